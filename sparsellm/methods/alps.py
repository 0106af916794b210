"""Masked reconstruction that may move the mask: ALPS's ADMM (Meng et al., NeurIPS 2024), warm-started at a
method's pruned weights, then the PCG refit (methods/refit.py) on the mask it settles on.

With H the linear's input Hessian and d its dense weights, find W with the target's zero count (or N:M pattern)
minimising sum over rows of (w_r - d_r)^T H (w_r - d_r). In the inputs' scale (b = w * s, s_j = sqrt(H_jj), so
the normalised Hessian G has a unit diagonal and |b| is Wanda's score) ADMM splits the problem into a dense B and
a sparse D held equal by a penalty rho and the dual U:
    B <- (b_dense G - U + rho D) (G + rho I)^-1      (one eigendecomposition of G serves every rho)
    D <- the largest |B + U / rho| the target allows   (the whole matrix's top k, or M - N in every M)
    U <- U + rho (B - D)
rho grows while the support still changes (by 1.3x, 1.2x, 1.1x as the change is large, small, a few weights);
the loop ends when the support stops moving or after `iterations`. The mask is that of the last D; the PCG refit
then solves its kept weights. That result is kept only if the whole matrix's calibration error is below the
fixed-mask refit's (`--refit pcg` on the method's mask), else that one is: the zero count stays exact either way,
and the error is never above what `--refit pcg` gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import precision
from ..core.errors import UserError
from .base import Target
from .refit import Refit, row_error


@dataclass(frozen=True)
class Alps:
    """At most `iterations` ADMM steps from penalty `rho` (in G's unit-diagonal scale), then `refit`."""

    iterations: int = 30
    rho: float = 0.1
    damping: float = 0.01
    refit: Refit = field(default_factory=Refit)

    def __post_init__(self):
        if not (isinstance(self.iterations, int) and self.iterations > 0):
            raise UserError(f"ALPS iterations must be a positive integer; got {self.iterations}")
        if not (0.0 < self.rho < 1e6):  # also refuses NaN
            raise UserError(f"ALPS's initial rho must be in (0, 1e6); got {self.rho}")
        if not (0.0 <= self.damping < 1e3):
            raise UserError(f"ALPS's damping must be in [0, 1000); got {self.damping}")

    def __call__(
        self, dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, target: Target
    ) -> torch.Tensor:
        H = hessian.float()
        d = dense.float()
        kept = int((pruned != 0).sum())
        moved = self.refit(d, self.search(d, pruned.float(), H, target, kept), H)
        plain = self.refit(d, pruned, H)
        if row_error(d, moved, H).sum() < row_error(d, plain.float(), H).sum():
            return moved.to(pruned.dtype)
        return plain

    def search(self, d: torch.Tensor, w0: torch.Tensor, H: torch.Tensor, target: Target, kept: int) -> torch.Tensor:
        """ADMM from the method's weights `w0`: the projected weights of its last step (zeros where it pruned)."""
        s = H.diagonal().clamp_min(1e-12).sqrt()
        G = H / s.unsqueeze(0) / s.unsqueeze(1)
        G.diagonal().add_(self.damping)  # G's mean diagonal is 1: SparseGPT's relative damping
        lam, Q = torch.linalg.eigh(G)
        Q_low, Qt_low = precision.low(Q), precision.low(Q.T)  # the iterations' products in the run's precision
        rhs = (d * s) @ G
        D = w0 * s
        U = torch.zeros_like(D)  # the dual, unscaled: it keeps its meaning when rho changes
        support, rho = D != 0, self.rho
        for step in range(1, self.iterations + 1):
            eigen = (precision.low(rhs - U + rho * D) @ Q_low).float() / (lam + rho)
            B = (precision.low(eigen) @ Qt_low).float()
            D = project(B + U / rho, target, kept)
            U += rho * (B - D)
            if step % 3 == 0:
                now = D != 0
                change = int((now != support).sum()) / max(kept, 1)
                support = now
                if change == 0:
                    break
                rho *= 1.3 if change > 0.1 else 1.2 if change > 0.005 else 1.1
        return D / s


def project(x: torch.Tensor, target: Target, kept: int) -> torch.Tensor:
    """`x` with all but its largest magnitudes zeroed: `kept` over the whole matrix, or M - N in every M inputs."""
    if target.is_nm:
        groups = x.reshape(-1, target.m)
        drop = groups.abs().topk(target.n, dim=1, largest=False).indices
        return groups.scatter(1, drop, 0.0).reshape(x.shape)
    keep = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    keep[x.abs().flatten().topk(kept, sorted=False).indices] = True
    return x * keep.view(x.shape)
