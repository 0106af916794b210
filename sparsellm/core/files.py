"""Files the tool writes and checks: content hashes (checkpoint, GGUF cache, report, `inspect`) and strict JSON."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _finite(value):
    """`value` with every NaN or infinity replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value) -> str:
    """JSON any strict parser reads: non-finite numbers become null instead of bare NaN/Infinity literals."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


def mask_sha256(weight: torch.Tensor) -> str:
    """The sha256 of a matrix's sparsity pattern (one bit a weight, set where it is not zero; -0.0 is zero), so
    two folders' masks compare without their values."""
    bits = np.packbits(weight.detach().ne(0).cpu().numpy().reshape(-1))
    return hashlib.sha256(f"{tuple(weight.shape)}".encode() + bits.tobytes()).hexdigest()


def state_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of named tensors' bytes, in name order: a model's weights, to tell whether they changed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary path)`, then rename it to `path`: a reader finds the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:  # a full disk or a kill between the bytes: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
