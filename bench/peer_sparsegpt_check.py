"""Is our SparseGPT llm-compressor's? The same layers' weights and Hessians through both solvers.

    python bench/peer_sparsegpt_check.py [--layers 0,10,20] [--target 0.7]

Runs in our venv: captures the input Hessians of every linear of the given decoder layers of the built-in SmolLM2
on the quick protocol's calibration tokens (the dense model's inputs, as both toolkits' one-pass pipelines see
them in layer 0; deeper layers get the dense model's inputs too, so both solvers see one and the same problem),
prunes each linear with our SparseGPT, has `.venv-peer` (bench/peer_env.sh) prune the same (W, H) with
llm-compressor's own `sparsify_weight`, and prints per linear: how many mask entries differ, the largest weight
difference, and each solver's reconstruction error tr(dW H dW^T) / tr(W H W^T).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def problems(layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear name: (W, H = X^T X / N)} for the linears of `layers`, from the dense model."""
    import sparsellm
    from sparsellm.api import protocol, seqlen_for
    from sparsellm.data import texts
    from sparsellm.engine.stats import recording
    from sparsellm.models.adapters import adapter_for
    from sparsellm.models.layers import capture, run_layer

    model, tok = sparsellm.load("smollm2-135m")
    adapter, proto = adapter_for(model), protocol("quick")
    tokens = texts.calibration(tok, texts.corpus("c4", "train"), proto.nsamples, seqlen_for(model, proto, None), 0)
    inputs = capture(model, adapter, tokens, 8)
    x, out = inputs.hidden, {}
    with torch.no_grad():
        for i, layer in enumerate(adapter.decoder_layers(model)[: max(layers) + 1]):
            linears = adapter.linears(layer)
            with recording(linears if i in layers else {}, "hessian") as stats:
                y = run_layer(layer, x, inputs.kwargs[i], 8)
            out |= {f"{i}.{n}": (lin.weight.data.clone(), stats[n].mean()) for n, lin in linears.items() if i in layers}
            x = y
    return out


def peer(path: Path) -> None:
    """In .venv-peer: llm-compressor's sparsify_weight on every saved (W, H); results written back to `path`."""
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    saved = torch.load(path)
    n, m = saved["nm"]
    for name, (w, h) in saved["problems"].items():
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        # llm-compressor accumulates H = 2 X^T X / N; the factor 2 changes nothing, but give it what it expects.
        _, pruned = sparsify_weight(linear, {linear: 2 * h.clone()}, saved["sparsity"], n, m, 128, 0.01, False)
        saved.setdefault("theirs", {})[name] = pruned
    torch.save(saved, path)


def relative_error(w: torch.Tensor, wp: torch.Tensor, h: torch.Tensor) -> float:
    dw = (w - wp).double()
    return ((dw @ h.double() * dw).sum() / (w.double() @ h.double() * w.double()).sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,10,20")
    ap.add_argument("--target", default="0.7", help="a fraction, or N:M with N of every M zeroed")
    ap.add_argument("--peer", type=Path, help=argparse.SUPPRESS)  # the half that runs in .venv-peer
    args = ap.parse_args()
    if args.peer:
        return peer(args.peer)
    if not PEER_PYTHON.exists():
        raise SystemExit(f"peer_sparsegpt_check: {PEER_PYTHON} missing; run `bash bench/peer_env.sh` first")
    from sparsellm.api import parse_nm
    from sparsellm.methods import Target, make_method

    target = parse_nm(args.target) if ":" in args.target else Target(sparsity=float(args.target))
    todo = problems([int(i) for i in args.layers.split(",")])
    ours = {name: make_method("sparsegpt").prune(w, h, target).weight for name, (w, h) in todo.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "problems.pt"
        # llm-compressor's unstructured rule prunes everything at or below the block's k-th score: give it the
        # fraction; N:M: it takes N (pruned) and M.
        torch.save({"problems": todo, "sparsity": target.fraction, "nm": (target.n, target.m)}, path)
        subprocess.run([str(PEER_PYTHON), __file__, "--peer", str(path)], check=True)
        theirs = torch.load(path)["theirs"]
    print(f"SparseGPT {target}: sparsellm vs llm-compressor on the same (W, H)\n")
    print("| linear | shape | zeros ours | zeros theirs | mask entries that differ | max abs weight diff | "
          "error ours | error theirs |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, (w, h) in todo.items():
        a, b = ours[name], theirs[name]
        print(f"| {name} | {tuple(w.shape)} | {int((a == 0).sum())} | {int((b == 0).sum())} | "
              f"{int(((a == 0) != (b == 0)).sum())} | {(a - b).abs().max().item():.2e} | "
              f"{relative_error(w, a, h):.5f} | {relative_error(w, b, h):.5f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
