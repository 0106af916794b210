"""Few calibration tokens per input: held-out perplexity against SparseGPT's damping of the input Hessian.

    python bench/damping.py --model smollm2-135m --nsamples 6 --percdamps 0.01,0.1,0.3,1.0

SparseGPT solves each linear's least squares on H = X^T X + damp I, damp = percdamp x mean(diag H). With few
calibration tokens per input (a wide linear, a short calibration set) H is a noisy estimate of the input's
covariance and the fit follows the calibration text; a larger damping pulls it back towards the dense weights.
Each line: one prune through the Python API (`PruneConfig.method_options={"percdamp": ...}`) and the C4
validation perplexity, the text defaults may be chosen on.
"""

from __future__ import annotations

import argparse
import time

import sparsellm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "sparsellm"))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=6, help="calibration windows of the quick protocol's 512 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percdamps", default="0.01,0.1,0.3,1.0")
    args = ap.parse_args()
    print("| model | method | sparsity | calibration | percdamp | C4 | prune s |\n|---|---|---|---|---|---|---|")
    for damp in (float(x) for x in args.percdamps.split(",")):
        model, tokenizer = sparsellm.load(args.model)
        config = sparsellm.PruneConfig(
            method=args.method,
            sparsity=args.sparsity,
            nsamples=args.nsamples,
            seed=args.seed,
            method_options={"percdamp": damp},
        )
        t0 = time.perf_counter()
        sparsellm.prune(model, tokenizer, config, progress=False)
        seconds = time.perf_counter() - t0
        ppl, _ = sparsellm.evaluate(model, tokenizer, ["c4"], progress=False)
        row = [args.model, args.method, args.sparsity, f"{args.nsamples} x 512, seed {args.seed}", damp]
        print("| " + " | ".join(map(str, row)) + f" | {ppl['c4']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
