"""The arithmetic of the matrix work: bf16 products summed in fp32 where the hardware runs bf16 faster, else fp32.

Under bf16 the decoder layers' forward passes run in torch.autocast, and SparseLLM's cross products and linears
on its auxiliaries multiply bf16 copies of their operands chunk by chunk, each chunk's product added into an fp32
sum (core/linalg.py). What never changes: the weights (the model's own dtype, read and written by the solvers),
the Hessians and Grams (fp32 products: they must stay positive semi-definite), every solve (Cholesky, damping,
SparseGPT's column loop, SparseLLM's normal equations and p-step operators), the elementwise steps and every sum.

A bf16 x bf16 product on the CPU returns bf16 (torch has no fp32-output bf16 matmul there): each chunk's product
is rounded once to 8 mantissa bits, and the fp32 sum of many chunks averages those roundings down.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

CHOICES = ("auto", "bf16", "fp32")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of native bf16 dot products (oneDNN uses them)


@dataclass(frozen=True)
class Precision:
    """`name` is "bf16" or "fp32"; `reason` says why it was chosen (recorded in report.json)."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


FP32 = Precision("fp32", "default")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def check(request: str) -> None:
    if request not in CHOICES:
        raise UserError(f"unknown --precision '{request}'; choose from: {', '.join(CHOICES)}")


def resolve(request: str, device: torch.device) -> Precision:
    """The precision to run: `request` itself, or for "auto" bf16 exactly where the hardware has bf16 products."""
    check(request)
    if request != "auto":
        return Precision(request, "requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: the GPU supports bf16")
        return Precision("fp32", "auto: the GPU has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto: no bf16 rule for device type {device.type}")
    found = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
    if not found:
        return Precision("fp32", f"auto: the CPU has none of {', '.join(CPU_BF16_FLAGS)}")
    if not torch.backends.mkldnn.is_available():
        return Precision("fp32", f"auto: the CPU has {', '.join(found)} but this torch has no oneDNN")
    return Precision("bf16", f"auto: the CPU has {', '.join(found)}")


_current = FP32


def current() -> Precision:
    return _current


@contextlib.contextmanager
def using(p: Precision):
    """Within the block, `forward` and the products below follow `p`."""
    global _current
    before, _current = _current, p
    try:
        yield
    finally:
        _current = before


def forward(device: torch.device):
    """Context for a model's forward pass: autocast to bf16 under bf16, nothing under fp32.

    The cast-weight cache is off: weights are pruned in place between passes, and a cached bf16 copy would be stale.
    """
    if _current.name != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def low(t: torch.Tensor) -> torch.Tensor:
    """`t` in the products' dtype."""
    return t.to(_current.dtype)
