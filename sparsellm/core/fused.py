"""Elementwise hot loops fused by `torch.compile`, with the same function run eagerly where it cannot compile.

Eager PyTorch runs each elementwise op as its own pass over memory; SparseLLM's z/s-steps are ~60 of them per
element, and `torch.compile` fuses them into one loop (4x faster on SmolLM2's shapes). The first
call compiles (C++ through the system compiler: ~10 s on a cold cache, ~3 s once the cache in the temporary folder
is warm); with no compiler, or with `TORCH_COMPILE_DISABLE=1`, the function runs eagerly, with the same math.
Compiled with dynamic shapes, so one kernel serves every chunk and model width; scalars are passed as 0-d tensors,
because a Python float would be compiled in as a constant and each new value would recompile.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger("sparsellm")


class fused:  # noqa: N801 (used as a function decorator)
    """`fn` compiled on first use; if compiling fails, `fn` itself from then on (one warning, and `eager` is set)."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compiled: Callable | None = None
        self.eager = False

    def __call__(self, *args, **kwargs):
        if not self.eager:
            try:
                self.compiled = self.compiled or torch.compile(self.fn, dynamic=True)
                return self.compiled(*args, **kwargs)
            except Exception as e:  # no C++ compiler, an unsupported platform: the same function, eagerly
                self.eager = True
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("torch.compile unavailable for %s (%s); running it eagerly (slower)", self.__name__, reason)
        return self.fn(*args, **kwargs)
