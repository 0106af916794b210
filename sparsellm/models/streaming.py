"""Models larger than memory: weights read one decoder layer at a time from the safetensors files, and
pruned layers written out as they finish.

The model is built with its parameters on the meta device (no memory; buffers such as rotary tables are
real). The modules outside the decoder layers (embeddings, final norm, head) are loaded once; each decoder
layer is loaded when the engine reaches it and dropped back to meta when it is done, after its tensors were
written to their own shard of the output folder. Peak memory is then those outer modules, one layer, and the
activations, whatever the number of layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.errors import UserError, reading
from ..core.types import LayerIO
from . import compressed
from .adapters import Adapter, adapter_for


class SafetensorsWeights:
    """Where each tensor of a Hugging Face folder lives: model.safetensors, or the shards its index names; the
    files dense or compressed (models/compressed.py, decoded as they are read)."""

    def __init__(self, folder: Path):
        sparse = compressed.is_compressed(folder)
        stored = compressed.sparse_name if sparse else str
        index = folder / (compressed.SPARSE_INDEX if sparse else compressed.DENSE_INDEX)
        self.entries: dict[str, dict] = {}  # the encoding of each tensor of a compressed folder
        if index.is_file():
            with reading(f"the index {index}"):
                weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / stored(f) for name, f in weight_map.items()}
        elif (single := folder / stored("model.safetensors")).is_file():
            self.files = dict.fromkeys(self._names(single), single)
        else:
            raise UserError(f"{folder} has no safetensors weights (model.safetensors, shards, or compressed ones)")
        if sparse:
            for file in sorted(set(self.files.values())):
                self._names(file)

    def _names(self, file: Path) -> list[str]:
        """The tensors a file holds (recording their encodings if it is compressed)."""
        with reading(f"the safetensors file {file}"), safe_open(file, "pt") as f:
            table = compressed.entries(f)
            if table is None:
                return list(f.keys())
        self.entries.update(table)
        return list(table)

    def check_against(self, expected: dict[str, torch.Tensor], optional: set[str]) -> None:
        """Refuse files that lack a tensor of the model, hold one it does not have, or one of another shape
        (read from the files' headers only), before any layer is pruned."""
        missing = sorted(k for k in expected if k not in self.files and k not in optional)
        unexpected = sorted(k for k in self.files if k not in expected)
        for names, what in ((missing, "lack"), (unexpected, "hold unexpected")):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                raise UserError(f"the model's safetensors files {what} tensors ({', '.join(names[:3])}{more})")
        by_file: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with reading(f"the safetensors file {file}"), safe_open(file, "pt") as f:
                for name in names:
                    entry = self.entries.get(name, {})
                    shape = tuple(entry["shape"] if "shape" in entry else f.get_slice(name).get_shape())
                    if shape != tuple(expected[name].shape):
                        raise UserError(f"{file.name}: {name} has shape {shape}, the model's config says "
                                        f"{tuple(expected[name].shape)}")  # fmt: skip

    def load(self, names: list[str], dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors `names` on `device`, in `dtype` (None: as stored)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise UserError(f"tensor {name} is missing from the model's safetensors files")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            table = {key: self.entries.get(key) or {"encoding": "dense"} for key in keys}
            with reading(f"the safetensors file {file}"), safe_open(file, "pt") as f:
                stored = {part: f.get_tensor(part) for key in keys for part in compressed.part_names(key, table[key])}
                tensors = compressed.decode_all(stored, table)
            out.update({key: t.to(device=device, dtype=dtype or t.dtype) for key, t in tensors.items()})
        return out


def layer_prefixes(model: nn.Module, adapter: Adapter) -> list[str]:
    """The state-dict prefix of every decoder layer, e.g. "model.layers.3."."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(layer)] + "." for layer in adapter.decoder_layers(model)]


class StreamedLayers(LayerIO):
    """The engine's layer hooks for a meta-device model: load a layer on `enter`, write (if `out` is given)
    and drop it on `leave`."""

    def __init__(self, model: nn.Module, adapter: Adapter, weights: SafetensorsWeights, out: Path | None = None):
        self.model, self.adapter, self.weights, self.out = model, adapter, weights, out
        self.prefixes = layer_prefixes(model, adapter)
        self.param = next(p for p in model.parameters() if not p.is_meta)  # dtype and device to load into
        self.weight_map: dict[str, str] = {}

    def enter(self, i: int, layer: nn.Module) -> None:
        names = [self.prefixes[i] + k for k in layer.state_dict()]
        tensors = self.weights.load(names, self.param.dtype, self.param.device)
        with reading(f"decoder layer {i} of the model's safetensors files"):  # e.g. a tensor of the wrong shape
            layer.load_state_dict({k[len(self.prefixes[i]) :]: v for k, v in tensors.items()}, assign=True)

    def leave(self, i: int, layer: nn.Module) -> None:
        if self.out is not None:
            shard = f"layer-{i:05d}.safetensors"
            tensors = {self.prefixes[i] + k: v.contiguous() for k, v in layer.state_dict().items()}
            save_file(tensors, self.out / shard, metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(tensors, shard))
        layer.to("meta")

    def release(self, i: int, layer: nn.Module) -> None:
        layer.to("meta")

    def finish(self) -> None:
        """Write the modules outside the layers and the shard index: the folder is then a complete model."""
        layers = tuple(self.prefixes)
        outer = {k: v.contiguous() for k, v in self.model.state_dict().items() if not k.startswith(layers)}
        if getattr(self.model.config, "tie_word_embeddings", False):
            outer = {k: v for k, v in outer.items() if k != "lm_head.weight"}
        save_file(outer, self.out / "outer.safetensors", metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(outer, "outer.safetensors"))
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def load_streamed(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, SafetensorsWeights]:
    """The model of `folder` with only its outer modules loaded; the decoder layers stay on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with init_empty_weights(include_buffers=False), no_init_weights():  # nothing to initialise: all is read
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = SafetensorsWeights(folder)
    tied = getattr(config, "tie_word_embeddings", False)
    weights.check_against(model.state_dict(), optional={"lm_head.weight"} if tied else set())
    layers = tuple(layer_prefixes(model, adapter_for(model)))
    outer = [k for k in model.state_dict() if not k.startswith(layers)]
    if tied:
        outer = [k for k in outer if k != "lm_head.weight" or k in weights.files]
    model.load_state_dict(weights.load(outer, dtype, device), strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():  # buffers (rotary tables) were built real, on the CPU
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)
    model.eval()
    model.config.use_cache = False
    return model, weights


def load_whole(folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The whole model of `folder` through the same reader (how a compressed folder loads): its outer modules,
    then every decoder layer's tensors in one read, so that decoding keeps every core busy."""
    model, weights = load_streamed(folder, dtype, device)
    layers = layer_prefixes(model, adapter_for(model))
    tensors = weights.load([k for k in model.state_dict() if k.startswith(tuple(layers))], dtype, device)
    with reading(f"the decoder layers of {folder}"):
        model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise UserError(f"{folder}: its files lack {missing[0]} (and {len(missing) - 1} more)")
    return model
