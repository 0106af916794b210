#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, then lint.
set -euo pipefail
cd "$(dirname "$0")/.."
free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 4 ]; then  # pruned SmolLM2 folders: the suite writes up to ~2 GB at once, plus the venv
  echo "warning: only ${free_gb} GB free on this disk; the tests need about 4 GB (setup included)" >&2
fi
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
ruff check sparsellm tests bench
