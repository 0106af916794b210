"""Choose SparseLLM's (alpha, beta, gamma, rounds) on held-out text: one SmolLM2 MLP, several settings.

    python bench/sparsellm_sweep.py --layer 20 --sparsity 0.8 --configs "[{'rounds': 1}, {'beta': 30}]"

The MLP of decoder `--layer` is pruned on the MLP inputs of 32 calibration windows (c4, seed 0; layers before
it dense) and scored on 16 held-out windows (c4, seed 1): relative output error ||Y - mlp(X)||^2 / ||Y||^2.
`{'rounds': 1}` is SparseGPT. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ast
import copy
import time

import torch

import sparsellm
from sparsellm.api import parse_nm
from sparsellm.data import texts
from sparsellm.engine.joint_mlp import mlp_inputs
from sparsellm.methods import Target, make_method
from sparsellm.models.adapters import adapter_for
from sparsellm.models.layers import capture, run_layer


def layer_inputs_at(model, adapter, tokens, layer_index):
    """The inputs of decoder layer `layer_index` and its kwargs, every layer before it dense."""
    inputs = capture(model, adapter, tokens, 8)
    x = inputs.hidden
    for i in range(layer_index):
        x = run_layer(adapter.decoder_layers(model)[i], x, inputs.kwargs[i], 8)
    return x, inputs.kwargs[layer_index]


def mlp_inputs_at(model, adapter, tokens, layer_index):
    x, kwargs = layer_inputs_at(model, adapter, tokens, layer_index)
    return mlp_inputs(adapter.decoder_layers(model)[layer_index], adapter, x, kwargs, 8)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--nm", default=None, help="N:M instead of --sparsity, e.g. 2:4")
    ap.add_argument("--configs", default="[{'rounds': 1}, {}]", help="a Python list of SparseLLM option dicts")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = sparsellm.load(args.model)
    adapter = adapter_for(model)
    c4 = texts.corpus("c4", "train")
    x_fit = mlp_inputs_at(model, adapter, texts.calibration(tok, c4, 32, 512, seed=0), args.layer)
    x_held = mlp_inputs_at(model, adapter, texts.calibration(tok, c4, 16, 512, seed=1), args.layer)
    layer = adapter.decoder_layers(model)[args.layer]
    target = parse_nm(args.nm) if args.nm else Target(sparsity=args.sparsity)
    with torch.no_grad():
        y_held = adapter.mlp(layer)(x_held)
    tokens = f"{x_fit.shape[0]} fit / {x_held.shape[0]} held-out tokens"
    print(f"layer {args.layer}, target {args.nm or args.sparsity}, {tokens}")
    print("| options | seconds | calibration error per round | kept | held-out error |")
    print("|---|---|---|---|---|")
    for options in ast.literal_eval(args.configs):
        mlp = adapter.mlp(copy.deepcopy(layer))
        t0 = time.perf_counter()
        log = make_method("sparsellm", **options).prune_mlp(mlp, x_fit, target).rounds
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            held = ((mlp(x_held) - y_held) ** 2).sum().item() / (y_held**2).sum().item()
        rounds = ", ".join(f"{e:.4f}" for e in log["output_error"])
        print(f"| {options} | {seconds:.1f} | {rounds} | {log['kept_round']} | {held:.4f} |")


if __name__ == "__main__":
    main()
