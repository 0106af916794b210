#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, then lint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
ruff check sparsellm tests bench
