"""Resume a killed recovery: the training state after a step, written atomically and checked before it is used.

Each save writes `recovery_step_NNNNNN.pt` (to a temporary name, then renamed), then `recovery.json` naming it
with its sha256 and the run's fingerprint (the same way), then deletes the older step file: a kill at any instant
leaves `recovery.json` naming a complete file. A state is written once `every` seconds have passed since the last
(0: after every step) and after the last step. The data order is fixed by the seed, so the step count, weights,
optimizer and schedule are the whole state: a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.files import sha256_file, write_atomic

INDEX = "recovery.json"


class TrainingCheckpoint:
    def __init__(self, folder: Path, fingerprint: dict, every: float):
        self.folder, self.fingerprint = Path(folder), json.loads(json.dumps(fingerprint))
        self.every, self.written = every, time.monotonic()

    def exists(self) -> bool:
        return (self.folder / INDEX).is_file()

    def save(self, step: int, state: Callable[[], dict], last: bool) -> None:
        """After `step` steps: write `state()` if `every` seconds have passed, or if this is the `last` step."""
        if not last and time.monotonic() - self.written < self.every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"recovery_step_{step:06d}.pt"
        write_atomic(path, lambda p: torch.save({"step": step, **state()}, p))
        index = {"fingerprint": self.fingerprint, "file": path.name, "sha256": sha256_file(path)}
        write_atomic(self.folder / INDEX, lambda p: p.write_text(json.dumps(index)))
        for old in self.folder.glob("recovery_step_*.pt"):
            if old != path:
                old.unlink()
        self.written = time.monotonic()

    def load(self) -> dict:
        """The saved state, after checking it belongs to this run and is the file that was written."""
        try:
            index = json.loads((self.folder / INDEX).read_text())
            path = self.folder / index["file"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the checkpoint {self.folder / INDEX} ({e}); delete {self.folder}") from e
        if index.get("fingerprint") != self.fingerprint:
            differs = sorted(k for k in self.fingerprint if index["fingerprint"].get(k) != self.fingerprint[k])
            raise UserError(f"the checkpoint in {self.folder} is from a run with other arguments or inputs (differs "
                            f"in: {', '.join(differs)}); repeat that run's arguments or delete the folder")  # fmt: skip
        if not path.is_file() or sha256_file(path) != index.get("sha256"):
            raise UserError(f"the checkpoint file {path} is missing or was changed after it was written; delete "
                            f"{self.folder} and start over")  # fmt: skip
        return torch.load(path, weights_only=True)
