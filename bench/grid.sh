#!/usr/bin/env bash
# Quick-protocol grid on the built-in SmolLM2: each run is a fresh `sparsellm prune` process (honest peak RSS),
# all on the same calibration tokens (c4, seed 0). Reports land in runs/bench/<method>-<target>/report.json;
# `python bench/table.py runs/bench` turns them into the BENCHMARKS.md table.
# Usage: bench/grid.sh "method:target[:datasets]" ...   (target 0.7 or 2:4; datasets default wikitext2)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
mkdir -p runs/bench
for spec in "$@"; do
  IFS=: read -r method t1 t2 t3 <<<"$spec"
  if [[ -n "${t2:-}" && "$t2" =~ ^[0-9]+$ ]]; then target="--nm $t1:$t2"; name="$method-$t1:$t2"; ds="${t3:-wikitext2}"
  else target="--sparsity $t1"; name="$method-$t1"; ds="${t2:-wikitext2}"; fi
  if [[ "$method" == dense ]]; then
    sparsellm eval smollm2-135m --datasets "$ds" --json > "runs/bench/dense.json"
    continue
  fi
  # shellcheck disable=SC2086
  sparsellm prune smollm2-135m --method "$method" $target --protocol quick --eval "$ds" \
    --out "runs/bench/$name" --overwrite 2> "runs/bench/$name.log" | tail -3
done
