"""Time SparseLLM's MLP solve alone on one real decoder layer: the number to watch when making SparseLLM faster.

    python bench/mlp_solve.py --model qwen2.5-coder-1.5b --layer 0 --sparsity 0.7 --repeats 3

The layer's MLP inputs for the quick protocol's calibration tokens (seed 0) are taken from the dense model (the
layers below it unpruned), then `SparseLLM().prune_mlp` runs on a fresh copy of the MLP `--repeats` times in this
process, after a small warm-up that compiles the fused elementwise steps. Prints each solve's seconds and the
rounds' per-token output errors (which a faster solve must leave as they were, up to summation order). To compare
two commits, run it in a worktree of each, alternating.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from run import commit, machine

import sparsellm
from sparsellm.core import precision
from sparsellm.core.memory import keep_freed_memory
from sparsellm.data import texts
from sparsellm.engine.joint_mlp import mlp_inputs
from sparsellm.methods.base import Target
from sparsellm.methods.sparsellm import SparseLLM
from sparsellm.models.adapters import adapter_for
from sparsellm.models.layers import capture, run_layer


def layer_mlp_inputs(model, adapter, layer: int, nsamples: int, seqlen: int, tokenizer) -> torch.Tensor:
    tokens = texts.calibration(tokenizer, texts.corpus("c4", "train"), nsamples, seqlen, 0)
    captured = capture(model, adapter, tokens, 8)
    hidden, layers = captured.hidden, adapter.decoder_layers(model)
    for i in range(layer):
        hidden = run_layer(layers[i], hidden, captured.kwargs[i], 8)
    return mlp_inputs(layers[layer], adapter, hidden, captured.kwargs[layer], 8)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=precision.CHOICES)
    args = ap.parse_args()
    keep_freed_memory()  # as the engine does: the solve's large temporaries reuse the heap
    model, tokenizer = sparsellm.load(args.model)
    adapter = adapter_for(model)
    chosen = precision.resolve(args.precision, torch.device("cpu"))
    with precision.using(chosen):
        with precision.forward(torch.device("cpu")):
            x = layer_mlp_inputs(model, adapter, args.layer, 32, 512, tokenizer)
        mlp = adapter.mlp(adapter.decoder_layers(model)[args.layer])
        SparseLLM(rounds=2).prune_mlp(copy.deepcopy(mlp), x[:1024], Target(args.sparsity))  # compiles
        print(f"{args.model} layer {args.layer}, {x.shape[0]} tokens, SparseLLM {args.sparsity}, {chosen.name}; "
              f"{machine()}, commit {commit()}")  # fmt: skip
        print("| run | seconds | token error per round |\n|---|---|---|")
        for k in range(args.repeats):
            fresh = copy.deepcopy(mlp)
            start = time.perf_counter()
            result = SparseLLM().prune_mlp(fresh, x, Target(args.sparsity))
            errors = ", ".join(f"{e:.6f}" for e in result.rounds["token_error"])
            print(f"| {k + 1} | {time.perf_counter() - start:.1f} | {errors} |")


if __name__ == "__main__":
    main()
