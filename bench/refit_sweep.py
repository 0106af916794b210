"""The masked refit's iterations and product precision, linear by linear on held-out text.

    python bench/refit_sweep.py [--layers 5,12,20,27] [--sparsity 0.7] [--iterations 0,5,10,20,40] [--write]

In each decoder layer of `--layers` (the layers before it dense), every linear is pruned by Wanda and by SparseGPT
on the input Hessian of 32 calibration windows (c4 train, seed 0) and refit with each number of iterations, its
products in fp32 and in bf16. It is scored on 16 other windows (c4 train, seed 1) by the relative output error
tr((W - W') H (W - W')^T) / tr(W H W^T), H the held-out inputs' Hessian. The table gives the geometric mean of
that error over the layers' linears and the refit seconds summed over them (0 iterations: the method alone).
It does not predict the model's perplexity (5 iterations match 40 here and lose 6.5% for Wanda end to end):
choose with `bench/variants.py --eval c4`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from run import machine, publish, stamp
from sparsellm_sweep import layer_inputs_at

import sparsellm
from sparsellm.core import precision
from sparsellm.data import texts
from sparsellm.engine.stats import recording
from sparsellm.methods import Target, make_method
from sparsellm.methods.refit import Refit, row_error
from sparsellm.models.adapters import adapter_for, submodule
from sparsellm.models.layers import run_layer

PRECISIONS = {"fp32": precision.FP32, "bf16": precision.Precision("bf16", "bench")}


def site_hessians(model, adapter, tokens: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """{site: the input Hessian of decoder layer `index`'s linears there} with every layer dense."""
    x, kwargs = layer_inputs_at(model, adapter, tokens, index)
    layer = adapter.decoder_layers(model)[index]
    first = {site.name: submodule(layer, site.linears[0]) for site in adapter.sites}
    with recording(first, "hessian") as stats:
        run_layer(layer, x, kwargs, 8)
    return {name: stats[name].mean() for name in first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="5,12,20,27")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--iterations", default="0,5,10,20,40")
    ap.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    args = ap.parse_args()
    model, tokenizer = sparsellm.load(args.model)
    adapter, c4 = adapter_for(model), texts.corpus("c4", "train")
    fit_tokens, held_tokens = (texts.calibration(tokenizer, c4, n, 512, seed) for n, seed in ((32, 0), (16, 1)))
    iterations = [int(k) for k in args.iterations.split(",")]
    errors: dict[tuple, list[float]] = {}
    seconds: dict[tuple, float] = {}
    for index in (int(i) for i in args.layers.split(",")):
        fit, held = (site_hessians(model, adapter, t, index) for t in (fit_tokens, held_tokens))
        for site in adapter.sites:
            for path in site.linears:
                dense = submodule(adapter.decoder_layers(model)[index], path).weight.data.float()
                held_norm = float(row_error(dense, torch.zeros_like(dense), held[site.name]).sum())  # tr(W H W^T)
                for name in ("wanda", "sparsegpt"):
                    method = make_method(name)
                    stat = fit[site.name].diagonal().clone() if method.statistic == "sqnorm" else fit[site.name]
                    pruned = method.prune(dense, stat, Target(sparsity=args.sparsity)).weight
                    for k in iterations:
                        for p_name, p in PRECISIONS.items() if k else [("-", precision.FP32)]:
                            with precision.using(p):
                                t0 = time.perf_counter()
                                refit = Refit(k)(dense, pruned, fit[site.name]) if k else pruned
                                key = (name, k, p_name)
                                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
                            held_err = float(row_error(dense, refit, held[site.name]).sum()) / held_norm
                            errors.setdefault(key, []).append(held_err)
        print(f"layer {index} done", flush=True)
    lines = ["| method | iterations | products | held-out error (geometric mean) | refit s |", "|---|---|---|---|---|"]
    for (name, k, p_name), errs in errors.items():
        mean = math.exp(sum(math.log(e) for e in errs) / len(errs))
        lines.append(f"| {name} | {k} | {p_name} | {mean:.4f} | {seconds[(name, k, p_name)]:.1f} |")
    head = (f"`python bench/refit_sweep.py --model {args.model} --layers {args.layers} --sparsity {args.sparsity} "
            f"--iterations {args.iterations}` on {machine()}; {len(next(iter(errors.values())))} linears; "
            f"{stamp()}.")  # fmt: skip
    text = head + "\n\n" + "\n".join(lines)
    publish(text, f"refit_sweep.py {args.model} {args.sparsity}", args.write)


if __name__ == "__main__":
    main()
