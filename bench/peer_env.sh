#!/usr/bin/env bash
# The peer toolkit for bench/run.py: llm-compressor in its own venv (.venv-peer), because it pins a transformers
# (<=5.17) other than ours. The same CPU build of torch as ours, so timings compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-peer/bin/python ] || python3 -m venv .venv-peer
.venv-peer/bin/python -m pip install -q "torch==2.13.0" "llmcompressor==0.14.0.1"
