"""`sparsellm prune | recover | eval | inspect | compress | decompress`: bad input is a one-line error with exit
status 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .core import parallel
from .core.errors import UserError
from .core.files import strict_json
from .engine import CHECKPOINT_EVERY
from .models.loading import BUILTINS

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract for every bad input), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"sparsellm: error: {message} (see {self.prog} --help)\n")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (statistics are fp32 on any device)")
    p.add_argument("--dtype", default="float32", help="weights as loaded and saved: float32, bfloat16 or float16")
    p.add_argument(
        "--precision",
        default="auto",
        help="matrix products: bf16 (sums, solves and weights stay fp32), fp32, or auto (default): bf16 where the "
        "hardware has bf16 products (CPU flags amx_bf16/avx512_bf16, a GPU with bf16), fp32 elsewhere",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="never hold the whole model: read one decoder layer at a time from the safetensors files "
        "(and write pruned layers as they finish); memory is one layer plus activations",
    )
    p.add_argument(
        "--protocol",
        default="quick",
        help="quick (seqlen 512, 32 calibration samples, first 64 "
        "windows per text) or standard (seqlen 2048, 128 samples, full test sets)",
    )
    p.add_argument("--seqlen", type=int, help="override the protocol's sequence length")
    z = p.add_argument_group("zero-shot accuracy through lm-evaluation-harness")
    z.add_argument(
        "--tasks",
        default="",
        help="lm-eval tasks: zeroshot (the papers' seven: boolq, rte, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa), or a list of those and piqa, lambada_openai",
    )
    z.add_argument("--limit", type=int, help="score only the first N items of each task (recorded in the report)")
    z.add_argument(
        "--hellaswag-file",
        type=Path,
        help="the original hellaswag_val.jsonl (only a preprocessed, not lm-eval-exact copy is bundled)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsellm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--threads", type=_positive_int, help="torch threads (default: OMP_NUM_THREADS if set, else all cores)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it with report.json")
    p.add_argument("model", help=f"built-in name ({', '.join(BUILTINS)}), .gguf file, HF folder or hub id")
    p.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt or sparsellm")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of each matrix zeroed, in [0, 1)")
    target.add_argument(
        "--nm",
        help="N:M semi-structured: N of every M consecutive input weights are zeroed "
        "(2:4 = 50%%, 3:4 = 75%%), as in the SparseGPT/SparseLLM code",
    )
    _add_eval_args(p)
    p.add_argument("--calib", default="c4", help="calibration text: c4, ptb, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, help="calibration samples (default: the protocol's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="all", help="all, first-half (the SparseLLM paper's protocol), A:B or i,j,k")
    p.add_argument(
        "--true-sequential",
        action="store_true",
        help="prune q,k,v -> o -> gate,up -> down in turn, recomputing each group's inputs",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-memory",
        help="RAM for the per-token tensors (layer inputs and outputs, then SparseLLM's auxiliaries), e.g. 8GB; "
        "what does not fit is memory-mapped from files in --offload-dir (default: half the machine's RAM)",
    )
    p.add_argument("--offload-dir", help="folder for offloaded tensors (default: the system's temporary folder)")
    p.add_argument(
        "--refit",
        choices=("none", "pcg", "alps"),
        default="none",
        help="pcg: after each linear's mask is chosen, re-solve its kept weights to reproduce the dense outputs on "
        "the calibration inputs (conjugate gradients on the Hessian; any method; SparseLLM: its attention linears and "
        "each W-step's sparse fit of its MLP); alps: first let the mask move (ALPS's ADMM on the Hessian, the same "
        "zero count), kept where it lowers the calibration error (SparseLLM: the same linears as pcg)",
    )
    p.add_argument("--refit-iterations", type=_positive_int, help="conjugate-gradient iterations (default 10)")
    p.add_argument("--alps-iterations", type=_positive_int, help="alps: most ADMM iterations (default 30)")
    p.add_argument("--alps-rho", type=float, help="alps: the ADMM penalty it starts from (default 0.1)")
    p.add_argument(
        "--alps-rounds",
        type=_positive_int,
        help="sparsellm with alps: ALPS in the last K rounds' W-steps only, PCG in the earlier (default: every round)",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "owl", "dlp", "alpha"),
        default="uniform",
        help="per-layer sparsities (--sparsity only): owl prunes layers with more activation outliers less (one "
        "dense pass); dlp prunes layers with a higher median Wanda score more (the same pass); alpha prunes layers "
        "with heavier-tailed weight spectra less (AlphaPruning, data-free)",
    )
    p.add_argument(
        "--owl-lambda",
        type=float,
        help="the allocation's spread, OWL's lambda or DLP's alpha: layer targets within target +- this (default: "
        "the method's, chosen on C4 validation: owl 0.2 with sparsegpt or sparsellm, dlp 0.15 with wanda; else 0.08)",
    )
    p.add_argument("--owl-m", type=float, help="owl: an outlier's score exceeds M x the layer mean (default 5)")
    p.add_argument(
        "--damping",
        type=float,
        help="sparsegpt, sparsellm: the ridge added to each input Hessian, as a fraction of its mean diagonal "
        "(default 0.01); with few calibration tokens per input (a wide linear, a short calibration set) a larger one "
        "(0.1) fits the calibration text less closely",
    )
    s = p.add_argument_group("SparseLLM (--method sparsellm)")
    s.add_argument("--rounds", type=int, help="alternating rounds per MLP (round 1 = SparseGPT)")
    s.add_argument("--alpha", type=float, help="weight of the up/gate terms (each term is normalised per layer)")
    s.add_argument("--beta", type=float, help="weight of the output term")
    s.add_argument("--gamma", type=float, help="weight of the activation coupling term")
    s.add_argument(
        "--dense-attention-input",
        action="store_true",
        help="take the MLP input before the layer's attention was pruned (the reference code's variant)",
    )
    p.add_argument("--eval", default="", help="perplexity datasets to evaluate after pruning, e.g. wikitext2,ptb,c4")
    p.add_argument("--out", required=True, help="output folder (Hugging Face format + report.json)")
    p.add_argument(
        "--save-format",
        choices=("dense", "compressed"),
        default="dense",
        help="dense: a plain Hugging Face folder; compressed: each sparse matrix as a bitmask (or N:M codes) and its "
        "kept values, whichever is smaller (sparsellm eval/inspect/load read it; `sparsellm decompress` undoes it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (and any checkpoint)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from OUT.checkpoint; same arguments required",
    )
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=CHECKPOINT_EVERY,
        metavar="SECONDS",
        help="save OUT.checkpoint after a layer once this many seconds have passed since the last save "
        f"(default {CHECKPOINT_EVERY:g}; 0: after every layer). A kill loses at most about this much work",
    )

    r = p.add_argument_group("recovery after pruning (sparsellm recover has every option)")
    r.add_argument("--recover-tokens", type=_positive_int, help="then fine-tune on this many tokens, zeros held, in "
                   "windows of --seqlen (default 512)")  # fmt: skip
    r.add_argument("--recover-loss", help="kl (default), kl+hidden or ce")
    r.add_argument("--recover-data", help="c4 (default), ptb or a .txt/.jsonl file")
    r.add_argument("--recover-lr", type=float, help="peak learning rate (default 1e-3)")

    _add_recover_parser(sub)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or pruned folder")
    e.add_argument("model")
    e.add_argument("--datasets", help="perplexity datasets (default: wikitext2,ptb,c4 unless only --tasks is given)")
    _add_eval_args(e)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    conversions = {"compress": "a pruned folder, compressed", "decompress": "a compressed folder's dense twin"}
    for command, what in conversions.items():
        c = sub.add_parser(command, help=f"write {what} (the same tensors, bit for bit)")
        c.add_argument("folder", help="a folder written by `sparsellm prune`")
        c.add_argument("out")
        c.add_argument("--overwrite", action="store_true", help="replace an output folder sparsellm wrote")

    i = sub.add_parser("inspect", help="per-layer sparsity, N:M validity and the manifest of a pruned folder")
    i.add_argument("folder")
    return parser


def _add_recover_parser(sub) -> None:
    r = sub.add_parser("recover", help="fine-tune a pruned folder with its zeros held, distilling from the dense model")
    r.add_argument("folder", help="a folder written by `sparsellm prune`")
    r.add_argument("--teacher", help="the dense model (default: the model the folder was pruned from)")
    r.add_argument("--tokens", type=_positive_int, required=True, help="training tokens in all")
    # The training options default to None: RecoverConfig's own defaults apply (importing it here would load torch
    # for every `--help`).
    r.add_argument("--loss", help="kl (KL to the teacher's logits; default), kl+hidden (plus "
                   "SquareHead's per-layer normalised hidden-state MSE) or ce (next-token, no teacher)")  # fmt: skip
    r.add_argument("--data", help="c4 (default) or ptb (train splits, calibration windows left out) or a "
                   ".txt/.jsonl file; a bundled evaluation text is refused")  # fmt: skip
    r.add_argument("--train-seqlen", type=_positive_int, help="tokens per training window (default 512)")
    r.add_argument("--batch-size", type=_positive_int, help="windows per optimizer step (default 2)")
    r.add_argument("--micro-batch", type=_positive_int, help="windows per forward pass (accumulated; default 2; "
                   "under torchrun each rank's, so 2 ranks at the default batch need --micro-batch 1)")  # fmt: skip
    r.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-3)")
    r.add_argument("--warmup", type=float, help="fraction of the steps warming up, then cosine decay (default 0.05)")
    r.add_argument("--weight-decay", type=float, help="AdamW's (default 0)")
    r.add_argument("--clip", type=float, help="gradient norm clipping (default 1.0)")
    r.add_argument("--seed", type=int, help="order of the training windows (default 0)")
    r.add_argument("--freeze", help="parts that do not train: embeddings, norms, head (comma-separated; default "
                   "embeddings,head; none trains them all). The pruned linears' zeros never train")  # fmt: skip
    _add_eval_args(r)
    r.add_argument("--eval", default="wikitext2", help="perplexity datasets before and after (default wikitext2)")
    r.add_argument("--out", required=True)
    r.add_argument("--save-format", choices=("dense", "compressed"), default="dense")
    r.add_argument("--overwrite", action="store_true", help="replace an output folder sparsellm wrote")
    r.add_argument("--resume", action="store_true", help="continue a killed run from OUT.checkpoint")
    r.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                   help="save the training state (weights and AdamW's moments: 3 copies of the trained weights) after "
                   "a step once this many seconds have passed (default 300; 0: every step)")  # fmt: skip


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _datasets(spec: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in spec.split(",") if d.strip())


def _with_stderr(result: dict, metric: str) -> str:
    return f"{result[metric]:.4f} ± {result[metric + '_stderr']:.4f}" if metric in result else ""


def _zeroshot_rows(summary: dict) -> list[dict]:
    rows = []
    for task, r in summary["tasks"].items():
        rows.append({"task": task, "acc": _with_stderr(r, "acc"), "acc_norm": _with_stderr(r, "acc_norm"), "n": r["n"]})
    rows.append({"task": "mean acc", "acc": f"{summary['mean_acc']:.4f}", "n": f"limit {summary['limit']}"})
    return rows


def _bytes(text: str) -> int:
    """'24GB', '512MiB', '1e9' -> bytes."""
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    number = text.upper().removesuffix("B").rstrip("KMGTI")
    try:
        value = float(number) * units[text.upper().removesuffix("B")[len(number) :]]
    except (KeyError, ValueError):
        raise UserError(f"--max-memory {text!r}: give a size such as 8GB or 512MiB") from None
    if not value > 0 or value == float("inf"):
        raise UserError("--max-memory must be a positive, finite size")
    return int(value)


def _method_options(args) -> dict:
    """The method's options as given (the method validates their values, for the API and the CLI alike)."""
    names = ("rounds", "alpha", "beta", "gamma", "alps_rounds")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.dense_attention_input:
        options["dense_attention_input"] = True
    if options and args.method != "sparsellm":
        raise UserError(
            "--rounds, --alpha, --beta, --gamma, --alps-rounds and --dense-attention-input apply to --method sparsellm "
            "only"
        )
    if args.damping is not None:
        from .api import METHODS

        damped = [name for name, method in METHODS.items() if hasattr(method, "percdamp")]
        if args.method not in damped:
            raise UserError(f"--damping applies to --method {' or '.join(damped)} only")
        options["percdamp"] = args.damping
    return options


def _model_spec(args):
    from .pipeline import ModelSpec

    return ModelSpec(args.model, args.device, args.dtype, args.stream)


def _eval_spec(args, datasets: tuple[str, ...]):
    from .pipeline import EvalSpec

    return EvalSpec(datasets, args.tasks, args.limit, args.hellaswag_file, args.protocol, args.seqlen, args.precision)


def _freeze(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else tuple(v.strip() for v in text.split(",") if v.strip())


def _print_result(result: dict, out: str) -> None:
    row = {
        "method": result["method"],
        "target": result["sparsity"]["target"],
        "measured": f"{result['sparsity']['measured']:.4f}",
        "precision": result["precision"]["name"],
        "prune s": f"{result['timing']['prune_s']:.1f}",
        "peak RSS MB": f"{result['peak_rss_mb']:.0f}",
        **{k: f"{v:.2f}" for k, v in result["perplexity"].items()},
    }
    recovery = result.get("recovery")
    if recovery:
        row["recover s"] = f"{recovery['train_s']:.0f} ({recovery['tokens_per_s']:.0f} tok/s)"
        row.update({f"{k} before": f"{v:.2f}" for k, v in recovery["before"]["perplexity"].items()})
    if result["zeroshot"]:
        row["zero-shot mean acc"] = f"{result['zeroshot']['mean_acc']:.4f} (limit {result['zeroshot']['limit']})"
    print(_table([row], list(row)))
    storage = result["storage"]
    size = f"{storage['bytes'] / 1e6:.1f} MB of {storage['format']} safetensors"
    if storage["format"] == "compressed":
        size += f", {storage['bytes'] / storage['dense_bytes']:.3f}x dense"
    print(f"saved {out}/ ({size}; report.json inside)")


def _given(options: dict) -> dict:
    """The options the user set: the others keep their defaults, written once, in the config classes."""
    return {name: value for name, value in options.items() if value is not None}


def cmd_recover(args) -> int:
    from . import api, pipeline

    options = {"loss": args.loss, "data": args.data, "seqlen": args.train_seqlen, "batch_size": args.batch_size,
               "micro_batch": args.micro_batch, "lr": args.lr, "warmup": args.warmup,
               "weight_decay": args.weight_decay, "clip": args.clip, "seed": args.seed,
               "freeze": None if args.freeze is None else _freeze(args.freeze)}  # fmt: skip
    config = api.RecoverConfig(tokens=args.tokens, precision=args.precision, **_given(options))
    output = pipeline.Output(Path(args.out), args.overwrite, args.resume, args.checkpoint_every, args.save_format)
    spec = pipeline.ModelSpec(args.folder, args.device, args.dtype, args.stream)
    result = pipeline.recover(Path(args.folder), args.teacher, spec, config,
                              _eval_spec(args, _datasets(args.eval)), output)  # fmt: skip
    if result is not None:
        _print_result(result, args.out)
    return 0


def cmd_prune(args) -> int:
    from . import api, pipeline

    options = {"refit_iterations": args.refit_iterations, "alps_iterations": args.alps_iterations,
               "alps_rho": args.alps_rho, "owl_lambda": args.owl_lambda, "owl_m": args.owl_m}  # fmt: skip
    config = api.PruneConfig(
        method=args.method, sparsity=args.sparsity, nm=args.nm, protocol=args.protocol, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, layers=args.layers,
        true_sequential=args.true_sequential, batch_size=args.batch_size, method_options=_method_options(args),
        max_memory=_bytes(args.max_memory) if args.max_memory else None, offload_dir=args.offload_dir,
        precision=args.precision, refit=args.refit, allocation=args.allocation,
        **_given(options),
    )  # fmt: skip
    output = pipeline.Output(Path(args.out), args.overwrite, args.resume, args.checkpoint_every, args.save_format)
    recovery = None
    if args.recover_tokens:
        training = {"loss": args.recover_loss, "data": args.recover_data, "lr": args.recover_lr, "seqlen": args.seqlen}
        recovery = api.RecoverConfig(tokens=args.recover_tokens, precision=args.precision, **_given(training))
    result = pipeline.prune(_model_spec(args), config, _eval_spec(args, _datasets(args.eval)), output, recovery)
    if result is not None:
        _print_result(result, args.out)
    return 0


def cmd_eval(args) -> int:
    from . import pipeline

    datasets = _datasets(args.datasets if args.datasets is not None else "" if args.tasks else "wikitext2,ptb,c4")
    if not datasets and not args.tasks:
        raise UserError("nothing to evaluate: give --datasets and/or --tasks")
    spec = _eval_spec(args, datasets)
    spec.check(args.stream)
    result = {
        "model": args.model,
        "protocol": args.protocol,
        **pipeline.evaluate(pipeline.load(_model_spec(args)), spec),
    }
    if not parallel.is_main():
        return 0
    if args.json:
        print(strict_json(result))
        return 0
    if datasets:
        ppl = {k: f"{v:.3f}" for k, v in result["perplexity"].items()}
        print(_table([{"model": args.model, "protocol": args.protocol, **ppl}], ["model", "protocol", *ppl]))
    if args.tasks:
        print(_table(_zeroshot_rows(result["zeroshot"]), ["task", "acc", "acc_norm", "n"]))
        for task, d in result["data"]["zeroshot"].items():
            if not d["exact"]:
                print(f"{task}: {d['note']}")
    return 0


def cmd_convert(args) -> int:
    from . import pipeline

    save_format = "compressed" if args.command == "compress" else "dense"
    output = pipeline.Output(Path(args.out), args.overwrite, save_format=save_format)
    report = pipeline.convert(Path(args.folder), output)
    storage = report["storage"]
    print(f"saved {args.out}/ ({storage['bytes'] / 1e6:.1f} MB of {save_format} safetensors; "
          f"{storage['bytes'] / storage['dense_bytes']:.3f}x dense)")  # fmt: skip
    return 0


def cmd_inspect(args) -> int:
    from .inspection import inspect_folder

    ok, text = inspect_folder(Path(args.folder))
    print(text)
    return 0 if ok else 1


def _threads_per_rank() -> int:
    """OMP_NUM_THREADS when the user set it (torchrun sets it too), else all cores shared between the ranks."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sparsellm: %(message)s")
    try:
        import torch

        from .core.memory import keep_freed_memory
        from .pipeline import start_ranks

        keep_freed_memory()
        torch.set_num_threads(args.threads or _threads_per_rank())
        if args.command in ("prune", "eval", "recover"):
            start_ranks(args.device)
        commands = {"prune": cmd_prune, "eval": cmd_eval, "inspect": cmd_inspect, "recover": cmd_recover}
        commands.update(compress=cmd_convert, decompress=cmd_convert)
        return commands[args.command](args)
    except UserError as e:
        print(f"sparsellm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        from .pipeline import disk_full

        if not disk_full(e):
            raise
        print("sparsellm: error: the disk filled up while writing; what was half-written is removed: free some "
              "space or choose another --out (or --offload-dir)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sparsellm: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        parallel.close()


if __name__ == "__main__":
    sys.exit(main())
