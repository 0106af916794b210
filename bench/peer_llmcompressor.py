"""llm-compressor's SparseGPT or Wanda on the bench's calibration tokens, in its own environment.

    .venv-peer/bin/python bench/peer_llmcompressor.py --model FOLDER --method sparsegpt --target 0.7 \
        --calibration runs/bench-run/calibration.pt --out DIR

Runs in `.venv-peer` (made by `bench/peer_env.sh`) because llm-compressor pins its own transformers. It prunes
every Linear of the decoder layers (lm_head ignored: the same matrices sparsellm prunes) layer by layer
(its "sequential" pipeline, like ours), with its defaults otherwise (block 128, dampening 0.01 as ours).
Writes DIR as a plain Hugging Face folder (uncompressed safetensors, the source's config and tokenizer)
plus DIR/peer.json with prune seconds, peak RSS and versions. Perplexity is measured by the bench with
sparsellm's evaluator, so both toolkits are scored on the same windows by the same code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import llmcompressor
import torch
import transformers
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from safetensors.torch import save_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

MODIFIERS = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}


def peak_rss_mb() -> float:
    """VmHWM, as sparsellm reports it (ru_maxrss would include the RSS of the bench process that forked us)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="a Hugging Face folder (the bench passes our cache)")
    ap.add_argument("--method", choices=sorted(MODIFIERS), required=True)
    ap.add_argument("--target", required=True, help="a fraction, or N:M with N of every M zeroed")
    ap.add_argument("--calibration", type=Path, required=True, help="a saved [n, seqlen] token tensor")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=8, help="as sparsellm's engine")
    args = ap.parse_args()
    if ":" in args.target:
        n, m = (int(v) for v in args.target.split(":"))
        sparsity, structure = n / m, args.target
    else:
        sparsity, structure = float(args.target), "0:0"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = torch.load(args.calibration)
    samples = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in tokens]
    loader = DataLoader(samples, batch_size=args.batch_size, shuffle=False)
    recipe = MODIFIERS[args.method](
        sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, pipeline="sequential", max_seq_length=tokens.shape[1])
    prune_s = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    for f in args.model.iterdir():  # config and tokenizer unchanged: the folder loads like the source
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".json.index"):
            shutil.copy(f, args.out / f.name)
    run = {
        "prune_s": prune_s,
        "peak_rss_mb": peak_rss_mb(),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    (args.out / "peer.json").write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
