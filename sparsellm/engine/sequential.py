"""The SparseGPT-style sequential engine: prune decoder layers in order, each on the outputs of the last.

Per layer: (a) run it on its inputs with hooks on its linears to accumulate statistics, keeping the dense
outputs; (b) prune its linears; (c) run the pruned layer to produce the next layer's inputs, measuring
the relative reconstruction error against the dense outputs. Errors propagate, as in every peer.
With `true_sequential`, (a)-(b) repeat site by site (q,k,v -> o -> gate,up -> down), each site's inputs
recomputed after the sites before it were pruned. Joint-MLP methods (SparseLLM) get the attention sites
the same way and then the whole MLP at once (engine/joint_mlp.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import parallel
from ..core.errors import UserError
from ..core.memory import allocator
from ..core.types import LayerIO, Site
from ..methods.allocation import Allocation
from ..methods.alps import Alps
from ..methods.base import Event, Method, Target
from ..methods.refit import Refit
from ..models.adapters import Adapter, submodule
from ..models.layers import call_layer, capture, run_layer
from .allocate import layer_targets
from .checkpoint import Checkpoint
from .joint_mlp import JointMLP, replaying
from .stats import recording


@dataclass
class LayerLog:
    index: int
    target: float = 0.0  # the fraction of this layer's weights to zero (the allocation's, or the run's target)
    seconds: float = 0.0
    recon_error: float = 0.0  # ||Y_dense - Y_pruned||^2 / ||Y_dense||^2 of the layer's output
    events: list[Event] = field(default_factory=list)
    mlp: dict | None = None  # joint-MLP methods: objective per round, chosen round


@dataclass
class EngineOptions:
    batch_size: int = 8
    true_sequential: bool = False
    offload_dir: Path | None = None  # layer inputs/outputs memory-mapped from files here instead of RAM
    auxiliary_dir: Path | None = None  # a joint-MLP method's per-token tensors memory-mapped from files here
    refit: Refit | Alps | None = None  # re-solve each pruned linear on its Hessian (methods/refit.py, alps.py)
    allocation: Allocation = Allocation()  # per-layer targets (methods/allocation.py)


@torch.no_grad()
def prune_site_group(
    layer: nn.Module,
    sites: list[Site],
    method: Method,
    target: Target,
    x: torch.Tensor,
    kwargs: dict,
    opts: EngineOptions,
    dense_out: torch.Tensor | None = None,
) -> list[Event]:
    """Statistics of `sites` from one pass over the layer, then prune each of their linears."""
    first = {site.name: submodule(layer, site.linears[0]) for site in sites}
    kind = "hessian" if opts.refit is not None else method.statistic  # a refit needs the Hessian whatever the method
    # A data-free method (magnitude) hooks nothing but still runs the pass, for the dense outputs.
    with recording(first if kind else {}, kind or "") as stats:
        run_layer(layer, x, kwargs, opts.batch_size, out=dense_out)
    events: list[Event] = []
    for site in sites:
        recorded = stats[site.name].mean() if kind else None
        if recorded is not None and not torch.isfinite(recorded).all():
            raise UserError(f"the inputs of {site.name} hold NaN/Inf (the model or data is broken); nothing was saved")
        stat = recorded.diagonal().clone() if method.statistic == "sqnorm" and kind == "hessian" else recorded
        for path in site.linears:
            linear = submodule(layer, path)
            pruned = method.prune(linear.weight.data, stat if method.statistic else None, target)
            weight = pruned.weight
            if opts.refit is not None:
                weight = opts.refit(linear.weight.data, weight, recorded, target)
            linear.weight.data.copy_(weight)
            events += [e.on(path) for e in pruned.events]
    return events


@torch.no_grad()
def finish_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict, dense_out: torch.Tensor, batch_size: int) -> float:
    """Overwrite `dense_out` with the pruned layer's outputs; return the relative squared error (all ranks)."""
    err = norm = bad_dense = bad_out = 0.0
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        out = call_layer(layer, x[sl], kwargs)
        bad_dense += not torch.isfinite(dense_out[sl]).all()
        bad_out += not torch.isfinite(out).all()
        err += (out - dense_out[sl]).float().pow(2).sum().item()
        norm += dense_out[sl].float().pow(2).sum().item()
        dense_out[sl] = out
    err, norm, bad_dense, bad_out = parallel.all_sum_floats(err, norm, bad_dense, bad_out)  # stop together
    if bad_dense:
        raise UserError("the dense model gives NaN/Inf inside a layer on this calibration data; nothing was saved")
    if bad_out:
        raise UserError("a pruned layer produced NaN/Inf outputs; nothing was saved (try a lower sparsity)")
    return err / max(norm, 1e-30)


def prune_layer(
    layer: nn.Module,
    adapter: Adapter,
    method: Method,
    target: Target,
    x: torch.Tensor,
    kwargs: dict,
    out: torch.Tensor,
    opts: EngineOptions,
) -> LayerLog:
    """Prune one decoder layer in place; `out` receives its pruned outputs."""
    t0 = time.perf_counter()
    log = LayerLog(index=-1)
    sites = [s for s in adapter.sites if not (method.joint_mlp and s.part == "mlp")]
    groups = [[s] for s in sites] if opts.true_sequential else [sites]
    joint = None
    if method.joint_mlp:
        joint = JointMLP(layer, adapter, method, x, kwargs, opts.batch_size, allocator(opts.auxiliary_dir))
    for i, group in enumerate(groups):
        log.events += prune_site_group(layer, group, method, target, x, kwargs, opts, dense_out=out if i == 0 else None)
    replay = {}
    if joint is not None:
        result, replay = joint.prune(target)
        log.mlp, log.events = result.rounds, log.events + result.events
    with replaying(replay):
        log.recon_error = finish_layer(layer, x, kwargs, out, opts.batch_size)
    log.seconds = time.perf_counter() - t0
    return log


def prune_model(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    target: Target,
    calib: torch.Tensor,
    layers: set[int],
    opts: EngineOptions,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
    io: LayerIO | None = None,
) -> list[LayerLog]:
    """Prune the decoder layers in `layers` sequentially on calibration tokens [n, seqlen].

    With a `checkpoint`, the state is saved as its `every` says, and a run that finds one resumes from it.
    `io` is told when each layer's turn starts and ends (streaming loads and writes layers there).
    """
    io = io or LayerIO()
    alloc = allocator(opts.offload_dir)
    inputs = capture(model, adapter, calib, opts.batch_size, alloc)
    targets = layer_targets(model, adapter, opts.allocation, target, inputs, layers, opts.batch_size, alloc, io)
    decoder = adapter.decoder_layers(model)
    x, start, logs = inputs.hidden, 0, []
    if checkpoint is not None and checkpoint.exists():
        start, restored, saved = checkpoint.load(decoder, adapter)
        x.copy_(restored)
        logs = [LayerLog(**{**log, "events": [Event(**e) for e in log["events"]]}) for log in saved]
    out = alloc(tuple(x.shape), x.dtype, x.device)
    bar = tqdm(range(start, len(decoder)), desc=f"{method.name} {target}", unit="layer", disable=not progress)
    for i in bar:
        io.enter(i, decoder[i])
        if i in layers:
            logs.append(prune_layer(decoder[i], adapter, method, targets[i], x, inputs.kwargs[i], out, opts))
            logs[-1].index, logs[-1].target = i, targets[i].fraction
        else:
            run_layer(decoder[i], x, inputs.kwargs[i], opts.batch_size, out=out)
        x, out = out, x
        if checkpoint is not None:
            checkpoint.save(i, decoder[i], adapter, i in layers, x, logs, last=i + 1 == len(decoder))
        io.leave(i, decoder[i])
    return logs
