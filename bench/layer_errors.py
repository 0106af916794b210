"""Where do two pruned models part? Each one's per-layer output error along its own pipeline.

    python bench/layer_errors.py runs/s7/fast [--runs sparsegpt-0.7,llmcompressor-sparsegpt-0.7]

It reads the pruned weights: run the bench with --keep-models.

For each pruned model folder of a bench run: the bench's calibration tokens go through the pruned model one
decoder layer at a time, and at each layer the pruned layer's output is compared with the dense layer's on the
same input, ||Y_pruned - Y_dense||^2 / ||Y_dense||^2 (what report.json's recon_error measures for our runs).
Prints a Markdown table with the ratio of the first run to the second per layer and its geometric mean.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import sparsellm
from sparsellm.models.adapters import adapter_for
from sparsellm.models.layers import capture, run_layer


def layer_errors(dense_layers, model, adapter, tokens: torch.Tensor) -> list[float]:
    captured = capture(model, adapter, tokens, 8)
    x, errors = captured.hidden, []
    for dense, pruned, kwargs in zip(dense_layers, adapter.decoder_layers(model), captured.kwargs, strict=True):
        y_dense, y = run_layer(dense, x, kwargs, 8), run_layer(pruned, x, kwargs, 8)
        errors.append(((y - y_dense).pow(2).sum() / y_dense.pow(2).sum()).item())
        x = y
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench", type=Path, help="a bench/run.py output folder (holds calibration.pt)")
    ap.add_argument("--runs", default="sparsegpt-0.7,llmcompressor-sparsegpt-0.7", help="two model folders in it")
    ap.add_argument("--model", default="smollm2-135m", help="the dense model the runs pruned")
    args = ap.parse_args()
    tokens = torch.load(args.bench / "calibration.pt")
    dense, _ = sparsellm.load(args.model)
    adapter = adapter_for(dense)
    names = args.runs.split(",")
    errors = [layer_errors(adapter.decoder_layers(dense), sparsellm.load(str(args.bench / n))[0], adapter, tokens)
              for n in names]  # fmt: skip
    print(f"| layer | {names[0]} | {names[1]} | ratio |\n|---|---|---|---|")
    ratios = [a / b for a, b in zip(*errors, strict=True)]
    for i, (a, b) in enumerate(zip(*errors, strict=True)):
        print(f"| {i} | {a:.5f} | {b:.5f} | {ratios[i]:.3f} |")
    print(f"geometric mean of the ratios: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}")


if __name__ == "__main__":
    main()
