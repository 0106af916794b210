"""`sparsellm inspect`: re-measure a saved model's sparsity from its tensors and check it against its report."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from .core.errors import UserError, reading
from .core.files import mask_sha256, sha256_file
from .models.streaming import SafetensorsWeights


def check_files(folder: Path, report: dict) -> list[str]:
    """Every tensor file the report lists must be there with the same sha256 (and no unlisted one)."""
    listed = report.get("files_sha256")
    if listed is None:
        return ["report.json lists no file checksums (written by an older sparsellm?)"]
    problems = [f"{name}: missing" for name in listed if not (folder / name).is_file()]
    problems += [
        f"{name}: sha256 differs from the report"
        for name, sha in listed.items()
        if (folder / name).is_file() and sha256_file(folder / name) != sha
    ]
    problems += [f"{f.name}: not listed in the report" for f in folder.glob("*.safetensors") if f.name not in listed]
    return problems


def _weights(folder: Path) -> SafetensorsWeights:
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} holds no .safetensors files")
    return SafetensorsWeights(folder)


def _load(weights: SafetensorsWeights, name: str) -> torch.Tensor:
    return weights.load([name], None, torch.device("cpu"))[name]


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every row has at least n zeros."""
    rows, cols = weight.shape
    return cols % m == 0 and bool(((weight.reshape(rows, cols // m, m) == 0).sum(-1) >= n).all())


def read_report(folder: Path) -> dict:
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise UserError(f"{folder} has no report.json; is it a folder written by `sparsellm prune`?")
    with reading(f"{report_path} (damaged?)"):
        report = json.loads(report_path.read_text())
        for key in ("method", "protocol", "sparsity", "config"):
            report[key]  # noqa: B018 (every figure inspect checks hangs off these)
        report["sparsity"]["per_matrix"].items()
    return report


def _measure(weights: SafetensorsWeights, report: dict) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{matrix: (numel, zeros)} recomputed from the tensors, and what disagrees with the report's entries."""
    problems, measured = [], {}
    target = report["sparsity"]["target"]
    nm = tuple(int(v) for v in target.split(":")) if ":" in target else None
    for name, rec in report["sparsity"]["per_matrix"].items():
        key = next((k for k in weights.files if k.endswith(f"{name}.weight")), None)
        if key is None:
            problems.append(f"{name}: tensor missing")
            continue
        w = _load(weights, key)
        numel, zeros = w.numel(), int((w == 0).sum())
        measured[name] = (numel, zeros)
        if (numel, zeros) != (rec.get("numel"), rec.get("zeros")) or rec.get("measured") != zeros / numel:
            problems.append(f"{name}: {zeros} of {numel} zero on disk; the report says {rec.get('zeros')} of "
                            f"{rec.get('numel')} ({rec.get('measured')})")  # fmt: skip
        if nm and not nm_valid(w, *nm):
            problems.append(f"{name}: not a valid {target} pattern")
        if "mask_sha256" in rec and mask_sha256(w) != rec["mask_sha256"]:
            problems.append(f"{name}: its zeros on disk are not the ones the report records")
    recorded = {name: rec.get("mask_sha256") for name, rec in report["sparsity"]["per_matrix"].items()}
    source = report.get("recovery", {}).get("source_masks", {})
    problems += [f"{name}: recovery changed its zeros (the pruned folder's mask differs)"
                 for name, sha in source.items() if recorded.get(name) != sha]  # fmt: skip
    return measured, problems


def _fraction(target: str) -> float:
    with reading(f"the report's target {target!r}"):
        return int(target.split(":")[0]) / int(target.split(":")[1]) if ":" in target else float(target)


def _check_summary(report: dict, measured: dict[str, tuple[int, int]]) -> list[str]:
    """The report's overall figures against the ones recomputed from the tensors."""
    sparsity, problems = report["sparsity"], []
    total, zeros = sum(n for n, _ in measured.values()), sum(z for _, z in measured.values())
    overall = zeros / max(total, 1)
    if sparsity.get("measured") != overall or sparsity.get("kept_over_total") != f"{total - zeros}/{total}":
        problems.append(f"overall: {overall:.6f} ({total - zeros}/{total} kept) on disk; the report says "
                        f"{sparsity.get('measured')} ({sparsity.get('kept_over_total')})")  # fmt: skip
    target = sparsity["target"]
    fraction = _fraction(target)
    if sparsity.get("target_fraction") != fraction:
        problems.append(
            f"target: {target} is a fraction of {fraction}, the report says {sparsity.get('target_fraction')}"
        )
    if overall < fraction - 1e-4:
        problems.append(f"target not met: {overall:.6f} of the pruned matrices are zero, the target is {target}")
    layers = sorted({int(name.split(".")[1]) for name in sparsity["per_matrix"]})
    if layers != sorted(report["config"].get("layers_pruned", [])):
        problems.append(f"layers pruned: the matrices are of layers {layers}, the report says "
                        f"{report['config'].get('layers_pruned')}")  # fmt: skip
    return problems


def _storage(folder: Path, weights: SafetensorsWeights, report: dict) -> tuple[str, list[str]]:
    """The line describing how the tensors are stored, measured from the files, and its disagreements."""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    encodings: dict[str, int] = {}
    for entry in weights.entries.values():
        encodings[entry["encoding"]] = encodings.get(entry["encoding"], 0) + 1
    kind = "compressed" if weights.entries else "dense"
    line = f"storage: {kind}, {size / 1e6:.1f} MB of tensor files"
    if weights.entries:
        dense = report.get("storage", {}).get("dense_bytes", 0)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(encodings.items()))
        line += f" ({size / max(dense, 1):.3f}x the dense files' {dense / 1e6:.1f} MB; tensors stored {counts})"
    stated = report.get("storage")
    if stated is None:
        return line, []
    found = {"format": kind, "bytes": size, **({"encodings": encodings} if weights.entries else {})}
    return line, [f"storage: {k} is {v} on disk; the report says {stated.get(k)}"
                  for k, v in found.items() if stated.get(k) != v]  # fmt: skip


def _recovery_line(recovery: dict) -> str:
    config, data = recovery["config"], recovery["data"]
    before, after = recovery["before"]["perplexity"], recovery["after"]["perplexity"]
    change = ", ".join(f"{k} {before[k]:.2f} -> {after[k]:.2f}" for k in after if k in before)
    return (f"recovered: {recovery['tokens']} tokens of {data['name']} ({config['loss']}, teacher "
            f"{recovery.get('teacher')}); zeros held in {len(recovery['source_masks'])} matrices"
            + (f"; perplexity {change}" if change else ""))  # fmt: skip


def inspect_folder(folder: Path) -> tuple[bool, str]:
    """(everything agrees, the text to print): every figure printed is recomputed from the tensors."""
    report = read_report(folder)
    weights = _weights(folder)
    measured, problems = _measure(weights, report)
    problems = check_files(folder, report) + problems + _check_summary(report, measured)
    per_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for name, (numel, zeros) in measured.items():
        per_layer[int(name.split(".")[1])][0] += zeros
        per_layer[int(name.split(".")[1])][1] += numel
    total, zeros = sum(n for n, _ in measured.values()), sum(z for _, z in measured.values())
    target = report["sparsity"]["target"]
    layers = sorted(per_layer)
    lines = [
        f"model: {report.get('model')}  method: {report['method']}  target: {target}  protocol: {report['protocol']}",
        f"layers pruned: {layers[0] if layers else '-'}..{layers[-1] if layers else '-'} of "
        f"{report['config'].get('layers_total')}  measured sparsity: {zeros / max(total, 1):.4f} (kept/total "
        f"{total - zeros}/{total})",
        "layer  sparsity  target",
    ]
    targets = {log["index"]: log.get("target") for log in report.get("layers", [])}
    for layer, (z, n) in sorted(per_layer.items()):
        wanted = targets.get(layer)
        lines.append(f"{layer:5d}  {z / n:.4f}    " + (f"{wanted:.4f}" if isinstance(wanted, float) else "-"))
        if isinstance(wanted, float) and wanted > 0 and z / n < wanted - 0.01:  # N:M and per-row rounding are finer
            problems.append(f"layer {layer}: {z / n:.4f} zero on disk, its target is {wanted:.4f}")
    if report.get("perplexity"):
        lines.append(
            "perplexity (from the report): " + ", ".join(f"{k} {v:.3f}" for k, v in report["perplexity"].items())
        )
    if report.get("recovery"):
        lines.append(_recovery_line(report["recovery"]))
    storage, storage_problems = _storage(folder, weights, report)
    problems += storage_problems
    lines.append(storage)
    lines.append("manifest: " + json.dumps(report.get("manifest", {}), indent=1))
    lines += [f"MISMATCH {p}" for p in problems] or [
        "OK: file checksums and tensors match the report" + (f" and are valid {target}" if ":" in target else "")
    ]
    return not problems, "\n".join(lines)
