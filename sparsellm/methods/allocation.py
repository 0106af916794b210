"""Per-layer sparsities: how much of an unstructured target each decoder layer takes.

Every rule scores the layers, maps the scores linearly onto [target - spread, target + spread] (the lowest
score prunes least) and shifts the result so that the mean over the layers, weighted by their parameters, is
exactly the target. The measured sparsity over all pruned linears then equals the target up to each matrix's
rounding to whole weights.

- owl (Yin et al., ICML 2024): score = minus the layer's outlier fraction, the share of its weights whose Wanda
  score |W_ij| * ||X_j|| exceeds `owl_m` times the mean score over the layer: layers with many outliers keep
  more. `spread` is OWL's lambda. Needs the dense model's input norms of every linear (one calibration pass).
- dlp (Chen et al., ICML 2025): score = the median Wanda score |W_ij| * ||X_j|| over the layer's weights: a
  layer whose typical weight matters more is, by DLP's finding, the less important one and is pruned more.
  `spread` is DLP's alpha. Needs the same calibration pass as owl.
- alpha (AlphaPruning, Lu et al., NeurIPS 2024): score = the layer's mean heavy-tail exponent of the eigenvalue
  spectrum of W^T W (Hill estimator over its upper half): a heavier tail (lower alpha) marks a better-trained
  layer, which keeps more. Data-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import UserError
from .base import Target

RULES = ("uniform", "owl", "dlp", "alpha")


@dataclass(frozen=True)
class Allocation:
    rule: str = "uniform"
    spread: float = 0.08  # OWL's lambda: layer sparsities within target +- spread (each method has its default)
    owl_m: float = 5.0  # OWL's M: an outlier's score exceeds M times the layer's mean

    def __post_init__(self):
        if self.rule not in RULES:
            raise UserError(f"unknown allocation '{self.rule}'; choose from: {', '.join(RULES)}")
        if not (0.0 <= self.spread < 0.5):  # also refuses NaN
            raise UserError(f"the allocation's spread (--owl-lambda) must be in [0, 0.5); got {self.spread}")
        if not (self.owl_m > 0 and math.isfinite(self.owl_m)):
            raise UserError(f"--owl-m must be a positive number; got {self.owl_m}")

    def check(self, target: Target) -> None:
        if self.rule != "uniform" and target.is_nm:
            raise UserError("an N:M target is the same in every layer: --allocation applies to --sparsity targets only")

    @property
    def needs_data(self) -> bool:
        return self.rule in ("owl", "dlp")

    def data_score(self, linears: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """A layer's score (low: pruned less) from (weight, input mean square) of its linears, for a rule that
        `needs_data`."""
        return -outlier_fraction(linears, self.owl_m) if self.rule == "owl" else median_score(linears)

    def sparsities(self, scores: list[float], sizes: list[int], target: float) -> list[float]:
        """Each layer's sparsity from its score (low score: pruned less) and its parameter count."""
        if self.rule == "uniform" or len(scores) < 2 or max(scores) == min(scores):
            return [target] * len(scores)
        low, high = min(scores), max(scores)
        raw = [target + self.spread * (2 * (s - low) / (high - low) - 1) for s in scores]
        shift = target - sum(r * n for r, n in zip(raw, sizes, strict=True)) / sum(sizes)
        result = [r + shift for r in raw]
        if min(result) < 0 or max(result) >= 1:
            raise UserError(f"the allocation puts layers outside [0, 1) at target {target} with spread "
                            f"{self.spread}; lower the spread (--owl-lambda)")  # fmt: skip
        return result


def wanda_scores(linears: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """|W_ij| * ||X_j|| of each (weight, input mean square) pair, in fp32: what owl and dlp score a layer by."""
    return [w.float().abs() * sqnorm.float().sqrt().unsqueeze(0) for w, sqnorm in linears]


def outlier_fraction(linears: list[tuple[torch.Tensor, torch.Tensor]], m: float) -> float:
    """OWL's layer outlier ratio from (weight, input mean square) of each of a layer's linears: the share of the
    layer's Wanda scores above m times their mean over the whole layer (as OWL's code measures it)."""
    scores = wanda_scores(linears)
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def median_score(linears: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """DLP's layer score from (weight, input mean square) of each of a layer's linears: the median of the layer's
    Wanda scores, all its linears' together."""
    scores = torch.cat([s.flatten() for s in wanda_scores(linears)])
    k = (scores.numel() - 1) // 2  # the lower middle value, as torch.median gives it
    return float(np.partition(scores.cpu().numpy(), k)[k])  # numpy's selection: 2x torch.median's speed here


def hill_alpha(weight: torch.Tensor) -> float:
    """Heavy-tail exponent of the eigenvalues of W^T W, by the Hill estimator over the largest half."""
    eig = torch.linalg.svdvals(weight.double()).square().sort(descending=True).values
    k = max(1, eig.numel() // 2)
    logs = torch.log(eig[:k] / eig[k].clamp_min(1e-300))
    return 1.0 + k / max(float(logs.sum()), 1e-12)
