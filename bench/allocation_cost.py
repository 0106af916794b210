"""What `--allocation` costs: its pass over the dense model against one forward pass of the calibration set.

    python bench/allocation_cost.py [--model smollm2-135m] [--repeats 3] [--write]

The calibration set is a prune's (c4, 32 x 512 under the quick protocol, seed 0), in the precision a prune
would choose. The forward pass is the engine's: every decoder layer applied to the layer-0 inputs in turn.
Each rule's time is `engine.allocate.layer_targets`, the whole of what `--allocation` adds to a prune (owl:
that same layer-by-layer pass with its input norms recorded, then the outlier ratios; dlp: the same pass, then
the median Wanda score of each layer; alpha: the singular values of every pruned matrix, no data). The fastest
of `--repeats` runs of each is reported.
"""

from __future__ import annotations

import argparse

import torch
from run import machine, publish, seconds, stamp

import sparsellm
from sparsellm.api import protocol, seqlen_for
from sparsellm.core import precision
from sparsellm.core.memory import in_ram
from sparsellm.core.types import LayerIO
from sparsellm.data import texts
from sparsellm.engine.allocate import layer_targets
from sparsellm.methods.allocation import Allocation
from sparsellm.methods.base import Target
from sparsellm.models.adapters import adapter_for
from sparsellm.models.layers import capture, run_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    args = ap.parse_args()
    model, tokenizer = sparsellm.load(args.model)
    adapter, proto = adapter_for(model), protocol("quick")
    calib = texts.calibration(tokenizer, texts.corpus("c4", "train"), proto.nsamples, seqlen_for(model, proto, None), 0)
    chosen = precision.resolve("auto", torch.device("cpu"))
    decoder, batch = adapter.decoder_layers(model), 8
    layers, target = set(range(len(decoder))), Target(sparsity=0.7)
    with torch.no_grad(), precision.using(chosen):
        inputs = capture(model, adapter, calib, batch, in_ram)

        def forward() -> None:
            x = inputs.hidden
            for layer, kwargs in zip(decoder, inputs.kwargs, strict=True):
                x = run_layer(layer, x, kwargs, batch)

        rows = [("one forward pass of the calibration set", min(seconds(forward, args.repeats)))]
        for rule in ("owl", "dlp", "alpha"):
            allocate = lambda rule=rule: layer_targets(  # noqa: E731
                model, adapter, Allocation(rule), target, inputs, layers, batch, in_ram, LayerIO()
            )
            rows.append((f"--allocation {rule}", min(seconds(allocate, args.repeats))))
    head = (f"`python bench/allocation_cost.py --model {args.model} --repeats {args.repeats}` on {machine()}; "
            f"{calib.shape[0]} x {calib.shape[1]} calibration tokens, {chosen.name}; "
            f"{stamp()}.")  # fmt: skip
    lines = ["| pass | seconds | / forward pass |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {s / rows[0][1]:.2f} |" for name, s in rows]
    text = head + "\n\n" + "\n".join(lines)
    publish(text, f"allocation_cost.py {args.model}", args.write)


if __name__ == "__main__":
    main()
