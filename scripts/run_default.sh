#!/usr/bin/env bash
# The main job on a fresh machine: set up, prune the built-in SmolLM2-135M with SparseLLM at 70% on the
# bundled C4 calibration text (quick protocol), evaluate WikiText-2/PTB/C4, print the table, write
# runs/smollm2-135m-sparsellm-0.7/ (model, report.json, plots/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sparsellm prune smollm2-135m --method sparsellm --sparsity 0.7 --protocol quick \
  --eval wikitext2,ptb,c4 --out runs/smollm2-135m-sparsellm-0.7 --overwrite "$@"
