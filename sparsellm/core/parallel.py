"""Data-parallel pruning through torch.distributed (gloo on CPU, nccl on CUDA), started by `torchrun`.

Each rank holds a contiguous slice of the calibration samples. Every statistic a method uses is a sum over
tokens (Hessians, column norms, SparseLLM's Gram and cross terms, error norms), so it is all-reduced before
use: every rank then computes the same pruned weights as a single process would, up to fp32 summation order.
Without torchrun (or with one process) every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import UserError


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int) -> slice:
    """This rank's contiguous share of n samples (the first n % world ranks take one more)."""
    size, r = world(), rank()
    if n < size:
        raise UserError(f"{n} calibration samples cannot be split over {size} ranks; give --nsamples >= {size}")
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (every rank gets the same bits)."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_sum_floats(*values: float) -> list[float]:
    """Sum Python numbers over the ranks, in float64."""
    if world() == 1:
        return list(values)
    return all_sum(torch.tensor(values, dtype=torch.float64, device=_device())).tolist()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
