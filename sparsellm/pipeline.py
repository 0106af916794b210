"""One run behind `sparsellm prune` and `sparsellm eval`: load a model (whole, or streamed one decoder layer at a
time), prune it, evaluate it, and write the result folder atomically. The CLI is argparse and printing around it."""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import api
from .core import parallel, precision
from .core.errors import UserError, require_free_space
from .core.files import sha256_file, strict_json
from .core.types import LayerIO

SAVE_FORMATS = ("dense", "compressed")


def start_ranks(device: str) -> None:
    """Join torchrun's process group, if this process was started by it (nothing otherwise)."""
    from .models.loading import device_for

    parallel.init_from_env(device_for(device))


@dataclass(frozen=True)
class ModelSpec:
    """Which model, where, in which stored dtype, and whether it is streamed from its safetensors files."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    stream: bool = False


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: perplexity `datasets`, lm-eval `tasks` (first `limit` items), under a protocol."""

    datasets: tuple[str, ...] = ()
    tasks: str = ""
    limit: int | None = None
    hellaswag_file: Path | None = None
    protocol: str = "quick"
    seqlen: int | None = None
    precision: str = "auto"

    def check(self, stream: bool) -> None:
        """Every check that needs no model (one-line errors before any slow work)."""
        from .eval import zeroshot

        api.protocol(self.protocol)
        api.check_datasets(list(self.datasets))
        precision.check(self.precision)
        zeroshot.check_request(self.tasks, self.limit, self.hellaswag_file)
        if stream and self.tasks:
            raise UserError("--stream evaluates perplexity only: lm-eval (--tasks) needs the whole model")


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    io: LayerIO | None  # streamed: loads and drops each decoder layer in turn
    seconds: float


def load(spec: ModelSpec, folder: Path | None = None) -> Loaded:
    """The model (from `folder` instead of its name, for a streamed result just written)."""
    from .models import loading, streaming
    from .models.adapters import adapter_for

    t0 = time.perf_counter()
    if not spec.stream:
        model, tokenizer = loading.load(spec.name, spec.device, spec.dtype)
        return Loaded(model, tokenizer, None, time.perf_counter() - t0)
    model, tokenizer, weights = loading.load_streamed(str(folder or spec.name), spec.device, spec.dtype)
    return Loaded(
        model, tokenizer, streaming.StreamedLayers(model, adapter_for(model), weights), time.perf_counter() - t0
    )


def evaluate(loaded: Loaded, spec: EvalSpec) -> dict:
    """{"perplexity", "zeroshot", "data": {"evaluation", "zeroshot"}, "timing": {"eval_s", "zeroshot_s"}}."""
    result: dict = {"perplexity": {}, "zeroshot": {}, "data": {}, "timing": {}}
    if spec.datasets:
        t0 = time.perf_counter()
        result["perplexity"], result["data"]["evaluation"] = api.evaluate(
            loaded.model, loaded.tokenizer, list(spec.datasets), spec.protocol, spec.seqlen, io=loaded.io,
            precision_name=spec.precision,
        )  # fmt: skip
        result["timing"]["eval_s"] = time.perf_counter() - t0
    if spec.tasks:
        t0 = time.perf_counter()
        result["zeroshot"], result["data"]["zeroshot"] = _zeroshot(loaded, spec)
        result["timing"]["zeroshot_s"] = time.perf_counter() - t0
    return result


def _zeroshot(loaded: Loaded, spec: EvalSpec) -> tuple[dict, dict]:
    """(report entry, data provenance) of the lm-eval tasks."""
    from .data.texts import default_online
    from .eval import zeroshot

    tasks = zeroshot.check_request(spec.tasks, spec.limit, spec.hellaswag_file)
    results, provenance = zeroshot.evaluate_zeroshot(
        loaded.model, loaded.tokenizer, tasks, spec.limit, online=default_online(), hellaswag_file=spec.hellaswag_file,
        precision_name=spec.precision,
    )  # fmt: skip
    return zeroshot.summary(results, spec.limit), provenance


@dataclass(frozen=True)
class Output:
    """Where a pruned model goes, and what may happen to what is there."""

    folder: Path
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: float = api.CHECKPOINT_EVERY
    save_format: str = "dense"  # or "compressed" (models/compressed.py)

    def check(self) -> None:
        """Refuse a bad output folder before any work is done. `--overwrite` replaces only a folder this tool
        wrote (its report.json is there), never a link, the working folder or a parent of it, home or root."""
        out = self.folder
        if out.is_symlink():
            raise UserError(f"--out {out} is a symbolic link; give the folder it points to, or another --out")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        if len(out.resolve().name) > 200:
            raise UserError(f"--out {out}: a folder name of at most 200 characters, please")
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved in (cwd, *cwd.parents, Path.home().resolve()):
            raise UserError(f"--out {out} is the working folder, one of its parents or home; give a new folder")
        if out.is_dir() and any(out.iterdir()):
            if not self.overwrite:
                raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")
            if not (out / "report.json").is_file():
                raise UserError(f"--out {out} holds files sparsellm did not write (no report.json): it is not "
                                "replaced; choose another --out")  # fmt: skip
        parent = out.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)  # `--out runs/x` works in a fresh clone
        except OSError as e:
            raise UserError(f"cannot create {parent} ({e.strerror}); choose another --out") from e
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write to {parent}; choose another --out")
        if self.save_format not in SAVE_FORMATS:
            raise UserError(f"--save-format {self.save_format!r}: choose from {', '.join(SAVE_FORMATS)}")
        if not self.checkpoint_every >= 0:  # also NaN
            raise UserError(f"--checkpoint-every must be 0 or more seconds; got {self.checkpoint_every}")

    def checkpoint_dir(self, stream: bool) -> Path | None:
        """OUT.checkpoint for a resumable run (one process, in memory), after dealing with a leftover one."""
        checkpoint_dir = self.folder.with_name(self.folder.name + ".checkpoint")
        if parallel.world() > 1 or stream:
            if self.resume:
                raise UserError(
                    "--resume works for one process without --stream only (not yet with torchrun or --stream)"
                )
            return None  # ranks hold different activations; a streamed run has no whole model to restore into
        if checkpoint_dir.exists() and not self.resume:
            if not self.overwrite:
                advice = "pass --resume to continue it or --overwrite to start over"
                raise UserError(f"an interrupted run left {checkpoint_dir}; {advice}")
            ours = checkpoint_dir.is_dir() and not checkpoint_dir.is_symlink()
            if not ours or any(not _checkpoint_file(f.name) for f in checkpoint_dir.iterdir()):
                raise UserError(f"{checkpoint_dir} holds files sparsellm did not write: it is not removed")
            shutil.rmtree(checkpoint_dir)
        return checkpoint_dir

    def check_space(self, model: nn.Module, copies: int) -> None:
        """Refuse before pruning, not after, when the output (and a checkpoint beside it) cannot fit."""
        needed = copies * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**26  # + tokenizer, report
        require_free_space(
            self.folder.resolve().parent, needed, f"--out {self.folder}", "free some space or choose another --out"
        )

    @contextlib.contextmanager
    def writing(self):
        """A temporary sibling of the folder to write into, renamed into place when the block succeeds: an
        interrupted or failed run never leaves a folder that looks finished."""
        out = self.folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
        try:
            yield tmp
            _readable(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _readable(folder: Path) -> None:
    """The permissions of a folder made by hand: mkdtemp and safetensors create theirs private (0700, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _checkpoint_file(name: str) -> bool:
    """A name the checkpoint writes (engine/checkpoint.py), or one of its atomic writes' temporaries."""
    return name.startswith(("state.pt", "layer_", "recovery"))


@contextlib.contextmanager
def _exclusive(folder: Path):
    """Hold an exclusive lock on `folder` (a lock file beside it) for the block: a second run writing the same
    --out, or its checkpoint, is refused in one line instead of both printing "saved" over each other."""
    if not parallel.is_main():  # rank 0 alone writes
        yield
        return
    lock = folder.resolve().parent / f".{folder.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the holder finished and unlinked it as we opened it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        busy = f"another sparsellm run is writing --out {folder}; wait for it or choose another --out"
        raise UserError(busy) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: a run waiting on this file then finds it gone and makes its own
        os.close(fd)


def disk_full(e: BaseException) -> bool:
    """ENOSPC, as an OSError or inside safetensors' own error type (which carries only the OS message)."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def prune(spec: ModelSpec, config: api.PruneConfig, evals: EvalSpec, output: Output,
          recovery: api.RecoverConfig | None = None) -> dict | None:  # fmt: skip
    """Load, prune (then recover, if asked), evaluate and save; the report as written (None on ranks but 0)."""
    config.validate()
    evals.check(spec.stream)
    output.check()
    if recovery is not None:
        recovery.validate()
        if spec.stream or spec.dtype != "float32":
            raise UserError("--recover-tokens trains the whole model's fp32 weights: not with --stream or --dtype")
    if spec.stream and parallel.world() > 1:
        raise UserError("--stream runs in one process (not under torchrun)")
    with _exclusive(output.folder):
        output.check()  # again, now that no other run can change it
        checkpoint_dir = output.checkpoint_dir(spec.stream)
        if spec.stream:
            report = _prune_streamed(spec, config, evals, output)
        else:
            report = _prune_in_memory(spec, config, evals, output, checkpoint_dir, recovery)
        if report is not None and checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the result is in place: the checkpoint has served
    return report


def _prune_in_memory(spec, config, evals: EvalSpec, output: Output, checkpoint_dir: Path | None,
                     recovery: api.RecoverConfig | None) -> dict | None:  # fmt: skip
    loaded = load(spec)
    output.check_space(loaded.model, copies=1 if checkpoint_dir is None else 2)  # the checkpoint holds pruned layers
    teacher = copy.deepcopy(loaded.model) if recovery is not None and recovery.loss != "ce" else None
    report = api.prune(
        loaded.model, loaded.tokenizer, config, checkpoint_dir=checkpoint_dir, checkpoint_every=output.checkpoint_every
    )
    if recovery is not None:
        pruned = {**report.to_dict(), "model": spec.name}
        report.recovery = _recover(loaded, teacher, spec.name, recovery, pruned, evals, checkpoint_dir, output)
        del teacher
    _add_evaluation(report, loaded, evals)
    if not parallel.is_main():  # the ranks computed the same model; rank 0 alone writes and reports
        return None
    with output.writing() as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        return _write_report(tmp, report, spec, output.save_format)


def _prune_streamed(spec, config, evals: EvalSpec, output: Output) -> dict:
    """Prune from the model's safetensors files into the output folder's, one decoder layer at a time."""
    from .models import streaming
    from .models.adapters import adapter_for

    loaded = load(spec)
    output.check_space(loaded.model, copies=1)
    with output.writing() as tmp:
        layers = streaming.StreamedLayers(loaded.model, adapter_for(loaded.model), loaded.io.weights, out=tmp)
        report = api.prune(loaded.model, loaded.tokenizer, config, io=layers)
        layers.finish()
        loaded.model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        pruned = load(spec, folder=tmp) if evals.datasets else loaded  # read back one layer at a time
        _add_evaluation(report, Loaded(pruned.model, loaded.tokenizer, pruned.io, loaded.seconds), evals)
        return _write_report(tmp, report, spec, output.save_format)


def _recover(loaded: Loaded, teacher: nn.Module | None, teacher_name: str, config: api.RecoverConfig, pruned: dict,
             evals: EvalSpec, checkpoint_dir: Path | None, output: Output) -> dict:  # fmt: skip
    """Evaluate the pruned model, train it with its zeros held, and say so: the report's "recovery" section (the
    evaluation after it is the report's own perplexity and zeroshot)."""
    before = _before(loaded, pruned, evals)
    section = api.recover(loaded.model, loaded.tokenizer, config, teacher, pruned,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=output.checkpoint_every)  # fmt: skip
    for name, sha in section["source_masks"].items():  # equal to the pattern now (api.recover checked)
        pruned["sparsity"]["per_matrix"][name]["mask_sha256"] = sha
    return {"teacher": teacher_name if teacher is not None else None, **section, "before": before}


def _before(loaded: Loaded, pruned: dict, evals: EvalSpec) -> dict:
    """The pruned model's perplexity and zero-shot accuracy: the report's, where it measured exactly what `evals`
    asks (same protocol, texts and task limit), else measured now."""
    seqlen = api.seqlen_for(loaded.model, api.protocol(evals.protocol), evals.seqlen)
    measured = pruned.get("data", {}).get("evaluation", {})
    same = pruned.get("protocol") == evals.protocol and all(
        d in pruned.get("perplexity", {}) and measured.get(d, {}).get("seqlen") == seqlen for d in evals.datasets
    )
    from .eval.zeroshot import check_request

    zeroshot = pruned.get("zeroshot") or {}
    asked = set(check_request(evals.tasks, evals.limit, evals.hellaswag_file)) if evals.tasks else set()
    if same and (not asked or (zeroshot.get("limit") == evals.limit and set(zeroshot.get("tasks", {})) == asked)):
        return {"perplexity": {d: pruned["perplexity"][d] for d in evals.datasets}, "zeroshot": zeroshot,
                "source": "the pruned folder's report"}  # fmt: skip
    evaluated = evaluate(loaded, evals)
    return {"perplexity": evaluated["perplexity"], "zeroshot": evaluated["zeroshot"], "source": "measured"}


def recover(source: Path, teacher_name: str | None, spec: ModelSpec, config: api.RecoverConfig, evals: EvalSpec,
            output: Output) -> dict | None:  # fmt: skip
    """`sparsellm recover`: a folder `sparsellm prune` wrote, fine-tuned with its zeros held, into `output`."""
    config.validate()
    evals.check(stream=False)
    if spec.stream:
        raise UserError("recover trains the whole model: it does not run with --stream")
    if spec.dtype != "float32":
        raise UserError("recover trains fp32 master weights (bf16 only in the products, --precision): --dtype float32")
    pruned = _source_report(source, output)
    if pruned.get("recovery"):
        raise UserError(f"{source} was recovered already; recover the pruned folder it came from")
    with _exclusive(output.folder):
        output.check()
        checkpoint_dir = output.checkpoint_dir(stream=False)
        loaded = load(ModelSpec(str(source), spec.device, spec.dtype))
        output.check_space(loaded.model, copies=1 if checkpoint_dir is None else 4)  # + the optimizer's moments
        teacher_name = teacher_name or pruned.get("model", "")
        teacher = None if config.loss == "ce" else load(ModelSpec(teacher_name, spec.device, "float32")).model
        kept = {k: v for k, v in pruned.items() if k in api.Report.__dataclass_fields__ and k != "schema"}
        report = api.Report(**kept)
        report.recovery = _recover(loaded, teacher, teacher_name, config, pruned, evals, checkpoint_dir, output)
        report.recovery["pruned"] = {"folder": str(source.resolve()), "files_sha256": pruned["files_sha256"],
                                     "command": pruned.get("manifest", {}).get("command")}  # fmt: skip
        del teacher
        _add_evaluation(report, loaded, evals)
        result = None
        if parallel.is_main():
            with output.writing() as tmp:
                loaded.model.save_pretrained(tmp)
                loaded.tokenizer.save_pretrained(tmp)
                result = _write_report(tmp, report, ModelSpec(pruned.get("model", "")), output.save_format)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return result


def _add_evaluation(report: api.Report, loaded: Loaded, evals: EvalSpec) -> None:
    evaluated = evaluate(loaded, evals)
    report.perplexity, report.zeroshot = evaluated["perplexity"], evaluated["zeroshot"]
    report.data.update(evaluated["data"])
    report.timing.update(load_s=loaded.seconds, **evaluated["timing"])
    report.peak_rss_mb = api.peak_rss_mb()
    if report.recovery:
        report.recovery["after"] = {"perplexity": report.perplexity, "zeroshot": report.zeroshot}
        report.timing["recover_s"] = report.recovery["train_s"]


def _write_report(folder: Path, report: api.Report, spec: ModelSpec, save_format: str) -> dict:
    """Compress the tensor files if asked, then report.json, the model card and the plots."""
    from .plots import write_plots

    report.model = spec.name
    report.manifest = {**manifest(report), "save_format": save_format}
    report.storage = _store(folder, save_format, report.sparsity["target"])
    result = _finish(folder, report.to_dict())
    write_plots(result, folder / "plots")
    return result


def _store(folder: Path, save_format: str, target: str) -> dict:
    """The tensor files in `save_format`, and what they weigh."""
    if save_format == "compressed":
        return _compress(folder, folder, target)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"format": save_format, "bytes": size, "dense_bytes": size, "encodings": {}}


def _compress(source: Path, folder: Path, target: str) -> dict:
    from .models import compressed

    nm = api.parse_nm(target) if ":" in target else None
    stored = compressed.compress_folder(source, folder, (nm.n, nm.m) if nm else None)
    return {"format": "compressed", "bytes": stored.stored_bytes, "dense_bytes": stored.dense_bytes,
            "encodings": stored.encodings}  # fmt: skip


def _finish(folder: Path, report: dict) -> dict:
    """The report with its tensor files' checksums, written with the model card."""
    from .card import model_card
    from .models.loading import hub_id

    report["files_sha256"] = {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}
    (folder / "report.json").write_text(strict_json(report))
    (folder / "README.md").write_text(model_card(report, hub_id(report["model"])))
    return report


def _source_report(source: Path, output: Output) -> dict:
    """The report of a folder `sparsellm prune` wrote, its files checked against it; and `output` checked."""
    from .inspection import check_files, read_report

    report = read_report(source)
    if problems := check_files(source, report):
        raise UserError(f"{source} does not match its report.json ({problems[0]}); `sparsellm inspect` says more")
    output.check()
    if output.folder.resolve() == source.resolve():
        raise UserError("write into another folder than the one read")
    return report


def convert(source: Path, output: Output) -> dict:
    """A folder `sparsellm prune` wrote, in `output.save_format`: compressed, or the dense twin of a compressed one
    (the same tensors, byte for byte). The source's files are checked against its report first."""
    from .models import compressed

    packed = source.is_dir() and compressed.is_compressed(source)
    if output.save_format == "dense" and not packed:
        raise UserError(f"{source} is not a compressed folder (no *{compressed.SUFFIX} files in it)")
    if output.save_format == "compressed" and packed:
        raise UserError(f"{source} is compressed already")
    report = _source_report(source, output)
    with _exclusive(output.folder):
        output.check()
        require_free_space(output.folder.resolve().parent, report.get("storage", {}).get("dense_bytes", 0) + 2**26,
                           f"--out {output.folder}", "free some space or choose another folder")  # fmt: skip
        with output.writing() as tmp:
            if packed:
                compressed.decompress_folder(source, tmp)
                report["storage"] = _store(tmp, "dense", report["sparsity"]["target"])
            else:
                report["storage"] = _compress(source, tmp, report["sparsity"]["target"])
            report["manifest"]["save_format"] = report["storage"]["format"]
            return _finish(tmp, report)


def manifest(report: api.Report) -> dict:
    """Everything needed to reproduce the run, or to explain why another run differs."""
    data = {"calibration": report.data["calibration"]["sha256"]}
    data.update({name: d["sha256"] for name, d in report.data.get("evaluation", {}).items()})
    return {
        "command": " ".join(["sparsellm", *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": report.model,
        "protocol": report.protocol,
        "seed": report.config["seed"],
        "calibration_tokens_sha256": report.data["calibration"]["tokens_sha256"],
        "data_sha256": data,
        "versions": report.versions,
        "resumed": report.config["resumed"],
    }
