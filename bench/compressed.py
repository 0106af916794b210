"""What a sparse checkpoint buys on this machine: bytes on disk, load time, and inference speed, dense against sparse.

    python bench/compressed.py                                 # SmolLM2 at 50%, 70%, 90% and 2:4
    python bench/compressed.py --targets 0.7 --repeats 1 --write
    python bench/compressed.py --model qwen2.5-coder-1.5b --method magnitude --prompt 128 --new 16 --repeats 1 --clean

For each target, one `sparsellm prune --method METHOD` run saves the dense folder, `sparsellm compress` writes
its compressed twin and `sparsellm decompress` writes it back (checked byte for byte against the dense files).
Sizes and speeds depend on how many weights are kept and in what pattern, not on which: `--method magnitude`
gives a large model's figures in minutes. Size table: tensor-file bytes of both folders, and of the pruned linears
alone. Load table, the median of 3 x --repeats: `sparsellm.load` of each folder, and the load plus a first forward
pass of 32 tokens (the time until the model answers: a dense load maps its files and reads the weights only when
they are first used, a compressed load decodes them at once). Inference table, batch 1,
fp32 weights: prefill (one forward pass of --prompt tokens) and greedy generation (--new tokens after a 32-token
prompt, with the KV cache), executed dense (torch's nn.Linear) and sparse (each pruned linear as a torch CSR
matrix, the fastest of the sparse layouts torch offers on this CPU: BSR and COO measured slower); tokens/s, the
median of --repeats. `--write` replaces this bench's section of BENCHMARKS.md in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from run import ROOT, commit, machine, seconds, target_args, write_section
from safetensors import safe_open
from torch import nn

from sparsellm import load


def sh(cmd: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "sparsellm", *cmd], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench: `sparsellm {' '.join(cmd)}` failed: {done.stderr.strip().splitlines()[-1:]}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class CSRLinear(nn.Module):
    """A pruned nn.Linear executed as a torch CSR matrix times the transposed input."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.reshape(-1, x.shape[-1]).T.contiguous()).T.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def as_csr(model: nn.Module, pruned: set[str]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if is_pruned(name, pruned):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CSRLinear(module))
    return model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, oneDNN/MKL setup)
    return statistics.median(seconds(fn, repeats))  # freeing a model is not part of loading it


@torch.inference_mode()
def ready(folder: Path, prompt: torch.Tensor) -> nn.Module:
    """The model of `folder` after its first forward pass (every weight read)."""
    model, _ = load(str(folder))
    model(prompt, use_cache=False)
    return model


@torch.inference_mode()
def speed(model: nn.Module, tokens: torch.Tensor, new: int, repeats: int) -> tuple[float, float]:
    """(prefill tokens/s, generated tokens/s) at batch 1."""
    prompt = tokens[:, :32]
    prefill = median_seconds(lambda: model(tokens, use_cache=False), repeats)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    generate = median_seconds(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), repeats)
    return tokens.shape[1] / prefill, new / generate


def is_pruned(name: str, pruned: set[str]) -> bool:
    """`name` (a module or tensor of the model) is one of the report's pruned matrices (named from the layers on)."""
    return any(name == p or name.endswith("." + p) for p in pruned)


ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}


def linear_bytes(folder: Path, pruned: set[str]) -> int:
    """Bytes the pruned linears take in `folder`'s files (their stored parts, when compressed), from the headers."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if is_pruned(key.split("::")[0].removesuffix(".weight"), pruned):
                    part = st.get_slice(key)
                    total += math.prod(part.get_shape()) * ITEMSIZE[part.get_dtype()]
    return total


def one_target(args, target: str, tokens: torch.Tensor) -> dict:
    base = args.out / target.replace(":", "-")
    dense, packed, back = base / "dense", base / "compressed", base / "decompressed"
    if not (dense / "report.json").is_file():
        sh(["prune", args.model, "--method", args.method, *target_args(target), "--out", str(dense), "--overwrite"])
    sh(["compress", str(dense), str(packed), "--overwrite"])
    sh(["decompress", str(packed), str(back), "--overwrite"])
    identical = all(sha256(back / f.name) == sha256(f) for f in dense.glob("*.safetensors"))
    shutil.rmtree(back)
    report = json.loads((dense / "report.json").read_text())
    pruned = set(report["sparsity"]["per_matrix"])
    row = {
        "target": target,
        "sparsity": report["sparsity"]["measured"],
        "dense_mb": tensor_bytes(dense) / 1e6,
        "compressed_mb": tensor_bytes(packed) / 1e6,
        "linears_ratio": linear_bytes(packed, pruned) / linear_bytes(dense, pruned),
        "encodings": json.loads((packed / "report.json").read_text())["storage"]["encodings"],
        "decompress_identical": identical,
        "load_dense_s": median_seconds(lambda: load(str(dense)), 3 * args.repeats),
        "load_compressed_s": median_seconds(lambda: load(str(packed)), 3 * args.repeats),
        "ready_dense_s": median_seconds(lambda: ready(dense, tokens[:, :32]), 3 * args.repeats),
        "ready_compressed_s": median_seconds(lambda: ready(packed, tokens[:, :32]), 3 * args.repeats),
    }
    model, _ = load(str(dense))
    row["prefill_dense"], row["generate_dense"] = speed(model, tokens, args.new, args.repeats)
    row["prefill_csr"], row["generate_csr"] = speed(as_csr(model, pruned), tokens, args.new,
                                                    args.repeats)  # fmt: skip
    if args.clean:
        shutil.rmtree(base)
    return row


def tables(rows: list[dict], dense_speed: tuple[float, float]) -> str:
    size = ["| target | measured sparsity | dense MB | compressed MB | ratio | pruned linears ratio | encodings | "
            "decompress bit-identical | load dense s | load compressed s | load ratio | "
            "load + first forward, dense s | load + first forward, compressed s | ratio |",
            "|" + "---|" * 14]  # fmt: skip
    for r in rows:
        enc = ", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items()))
        size.append(f"| {r['target']} | {r['sparsity']:.4f} | {r['dense_mb']:.1f} | {r['compressed_mb']:.1f} | "
                    f"{r['compressed_mb'] / r['dense_mb']:.3f} | {r['linears_ratio']:.3f} | {enc} | "
                    f"{'yes' if r['decompress_identical'] else 'NO'} | {r['load_dense_s']:.2f} | "
                    f"{r['load_compressed_s']:.2f} | {r['load_compressed_s'] / r['load_dense_s']:.2f} | "
                    f"{r['ready_dense_s']:.2f} | {r['ready_compressed_s']:.2f} | "
                    f"{r['ready_compressed_s'] / r['ready_dense_s']:.2f} |")  # fmt: skip
    speed = ["| model | prefill tok/s, dense | prefill tok/s, CSR | CSR/dense | generate tok/s, dense | "
             "generate tok/s, CSR | CSR/dense |", "|" + "---|" * 7,
             f"| unpruned | {dense_speed[0]:.0f} | - | - | {dense_speed[1]:.1f} | - | - |"]  # fmt: skip
    for r in rows:
        speed.append(f"| {r['target']} | {r['prefill_dense']:.0f} | {r['prefill_csr']:.0f} | "
                     f"{r['prefill_csr'] / r['prefill_dense']:.2f} | {r['generate_dense']:.1f} | "
                     f"{r['generate_csr']:.1f} | {r['generate_csr'] / r['generate_dense']:.2f} |")  # fmt: skip
    return "\n".join(size) + "\n\n" + "\n".join(speed)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default="0.5,0.7,0.9,2:4")
    p.add_argument("--method", default="sparsegpt", help="the pruning method that makes each folder")
    p.add_argument("--clean", action="store_true", help="delete each target's folders once measured (large models)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length, tokens")
    p.add_argument("--new", type=int, default=64, help="tokens generated greedily")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-compressed")
    p.add_argument("--write", action="store_true", help="replace this bench's section of BENCHMARKS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    code = commit()  # the code this process imported, whatever is checked out when it ends
    tokens = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    dense_model, _ = load(args.model)
    dense_speed = speed(dense_model, tokens, args.new, args.repeats)
    del dense_model
    rows = [one_target(args, t, tokens) for t in args.targets.split(",")]
    header = (
        f"`python bench/compressed.py --model {args.model} --method {args.method} --targets {args.targets} "
        f"--prompt {args.prompt} "
        f"--new {args.new} --repeats {args.repeats}`; {machine()}; torch {torch.__version__}; started {started}; "
        f"commit {code}. Pruned by `--method {args.method}`, seed 0; fp32 weights."
    )
    text = header + "\n\n" + tables(rows, dense_speed)
    print(text)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    if args.write:
        write_section(text, f"compressed.py {args.model} {args.targets}")


if __name__ == "__main__":
    main()
