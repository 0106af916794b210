"""The timed part of bench/gpu_check.sh: SparseGPT and SparseLLM at 70% on SmolLM2 and Qwen 1.5B (quick protocol,
WikiText-2, `--precision auto`: bf16 on a GPU that has it), each beside the CPU report of the same run, and on a GPU
the 2:4 SmolLM2 executed with torch's semi-structured sparse kernels against dense (prefill, batch 1 and 8).

    python bench/gpu_check.py --device cuda --reference DIR --out runs/gpu-check
    python bench/gpu_check.py --device cpu --out runs/gpu-reference   # the CPU reports `gpu_check.sh pack` carries

Each prune is a fresh `sparsellm prune` process; the table goes to OUT/gpu_check.md and stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from run import ROOT, machine

RUNS = [(model, method) for model in ("smollm2-135m", "qwen2.5-coder-1.5b") for method in ("sparsegpt", "sparsellm")]


def prune(args, model: str, method: str, target: list[str], name: str) -> dict:
    out = args.out / name
    cmd = [sys.executable, "-m", "sparsellm", "prune", model, "--method", method, *target, "--protocol", "quick",
           "--device", args.device, "--eval", "wikitext2", "--out", str(out), "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    with open(args.out / f"{name}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.exit(f"gpu_check: {' '.join(cmd)} failed; see {args.out / f'{name}.log'}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall_s": time.perf_counter() - t0, "folder": out}


def reference(args, name: str) -> dict | None:
    path = args.reference / f"{name}.json" if args.reference else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def prune_table(args) -> str:
    head = "| model | method | device | precision | prune s | WikiText-2 | CPU prune s | CPU WikiText-2 | CPU/device |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for model, method in RUNS:
        name = f"{model}-{method}-0.7"
        run = prune(args, model, method, ["--sparsity", "0.7"], name)
        report, cpu = run["report"], reference(args, name)
        for f in run["folder"].glob("*.safetensors"):
            f.unlink()
        prune_s, cpu_s = report["timing"]["prune_s"], cpu["timing"]["prune_s"] if cpu else None
        lines.append(f"| {model} | {method} | {args.device} | {report['precision']['name']} | {fmt(prune_s)} | "
                     f"{fmt(report['perplexity']['wikitext2'], 2)} | {fmt(cpu_s)} | "
                     f"{fmt(cpu['perplexity']['wikitext2'], 2) if cpu else ''} | "
                     f"{fmt(cpu_s / prune_s, 2) if cpu_s else ''} |")  # fmt: skip
        print(lines[-1], flush=True)
    return "\n".join(lines)


def seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.inference_mode()
def semi_structured_table(args) -> str:
    """SmolLM2 pruned 2:4 on the GPU, in fp16: prefill tokens/s dense and with every pruned linear's weight as
    torch's semi-structured sparse tensor (cuSPARSELt / CUTLASS 2:4 kernels)."""
    from torch.sparse import to_sparse_semi_structured

    from sparsellm import load

    run = prune(args, "smollm2-135m", "sparsegpt", ["--nm", "2:4"], "smollm2-135m-sparsegpt-2-4")
    pruned = set(run["report"]["sparsity"]["per_matrix"])
    model, _ = load(str(run["folder"]), device="cuda", dtype="float16")
    lines = ["| batch x tokens | dense tokens/s | semi-structured 2:4 tokens/s | ratio |", "|---|---|---|---|"]
    shapes = [(1, 512), (8, 512)]
    tokens = {s: torch.zeros(s, dtype=torch.long, device="cuda") for s in shapes}
    dense = {s: s[0] * s[1] / seconds(lambda s=s: model(tokens[s])) for s in shapes}
    try:
        for name, module in model.named_modules():
            if any(name.endswith(p) for p in pruned):
                module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight))
    except (RuntimeError, ValueError) as e:  # kernels missing on this GPU or build: say so, do not guess
        return "\n".join([*lines, f"| semi-structured conversion failed: {str(e).splitlines()[0]} | | | |"])
    for s in shapes:
        sparse = s[0] * s[1] / seconds(lambda s=s: model(tokens[s]))
        lines.append(f"| {s[0]} x {s[1]} | {dense[s]:.0f} | {sparse:.0f} | {sparse / dense[s]:.2f} |")
    shutil.rmtree(run["folder"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference", type=Path, help="folder of the CPU runs' reports, NAME.json")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    text = [f"`python bench/gpu_check.py --device {args.device}` on {gpu or machine()}, torch {torch.__version__}",
            "", prune_table(args)]  # fmt: skip
    if gpu:
        text += ["", semi_structured_table(args)]
    (args.out / "gpu_check.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
