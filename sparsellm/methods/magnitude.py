"""Magnitude pruning: zero the smallest |W| of each matrix (N:M: of each group). Needs no data."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, Pruned, mask_from_scores


@dataclass
class Magnitude(Method):
    name = "magnitude"
    statistic = None

    def prune(self, weight, stat, target):
        mask = mask_from_scores(weight.abs(), target, per_row=False)
        return Pruned(weight.masked_fill(mask, 0.0))
