"""Input statistics of linears, accumulated by forward hooks over token chunks.

Statistics are plain fp32 sums plus a token count, so they add across chunks (and across processes).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from . import parallel


def _blocks(k: int, block: int):
    for i in range(0, k, block):
        yield i, min(i + block, k)


def xtx(a: torch.Tensor, block: int = 384) -> torch.Tensor:
    """A^T A for A [N, k], exactly symmetric: only the blocks on and above the diagonal are multiplied, the
    rest mirrored (~2/3 of a full product's work at k = 1536, ~4/5 at 576)."""
    k = a.shape[1]
    out = torch.empty(k, k, dtype=a.dtype, device=a.device)
    for i, j in _blocks(k, block):
        out[i:j, i:] = a[:, i:j].T @ a[:, i:]
    return mirror_upper(out, block)


def add_xtx_upper(acc: torch.Tensor, a: torch.Tensor, block: int = 384) -> None:
    """acc += A^T A on and above the diagonal blocks only, for sums over many chunks of rows: `mirror_upper`
    completes the sum once (mirroring every chunk's product made a 16-chunk sum ~15% slower than one product)."""
    for i, j in _blocks(a.shape[1], block):
        acc[i:j, i:].addmm_(a[:, i:j].T, a[:, i:])


def mirror_upper(out: torch.Tensor, block: int = 384) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks with the transpose of those above (in place)."""
    for i, j in _blocks(out.shape[0], block):
        out[j:, i:j] = out[i:j, j:].T
    return out


class InputStats:
    """Running X^T X (kind "hessian") or column sums of squares (kind "sqnorm") of a linear's input."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        part = xtx(x) if self.kind == "hessian" else (x * x).sum(0)
        self.sum = part if self.sum is None else self.sum.add_(part)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        """X^T X / N (or the per-column mean square), over the tokens of every rank."""
        (tokens,) = parallel.all_sum_floats(self.tokens)
        return parallel.all_sum(self.sum) / tokens


@contextmanager
def recording(modules: dict[str, nn.Module], kind: str):
    """Within the block, every forward of each module adds its input to `stats[name]`."""
    stats = {name: InputStats(kind) for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, module in modules.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
