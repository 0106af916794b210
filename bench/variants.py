"""Variants of the same runs side by side: prune time, evaluation time and WikiText-2 of each, and each over the
first, per calibration seed and as the geometric mean over the seeds.

    python bench/variants.py                                   # fp32 against bf16: SparseGPT, SparseLLM at 70%, 2:4
    python bench/variants.py --variants "plain=;refit=--refit pcg" --methods wanda,sparsegpt --targets 0.7 --write

A variant is a name and the `sparsellm prune` arguments it adds (`--variants "NAME=ARGS;NAME=ARGS"`, the first is
the baseline). Each run is a fresh `sparsellm prune ... --eval TEXT` process (WikiText-2 unless `--eval` says
otherwise: choose settings on `--eval c4`, the C4 validation windows, never on a test text), the variants of one
setting back to back on the same calibration seed. At 70% one run's perplexity moves by several percent with its
arithmetic alone and by 10-25% between seeds: compare the geometric means over seeds. `--write` replaces this
bench's section of BENCHMARKS.md (one per model, methods, targets, variants and text) in place.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from run import ROOT, commit, geometric_mean, machine, seed_list, sh, target_args, write_section

TEXT_NAMES = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}


def parse_variants(text: str) -> dict[str, list[str]]:
    variants = {}
    for item in filter(None, (v.strip() for v in text.split(";"))):
        name, _, extra = item.partition("=")
        variants[name.strip()] = shlex.split(extra)
    if len(variants) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two variants, NAME=ARGS;NAME=ARGS")
    return variants


def prune(args, seed: int, method: str, target: str, variant: str) -> dict:
    name = f"{method}-{target}-seed{seed}-{variant}"
    out = args.out / name
    cmd = [sys.executable, "-m", "sparsellm", "prune", args.model, "--method", method, *target_args(target)]
    cmd += ["--seed", str(seed), *args.variants[variant], "--eval", args.eval, "--out", str(out)]
    sh([*cmd, "--overwrite"], args.out / f"{name}.log")
    report = json.loads((out / "report.json").read_text())
    for f in out.glob("*.safetensors"):
        f.unlink()
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "variant": variant,
        "commit": commit(),
        "precision": report["precision"]["name"],
        "prune_s": report["timing"]["prune_s"],
        "eval_s": report["timing"]["eval_s"],
        args.eval: report["perplexity"][args.eval],
        "measured": report["sparsity"]["measured"],
    }


def tables(rows: list[dict], variants: list[str], text: str) -> str:
    name = TEXT_NAMES[text]
    lines = [f"| method | target | seed | variant | precision | measured | prune s | eval s | {name} |",
             "|" + "---|" * 9]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['target']} | {r['seed']} | {r['variant']} | {r['precision']} | {r['measured']:.4f} "
            f"| {r['prune_s']:.1f} | {r['eval_s']:.1f} | {r[text]:.2f} |"
        )
    base = variants[0]
    lines += ["", f"Each variant over {base}, geometric mean over the seeds (each seed's ratio in brackets), and its "
              f"{name} as the geometric mean over the seeds [lowest, highest]:", ""]  # fmt: skip
    lines += [f"| method | target | variant | prune time | evaluation time | {name} ratio | {name} |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, target in dict.fromkeys((r["method"], r["target"]) for r in rows):
        runs = {(r["seed"], r["variant"]): r for r in rows if (r["method"], r["target"]) == (method, target)}
        for variant in variants:
            seeds = sorted({seed for seed, v in runs if v == variant and (seed, base) in runs})
            if not seeds:
                continue
            cells = []
            for key in ("prune_s", "eval_s", text):
                ratios = [runs[s, variant][key] / runs[s, base][key] for s in seeds]
                cells.append(f"**{geometric_mean(ratios):.3f}** ({', '.join(f'{v:.3f}' for v in ratios)})")
            ppl = [runs[s, variant][text] for s in seeds]
            cells.append(f"{geometric_mean(ppl):.2f} [{min(ppl):.2f}, {max(ppl):.2f}]")
            lines.append(f"| {method} | {target} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="sparsegpt,sparsellm")
    ap.add_argument("--targets", default="0.7,2:4", help="fractions or N:M (N of every M zeroed)")
    ap.add_argument("--variants", type=parse_variants, default="fp32=--precision fp32;bf16=--precision bf16")
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    ap.add_argument("--eval", choices=tuple(TEXT_NAMES), default="wikitext2", help="the text each run is scored on")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-variants")
    ap.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    ap.add_argument("--busy", help="what else ran on the machine (then the times are not figures), for the header")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs already in OUT/variants.json and run only the missing ones (a run disturbed by other "
        "work is deleted from the file and run again)",
    )
    args = ap.parse_args()
    if isinstance(args.variants, str):
        args.variants = parse_variants(args.variants)
    args.out = args.out.resolve()  # the runs start in the repository's root
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = args.out / "variants.json"
    done = json.loads(saved.read_text()) if args.reuse and saved.is_file() else []
    rows = []
    for seed in args.seeds:
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                for variant in args.variants:
                    key = (method, target, seed, variant)
                    kept = [
                        r for r in done if (r["method"], r["target"], r["seed"], r["variant"]) == key and args.eval in r
                    ]
                    if not kept:
                        print(f"bench: seed {seed}: {method} {target} {variant}", file=sys.stderr)
                    rows.append(kept[0] if kept else prune(args, seed, method, target, variant))
                    saved.write_text(json.dumps(rows + [r for r in done if r not in rows], indent=1))
    names = list(args.variants)
    described = "; ".join(f"{n}: `{' '.join(a) or '(defaults)'}`" for n, a in args.variants.items())
    text = (
        f"### {' against '.join(names)}: {args.model}, quick protocol, calibration seeds "
        f"{', '.join(map(str, args.seeds))}\n\n"
        f"`python bench/variants.py {shlex.join(sys.argv[1:])}` ({described}) on {machine()}, "
        f"{args.busy or 'nothing else running'}; "
        f"started {started}; runs at commit {', '.join(sorted({r.get('commit', '?') for r in rows}))}.\n\n"
        f"{tables(rows, names, args.eval)}\n"
    )
    (args.out / "variants.md").write_text(text)
    print(text)
    if args.write:
        scored = "" if args.eval == "wikitext2" else f" {args.eval}"
        write_section(text, f"variants.py {args.model} {args.methods} {args.targets} {','.join(names)}{scored}")


if __name__ == "__main__":
    main()
