"""Files the tool writes and checks: content hashes (checkpoint, GGUF cache, report, `inspect`) and strict JSON."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path


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
