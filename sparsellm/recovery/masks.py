"""The zeros of the pruned linears, held exactly while their kept weights train.

Each step the gradients of the zeros are set to zero before clipping (so the norm is the kept weights' own), which
leaves AdamW's moments there at zero and its update there at zero; the weights are multiplied by their masks after
the step all the same, so no optimizer detail (weight decay, eps) can move a zero. `check` proves it: every weight
that was zero when training started is zero at the end, and the patterns' hashes equal the pruned folder's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.files import mask_sha256


class Masks:
    """Boolean keep-masks of named linears (`name -> nn.Linear`), taken from their zeros now."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.keep = {name: lin.weight.detach().ne(0) for name, lin in linears.items()}

    def hashes(self) -> dict[str, str]:
        return {name: mask_sha256(lin.weight) for name, lin in self.linears.items()}

    def mask_grads(self) -> None:
        for name, lin in self.linears.items():
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(self.keep[name])

    @torch.no_grad()
    def apply(self) -> None:
        for name, lin in self.linears.items():
            lin.weight.mul_(self.keep[name])

    def check(self) -> None:
        """Raise if any weight that was zero is not (a bug, never a user error: nothing is written)."""
        for name, lin in self.linears.items():
            moved = int(lin.weight.detach().ne(0).logical_and(~self.keep[name]).sum())
            if moved:
                raise RuntimeError(f"{name}: {moved} pruned weights became non-zero during recovery")
