"""The products statistics are made of: Grams (always fp32 products) and cross products and linears in the
current precision (core/precision.py): under bf16, bf16 copies of each chunk of CHUNK_ROWS tokens are multiplied
and the chunk's product added into an fp32 sum.
"""

from __future__ import annotations

import torch

from . import precision

CHUNK_ROWS = 1024  # tokens per bf16 cross product: each chunk's product is rounded once, their sum is fp32


def _row_chunks(*tensors: torch.Tensor):
    """The tensors' rows in chunks of CHUNK_ROWS under bf16, whole under fp32 (one product, no rounding to spread)."""
    size = CHUNK_ROWS if precision.current().name == "bf16" else max(tensors[0].shape[0], 1)
    return zip(*(t.split(size) for t in tensors), strict=True)


def _blocks(k: int, block: int):
    for i in range(0, k, block):
        yield i, min(i + block, k)


def add_gram_upper(acc: torch.Tensor, a: torch.Tensor, block: int = 384) -> None:
    """acc += A^T A (acc fp32, A [N, k]) on and above the diagonal blocks only (~2/3 of a full product's work at
    k = 1536): `mirror_upper` completes a sum of many chunks once.

    Always fp32 products, whatever the precision: a bf16 product is rounded entrywise, and on SmolLM2 those
    roundings made o_proj's Hessians indefinite (Cholesky failed at SparseGPT's 1% damping in 5 of 30 layers),
    where the fp32 Gram of the same (bf16) inputs is positive semi-definite by construction.
    """
    a = a.float()
    for i, j in _blocks(a.shape[1], block):
        acc[i:j, i:].addmm_(a[:, i:j].T, a[:, i:])


def mirror_upper(out: torch.Tensor, block: int = 384) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks with the transpose of those above (in place)."""
    for i, j in _blocks(out.shape[0], block):
        out[j:, i:j] = out[i:j, j:].T
    return out


def gram(a: torch.Tensor) -> torch.Tensor:
    """A^T A in fp32 for A [N, k], exactly symmetric."""
    acc = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float32, device=a.device)
    add_gram_upper(acc, a)
    return mirror_upper(acc)


def add_cross(acc: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """acc += T^T A (acc fp32 [m, k]; T [N, m], A [N, k]); returns acc."""
    for t_rows, a_rows in _row_chunks(t, a):
        t_low, a_low = precision.low(t_rows), precision.low(a_rows)
        if t_low.dtype == acc.dtype:
            acc.addmm_(t_low.T, a_low)
        else:
            acc += t_low.T @ a_low
    return acc


def cross(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """T^T A in fp32."""
    return add_cross(torch.zeros(t.shape[1], a.shape[1], dtype=torch.float32, device=a.device), t, a)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) in fp32, the product in the current precision (under bf16 each entry rounded once)."""
    x_low, w_low = precision.low(x), precision.low(w)
    out = x_low @ w_low.T
    if out.dtype != torch.float32:
        out = out.float()
    return out if bias is None else out.add_(bias)
