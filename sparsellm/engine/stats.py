"""Input statistics of linears, accumulated by forward hooks over token chunks.

Statistics are plain fp32 sums plus a token count, so they add across chunks (and across processes).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core import parallel
from ..core.linalg import add_gram_upper, mirror_upper

_SQNORM_ROWS = 256


class InputStats:
    """Running X^T X (kind "hessian") or column sums of squares (kind "sqnorm") of a linear's input."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.sum is None:
            k = x.shape[1]
            self.sum = torch.zeros((k, k) if self.kind == "hessian" else (k,), dtype=torch.float32, device=x.device)
        if self.kind == "hessian":
            add_gram_upper(self.sum, x)
        else:
            for rows in x.split(_SQNORM_ROWS):  # an fp32 copy of a few rows stays in cache: 4x faster than one copy
                self.sum += rows.to(torch.float32, copy=True).square_().sum(0)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        """X^T X / N (or the per-column mean square), over the tokens of every rank."""
        (tokens,) = parallel.all_sum_floats(self.tokens)
        total = mirror_upper(self.sum.clone()) if self.kind == "hessian" else self.sum
        return parallel.all_sum(total) / tokens


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
