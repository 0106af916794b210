"""SparseGPT (Frantar & Alistarh 2023): prune column by column, updating the rest by the OBS rule.

Math in the paper's order: H = X X^T / N (fp32), dead inputs zeroed, damping 0.01 * mean(diag H),
U = upper Cholesky factor of (H + damp I)^-1. Columns are walked in blocks of 128; each block's mask is
chosen by w^2 / U_jj^2 (adaptive mask selection; N:M: per group of M when the column index is a multiple
of M); each pruned column's error is spread over the remaining columns of the block, and the block's
accumulated error over all later columns in one matmul (lazy batch updates).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core.errors import UserError
from .base import Event, Method, Pruned, Target, prune_count, smallest

log = logging.getLogger("sparsellm")

MAX_DAMPING_STEPS = 6


def with_damping(hessian: torch.Tensor, percdamp: float, factor) -> tuple[torch.Tensor, list[Event]]:
    """factor(H + damp I) with damp = percdamp * mean(diag H), raised 10x whenever factor returns None, then in fp64.

    Never falls back silently: every retry is returned as an event (logged, and counted in the report).
    """
    events: list[Event] = []
    base = percdamp * max(torch.diag(hessian).mean().item(), 1e-12)
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64:
            events.append(Event("cholesky_in_fp64", "", "fp32 failed at every damping: factorising in fp64"))
            log.warning(str(events[-1]))
        h = hessian.to(dtype)
        for step in range(MAX_DAMPING_STEPS):
            damp = base * 10**step
            damped = h.clone()
            damped.diagonal().add_(damp)  # = h + damp I, bit for bit, without two more passes over an n x n matrix
            result = factor(damped)
            if result is not None:
                return _cast(result, hessian.dtype), events
            detail = f"cholesky failed at damping {damp:.3g} ({dtype}); raising damping"
            events.append(Event("cholesky_damping_raised", "", detail))
            log.warning(detail)
    raise UserError("a Hessian stays singular after raising damping 1e5x and using fp64; check the calibration data")


def _cast(result, dtype: torch.dtype):
    return tuple(t.to(dtype) for t in result) if isinstance(result, tuple) else result.to(dtype)


def cholesky(h: torch.Tensor, upper: bool = False) -> torch.Tensor | None:
    """The Cholesky factor of h, or None if h is not (numerically) positive definite.

    Only the diagonal is checked for NaN/Inf: each row's sum of squares reaches its diagonal entry
    (L_ii^2 = h_ii - sum_k<i L_ik^2), so a non-finite entry anywhere shows there (the full check cost 4 ms at 1536).
    """
    chol, info = torch.linalg.cholesky_ex(h, upper=upper)
    return chol if info.item() == 0 and torch.isfinite(torch.diagonal(chol)).all() else None


def group_smallest(scores: torch.Tensor, n: int, later: torch.Tensor) -> torch.Tensor:
    """`smallest(scores.T, n).T` for one N:M group's scores [m, rows]: the n smallest of each column, ties to the
    lower index. Ranked by m x m comparisons (rank_j = #{k < j: s_k <= s_j} + #{k > j: s_k < s_j}; `later`[j, k, 0]
    is k < j), ~2x faster than a selection at m = 4: it runs once per group in the column loop."""
    a, b = scores.unsqueeze(1), scores.unsqueeze(0)
    return torch.where(later, b <= a, b < a).sum(1) < n


def upper_inverse(r: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """The inverse of an upper-triangular r, by halves: [[A, C], [0, B]]^-1 = [[A^-1, -A^-1 C B^-1], [0, B^-1]].
    Matrix products do the work (2n^3/3, where torch has no triangular inverse; a triangular solve against the
    identity costs n^3 and ran slower)."""
    n = r.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True)
    h = n // 2
    a_inv, b_inv = upper_inverse(r[:h, :h], leaf), upper_inverse(r[h:, h:], leaf)
    out = torch.zeros_like(r)
    out[:h, :h], out[h:, h:] = a_inv, b_inv
    out[:h, h:] = -(a_inv @ (r[:h, h:] @ b_inv))
    return out


def damped_factors(hessian: torch.Tensor, percdamp: float) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Event]]:
    """(U, R) with H + damp I = R R^T, R upper, and U = R^-1, so (H + damp I)^-1 = U^T U: U is the upper Cholesky
    factor of the inverse that SparseGPT uses. R is the Cholesky factor of H with its order reversed (J H J = L L^T,
    R = J L J): one factorisation and one triangular inverse, about 0.75x the time of the usual Cholesky, inverse and
    Cholesky again (Qwen2.5-1.5B's 8960-wide down-projection Hessian: 6.0-6.4 against 7.8-8.5 s on 2 cores), with
    half the residual max |U^T U (H + damp I) - I| there (5.5e-5 against 1.1e-4)."""

    def factors(h):
        r = cholesky(h.flip(0, 1))
        if r is None:
            return None
        r = r.flip(0, 1)  # rebound: the reversed factor's memory is freed before the inverse's
        u = upper_inverse(r)
        return (u, r) if torch.isfinite(u).all() else None

    return with_damping(hessian, percdamp, factors)


class Factor(NamedTuple):
    """What SparseGPT needs of a Hessian, computed once however many weights share it: U, the upper Cholesky factor
    of (H + damp I)^-1 with dead inputs (zero variance) given H_jj = 1, and which inputs are dead. With
    `solves`, also R, the upper-triangular factor of that H + damp I = R R^T, for solving with it (`solve`)."""

    U: torch.Tensor
    dead: torch.Tensor
    events: tuple[Event, ...]
    R: torch.Tensor | None = None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """B (H + damp I)^-1 for B [m, k], by two triangular solves with R: half the arithmetic of B U^T U."""
        half = torch.linalg.solve_triangular(self.R.T, b, upper=False, left=False)  # B R^-T
        return torch.linalg.solve_triangular(self.R, half, upper=True, left=False)  # B R^-T R^-1


def hessian_factor(hessian: torch.Tensor, percdamp: float, solves: bool = False) -> Factor:
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    (U, R), events = damped_factors(H, percdamp)
    return Factor(U, dead, tuple(events), R if solves else None)


@dataclass
class SparseGPT(Method):
    name = "sparsegpt"
    statistic = "hessian"
    # On the C4 validation windows at 70%, seeds 0-2: OWL's 0.2 beat 0.08, which did nothing here; DLP's 0.08 beat
    # 0.15 at every seed (0.2 was worse than uniform).
    spreads = {"owl": 0.2, "dlp": 0.08}
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        damp = self.percdamp
        if not (isinstance(damp, int | float) and not isinstance(damp, bool) and math.isfinite(damp) and damp > 0):
            raise UserError(f"--damping must be a finite positive number; got {damp}")

    def prune(self, weight: torch.Tensor, hessian: torch.Tensor, target: Target) -> Pruned:
        factor = hessian_factor(hessian, self.percdamp)
        return Pruned(self.prune_factored(weight, factor, target), factor.events)

    def prune_factored(self, weight: torch.Tensor, factor: Factor, target: Target) -> torch.Tensor:
        """The pruned weight, given its Hessian's factor (which weights with the same input share)."""
        W = weight.float().clone()
        W[:, factor.dead] = 0.0
        U = factor.U
        rows, cols = W.shape
        bs = max(target.m, self.blocksize - self.blocksize % target.m) if target.is_nm else self.blocksize
        # Lazy updates twice over: rank-1 updates stay within sub-blocks of 32 columns (a multiple of M), and
        # each sub-block's errors reach the rest of its block in one matmul (the same arithmetic, ~4x less
        # memory traffic in the column loop).
        sub = max(target.m, 32 - 32 % target.m) if target.is_nm else 32
        later = torch.ones(target.m, target.m, dtype=torch.bool, device=W.device).tril(-1).unsqueeze(-1)  # N:M only
        # Walk the columns of W as the rows of W^T: each update of the column loop then touches contiguous
        # memory (about 3x faster than strided columns for tall matrices); the arithmetic is the same.
        Wt = W.T.contiguous()
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            Ublock = U[i1:i2, i1:i2]
            d = torch.diag(Ublock)
            d2 = d[:, None] ** 2
            W1t = Wt[i1:i2].clone()
            Err1t = torch.zeros_like(W1t)
            if target.is_nm:
                mask1t = torch.zeros_like(W1t, dtype=torch.bool)
            else:
                # Per-block counts from cumulative totals, so the whole matrix prunes exactly round(s * numel).
                k = prune_count(rows * i2, target.sparsity) - prune_count(rows * i1, target.sparsity)
                mask1t = smallest((W1t.T**2 / d**2).reshape(1, -1), k).reshape(rows, i2 - i1).T
            # err = (w - q) / d is w / d where pruned and 0 where kept: one multiply by this per column.
            scale = mask1t / d[:, None]
            for j1 in range(0, i2 - i1, sub):
                j2 = min(j1 + sub, i2 - i1)
                for i in range(j1, j2):
                    if target.is_nm and i % target.m == 0:
                        group = slice(i, i + target.m)
                        mask1t[group] = group_smallest(W1t[group].square().div_(d2[group]), target.n, later)
                        torch.div(mask1t[group], d[group, None], out=scale[group])
                    err = torch.mul(W1t[i], scale[i], out=Err1t[i])
                    # Row i's own update turns its pruned weights into ~0 and leaves the kept ones as they are.
                    W1t[i:j2].addr_(Ublock[i, i:j2], err, alpha=-1.0)
                W1t[j2:].addmm_(Ublock[j1:j2, j2:].T, Err1t[j1:j2], alpha=-1.0)
            Wt[i1:i2] = W1t.masked_fill_(mask1t, 0.0)
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1t, alpha=-1.0)
        return Wt.T.to(weight.dtype)
