"""Where large tensors live, and glibc's memory policy, in one place.

Allocators (`Alloc`): `in_ram`, or `on_disk(folder)`, a file mapping the OS pages in and out, so tensors larger
than the memory budget (layer activations, SparseLLM's auxiliaries) cost disk, not RAM. Their pages are
file-backed: under pressure the kernel writes them out instead of failing, and they never count as anonymous
memory.

glibc's policy. In memory (the default), keep freed memory in the process: the layer passes allocate the same
large temporaries over and over. Streamed (`map_large_blocks`), hand large blocks back: layer-sized tensors come
and go once each, and a kept heap would grow with the number of layers.

By default glibc hands every allocation above its mmap threshold (at most 32 MB, and a trimmed heap top) back to
the kernel on free, so the next batch's attention scores ([8, 9, 512, 512] fp32 = 75 MB on SmolLM2) and MLP
activations are fresh pages the kernel must fault in and zero: a 50% Wanda prune of SmolLM2 spends 4.5 M page
faults and 12.9 s of system time that way, 0.3 M and 5.6 s with `keep_freed_memory`. Memory that nothing reuses
stays resident too, so one-off phases (dequantising a GGUF) call `return_freed_memory` after them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_NUMPY_HUGEPAGE_BYTES = 1 << 22  # numpy madvises arrays from this size on
KEEP = 1 << 30  # allocations up to 1 GB come from the reused heap; larger ones (a 7B model's states) are mapped

Alloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def in_ram(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def zeros_for_filling(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros on the CPU that the caller then writes all over (a decoded sparse matrix). From 4 MiB on, in memory
    the kernel backs with 2 MB pages: numpy asks for them on arrays that large (madvise MADV_HUGEPAGE;
    NUMPY_MADVISE_HUGEPAGE=0 turns it off), torch's allocator does not, and faulting in 4 KB pages is otherwise a
    third of decoding a compressed model: a 70% Qwen2.5-1.5B loads and answers in 4.9-5.6 s this way, 6.3-6.8 s
    with torch.zeros. Smaller tensors come faster from torch's reused heap (2.8 against 4.3 ms for 1536 x 576)."""
    size = math.prod(shape) * dtype.itemsize
    if size < _NUMPY_HUGEPAGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(size, np.uint8)).view(dtype).view(shape)


def on_disk(folder: Path) -> Alloc:
    """Allocate CPU tensors memory-mapped from a file in `folder` (unlinked at once, so nothing is left behind):
    the OS keeps in RAM only the pages that fit and writes the rest to the file."""

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return in_ram(shape, dtype, device)
        fd, path = tempfile.mkstemp(dir=folder, prefix="sparsellm-activations-")
        os.close(fd)
        try:
            return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        finally:
            os.unlink(path)

    return alloc


def allocator(folder: Path | None) -> Alloc:
    """`on_disk(folder)`, or `in_ram` when there is no folder (what the memory plan decided)."""
    return on_disk(folder) if folder is not None else in_ram


class Sink:
    """Writes successive batches of rows into one tensor of n rows, made by `alloc` on the first batch (so in the
    batches' dtype and shape)."""

    def __init__(self, n: int, alloc: Alloc):
        self.n, self.alloc, self.filled = n, alloc, 0
        self.tensor: torch.Tensor | None = None

    def write(self, rows: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = self.alloc((self.n, *rows.shape[1:]), rows.dtype, rows.device)
        self.tensor[self.filled : self.filled + rows.shape[0]] = rows
        self.filled += rows.shape[0]


def _glibc(function: str):
    """glibc's `function`, or None where the C library is another (musl and others: nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks up to 1 GB instead of returning them; False where that is not glibc."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, KEEP)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP))


def return_freed_memory() -> bool:
    """Hand every freed page back to the kernel now (after a one-off phase whose memory nothing will reuse)."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def map_large_blocks() -> bool:
    """Serve every block above 128 KiB by its own mapping, returned to the OS when freed (streamed models).

    Otherwise glibc raises its mmap threshold after large frees and serves later layer-sized tensors from a heap
    it never shrinks, so memory creeps up with the number of layers streamed through (+35% over 32 layers).
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
