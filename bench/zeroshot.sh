#!/usr/bin/env bash
# Zero-shot accuracy (lm-eval, the seven tasks, first 200 items each) of the dense SmolLM2 and of saved pruned
# folders, then the BENCHMARKS.md table: bench/zeroshot.sh runs/bench/sparsegpt-0.5 runs/bench/sparsegpt-0.7 ...
# Writes runs/zeroshot/<name>.json and prints `python bench/zeroshot_table.py runs/zeroshot`.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
mkdir -p runs/zeroshot
LIMIT="${LIMIT:-200}"
sparsellm eval smollm2-135m --tasks zeroshot --limit "$LIMIT" --json > runs/zeroshot/dense.json
for folder in "$@"; do
  sparsellm eval "$folder" --tasks zeroshot --limit "$LIMIT" --json > "runs/zeroshot/$(basename "$folder").json"
done
python bench/zeroshot_table.py runs/zeroshot
