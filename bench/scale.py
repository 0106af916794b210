"""Scale benchmarks: peak memory and time of in-memory vs streamed pruning for random-init models of SmolLM2's
width with 4 and 32 decoder layers; SparseGPT on SmolLM2 with 1 vs 2 gloo ranks; and peak anonymous memory of a
prune under memory budgets.

    python bench/scale.py layers   # 4 vs 32 layers, --stream vs in memory
    python bench/scale.py ranks    # torchrun 1 vs 2 ranks on smollm2-135m, SparseGPT 70%, quick protocol
    python bench/scale.py memory --nsamples 32 --seqlen 2048 --budgets default,256MB   # SparseLLM 70%, SmolLM2
    python bench/scale.py memory --model qwen2.5-coder-1.5b --method sparsegpt --budgets 2GB --stream

Every run is a fresh process; figures come from its report.json (VmHWM: resident memory of every kind) and, in
`memory`, from /proc/PID/status sampled every 50 ms (RssAnon: anonymous pages only, without the pages of
memory-mapped files, which the OS can write out and drop under pressure; a peak shorter than 50 ms can be missed).
"""

import argparse
import json
import subprocess
import sys
import threading
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


def rss_anon_mb(pid: int) -> float:
    """The process's anonymous resident memory now, MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((x for x in status.splitlines() if x.startswith("RssAnon:")), "RssAnon: 0 kB")
    return int(line.split()[1]) / 1024


def sampled(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run `cmd`, sampling its RssAnon every 50 ms: (exit code, wall seconds, peak RssAnon MB)."""
    t0, peak = time.perf_counter(), [0.0]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], rss_anon_mb(proc.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        watcher.join()
    return code, time.perf_counter() - t0, peak[0]


def where(plan: dict, size: str, folder: str) -> str:
    return ("disk" if plan[folder] else "RAM") if plan[size] else "-"


def memory(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scale.py memory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsellm")
    ap.add_argument("--sparsity", default="0.7")
    ap.add_argument("--nsamples", default="32")
    ap.add_argument("--seqlen", default="512")
    ap.add_argument("--batch-size", default="8")
    ap.add_argument("--budgets", default="default,256MB", help="--max-memory values; 'default': none given")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--layers", help="prune only these decoder layers (as prune --layers): the peak is a layer's")
    ap.add_argument("--eval", default="", help="datasets to evaluate after pruning (none by default)")
    args = ap.parse_args(argv)
    print(
        "| model | method | tokens | layers | --max-memory | mode | prune s | wall s | peak RssAnon MB | VmHWM MB "
        "| activations | auxiliaries | WikiText-2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for budget in args.budgets.split(","):
        name = f"{args.model}-{args.method}-{args.nsamples}x{args.seqlen}-{budget}{'-stream' if args.stream else ''}"
        name += f"-layers-{args.layers.replace(':', '-')}" if args.layers else ""
        out = OUT / name
        cmd = [sys.executable, "-m", "sparsellm", "prune", args.model, "--method", args.method, "--sparsity",
               args.sparsity, "--nsamples", args.nsamples, "--seqlen", args.seqlen, "--batch-size",
               args.batch_size, "--out", str(out), "--overwrite"]  # fmt: skip
        cmd += ["--eval", args.eval] if args.eval else []
        cmd += [] if budget == "default" else ["--max-memory", budget]
        cmd += ["--stream"] if args.stream else []
        cmd += ["--layers", args.layers] if args.layers else []
        code, wall, peak = sampled(cmd, OUT / f"{name}.log")
        if code:
            raise SystemExit(f"scale: {' '.join(cmd)} failed; see {OUT / f'{name}.log'}")
        report = json.loads((out / "report.json").read_text())
        plan = report["config"]["activations"]
        ppl = report["perplexity"].get("wikitext2")
        print(f"| {args.model} | {args.method} | {args.nsamples} x {args.seqlen} | {args.layers or 'all'} | {budget} | "
              f"{'stream' if args.stream else 'in memory'} | {report['timing']['prune_s']:.0f} | {wall:.0f} | "
              f"{peak:.0f} | {report['peak_rss_mb']:.0f} | {plan['bytes'] / 2**20:.0f} MiB "
              f"{where(plan, 'bytes', 'offload_dir')} | {plan['auxiliary_bytes'] / 2**20:.0f} MiB "
              f"{where(plan, 'auxiliary_bytes', 'auxiliary_dir')} | {ppl or ''} |", flush=True)  # fmt: skip
        for f in out.glob("*.safetensors"):
            f.unlink()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "memory":
        memory(rest)
    else:
        {"layers": layers, "ranks": ranks}[mode]()
