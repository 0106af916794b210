"""Per-layer targets before any layer is pruned: the layers' scores (methods/allocation.py) from the dense model,
one decoder layer at a time with the engine's machinery (streamed layers are loaded and released unwritten)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.memory import Alloc
from ..core.types import LayerIO
from ..methods.allocation import Allocation, hill_alpha
from ..methods.base import Target
from ..models.adapters import Adapter, submodule
from ..models.layers import LayerInputs, run_layer
from .stats import recording


@torch.no_grad()
def layer_targets(
    model: nn.Module,
    adapter: Adapter,
    allocation: Allocation,
    target: Target,
    inputs: LayerInputs,
    layers: set[int],
    batch_size: int,
    alloc: Alloc,
    io: LayerIO,
) -> dict[int, Target]:
    """{layer: its target}, their mean weighted by the pruned parameters equal to `target`."""
    allocation.check(target)
    if allocation.rule == "uniform":
        return dict.fromkeys(layers, target)
    scores, sizes = _scores(model, adapter, allocation, inputs, layers, batch_size, alloc, io)
    order = sorted(scores)
    fractions = allocation.sparsities([scores[i] for i in order], [sizes[i] for i in order], target.sparsity)
    return {i: Target(sparsity=s) for i, s in zip(order, fractions, strict=True)}


def _scores(model, adapter, allocation, inputs, layers, batch_size, alloc, io) -> tuple[dict, dict]:
    """Each pruned layer's score (low: pruned less) and parameter count of its pruned linears."""
    decoder = adapter.decoder_layers(model)
    x = out = None
    if allocation.needs_data:
        x = alloc(tuple(inputs.hidden.shape), inputs.hidden.dtype, inputs.hidden.device)
        x.copy_(inputs.hidden)  # the pruning pass starts again from the layer-0 inputs
        out = alloc(tuple(x.shape), x.dtype, x.device)
    scores, sizes = {}, {}
    last = max(layers)
    for i in range(last + 1):
        layer = decoder[i]
        io.enter(i, layer)
        linears = adapter.linears(layer)
        if i in layers:
            sizes[i] = sum(linear.weight.numel() for linear in linears.values())
        if allocation.needs_data:
            first = {site.name: submodule(layer, site.linears[0]) for site in adapter.sites}
            with recording(first if i in layers else {}, "sqnorm") as stats:
                run_layer(layer, x, inputs.kwargs[i], batch_size, out=out)
            if i in layers:
                pairs = [(submodule(layer, p).weight, stats[site.name].mean()) for site in adapter.sites
                         for p in site.linears]  # fmt: skip
                scores[i] = allocation.data_score(pairs)
            x, out = out, x
        elif i in layers:
            scores[i] = sum(hill_alpha(linear.weight) for linear in linears.values()) / len(linears)
        io.release(i, layer)
    return scores, sizes
