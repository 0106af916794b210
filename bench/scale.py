"""Scale benchmarks (issue 6): peak RSS and time of in-memory vs streamed pruning for random-init models of
SmolLM2's width with 4 and 32 decoder layers; and SparseGPT on SmolLM2 with 1 vs 2 gloo ranks.

    python bench/scale.py layers   # 4 vs 32 layers, --stream vs in memory
    python bench/scale.py ranks    # torchrun 1 vs 2 ranks on smollm2-135m, SparseGPT 70%, quick protocol

Every run is a fresh process; figures come from its report.json (peak RSS is the process's VmHWM).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "scale"


def run(cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"scale: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": time.perf_counter() - t0, "prune_s": report["timing"]["prune_s"],
            "peak_rss_mb": report["peak_rss_mb"], "perplexity": report["perplexity"]}  # fmt: skip


def random_model(layers: int) -> Path:
    """SmolLM2-135M's shape (d 576, MLP 1536, 9 heads, 3 KV heads, its tokenizer), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sparsellm.models import loading

    folder = OUT / f"random-{layers}-layers"
    if not (folder / "config.json").exists():
        source = loading.resolve("smollm2-135m")
        config = AutoConfig.from_pretrained(source, num_hidden_layers=layers)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def layers() -> None:
    print("| layers | mode | prune s | wall s | peak RSS MB |\n|---|---|---|---|---|")
    for n in (4, 32):
        folder = random_model(n)
        for mode in ("in memory", "--stream"):
            out = OUT / f"pruned-{n}-{'stream' if mode == '--stream' else 'memory'}"
            cmd = [sys.executable, "-m", "sparsellm", "prune", str(folder), "--method", "sparsegpt", "--sparsity",
                   "0.7", "--protocol", "quick", "--out", str(out), "--overwrite"]  # fmt: skip
            r = run([*cmd, "--stream"] if mode == "--stream" else cmd, out)
            print(f"| {n} | {mode} | {r['prune_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)


def ranks() -> None:
    print("| ranks | prune s | wall s | peak RSS MB (rank 0) | WikiText-2 ppl |\n|---|---|---|---|---|")
    for n in (1, 2):
        out = OUT / f"smollm2-sparsegpt-0.7-{n}-ranks"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
               "sparsellm", "prune", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.7", "--protocol",
               "quick", "--eval", "wikitext2", "--out", str(out), "--overwrite"]  # fmt: skip
        r = run(cmd, out)
        print(f"| {n} | {r['prune_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['perplexity']['wikitext2']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    {"layers": layers, "ranks": ranks}[sys.argv[1]]()
