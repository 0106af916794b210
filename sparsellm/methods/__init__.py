"""Pruning methods behind one interface (`Method`), looked up by name."""

from __future__ import annotations

from ..core.errors import UserError
from .base import Method, Pruned, Target
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .sparsellm import SparseLLM
from .wanda import Wanda

METHODS: dict[str, type[Method]] = {m.name: m for m in (Magnitude, Wanda, SparseGPT, SparseLLM)}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "Pruned", "Target", "make_method"]
