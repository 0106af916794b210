"""bf16 against fp32: prune time, evaluation time and WikiText-2 of the same runs in both precisions, side by side.

    python bench/precision.py                                  # SparseGPT, SparseLLM at 70% and 2:4, seeds 0, 1, 2
    python bench/precision.py --methods sparsegpt --targets 0.7 --seeds 0 --write

Each run is a fresh `sparsellm prune ... --precision P --eval wikitext2` process (pruning and evaluation both in
P), the two precisions of one setting back to back on the same calibration seed. Prints a Markdown table of the
runs and, per setting, bf16/fp32 of the prune time, of the evaluation time and of WikiText-2 perplexity, each
as its geometric mean over the seeds (at 70% one run's perplexity moves by several percent with its arithmetic
alone). `--write` replaces this bench's section of BENCHMARKS.md (one per model, methods and targets) in place.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from run import ROOT, geometric_mean, machine, seed_list, sh, target_args, write_section


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def prune(args, out: Path, seed: int, method: str, target: str, precision: str) -> dict:
    name = f"{method}-{target}-seed{seed}-{precision}"
    cmd = [sys.executable, "-m", "sparsellm", "prune", args.model, "--method", method, *target_args(target)]
    cmd += ["--seed", str(seed), "--precision", precision, "--eval", "wikitext2", "--out", str(out / name)]
    sh([*cmd, "--overwrite"], out / f"{name}.log")
    report = json.loads((out / name / "report.json").read_text())
    for f in (out / name).glob("*.safetensors"):
        f.unlink()
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "commit": commit(),
        "precision": report["precision"]["name"],
        "prune_s": report["timing"]["prune_s"],
        "eval_s": report["timing"]["eval_s"],
        "wikitext2": report["perplexity"]["wikitext2"],
        "measured": report["sparsity"]["measured"],
    }


def tables(rows: list[dict]) -> str:
    lines = ["| method | target | seed | precision | measured | prune s | eval s | WikiText-2 |", "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['target']} | {r['seed']} | {r['precision']} | {r['measured']:.4f} | "
            f"{r['prune_s']:.1f} | {r['eval_s']:.1f} | {r['wikitext2']:.2f} |"
        )
    lines += ["", "bf16 over fp32, geometric mean over the seeds (each seed's ratio in brackets):", ""]
    lines += ["| method | target | prune time | evaluation time | WikiText-2 |", "|---|---|---|---|---|"]
    settings = dict.fromkeys((r["method"], r["target"]) for r in rows)
    for method, target in settings:
        runs = {(r["seed"], r["precision"]): r for r in rows if (r["method"], r["target"]) == (method, target)}
        seeds = sorted({seed for seed, p in runs if p == "bf16" and (seed, "fp32") in runs})
        cells = []
        for key in ("prune_s", "eval_s", "wikitext2"):
            ratios = [runs[s, "bf16"][key] / runs[s, "fp32"][key] for s in seeds]
            cells.append(f"**{geometric_mean(ratios):.3f}** ({', '.join(f'{v:.3f}' for v in ratios)})")
        lines.append(f"| {method} | {target} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="sparsegpt,sparsellm")
    ap.add_argument("--targets", default="0.7,2:4", help="fractions or N:M (N of every M zeroed)")
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-precision")
    ap.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    ap.add_argument("--busy", help="what else ran on the machine (then the times are not figures), for the header")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs already in OUT/precision.json and run only the missing ones (a run disturbed by other "
        "work is deleted from the file and run again)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = args.out / "precision.json"
    done = json.loads(saved.read_text()) if args.reuse and saved.is_file() else []
    rows = []
    for seed in args.seeds:
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                for precision in ("fp32", "bf16"):
                    key = (method, target, seed, precision)
                    kept = [r for r in done if (r["method"], r["target"], r["seed"], r["precision"]) == key]
                    if not kept:
                        print(f"bench: seed {seed}: {method} {target} {precision}", file=sys.stderr)
                    rows.append(kept[0] if kept else prune(args, args.out, seed, method, target, precision))
                    saved.write_text(json.dumps(rows + [r for r in done if r not in rows], indent=1))
    text = (
        f"### bf16 against fp32: {args.model}, quick protocol, calibration seeds {', '.join(map(str, args.seeds))}\n\n"
        f"`python bench/precision.py {' '.join(sys.argv[1:])}` on {machine()}, "
        f"{args.busy or 'nothing else running'}; "
        f"started {started}; runs at commit {', '.join(sorted({r.get('commit', '?') for r in rows}))}.\n\n"
        f"{tables(rows)}\n"
    )
    (args.out / "precision.md").write_text(text)
    print(text)
    if args.write:
        write_section(text, f"precision.py {args.model} {args.methods} {args.targets}")


if __name__ == "__main__":
    main()
