"""Recovery after pruning: quality before and after `sparsellm recover`, and the training throughput.

    python bench/recover.py --folders runs/rec/sllm70,runs/rec/sgpt24 --tokens 500000 [--reuse] [--write]
    python bench/recover.py --folders runs/rec/sllm70 --tokens 65536 --lrs 3e-4,1e-3 --eval c4 --section recover-lr
    python bench/recover.py --folders runs/rec/sllm70 --tokens 65536 --eval c4 --settings 'kl=;hidden=--loss kl+hidden'
    python bench/recover.py --throughput runs/rec/sllm70 [--write]

Quality: each pruned folder (a `sparsellm prune` output) is recovered in each --settings (the defaults, unless a
setting says otherwise: `--loss kl`, C4 train without the calibration windows, 2 x 512 tokens a step) at each
learning rate, and evaluated before and after;
`sparsellm inspect` must pass on the result (its zeros are the pruned folder's). Throughput: tokens a second of
one optimizer step (8 windows of 512 in micro-batches of 4) after one warm-up step, for plain fine-tuning (ce, no
teacher) and the distillation step with its teacher, in bf16 autocast and fp32, on the same folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from run import ROOT, commit, machine, write_section


def settings(text: str) -> dict[str, list[str]]:
    """'NAME=ARGS;...' -> {NAME: the `sparsellm recover` arguments}."""
    pairs = [item.split("=", 1) for item in text.split(";") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise SystemExit(f"bench: --settings wants NAME=ARGS;NAME=ARGS...; got {text!r}")
    return {name.strip(): shlex.split(extra) for name, extra in pairs}


def recover(folder: Path, setting: str, lr: str, args) -> dict:
    """Recover `folder` with `setting` at learning rate `lr` (or reuse the result) and the row of the table."""
    out = args.out / f"{folder.name}-{setting}-lr{lr}-{args.tokens}"
    if not (args.reuse and (out / "report.json").is_file()):
        cmd = [sys.executable, "-m", "sparsellm", "recover", str(folder), "--tokens", str(args.tokens), "--lr", lr,
               "--eval", args.eval, "--out", str(out), "--overwrite", *args.settings[setting]]  # fmt: skip
        print("bench:", shlex.join(cmd), file=sys.stderr)
        with open(args.out / f"{out.name}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
                raise SystemExit(f"bench: recovering {folder} failed; see {log.name}")
    report = json.loads((out / "report.json").read_text())
    inspected = subprocess.run([sys.executable, "-m", "sparsellm", "inspect", str(out)], capture_output=True, cwd=ROOT)
    rec = report["recovery"]
    return {
        "model": f"{report['method']} {report['sparsity']['target']}",
        "setting": setting,
        "loss": rec["config"]["loss"],
        "lr": rec["config"]["lr"],
        "tokens": rec["tokens"],
        "before": rec["before"]["perplexity"],
        "after": rec["after"]["perplexity"],
        "zeroshot": [(rec[k].get("zeroshot") or {}).get("mean_acc") for k in ("before", "after")],
        "train s": rec["train_s"],
        "tok/s": rec["tokens_per_s"],
        "masks held": "yes" if inspected.returncode == 0 else "NO",
    }


def quality_table(rows: list[dict]) -> str:
    names = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
    datasets = [d for d in names if d in rows[0]["after"]]
    columns = [f"{names[d]} before -> after" for d in datasets]
    zeroshot = any(None not in r["zeroshot"] for r in rows)
    columns += ["zero-shot mean acc before -> after"] if zeroshot else []
    lines = [f"| pruned model | setting | loss | lr | tokens | {' | '.join(columns)} | train s | tok/s | masks held |",
             "|---" * (8 + len(columns)) + "|"]  # fmt: skip
    for r in rows:
        cells = [f"{r['before'][d]:.2f} -> **{r['after'][d]:.2f}** ({r['after'][d] / r['before'][d]:.3f})"
                 for d in datasets]  # fmt: skip
        if zeroshot:
            cells.append(" -> ".join("-" if acc is None else f"{100 * acc:.2f}" for acc in r["zeroshot"]))
        lines.append(f"| {r['model']} | {r['setting']} | {r['loss']} | {r['lr']:g} | {r['tokens']} | "
                     f"{' | '.join(cells)} | {r['train s']:.0f} | {r['tok/s']:.0f} | {r['masks held']} |")  # fmt: skip
    return "\n".join(lines)


def throughput(folder: Path) -> list[dict]:
    """Tokens a second of one recovery step, for each kind of step, measured in this process."""
    import torch

    import sparsellm
    from sparsellm.core import precision
    from sparsellm.recovery.masks import Masks
    from sparsellm.recovery.run import pruned_linears
    from sparsellm.recovery.trainer import RecoverConfig, Trainer

    report = json.loads((folder / "report.json").read_text())
    windows = torch.randint(0, 49152, (16, 512), generator=torch.Generator().manual_seed(0))
    rows = []
    for loss, arithmetic in [("ce", "fp32"), ("ce", "bf16"), ("kl", "fp32"), ("kl", "bf16")]:
        student, _ = sparsellm.load(str(folder))
        teacher = None
        if loss == "kl":
            teacher, _ = sparsellm.load(report["model"])
            teacher = teacher.requires_grad_(False).to(torch.bfloat16 if arithmetic == "bf16" else torch.float32)
        config = RecoverConfig(tokens=2 * 8 * 512, loss=loss, precision=arithmetic)
        trainer = Trainer(student, teacher, Masks(pruned_linears(student, report)), config,
                          precision.Precision(arithmetic, "bench"))  # fmt: skip
        curve = trainer.run(windows, progress=False)
        rows.append({"step": "plain fine-tuning (ce)" if loss == "ce" else "distillation (kl, teacher)",
                     "precision": arithmetic, "tok/s": 8 * 512 / curve[-1].seconds})  # fmt: skip
        print(rows[-1], file=sys.stderr)
    return rows


def throughput_table(rows: list[dict]) -> str:
    plain = {r["precision"]: r["tok/s"] for r in rows if r["step"].startswith("plain")}
    lines = [
        "| step | precision | tokens/s | / plain fine-tuning, same precision | / goal 1000 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tok/s"] / plain[r["precision"]]
        lines.append(f"| {r['step']} | {r['precision']} | {r['tok/s']:.0f} | {ratio:.2f} | {r['tok/s'] / 1000:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folders", default="", help="pruned folders to recover, comma-separated")
    ap.add_argument("--tokens", type=int, default=500000)
    ap.add_argument("--lrs", default="1e-3", help="peak learning rates, comma-separated")
    ap.add_argument("--eval", default="wikitext2,ptb,c4", help="perplexity datasets before and after")
    ap.add_argument("--section", default="recover-quality", help="the BENCHMARKS.md section to replace")
    settings_help = "NAME=ARGS;... : `sparsellm recover` arguments beside its defaults ('kl=;h=--loss kl+hidden')"
    ap.add_argument("--settings", default="kl=", help=settings_help)
    ap.add_argument("--throughput", type=Path, help="a pruned folder to time the training step on")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-recover")
    ap.add_argument("--reuse", action="store_true", help="keep recovered folders already in OUT")
    ap.add_argument("--busy", help="what else ran on the machine (then the times are not figures)")
    ap.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.settings = settings(args.settings)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"`python bench/recover.py {shlex.join(sys.argv[1:])}` on {machine()}, "
              f"{args.busy or 'nothing else running'}; started {started}, commit {commit()}"
              + ("; recovered folders already in OUT were reused, not run again." if args.reuse else "."))  # fmt: skip
    if args.folders:
        rows = [recover(Path(f).resolve(), setting, lr, args) for f in args.folders.split(",")
                for setting in args.settings for lr in args.lrs.split(",")]  # fmt: skip
        text = f"### Before and after recovery: smollm2-135m, quick protocol\n\n{header}\n\n{quality_table(rows)}\n"
        print(text)
        if args.write:
            write_section(text, args.section)
    if args.throughput:
        text = (f"### Recovery throughput: smollm2-135m\n\n{header}\n\n"
                f"{throughput_table(throughput(args.throughput.resolve()))}\n")  # fmt: skip
        print(text)
        if args.write:
            write_section(text, "recover-throughput")


if __name__ == "__main__":
    main()
