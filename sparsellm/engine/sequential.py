"""The SparseGPT-style sequential engine: prune decoder layers in order, each on the outputs of the last.

Per layer: (a) run it on its inputs with hooks on its linears to accumulate statistics, keeping the dense
outputs; (b) prune its linears; (c) run the pruned layer to produce the next layer's inputs, measuring
the relative reconstruction error against the dense outputs. Errors propagate, as in every peer.
With `true_sequential`, (a)-(b) repeat site by site (q,k,v -> o -> gate,up -> down), each site's inputs
recomputed after the sites before it were pruned. Joint-MLP methods (SparseLLM) get the attention sites
the same way and then the whole MLP at once, on MLP inputs recomputed after attention was pruned.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..methods.base import Method, Target
from ..models.adapters import Adapter, Site, submodule
from . import parallel
from .checkpoint import Checkpoint
from .layers import LayerIO, StopForward, call_layer, capture, in_ram, on_disk, run_layer
from .stats import recording


@dataclass
class LayerLog:
    index: int
    seconds: float = 0.0
    recon_error: float = 0.0  # ||Y_dense - Y_pruned||^2 / ||Y_dense||^2 of the layer's output
    events: list[str] = field(default_factory=list)
    mlp: dict | None = None  # joint-MLP methods: objective per round, chosen round


@dataclass
class EngineOptions:
    batch_size: int = 8
    true_sequential: bool = False
    dense_attention_mlp_input: bool = False  # SparseLLM: the reference code's variant
    offload_dir: Path | None = None  # layer inputs/outputs memory-mapped from files here instead of RAM


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
) -> list[str]:
    """Statistics of `sites` from one pass over the layer, then prune each of their linears."""
    first = {site.name: submodule(layer, site.linears[0]) for site in sites}
    # A data-free method (magnitude) hooks nothing but still runs the pass, for the dense outputs.
    with recording(first if method.statistic else {}, method.statistic or "") as stats:
        run_layer(layer, x, kwargs, opts.batch_size, out=dense_out)
    events = []
    for site in sites:
        stat = stats[site.name].mean() if method.statistic else None
        if stat is not None and not torch.isfinite(stat).all():
            raise UserError(f"the inputs of {site.name} hold NaN/Inf (the model or data is broken); nothing was saved")
        for path in site.linears:
            linear = submodule(layer, path)
            pruned = method.prune(linear.weight.data, stat, target)
            linear.weight.data.copy_(pruned.weight)
            events += [f"{path}: {e}" for e in pruned.events]
    return events


@torch.no_grad()
def mlp_inputs(
    layer: nn.Module, adapter: Adapter, x: torch.Tensor, kwargs: dict, opts: EngineOptions, keep_attention: bool = False
) -> tuple[torch.Tensor, list]:
    """The MLP's input for every calibration token, [N, d], as the layer currently computes it, and with
    `keep_attention` the attention's output of every batch (for `replaying`; its attention weights, which layers
    discard, dropped; otherwise the list is empty).

    The forward stops as soon as the MLP's first linear is reached: the MLP itself need not run.
    """
    chunks: list[torch.Tensor] = []
    attention: list = []

    def record(_module, args):
        chunks.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise StopForward

    def record_attention(_module, _args, out):
        attention.append((out[0], *(None for _ in out[1:])) if isinstance(out, tuple) else out)

    mlp = adapter.mlp(layer)
    handles = [lin.register_forward_pre_hook(record) for lin in (mlp.up, mlp.gate) if lin is not None]
    if keep_attention:
        handles.append(submodule(layer, adapter.attention).register_forward_hook(record_attention))
    try:
        for start in range(0, x.shape[0], opts.batch_size):
            with contextlib.suppress(StopForward):
                call_layer(layer, x[start : start + opts.batch_size], kwargs)
    finally:
        for h in handles:
            h.remove()
    x_mlp = torch.cat(chunks)
    (bad,) = parallel.all_sum_floats(float(not torch.isfinite(x_mlp).all()))  # every rank must stop together
    if bad:
        raise UserError("the MLP inputs hold NaN/Inf (the model or its data is broken); nothing was saved")
    return x_mlp, attention


def per_batch(rows: torch.Tensor, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Token rows [N, k] of the windows x [n, T, d], cut into the outputs of the engine's batches, [b, T, k]."""
    seqlen = x.shape[1]
    return [rows[start * seqlen : (start + batch_size) * seqlen].view(-1, seqlen, rows.shape[-1])
            for start in range(0, x.shape[0], batch_size)]  # fmt: skip


@contextlib.contextmanager
def replaying(outputs: dict[nn.Module, list]):
    """While active, each module in `outputs` returns its recorded outputs, one per call, in order, instead of
    computing; on exit every one must have been returned exactly once.

    SparseLLM's final pass feeds each layer the inputs it was just run on: the attention's outputs were
    recorded on the way to the MLP inputs, and the solver computed its kept MLP's outputs, so replaying them
    leaves only the norms and residual adds to run (no architecture knowledge needed here).
    """
    served = dict.fromkeys(outputs, 0)

    def replay(module: nn.Module):
        def forward(*args, **_kwargs):
            if served[module] == len(outputs[module]):
                raise RuntimeError("a replayed module was called more often than recorded (the final pass changed)")
            served[module] += 1
            out = outputs[module][served[module] - 1]
            if torch.is_tensor(out) and args and torch.is_tensor(args[0]):  # a linear's: shaped as its input asks
                out = out.reshape(*args[0].shape[:-1], -1)  # (OPT flattens the tokens before fc1)
            return out

        return forward

    for module in outputs:
        module.forward = replay(module)
    try:
        yield
    finally:
        for module in outputs:
            del module.forward
    if any(served[module] != len(outputs[module]) for module in outputs):
        raise RuntimeError("replayed outputs were not consumed exactly once (the final pass changed)")


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
    dense_x_mlp = None
    if method.joint_mlp and opts.dense_attention_mlp_input:
        dense_x_mlp, _ = mlp_inputs(layer, adapter, x, kwargs, opts)
    for i, group in enumerate(groups):
        log.events += prune_site_group(layer, group, method, target, x, kwargs, opts, dense_out=out if i == 0 else None)
    replay = {}
    if method.joint_mlp:
        x_mlp = dense_x_mlp
        if x_mlp is None:  # taken after attention was pruned: the final pass runs this attention on these inputs
            x_mlp, replay[submodule(layer, adapter.attention)] = mlp_inputs(
                layer, adapter, x, kwargs, opts, keep_attention=True
            )
        log.mlp = method.prune_mlp(adapter.mlp(layer), x_mlp, target)
        log.events += log.mlp.pop("events", [])
        outputs = log.mlp.pop("outputs", None)
        # The final pass feeds the MLP x_mlp again, unless x_mlp was taken before attention was pruned.
        if outputs and dense_x_mlp is None:
            replay |= {linear: per_batch(rows, x, opts.batch_size) for linear, rows in outputs.items()}
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
    alloc = on_disk(opts.offload_dir) if opts.offload_dir is not None else in_ram
    inputs = capture(model, adapter, calib, opts.batch_size, alloc)
    decoder = adapter.decoder_layers(model)
    x, start, logs = inputs.hidden, 0, []
    if checkpoint is not None and checkpoint.exists():
        start, restored, saved = checkpoint.load(decoder, adapter)
        x.copy_(restored)
        logs = [LayerLog(**log) for log in saved]
    out = alloc(tuple(x.shape), x.dtype, x.device)
    bar = tqdm(range(start, len(decoder)), desc=f"{method.name} {target}", unit="layer", disable=not progress)
    for i in bar:
        io.enter(i, decoder[i])
        if i in layers:
            logs.append(prune_layer(decoder[i], adapter, method, target, x, inputs.kwargs[i], out, opts))
            logs[-1].index = i
        else:
            run_layer(decoder[i], x, inputs.kwargs[i], opts.batch_size, out=out)
        x, out = out, x
        if checkpoint is not None:
            checkpoint.save(i, decoder[i], adapter, i in layers, x, logs, last=i + 1 == len(decoder))
        io.leave(i, decoder[i])
    return logs
