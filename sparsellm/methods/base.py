"""The method interface and the exact, deterministic mask helpers every method shares.

A method prunes one weight matrix W [out, in] given a statistic of its input (the Hessian X X^T / N, the
column mean squares, or nothing). Masks are `True` where a weight is zeroed. Ties are broken by a stable
sort (lower input index pruned first), so dequantised checkpoints, whose weights sit on a 4-bit grid and
tie often, give the same mask on every run and the count is always exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..core.errors import UserError
from ..core.memory import Alloc, in_ram
from ..core.types import MLP


@dataclass(frozen=True)
class Target:
    """Unstructured: `sparsity` of each matrix zeroed. N:M: `n` of every `m` consecutive inputs zeroed."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m or self.n:
            if not (0 < self.n < self.m):
                raise UserError(f"N:M needs 0 < N < M (N of every M weights are zeroed); got {self.n}:{self.m}")
        elif not (0.0 <= self.sparsity < 1.0):  # also refuses NaN
            raise UserError(f"sparsity must be in [0, 1); got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def fraction(self) -> float:
        return self.n / self.m if self.is_nm else self.sparsity

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def prune_count(numel: int, fraction: float) -> int:
    """How many of `numel` weights a fraction zeroes: round half up, with float noise removed."""
    return int(round(numel * fraction, 6) + 0.5)


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest scores in each row (stable: ties go to the lower index).

    The same mask as the first k of a stable argsort, from a selection instead of a sort (3-4x faster):
    everything below the k-th value, then as many of the entries equal to it as are still needed, lowest
    index first.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < kth
    tie = scores == kth
    return below | (tie & (tie.cumsum(-1) <= k - below.sum(-1, keepdim=True)))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n smallest scores in every group of m consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"N:M with M={m} needs the input width to be a multiple of M; a matrix has {cols} inputs")
    return smallest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)
    if per_row:
        return smallest(scores, prune_count(scores.shape[1], target.sparsity))
    return smallest(scores.reshape(1, -1), prune_count(scores.numel(), target.sparsity)).reshape(scores.shape)


EVENT_KINDS = ("cholesky_damping_raised", "cholesky_in_fp64")


@dataclass(frozen=True)
class Event:
    """A numerical safeguard that fired. `kind` is counted in the report: "cholesky_damping_raised" (a factorisation
    failed and is retried with 10x damping) or "cholesky_in_fp64" (every fp32 damping failed: fp64 from then on)."""

    kind: str
    matrix: str
    detail: str

    def on(self, matrix: str) -> Event:
        """The same event, said of `matrix` (its place in the layer)."""
        return Event(self.kind, f"{matrix} {self.matrix}".strip(), self.detail)

    def __str__(self) -> str:
        return f"{self.matrix}: {self.detail}" if self.matrix else self.detail


class Pruned(NamedTuple):
    weight: torch.Tensor
    events: tuple[Event, ...] = ()


@dataclass
class MLPResult:
    """What a joint-MLP method did to one MLP: per-round curves for the report (objective, output_error,
    token_error, kept_round), the safeguards that fired, and optionally `outputs` ({linear: its output on the
    given inputs, [N, out], as the layer's forward pass computes it}), which the engine replays instead of
    recomputing the MLP."""

    rounds: dict
    events: list[Event] = field(default_factory=list)
    outputs: dict[nn.Linear, torch.Tensor] | None = None


@dataclass
class Method:
    """One pruning method. Subclasses set `name` and `statistic` and implement `prune`.

    `joint_mlp` methods (SparseLLM) also implement `prune_mlp(mlp, x, target, alloc) -> MLPResult`: the engine
    hands them the whole MLP and its inputs x [N, d] (taken after the layer's attention was pruned, or before it
    when their `dense_attention_input` is set), and the allocator of their per-token tensors (RAM, or a file
    beyond the memory budget).
    """

    name: ClassVar[str] = ""
    statistic: ClassVar[str | None] = None  # "hessian", "sqnorm" or None
    joint_mlp: ClassVar[bool] = False
    dense_attention_input: ClassVar[bool] = False
    # Each allocation rule's spread (OWL's lambda, DLP's alpha) when none is given, as held-out text chose it for
    # this method; a rule not listed takes Allocation's (OWL's published 0.08).
    spreads: ClassVar[dict[str, float]] = {}

    def prune(self, weight: torch.Tensor, stat: torch.Tensor | None, target: Target) -> Pruned:
        raise NotImplementedError

    def prune_mlp(self, mlp: MLP, x: torch.Tensor, target: Target, alloc: Alloc = in_ram) -> MLPResult:
        raise NotImplementedError(f"{self.name} prunes linears one at a time, not an MLP jointly")
