"""The zero-shot table of BENCHMARKS.md from `sparsellm eval --json` outputs (NAME.json) and pruned folders'
reports (NAME/report.json) in one folder: python bench/zeroshot_table.py runs/zeroshot"""

import json
import sys
from pathlib import Path

from sparsellm.data.zeroshot import PAPER_TASKS


def results(folder: Path) -> dict[str, dict]:
    files = {p.stem: p for p in folder.glob("*.json")} | {p.parent.name: p for p in folder.glob("*/report.json")}
    found = {}
    for name, path in files.items():
        try:
            found[name] = json.loads(path.read_text())
        except json.JSONDecodeError:  # a run still writing its output
            continue
    return {name: r for name, r in found.items() if r.get("zeroshot")}


def main(folder: Path) -> None:
    rows = sorted(results(folder).items(), key=lambda kv: (kv[0] != "dense", kv[0]))
    for metric in ("acc", "acc_norm"):
        tasks = [t for t in PAPER_TASKS if any(metric in r["zeroshot"]["tasks"].get(t, {}) for _, r in rows)]
        mean = " mean acc | limit |" if metric == "acc" else ""
        print(f"\n{metric}, % ± standard error\n\n| model | " + " | ".join(tasks) + " |" + mean)
        print("|---" * (len(tasks) + 1 + 2 * bool(mean)) + "|")
        for name, r in rows:
            cells = []
            for t in tasks:
                m = r["zeroshot"]["tasks"].get(t, {})
                cells.append(f"{100 * m[metric]:.1f} ± {100 * m[metric + '_stderr']:.1f}" if metric in m else "")
            tail = f" {100 * r['zeroshot']['mean_acc']:.2f} | {r['zeroshot']['limit']} |" if mean else ""
            print(f"| {name} | " + " | ".join(cells) + " |" + tail)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
