"""The Python API: `prune(model, tokenizer, config) -> Report` and `evaluate(...)`, on named protocols."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core import parallel, precision
from .core.errors import UserError, require_free_space
from .core.files import mask_sha256, state_sha256
from .core.types import LayerIO
from .data import texts
from .engine import CHECKPOINT_EVERY
from .engine.checkpoint import Checkpoint
from .engine.sequential import EngineOptions, prune_model
from .eval.perplexity import perplexity
from .methods import METHODS, Method, Target, make_method
from .methods.allocation import Allocation
from .methods.alps import Alps
from .methods.base import EVENT_KINDS
from .methods.refit import Refit
from .models.adapters import Adapter, adapter_for, context_length
from .recovery.run import recover as recover
from .recovery.trainer import RecoverConfig as RecoverConfig


@dataclass(frozen=True)
class Protocol:
    """How calibration and evaluation data are cut (README, "Protocols")."""

    name: str
    seqlen: int
    nsamples: int
    max_windows: int | None  # None: the whole test text


PROTOCOLS = {
    "standard": Protocol("standard", seqlen=2048, nsamples=128, max_windows=None),
    "quick": Protocol("quick", seqlen=512, nsamples=32, max_windows=64),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol '{name}'; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def seqlen_for(model: nn.Module, proto: Protocol, seqlen: int | None) -> int:
    """The protocol's seqlen (capped at the model's context), or an explicit one that must fit."""
    context = context_length(model)
    if seqlen is None:
        return min(proto.seqlen, context)
    if not 1 < seqlen <= context:
        raise UserError(f"seqlen {seqlen} is outside the model's context (2..{context}); pass a smaller --seqlen")
    return seqlen


def parse_nm(text: str) -> Target:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError as e:
        raise UserError(f"--nm must look like N:M (e.g. 2:4, N of every M weights zeroed); got '{text}'") from e
    if not 0 < n < m:
        raise UserError(f"N:M needs 0 < N < M (N of every M weights are zeroed); got {text}")
    return Target(n=n, m=m)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """ "all", "first-half" (the SparseLLM paper's protocol), "A:B" (Python slice) or "i,j,k"."""
    if spec == "all":
        return list(range(n_layers))
    if spec == "first-half":
        return list(range(n_layers // 2))
    try:
        if ":" in spec:
            a, b = spec.split(":")
            chosen = list(range(n_layers))[slice(int(a) if a else None, int(b) if b else None)]
        else:
            chosen = sorted({int(v) for v in spec.split(",")})
    except ValueError as e:
        raise UserError(f"--layers must be all, first-half, A:B or i,j,k; got '{spec}'") from e
    if not chosen or not all(0 <= i < n_layers for i in chosen):
        raise UserError(f"--layers '{spec}' selects no valid layer of this {n_layers}-layer model")
    return chosen


@dataclass
class PruneConfig:
    method: str = "sparsegpt"
    sparsity: float | None = None
    nm: str | None = None  # "N:M": N of every M consecutive input weights zeroed
    protocol: str = "quick"
    calib: str = "c4"
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    layers: str = "all"
    true_sequential: bool = False
    batch_size: int = 8
    method_options: dict = field(default_factory=dict)  # percdamp (SparseGPT, SparseLLM); SparseLLM: rounds, alpha, ...
    max_memory: int | None = None  # bytes of RAM for per-token tensors (default: half the RAM); beyond: disk
    offload_dir: str | None = None  # where offloaded tensors go (default: the temporary folder)
    precision: str = "auto"  # matrix products: bf16 (fp32 sums and solves) where the hardware has it, else fp32
    refit: str = "none"  # "pcg": re-solve each pruned linear's kept weights on its Hessian (methods/refit.py);
    # "alps": first let the mask move by ADMM, then the same (methods/alps.py)
    refit_iterations: int = Refit.iterations
    alps_iterations: int = Alps.iterations
    alps_rho: float = Alps.rho
    allocation: str = "uniform"  # per-layer sparsities: uniform, owl, dlp or alpha (methods/allocation.py)
    owl_lambda: float | None = None  # the allocation's spread: targets within target +- this (None: the method's)
    owl_m: float = Allocation.owl_m

    def target(self) -> Target:
        if (self.sparsity is None) == (self.nm is None):
            raise UserError("give exactly one of --sparsity S or --nm N:M")
        return parse_nm(self.nm) if self.nm else Target(sparsity=self.sparsity)

    def validate(self) -> None:
        """Every check that needs no model, with the one-line errors of the CLI."""
        self.target()
        self.make_method()
        protocol(self.protocol)
        precision.check(self.precision)
        self.refitter()
        self.allocator().check(self.target())

    def allocator(self) -> Allocation:
        """The allocation rule. Without --owl-lambda: the method's own spread for the rule (chosen on held-out text
        at 70%), at most 0.8 (1 - target), so that at high targets no layer's share reaches 100% (90%: 0.08)."""
        spread = self.owl_lambda
        if spread is None:
            method = METHODS.get(self.method)
            spread = method.spreads.get(self.allocation, Allocation.spread) if method else Allocation.spread
            if self.sparsity is not None and 0 <= self.sparsity < 1:
                spread = min(spread, 0.8 * (1 - self.sparsity))
        return Allocation(self.allocation, spread, self.owl_m)

    def resolved(self) -> dict:
        """The settings as they run: the fields, with the spread a default resolved to (report and resume)."""
        return {**asdict(self), "owl_lambda": self.allocator().spread}

    def make_method(self) -> Method:
        """The method with its options; a joint-MLP method (SparseLLM) refits inside its own W-steps, since the
        engine's refit reaches only the linears it prunes one at a time (the attention's)."""
        options = dict(self.method_options)
        if self.refitter() is not None and getattr(METHODS.get(self.method), "joint_mlp", False):
            options.setdefault("refit_iterations", self.refit_iterations)
            if self.refit == "alps":
                options.setdefault("alps_iterations", self.alps_iterations)
                options.setdefault("alps_rho", self.alps_rho)
        return make_method(self.method, **options)

    def refitter(self) -> Refit | Alps | None:
        if self.refit not in REFITS:
            raise UserError(f"unknown refit '{self.refit}'; choose from: {', '.join(REFITS)}")
        if self.refit == "none":
            return None
        damping = self.method_options.get("percdamp", Refit.damping)  # the method's, for the same conditioning
        pcg = Refit(self.refit_iterations, damping)
        return pcg if self.refit == "pcg" else Alps(self.alps_iterations, self.alps_rho, damping, pcg)


REFITS = ("none", "pcg", "alps")
REPORT_SCHEMA = 4  # report.json's layout; raised whenever a field changes meaning or moves


@dataclass
class Report:
    """report.json, the one definition of its fields (pipeline.py fills model, manifest, files_sha256, storage)."""

    method: str
    protocol: str
    config: dict
    sparsity: dict
    layers: list[dict]
    timing: dict
    data: dict
    perplexity: dict = field(default_factory=dict)
    zeroshot: dict = field(default_factory=dict)  # see sparsellm.eval.zeroshot.summary
    events: list[dict] = field(default_factory=list)  # every numerical safeguard that fired: kind, matrix, detail
    hardening: dict = field(default_factory=dict)  # their counts: damping raised, fp64 used
    peak_rss_mb: float = 0.0
    versions: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # which arithmetic ran and why (core/precision.py)
    model: str = ""
    manifest: dict = field(default_factory=dict)  # command, time, seed, data and calibration-token hashes
    files_sha256: dict = field(default_factory=dict)  # every saved tensor file; `inspect` re-hashes them
    storage: dict = field(default_factory=dict)  # save format, bytes stored and dense, encodings chosen
    recovery: dict = field(default_factory=dict)  # fine-tuning after pruning (recovery/run.py), with before/after
    schema: int = REPORT_SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB. Linux: VmHWM of its own address space; ru_maxrss would also
    count the RSS of the parent it was forked from (the kernel carries it across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def versions() -> dict:
    import transformers

    from .core import __version__

    return {
        "sparsellm": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def layer_zeros(adapter: Adapter, i: int, layer: nn.Module) -> dict[str, tuple[int, int]]:
    """{"layers.i.path": (numel, zeros)} of the layer's prunable matrices."""
    return {
        f"layers.{i}.{path}": (linear.weight.numel(), int((linear.weight == 0).sum()))
        for path, linear in adapter.linears(layer).items()
    }


def layer_masks(adapter: Adapter, i: int, layer: nn.Module) -> dict[str, str]:
    """{"layers.i.path": sha256 of its zero pattern} of the layer's prunable matrices."""
    return {f"layers.{i}.{path}": mask_sha256(linear.weight) for path, linear in adapter.linears(layer).items()}


def model_zeros(model: nn.Module, adapter: Adapter, layer_ids: list[int]) -> dict[str, tuple[int, int]]:
    decoder = adapter.decoder_layers(model)
    return {k: v for i in layer_ids for k, v in layer_zeros(adapter, i, decoder[i]).items()}


def model_masks(model: nn.Module, adapter: Adapter, layer_ids: list[int]) -> dict[str, str]:
    decoder = adapter.decoder_layers(model)
    return {k: v for i in layer_ids for k, v in layer_masks(adapter, i, decoder[i]).items()}


class ZeroTally(LayerIO):
    """Counts the zeros of each pruned layer's matrices as its turn starts and ends (a streamed model is
    never whole, so they cannot be counted afterwards)."""

    def __init__(self, adapter: Adapter, layer_ids: list[int], inner: LayerIO):
        self.adapter, self.layer_ids, self.inner = adapter, set(layer_ids), inner
        self.before: dict[str, tuple[int, int]] = {}
        self.after: dict[str, tuple[int, int]] = {}
        self.masks: dict[str, str] = {}

    def enter(self, i: int, layer: nn.Module) -> None:
        self.inner.enter(i, layer)
        if i in self.layer_ids:
            self.before.update(layer_zeros(self.adapter, i, layer))

    def leave(self, i: int, layer: nn.Module) -> None:
        if i in self.layer_ids:
            self.after.update(layer_zeros(self.adapter, i, layer))
            self.masks.update(layer_masks(self.adapter, i, layer))
        self.inner.leave(i, layer)


def sparsity_summary(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], target: Target,
                     masks: dict[str, str]) -> dict:  # fmt: skip
    """Measured zeros and zero pattern of every pruned matrix, with the dense model's own zeros beside them."""
    per_matrix = {
        name: {
            "numel": numel,
            "zeros": z,
            "dense_zeros": before[name][1],
            "measured": z / numel,
            "mask_sha256": masks[name],
        }  # fmt: skip
        for name, (numel, z) in after.items()
    }
    total = sum(m["numel"] for m in per_matrix.values())
    zeros = sum(m["zeros"] for m in per_matrix.values())
    dense = sum(m["dense_zeros"] for m in per_matrix.values())
    return {
        "target": str(target),
        "target_fraction": target.fraction,
        "measured": zeros / max(total, 1),
        "dense_zeros": dense / max(total, 1),
        "kept_over_total": f"{total - zeros}/{total}",
        "per_matrix": per_matrix,
    }


@dataclass
class _Plan:
    """What a prune works out from its config, model and tokenizer before any layer is touched."""

    adapter: Adapter
    target: Target
    method: object
    proto: Protocol
    seqlen: int
    nsamples: int
    layer_ids: list[int]
    corpus: texts.Corpus
    calib: torch.Tensor
    precision: precision.Precision
    memory: dict  # where the large per-token tensors live (`_memory_plan`)


def _plan(model: nn.Module, tokenizer, config: PruneConfig) -> _Plan:
    adapter = adapter_for(model)
    target = config.target()
    method = config.make_method()
    proto = protocol(config.protocol)
    seqlen = seqlen_for(model, proto, config.seqlen)
    nsamples = proto.nsamples if config.nsamples is None else config.nsamples
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1; got {nsamples}")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {config.batch_size}")
    layer_ids = parse_layers(config.layers, len(adapter.decoder_layers(model)))
    _check_nm_width(model, adapter, layer_ids, target)
    rows = parallel.shard(nsamples)
    memory = _memory_plan(model, adapter, method, (rows.stop - rows.start) * seqlen, config)
    chosen = precision.resolve(config.precision, next(p for p in model.parameters() if not p.is_meta).device)
    corpus = texts.corpus(config.calib, "train", online=texts.default_online())
    calib = texts.calibration(tokenizer, corpus, nsamples, seqlen, config.seed)
    return _Plan(adapter, target, method, proto, seqlen, nsamples, layer_ids, corpus, calib, chosen, memory)


def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    io: LayerIO | None = None,
    checkpoint_every: float = CHECKPOINT_EVERY,
) -> Report:
    """Prune `model` in place as `config` says; return what was done and measured.

    With `checkpoint_dir`, the run's state is saved there after a decoder layer whenever `checkpoint_every`
    seconds have passed since the last save (0: after every layer), and a run that finds a checkpoint of the same
    arguments there continues from it (the caller removes it once the result is safe).
    With `io` (models.streaming), the decoder layers are loaded and written one at a time.
    """
    t_start = time.perf_counter()
    plan = _plan(model, tokenizer, config)
    t_data = time.perf_counter()
    tally = ZeroTally(plan.adapter, plan.layer_ids, io or LayerIO())
    if io is None:  # the whole model is here: count now, so layers restored from a checkpoint count too
        tally.before = model_zeros(model, plan.adapter, plan.layer_ids)
    local = plan.calib[parallel.shard(plan.calib.shape[0])]  # data parallel: this rank's samples (all, alone)
    folder = lambda key: Path(plan.memory[key]) if plan.memory[key] else None  # noqa: E731
    opts = EngineOptions(
        batch_size=config.batch_size,
        true_sequential=config.true_sequential,
        offload_dir=folder("offload_dir"),
        auxiliary_dir=folder("auxiliary_dir"),
        refit=config.refitter(),
        allocation=config.allocator(),
    )
    calib_sha = tensor_sha256(plan.calib.to(torch.int64))
    checkpoint = None
    if checkpoint_dir is not None:
        run = {**config.resolved(), "seqlen": plan.seqlen, "nsamples": plan.nsamples, "layers": plan.layer_ids,
               "precision": plan.precision.name}  # fmt: skip
        checkpoint = Checkpoint(checkpoint_dir, _fingerprint(model, run, calib_sha), checkpoint_every)
    resumed = checkpoint is not None and checkpoint.exists()
    with precision.using(plan.precision):
        logs = prune_model(
            model, plan.adapter, plan.method, plan.target, local, set(plan.layer_ids), opts, progress, checkpoint, tally
        )
    if io is None:
        tally.after = model_zeros(model, plan.adapter, plan.layer_ids)
        tally.masks = model_masks(model, plan.adapter, plan.layer_ids)
    timing = {"data_s": t_data - t_start, "prune_s": time.perf_counter() - t_data}
    extra = {"resumed": resumed, "tokens_sha256": calib_sha}
    return _report(model, config, plan, logs, tally, timing, extra)


def _report(model: nn.Module, config: PruneConfig, plan: _Plan, logs, tally: ZeroTally, timing: dict, extra: dict):
    events = [e for log in logs for e in log.events]
    return Report(
        method=config.method,
        protocol=plan.proto.name,
        config={
            **config.resolved(),
            "seqlen": plan.seqlen,
            "nsamples": plan.nsamples,
            "layers_pruned": plan.layer_ids,
            "layers_total": len(plan.adapter.decoder_layers(model)),
            "family": plan.adapter.family,
            "resumed": extra["resumed"],
            "ranks": parallel.world(),
            "activations": plan.memory,
        },
        sparsity=sparsity_summary(tally.before, tally.after, plan.target, tally.masks),
        layers=[asdict(log) for log in logs],
        timing=timing,
        data={
            "calibration": {
                "name": plan.corpus.name,
                "source": plan.corpus.source,
                "sha256": plan.corpus.sha256,
                "tokens_sha256": extra["tokens_sha256"],
            }
        },
        events=[asdict(e) for e in events],
        hardening={"events": len(events), **{kind: sum(e.kind == kind for e in events) for kind in EVENT_KINDS}},
        peak_rss_mb=peak_rss_mb(),
        versions=versions(),
        precision=plan.precision.as_dict(),
    )


def default_max_memory() -> int:
    """Half the machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _memory_plan(model: nn.Module, adapter: Adapter, method, tokens: int, config: PruneConfig) -> dict:
    """Where this rank's large per-token tensors live, decided before anything is allocated: the layer inputs and
    outputs (2 x tokens x d in the model's dtype) in RAM if they fit in --max-memory, then a joint-MLP method's
    auxiliaries ((2f + 3d) x 4 bytes a token: Z, S, Y, the MLP inputs, the attention outputs) if they fit in
    what is left; whatever does not fit is memory-mapped from files in --offload-dir, whose free space is checked.
    """
    param = next(p for p in model.parameters() if not p.is_meta)
    d = model.config.hidden_size
    f = adapter.mlp(adapter.decoder_layers(model)[0]).up.out_features
    activations = 2 * tokens * d * param.element_size()
    auxiliaries = tokens * (2 * f + 3 * d) * 4 if method.joint_mlp else 0
    limit = config.max_memory if config.max_memory is not None else default_max_memory()
    on_cpu = param.device.type == "cpu"  # accelerator memory is not mapped from files
    offload_activations = on_cpu and activations > limit
    in_ram = 0 if offload_activations else activations
    offload_auxiliaries = on_cpu and auxiliaries > 0 and in_ram + auxiliaries > limit
    folder = Path(config.offload_dir or tempfile.gettempdir())
    on_disk = activations * offload_activations + auxiliaries * offload_auxiliaries
    if on_disk:
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise UserError(f"--offload-dir {folder} is not a writable folder")
        # The backing files are unlinked and sparse: a disk that fills up under them kills the run with SIGBUS.
        advice = "free some space, choose another --offload-dir, raise --max-memory or use fewer --nsamples"
        require_free_space(folder, on_disk, f"--offload-dir {folder}", advice)
    return {
        "bytes": activations,
        "max_memory": limit,
        "offload_dir": str(folder) if offload_activations else None,
        "auxiliary_bytes": auxiliaries,
        "auxiliary_dir": str(folder) if offload_auxiliaries else None,
    }


def _check_nm_width(model: nn.Module, adapter: Adapter, layer_ids: list[int], target: Target) -> None:
    """N:M groups run along a matrix's inputs, so M must divide every pruned matrix's input width."""
    if not target.is_nm:
        return
    decoder = adapter.decoder_layers(model)
    for i in layer_ids:
        for path, linear in adapter.linears(decoder[i]).items():
            if linear.in_features % target.m:
                raise UserError(
                    f"--nm {target}: M={target.m} does not divide the {linear.in_features} inputs of "
                    f"layers.{i}.{path}; choose an M that divides it"
                )


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _fingerprint(model: nn.Module, run: dict, calib_sha: str) -> dict:
    """What must be equal for a checkpoint to be resumed: the arguments, the data and the model's weights."""
    from .core import __version__

    return {
        **run,
        "calibration_tokens": calib_sha,
        "model": f"{type(model).__name__} {sum(p.numel() for p in model.parameters())} params",
        "weights_sha256": state_sha256(model.state_dict()),  # the content, so a model changed in place is not resumed
        "sparsellm": __version__,
    }


def check_datasets(datasets: list[str]) -> None:
    for name in datasets:
        if name not in texts.DATASETS:
            raise UserError(f"unknown evaluation dataset '{name}'; choose from: {', '.join(texts.DATASETS)}")


def evaluate(
    model: nn.Module,
    tokenizer,
    datasets: list[str],
    protocol_name: str = "quick",
    seqlen: int | None = None,
    progress: bool = True,
    io: LayerIO | None = None,
    precision_name: str = "auto",
) -> tuple[dict[str, float], dict]:
    """Perplexity per dataset under a protocol, and the data used (source, sha256, windows, precision).

    With `io` (models.streaming), the decoder layers are loaded one at a time. The forward passes run in
    `precision_name` (auto, bf16 or fp32; core/precision.py).
    """
    adapter = adapter_for(model)
    chosen = precision.resolve(precision_name, next(p for p in model.parameters() if not p.is_meta).device)
    proto = protocol(protocol_name)
    seqlen = seqlen_for(model, proto, seqlen)
    check_datasets(datasets)
    results, data = {}, {}
    for name in datasets:
        corpus = texts.corpus(name, "test", online=texts.default_online())
        windows = texts.eval_windows(tokenizer, corpus, seqlen, proto.max_windows)
        local = windows[parallel.shard(windows.shape[0])]  # data parallel: this rank's windows
        with precision.using(chosen):
            results[name] = perplexity(model, adapter, local, progress=progress, io=io)
        data[name] = {"source": corpus.source, "sha256": corpus.sha256, "windows": windows.shape[0], "seqlen": seqlen,
                      "precision": chosen.as_dict()}  # fmt: skip
    return results, data
