"""Run a model one decoder layer at a time.

`capture` runs the embeddings once and records the inputs of decoder layer 0 together with the exact
keyword arguments the model passes to *every* layer (attention mask, position ids, rotary cos/sin).
Gemma 3 gives sliding and full attention layers different masks and rotary tables, so each layer's own
kwargs are recorded; no layer is ever asked to compute them itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core import precision
from ..core.memory import Alloc, Sink, in_ram
from .adapters import Adapter


class StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of a forward pass is skipped."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records what it is given and passes the hidden states through."""

    def __init__(self, index: int, last: bool, sink: Sink, kwargs: list[dict], layer: nn.Module):
        super().__init__()
        self.index, self.last, self.sink, self.kwargs = index, last, sink, kwargs
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.write(hidden_states.detach())  # in the model's dtype
        if len(self.kwargs) == self.index:
            self.kwargs.append(_static_kwargs(kwargs))
        if self.last:
            raise StopForward
        return hidden_states


def _static_kwargs(kwargs: dict) -> dict:
    drop = {"cache", "past_key_value", "past_key_values", "use_cache", "output_attentions", "cache_position"}
    return {k: v for k, v in kwargs.items() if k not in drop}


@dataclass
class LayerInputs:
    """Hidden states entering layer 0, [n, seqlen, d], and the kwargs of each layer's call."""

    hidden: torch.Tensor
    kwargs: list[dict]


@torch.no_grad()
def capture(
    model: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int, alloc: Alloc = in_ram
) -> LayerInputs:
    """Inputs of layer 0 for every row of `tokens` [n, seqlen], in a tensor made by `alloc`.

    The kwargs are recorded from a batch of one sample, so they broadcast over any batch size.
    """
    layers = adapter.decoder_layers(model)
    device = next(p for p in model.parameters() if not p.is_meta).device
    sink = Sink(tokens.shape[0], alloc)
    kwargs: list[dict] = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(i, i == len(originals) - 1, sink, kwargs, layer)
    try:
        starts = [0, *range(1, tokens.shape[0], batch_size)]
        for start, end in zip(starts, [*starts[1:], tokens.shape[0]], strict=False):
            with contextlib.suppress(StopForward), precision.forward(device):
                model(input_ids=tokens[start:end].to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(sink.tensor, kwargs)


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer's output hidden states, its matrix products in the current precision."""
    with precision.forward(hidden.device):
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer applied to every sample of `hidden`, batch by batch (written into `out` if given)."""
    out = torch.empty_like(hidden) if out is None else out
    for start in range(0, hidden.shape[0], batch_size):
        out[start : start + batch_size] = call_layer(layer, hidden[start : start + batch_size], kwargs)
    return out
