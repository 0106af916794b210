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
    rows = results(folder)
    print("| model | " + " | ".join(PAPER_TASKS) + " | mean acc | limit |")
    print("|---" * (len(PAPER_TASKS) + 3) + "|")
    for name, r in sorted(rows.items(), key=lambda kv: (kv[0] != "dense", kv[0])):
        tasks = r["zeroshot"]["tasks"]
        cells = []
        for t in PAPER_TASKS:
            m = tasks.get(t)
            cells.append("" if m is None else f"{100 * m['acc']:.1f} ± {100 * m['acc_stderr']:.1f}")
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {100 * r['zeroshot']['mean_acc']:.2f} | {r['zeroshot']['limit']} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
