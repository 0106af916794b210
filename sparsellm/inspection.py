"""`sparsellm inspect`: re-measure a saved model's sparsity from its tensors and check it against its report."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from .core.errors import UserError
from .core.files import sha256_file


def _check_files(folder: Path, report: dict) -> list[str]:
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


def _tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors files")
    index = {}
    for f in files:
        with safe_open(f, "pt") as st:
            index.update({k: (f, k) for k in st.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    return index


def _load(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(where[0], "pt") as st:
        return st.get_tensor(where[1])


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every row has at least n zeros."""
    rows, cols = weight.shape
    return cols % m == 0 and bool(((weight.reshape(rows, cols // m, m) == 0).sum(-1) >= n).all())


def inspect_folder(folder: Path) -> tuple[bool, str]:
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise UserError(f"{folder} has no report.json; is it a folder written by `sparsellm prune`?")
    report = json.loads(report_path.read_text())
    tensors = _tensors(folder)
    target = report["sparsity"]["target"]
    nm = tuple(int(v) for v in target.split(":")) if ":" in target else None
    per_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    problems = _check_files(folder, report)
    for name, rec in report["sparsity"]["per_matrix"].items():
        key = next((k for k in tensors if k.endswith(f"{name}.weight")), None)
        if key is None:
            problems.append(f"{name}: tensor missing")
            continue
        w = _load(tensors[key])
        zeros = int((w == 0).sum())
        if zeros != rec["zeros"]:
            problems.append(f"{name}: {zeros} zeros on disk, report says {rec['zeros']}")
        if nm and not nm_valid(w, *nm):
            problems.append(f"{name}: not a valid {target} pattern")
        layer = int(name.split(".")[1])
        per_layer[layer][0] += zeros
        per_layer[layer][1] += w.numel()
    lines = [
        f"model: {report.get('model')}  method: {report['method']}  target: {target}  protocol: {report['protocol']}",
        f"layers pruned: {report['config']['layers_pruned'][0]}..{report['config']['layers_pruned'][-1]} "
        f"of {report['config']['layers_total']}  measured sparsity: {report['sparsity']['measured']:.4f} "
        f"(dense zeros {report['sparsity']['dense_zeros']:.4f}; kept/total {report['sparsity']['kept_over_total']})",
        "layer  sparsity",
    ]
    for layer, (z, n) in sorted(per_layer.items()):
        lines.append(f"{layer:5d}  {z / n:.4f}")
    if report.get("perplexity"):
        lines.append("perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in report["perplexity"].items()))
    lines.append("manifest: " + json.dumps(report.get("manifest", {}), indent=1))
    lines += [f"MISMATCH {p}" for p in problems] or [
        "OK: file checksums and tensors match the report" + (f" and are valid {target}" if nm else "")
    ]
    return not problems, "\n".join(lines)
