"""Markdown table of a bench/grid.sh run: `python bench/table.py runs/bench` (reads */report.json and dense.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3, "sparsellm": 4}
DATASETS = ("wikitext2", "ptb", "c4")


def _fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def rows(folder: Path) -> list[dict]:
    out = []
    dense = folder / "dense.json"
    if dense.is_file():
        d = json.loads(dense.read_text())
        out.append({"method": "dense", "target": "0", "measured": 0.0, **d["perplexity"]})
    for report_path in sorted(folder.glob("*/report.json")):
        r = json.loads(report_path.read_text())
        out.append(
            {
                "method": r["method"],
                "target": r["sparsity"]["target"],
                "measured": r["sparsity"]["measured"],
                **r["perplexity"],
                "prune_s": r["timing"]["prune_s"],
                "peak_rss_mb": r["peak_rss_mb"],
            }
        )
    return sorted(out, key=lambda r: (r["target"], ORDER.get(r["method"], 9)))


def markdown(table: list[dict]) -> str:
    lines = [
        "| method | target | measured sparsity | WikiText-2 | PTB | C4 | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['method']} | {r['target']} | {_fmt(r['measured'], 4)} | "
            + " | ".join(_fmt(r.get(d)) for d in DATASETS)
            + f" | {_fmt(r.get('prune_s'), 0)} | {_fmt(r.get('peak_rss_mb'), 0)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench"))))
