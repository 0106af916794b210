"""The benchmark in one command: quality and cost of every method, beside llm-compressor and the cost floor.

    python bench/run.py                 # default grid: every method at 50/70/80/90%, 2:4, 3:4 (75-94 min on 2 cores)
    python bench/run.py --fast          # SparseGPT, SparseLLM at 70% and 2:4 (WikiText-2), llm-compressor's SparseGPT
    python bench/run.py --model gemma3-270m --methods sparsegpt,sparsellm --sparsities 0.7
    python bench/run.py --methods sparsegpt --sparsities 0.8,3:4 --all-datasets none --seeds 0,1,2,3

Every run is a fresh `sparsellm prune` process (honest peak RSS) on the same calibration tokens (the
protocol's sampler, `--seed`, default 0; each report's token sha256 is checked against the one the bench computed).
With several `--seeds` the grid runs once per seed (OUT/seed-K/) and the table ends with ours/theirs per seed and
its geometric mean: at 80% and 3:4 one run's perplexity moves with the last bits of its arithmetic (a standard
deviation of 6% at 3:4 on SmolLM2) and more between seeds, so a 1% comparison is a comparison of means.
llm-compressor (optional: `bash bench/peer_env.sh` makes `.venv-peer`, since it pins its own transformers)
prunes the same linears from the same tokens in its own process; its model is evaluated by our evaluator,
so perplexities differ only by the pruning. The floor is two forward passes of the calibration set
through the dense decoder, the least any layer-wise method must do. Writes OUT/bench.json, OUT/bench.md,
OUT/*.png and OUT/dense.json (the dense row and floor, which a later grid in the same OUT reuses), and each row
in its run's folder as row.json (`--resume` reads those instead of running them again); `--write`
puts the table into BENCHMARKS.md, replacing the section of the same model, methods, targets and seeds. Each
run's folder keeps its report, plots and log;
its weights are deleted once read (`--keep-models` keeps them: ~20 GB for the default grid on SmolLM2).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from functools import cache, partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
DATASETS_ALL = ("wikitext2", "ptb", "c4")
PEER_METHODS = ("sparsegpt", "wanda")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 0,1,2,3") from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: each seed once (a repeated seed repeats the same runs)")
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,sparsellm")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,2:4,3:4", help="fractions or N:M (N of M zeroed)")
    ap.add_argument("--all-datasets", default="0.7,2:4", help="targets also evaluated on PTB and C4")
    ap.add_argument("--protocol", default="quick")
    ap.add_argument(
        "--seeds",
        "--seed",
        type=seed_list,
        default=[0],
        help="calibration sampler seeds, e.g. 0,1,2,3: the grid once per seed (one tensor for every run of a seed),"
        " then ours/theirs per seed and its geometric mean",
    )
    ap.add_argument(
        "--fast",
        action="store_true",
        help="SparseGPT and SparseLLM at 70%% and 2:4, WikiText-2 only, beside llm-compressor's SparseGPT",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-run")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="read the rows already measured in OUT (same model, protocol, seed, method, target, calibration tokens,"
        " texts and machine) instead of running them again",
    )
    ap.add_argument("--write", action="store_true", help="replace this grid's section of BENCHMARKS.md (or add it)")
    ap.add_argument(
        "--keep-models",
        action="store_true",
        help="keep every pruned model's weights (0.5 GB each for SmolLM2; by default only reports, logs, plots stay)",
    )
    ap.add_argument(
        "--zeroshot-limit",
        type=int,
        help="also score the seven zero-shot tasks (lm-eval) on the first N items each: the mean acc column",
    )
    args = ap.parse_args(argv)
    if args.fast:
        # The peer runs the methods we share with it: here its SparseGPT, the pair of the goals' ratios.
        args.methods, args.sparsities, args.all_datasets = "sparsegpt,sparsellm", "0.7,2:4", "none"
    return args


def datasets_for(args, target: str) -> tuple[str, ...]:
    return DATASETS_ALL if target in args.all_datasets.split(",") else ("wikitext2",)


def zeroshot_args(args) -> list[str]:
    return ["--tasks", "zeroshot", "--limit", str(args.zeroshot_limit)] if args.zeroshot_limit else []


def mean_acc(report: dict) -> float | None:
    return report["zeroshot"]["mean_acc"] if report.get("zeroshot") else None


def target_args(target: str) -> list[str]:
    return ["--nm", target] if ":" in target else ["--sparsity", target]


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed (exit {done.returncode}); see {log}")


def calibrations(model: str, protocol: str, folders: dict[int, Path]) -> dict[int, tuple[Path, str]]:
    """Each seed's calibration tokens, which every run of that seed uses, saved in its folder for the peer; and
    their sha256 as our reports state it."""
    import sparsellm
    from sparsellm.api import protocol as named_protocol
    from sparsellm.api import seqlen_for, tensor_sha256
    from sparsellm.data import texts

    m, tok = sparsellm.load(model)
    proto, corpus = named_protocol(protocol), texts.corpus("c4", "train")
    out = {}
    for seed, folder in folders.items():
        tokens = texts.calibration(tok, corpus, proto.nsamples, seqlen_for(m, proto, None), seed=seed)
        folder.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a bad --model leaves no folder
        torch.save(tokens, folder / "calibration.pt")
        out[seed] = folder / "calibration.pt", tensor_sha256(tokens.to(torch.int64))
    return out


def kept(args, folder: Path, key: dict, run) -> dict:
    """A grid row, kept in FOLDER/row.json with its key and when it was measured: with `--resume` a row of the
    same key (a stopped grid's, or another grid's in the same OUT) is read instead of run again."""
    path = folder / "row.json"
    if args.resume and path.is_file():
        row = json.loads(path.read_text())
        if row["key"] == key:
            return {**row["row"], "reused": row["measured"]}
    measured, row = stamp(), run()
    path.write_text(json.dumps({"key": key, "measured": measured, "row": row}, indent=1))
    return row


def row_key(args, seed: int, toolkit: str, method: str, target: str, calib_sha: str) -> dict:
    return {"model": args.model, "protocol": args.protocol, "seed": seed, "toolkit": toolkit, "method": method,
            "target": target, "calibration": calib_sha, "datasets": list(datasets_for(args, target)),
            "zeroshot_limit": args.zeroshot_limit, "machine": machine()}  # fmt: skip


def run_name(toolkit: str, method: str, target: str) -> str:
    """A run's folder (and log) name in OUT: ours bare, the peer's prefixed by its toolkit."""
    return f"{method}-{target}" if toolkit == "sparsellm" else f"{toolkit}-{method}-{target}"


def ours(args, out: Path, seed: int, method: str, target: str, calib_sha: str) -> dict:
    name = run_name("sparsellm", method, target)
    datasets = datasets_for(args, target)
    cmd = [sys.executable, "-m", "sparsellm", "prune", args.model, "--method", method, *target_args(target)]
    cmd += ["--protocol", args.protocol, "--seed", str(seed), "--eval", ",".join(datasets)]
    cmd += ["--out", str(out / name), "--overwrite"]
    cmd += zeroshot_args(args)
    sh(cmd, out / f"{name}.log")
    return our_row(args, out / name, seed, method, target, calib_sha)


def our_row(args, folder: Path, seed: int, method: str, target: str, calib_sha: str) -> dict:
    """The table's row of one of our runs, read from its report (its weights are then deleted)."""
    name = folder.name
    report = json.loads((folder / "report.json").read_text())
    drop_weights(args, folder)
    if report["data"]["calibration"]["tokens_sha256"] != calib_sha:
        raise SystemExit(f"bench: {name} used other calibration tokens than the bench computed")
    return {
        "seed": seed,
        "toolkit": "sparsellm",
        "method": method,
        "target": target,
        "measured": report["sparsity"]["measured"],
        "perplexity": report["perplexity"],
        "zeroshot_acc": mean_acc(report),
        "prune_s": report["timing"]["prune_s"],
        "peak_rss_mb": report["peak_rss_mb"],
        "recon_error": [layer["recon_error"] for layer in report["layers"]],
    }


def peer(args, out: Path, seed: int, method: str, target: str, calib: Path) -> dict:
    name = run_name("llmcompressor", method, target)
    folder = out / name
    from sparsellm.models import loading

    source = str(loading.resolve(args.model))
    cmd = [str(PEER_PYTHON), str(ROOT / "bench" / "peer_llmcompressor.py"), "--model", source]
    cmd += ["--method", method, "--target", target, "--calibration", str(calib), "--out", str(folder)]
    sh(cmd, out / f"{name}.log")
    run = json.loads((folder / "peer.json").read_text())
    datasets = datasets_for(args, target)
    cmd = [sys.executable, "-m", "sparsellm", "eval", str(folder), "--datasets", ",".join(datasets)]
    cmd += ["--protocol", args.protocol, "--json", *zeroshot_args(args)]
    evaluated = json.loads(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    measured = measured_sparsity(folder)
    drop_weights(args, folder)
    return {"seed": seed, "toolkit": "llmcompressor", "method": method, "target": target, "measured": measured,
            "zeroshot_acc": mean_acc(evaluated), **run, **evaluated}  # fmt: skip


def drop_weights(args, folder: Path) -> None:
    """A default grid is ~40 pruned models: their numbers are read, their weights need not fill the disk."""
    if not args.keep_models:
        for f in folder.glob("*.safetensors"):
            f.unlink()


def measured_sparsity(folder: Path) -> float:
    """Zeros over all decoder-layer linears of a saved model, counted as sparsellm counts its own."""
    import sparsellm
    from sparsellm.api import model_zeros
    from sparsellm.models.adapters import adapter_for

    model, _ = sparsellm.load(str(folder))
    adapter = adapter_for(model)
    counts = model_zeros(model, adapter, list(range(len(adapter.decoder_layers(model))))).values()
    return sum(z for _, z in counts) / sum(n for n, _ in counts)


def dense_and_floor(args, calib: Path) -> dict:
    """Dense perplexity and the floor, measured once per OUT folder: a later grid in the same OUT (another method
    of the same model and protocol, on the same machine) reuses OUT/dense.json when it covers the texts it needs.
    On a 1.5B model the dense evaluation alone is 20 minutes of a 2-core machine."""
    every = sorted({d for t in args.sparsities.split(",") for d in datasets_for(args, t)})
    cache = args.out / "dense.json"
    key = {"model": args.model, "protocol": args.protocol, "zeroshot_limit": args.zeroshot_limit, "machine": machine()}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["key"] == key and set(every) <= set(cached["perplexity"]):
            return cached
    dense = {"key": key, "measured": stamp(), **measure_dense(args, calib, every)}
    cache.write_text(json.dumps(dense, indent=1))
    return dense


def measure_dense(args, calib: Path, datasets: list[str]) -> dict:
    """Dense perplexity, and the floor: two forward passes of the calibration set through the dense decoder."""
    code = (
        "import json, sys, time, torch, sparsellm\n"
        "from sparsellm.core.memory import keep_freed_memory\n"
        "from sparsellm.models.layers import capture, run_layer\n"
        "from sparsellm.models.adapters import adapter_for\n"
        "keep_freed_memory()  # as the CLI runs our methods: the floor is the fastest two passes\n"
        "model, _ = sparsellm.load(sys.argv[1]); adapter = adapter_for(model)\n"
        "tokens = torch.load(sys.argv[2]); seconds = []\n"
        "for _ in range(2):\n"
        "    t0 = time.perf_counter(); inputs = capture(model, adapter, tokens, 8); x = inputs.hidden\n"
        "    with torch.no_grad():\n"
        "        for i, layer in enumerate(adapter.decoder_layers(model)):\n"
        "            x = run_layer(layer, x, inputs.kwargs[i], 8)\n"
        "    seconds.append(time.perf_counter() - t0)\n"
        "print(json.dumps({'floor_s': sum(seconds)}))\n"
    )
    floor = json.loads(
        subprocess.run(
            [sys.executable, "-c", code, args.model, str(calib)], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    )
    cmd = [sys.executable, "-m", "sparsellm", "eval", args.model, "--datasets", ",".join(datasets)]
    cmd += ["--protocol", args.protocol, "--json", *zeroshot_args(args)]
    dense = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    return {**floor, "perplexity": dense["perplexity"], "zeroshot_acc": mean_acc(dense)}


def fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], dense: dict) -> str:
    """One line per run; ours beside llm-compressor's as ratios (perplexity on WikiText-2, seconds)."""
    peers = {id(ours): theirs for ours, theirs in pairs(rows)}
    head = "| toolkit | method | target | measured | WikiText-2 | PTB | C4 | zero-shot acc | prune s | x floor |"
    lines = [head + " peak RSS MB | ppl ours/theirs | s ours/theirs |", "|" + "---|" * 13]
    ppl = dense["perplexity"]
    lines.append(
        f"| dense | | 0 | | {fmt(ppl.get('wikitext2'))} | {fmt(ppl.get('ptb'))} | {fmt(ppl.get('c4'))} | "
        f"{fmt(dense.get('zeroshot_acc'), 4)} |" + " | | | | |"
    )
    for r in rows:
        p, theirs = r["perplexity"], peers.get(id(r))
        ratio_ppl = p["wikitext2"] / theirs["perplexity"]["wikitext2"] if theirs else None
        ratio_s = r["prune_s"] / theirs["prune_s"] if theirs else None
        lines.append(
            f"| {r['toolkit']} | {r['method']} | {r['target']} | {fmt(r.get('measured'), 4)} | "
            f"{fmt(p.get('wikitext2'))} | {fmt(p.get('ptb'))} | {fmt(p.get('c4'))} | {fmt(r.get('zeroshot_acc'), 4)} | "
            f"{fmt(r['prune_s'], 0)} | "
            f"{fmt(r['prune_s'] / dense['floor_s'], 1)} | {fmt(r['peak_rss_mb'], 0)} | {fmt(ratio_ppl, 3)} | "
            f"{fmt(ratio_s, 2)} |"
        )
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["toolkit"], r["method"]) for r in rows}):
        pts = sorted(
            (float(r["target"]), r["perplexity"]["wikitext2"])
            for r in rows
            if (r["toolkit"], r["method"]) == key and ":" not in r["target"]
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=" ".join(key))
    ax.set(xlabel="sparsity", ylabel="WikiText-2 perplexity", yscale="log", title="perplexity vs sparsity")
    ax.grid(alpha=0.3)
    if ax.lines:  # a grid of N:M targets only has no point on a sparsity axis
        ax.legend(fontsize=7)
    fig.savefig(out / "perplexity_vs_sparsity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.get("recon_error") and r["target"] in ("0.7", "2:4"):
            ax.plot(r["recon_error"], label=f"{r['method']} {r['target']}")
    ax.set(xlabel="decoder layer", ylabel="||Y - Y_pruned||² / ||Y||²", yscale="log", title="per-layer output error")
    ax.grid(alpha=0.3)
    if ax.lines:  # errors are drawn for 70% and 2:4 only
        ax.legend(fontsize=7)
    fig.savefig(out / "recon_error_per_layer.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    for r in rows:  # SparseLLM's per-layer objective curves (the paper's Figure 3 kind), drawn by each run
        curves = out / f"{r['method']}-{r['target']}" / "plots" / "sparsellm_rounds.png"
        if r["toolkit"] == "sparsellm" and curves.is_file():
            shutil.copy(curves, out / f"sparsellm_rounds-{r['target']}.png")


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(our run, llm-compressor's run of the same method, target and seed), for each of ours that has one."""
    theirs = {(r["method"], r["target"], r["seed"]): r for r in rows if r["toolkit"] == "llmcompressor"}
    keyed = ((r, (r["method"], r["target"], r["seed"])) for r in rows if r["toolkit"] == "sparsellm")
    return [(r, theirs[key]) for r, key in keyed if key in theirs]


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def over_seeds(rows: list[dict]) -> str:
    """Ours/theirs per seed and their geometric mean: at high sparsity one run's perplexity is a draw from a spread
    wider than 1% (the last bits of its arithmetic decide masks that compound over the layers), so a goal of 1%
    is judged on the mean over calibration seeds."""
    lines = [
        "| method | target | ppl ours/theirs, each seed | geometric mean | ours lower | s ours/theirs (geo. mean) |",
        "|---|---|---|---|---|---|",
    ]
    by_setting: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for ours, theirs in pairs(rows):
        by_setting.setdefault((ours["method"], ours["target"]), []).append((ours, theirs))
    for (method, target), runs in by_setting.items():
        ppl = [a["perplexity"]["wikitext2"] / b["perplexity"]["wikitext2"] for a, b in runs]
        sec = [a["prune_s"] / b["prune_s"] for a, b in runs]
        lines.append(
            f"| {method} | {target} | {', '.join(f'{v:.3f}' for v in ppl)} | **{geometric_mean(ppl):.3f}** | "
            f"{sum(v < 1 for v in ppl)} of {len(ppl)} | {geometric_mean(sec):.2f} |"
        )
    return "\n".join(lines)


def grid(args, out: Path, seed: int, calib: Path, calib_sha: str, use_peer: bool) -> list[dict]:
    """Every method at every target on one seed's calibration tokens, ours and (if installed) llm-compressor's."""
    rows, methods = [], args.methods.split(",")
    for target in args.sparsities.split(","):
        runs = [("sparsellm", m, partial(ours, args, out, seed, m, target, calib_sha)) for m in methods]
        runs += [
            ("llmcompressor", m, partial(peer, args, out, seed, m, target, calib))
            for m in PEER_METHODS
            if use_peer and m in methods
        ]
        for toolkit, method, run in runs:
            print(f"bench: seed {seed}: {toolkit} {method} {target}", file=sys.stderr)
            key = row_key(args, seed, toolkit, method, target, calib_sha)
            rows.append(kept(args, out / run_name(toolkit, method, target), key, run))
    plots(rows, out)
    return rows


def commit() -> str:
    """The short hash of the checked-out commit (every table names the code it measured)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def stamp() -> str:
    """When and at which commit a table was measured."""
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}"


def seconds(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn`; what it returns is freed outside the timed span."""
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return times


@cache  # one lscpu call: every row's key and the table's header name the machine
def machine() -> str:
    """The CPU model and its bf16 flags, as lscpu gives them (speed differs by CPU, so every table says)."""
    from sparsellm.core.precision import CPU_BF16_FLAGS, cpu_flags

    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), platform.machine())
    flags = sorted(cpu_flags() & set(CPU_BF16_FLAGS)) or ["no bf16 flags"]
    threads = torch.get_num_threads()
    return f"{model} ({', '.join(flags)}), {threads} thread{'s' if threads > 1 else ''}"


def reused_note(rows: list[dict]) -> str:
    """The rows a `--resume` read from earlier runs, and when those ran (the table names its own commit)."""
    reused = [
        f"{r['toolkit']} {r['method']} {r['target']} seed {r['seed']} ({r['reused']})" for r in rows if "reused" in r
    ]
    return f" Rows measured by an earlier run in OUT: {'; '.join(reused)}." if reused else ""


def publish(text: str, key: str, write: bool) -> None:
    """Print a bench's table, and with `write` put it in its section of BENCHMARKS.md."""
    print(text)
    if write:
        write_section(text, key)


def write_section(text: str, key: str) -> None:
    """Replace the section for `key` in BENCHMARKS.md (between its markers), or add it at the end: the file holds
    today's numbers, regenerated in place, not a log of runs."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    mark, end = f"<!-- bench/{key} -->", f"<!-- end bench/{key} -->"
    section = f"{mark}\n{text.strip()}\n{end}"
    if mark in doc and end in doc:
        doc = doc[: doc.index(mark)] + section + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(doc)


def main() -> None:
    args = parse_args()
    use_peer = not args.no_peer and PEER_PYTHON.exists()
    if not args.no_peer and not use_peer:
        print(
            f"bench: llm-compressor is not installed ({PEER_PYTHON} missing; run `bash bench/peer_env.sh`): "
            "its columns stay empty",
            file=sys.stderr,
        )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # One seed writes straight into OUT (as before seeds were a list); several, each into OUT/seed-K.
    folders = {k: args.out if len(args.seeds) == 1 else args.out / f"seed-{k}" for k in args.seeds}
    calib = calibrations(args.model, args.protocol, folders)
    dense = dense_and_floor(args, calib[args.seeds[0]][0])  # neither depends on the seed: measured once
    rows = []
    for k in args.seeds:
        rows += grid(args, folders[k], k, *calib[k], use_peer)
    result = {
        "started": started,
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "protocol": args.protocol,
        "seeds": args.seeds,
        "dense": dense,
        "runs": rows,
    }
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    seeds = ("seeds " if len(args.seeds) > 1 else "seed ") + ", ".join(map(str, args.seeds))
    text = (
        f"### {args.model}, protocol {args.protocol}, calibration {seeds}, {started}\n\n"
        f"`{result['command']}` on {result['machine']};"
        f" floor (two dense forward passes of the calibration set) {dense['floor_s']:.1f} s"
        f" (with the dense row: {dense['measured']})."
        + reused_note(rows)
        + (
            f" Zero-shot acc: mean `acc` over the seven tasks, first {args.zeroshot_limit} items each"
            " (HellaSwag from the bundled preprocessed copy, not lm-eval-exact)."
            if args.zeroshot_limit
            else ""
        )
        + "\n"
    )
    for k in args.seeds:
        heading = f"\nSeed {k}:\n" if len(args.seeds) > 1 else ""
        text += heading + "\n" + table([r for r in rows if r["seed"] == k], dense) + "\n"
    if len(args.seeds) > 1 and pairs(rows):
        text += "\nOurs against llm-compressor over the seeds (WikiText-2):\n\n" + over_seeds(rows) + "\n"
    (args.out / "bench.md").write_text(text)
    print(text)
    if args.write:
        write_section(text, f"run.py {args.model} {args.methods} {args.sparsities} seeds {args.seeds}")


if __name__ == "__main__":
    from sparsellm.core.errors import UserError

    try:
        main()
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
