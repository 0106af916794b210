"""Resume a killed run: the pruned layers' weights and the next layer's inputs, saved as the engine goes.

The sequential engine's whole state after layer i is (pruned weights of layers <= i, inputs of layer i+1,
the logs so far): everything else is recomputed from the model and the calibration tokens, which are
deterministic. Each layer's linears go to their own safetensors file, then `state.pt` is replaced
atomically (write a temporary file, then rename), so a kill at any instant leaves the last complete state.
The state is written after a layer only once `every` seconds have passed since the last write (0: after every
layer): the inputs are tokens x hidden floats (38 MB for SmolLM2 on the quick protocol, 4 GB for a 7B model on
128 x 2048 tokens), and a kill costs at most that much recomputation.
A fingerprint of the run's arguments guards against resuming with different ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import UserError
from ..core.files import sha256_file, write_atomic
from ..models.adapters import Adapter
from . import CHECKPOINT_EVERY


class Checkpoint:
    """One run's checkpoint folder; `fingerprint` (JSON-able) must match for a resume."""

    def __init__(self, folder: Path, fingerprint: dict, every: float = CHECKPOINT_EVERY):
        self.folder, self.fingerprint = Path(folder), json.loads(json.dumps(fingerprint))
        self.state_path = self.folder / "state.pt"
        self.every, self.written = every, time.monotonic()
        self.pending: list[tuple[int, nn.Module]] = []  # pruned layers done since the last write
        self.hashes: dict[str, str] = {}  # sha256 of every layer file written, checked on resume

    def exists(self) -> bool:
        return self.state_path.is_file()

    def save(
        self, index: int, layer: nn.Module, adapter: Adapter, pruned: bool, x_next: torch.Tensor, logs, last: bool
    ) -> None:
        """Record that decoder layer `index` is done and `x_next` are the inputs of the layer after it; write it
        (with the layers pruned since the last write) if `every` seconds have passed, or if it is the `last`."""
        if pruned:
            self.pending.append((index, layer))
        if not last and time.monotonic() - self.written < self.every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, done in self.pending:
            weights = {path: lin.weight.data.contiguous() for path, lin in adapter.linears(done).items()}
            path = self.folder / f"layer_{i:04d}.safetensors"
            write_atomic(path, lambda p, w=weights: save_file(w, p))
            self.hashes[path.name] = sha256_file(path)
        state = {"fingerprint": self.fingerprint, "done": index, "x": x_next, "logs": [asdict(g) for g in logs],
                 "files_sha256": dict(self.hashes)}  # fmt: skip
        write_atomic(self.state_path, lambda p: torch.save(state, p))
        self.pending, self.written = [], time.monotonic()

    def load(self, decoder: nn.ModuleList, adapter: Adapter) -> tuple[int, torch.Tensor, list[dict]]:
        """Restore the pruned layers into `decoder`; return (first layer still to do, its inputs, logs)."""
        try:
            state = torch.load(self.state_path, weights_only=True)
        except Exception as e:  # a foreign or damaged file: say so instead of a traceback
            raise UserError(f"cannot read the checkpoint {self.state_path} ({e}); delete {self.folder}") from e
        if state["fingerprint"] != self.fingerprint:
            differs = sorted(k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k])
            raise UserError(
                f"the checkpoint in {self.folder} is from a run with other arguments (differs in: "
                f"{', '.join(differs)}); repeat that run's arguments or delete the folder"
            )
        self.hashes = state.get("files_sha256", {})
        for log in state["logs"]:
            path = self.folder / f"layer_{log['index']:04d}.safetensors"
            if not path.is_file() or self.hashes.get(path.name) != sha256_file(path):
                raise UserError(f"the checkpoint file {path} is missing or was changed after it was written; "
                                f"delete {self.folder} and start over")  # fmt: skip
            saved = load_file(path)
            for path, lin in adapter.linears(decoder[log["index"]]).items():
                lin.weight.data.copy_(saved[path])
        return state["done"] + 1, state["x"], state["logs"]
