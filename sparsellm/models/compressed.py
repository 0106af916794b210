"""The compressed save format: a sparse matrix stored as what it keeps, every other tensor as it is.

Each matrix is stored in whichever of three encodings takes the fewest bytes, measured, not assumed:
- dense: the tensor itself;
- bitmask: one bit per weight (set where its bytes are not all zero) and the kept values in row-major order;
- nm: for an N:M pattern (N zeros in every M consecutive inputs), one code per group of M naming which M - N
  positions are kept (ceil(log2 C(M, M-N)) bits: 3 for 2:4, against 4 for a bitmask) and those M - N values.
A weight whose bytes are not all zero is a value, so -0.0 and NaN survive: decoding is bit-exact.

A compressed folder is a Hugging Face folder whose `X.safetensors` files are replaced by `X.sparse.safetensors`
(and an index `model.safetensors.index.json` by `model.sparse.safetensors.index.json`, kept verbatim), so
transformers refuses it plainly rather than initialising absent weights at random. Each file's metadata holds
the encodings and the sha256 of the dense file it replaces: `decompress_folder` writes that file back and
checks it byte for byte.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import UserError, reading
from ..core.files import sha256_file
from ..core.memory import zeros_for_filling

FORMAT = "sparsellm-compressed-1"
SUFFIX = ".sparse.safetensors"
DENSE_INDEX, SPARSE_INDEX = "model.safetensors.index.json", "model.sparse.safetensors.index.json"
# The file's one metadata key: a JSON object of the format, the encodings, and the dense file's name, sha256 and
# own metadata. One key, because safetensors writes several in no fixed order: the bytes would differ run to run.
_META = "sparsellm_compressed"


def sparse_name(dense: str) -> str:
    return dense.removesuffix(".safetensors") + SUFFIX


def is_compressed(folder: Path) -> bool:
    return any(folder.glob("*" + SUFFIX))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans [..., n] -> uint8 [..., ceil(n / 8)], the first of each eight in the lowest bit, zero padding."""
    return torch.from_numpy(np.packbits(bits.numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor) -> np.ndarray:
    """The inverse of pack_bits, padding included: uint8 [..., k] -> 0/1 bytes [..., 8k] (numpy: 7x a torch table
    lookup)."""
    return np.unpackbits(packed.numpy(), axis=-1, bitorder="little")


def nonzero(w: torch.Tensor) -> torch.Tensor:
    """Where `w`'s bytes are not all zero (so -0.0 counts as a value)."""
    return w.contiguous().view(torch.uint8).reshape(*w.shape, w.element_size()).ne(0).any(-1)


@functools.cache
def _patterns(m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions [C, keep] of every choice of `keep` of `m` positions, code of each m-bit mask or -1)."""
    positions = torch.tensor(list(itertools.combinations(range(m), keep)))
    masks = (1 << positions).sum(-1)
    code_of = torch.full((2**m,), -1, dtype=torch.int64)
    code_of[masks] = torch.arange(len(positions))
    return positions, code_of


def _unpack_codes(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """`count` integers of `width` <= 16 bits, as pack_bits stored their bits. Eight of them fill exactly `width`
    bytes, and each spans at most three: read a column of rows at a time (12x the bit-by-bit unpacking)."""
    rows = torch.nn.functional.pad(packed, (0, -packed.numel() % width)).view(-1, width)
    rows = torch.nn.functional.pad(rows, (0, 2)).int()
    codes = []
    for k in range(8):
        byte, shift = divmod(k * width, 8)
        word = rows[:, byte] | rows[:, byte + 1] << 8 | rows[:, byte + 2] << 16
        codes.append(word >> shift & ((1 << width) - 1))
    return torch.stack(codes, 1).view(-1)[:count]


def _code_bits(m: int, keep: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, keep))))


def _bitmask(w: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = nonzero(w)
    return {"bitmask": pack_bits(mask), "values": w[mask]}


def _nm(w: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor] | None:
    """The N:M encoding, or None where `w` is not an N:M pattern. Groups run along each row's inputs."""
    keep = m - n
    if w.dim() != 2 or w.shape[1] % m or not 0 < keep < m <= 16:
        return None
    groups = w.reshape(-1, m)
    kept = nonzero(groups)
    if (kept.sum(-1) > keep).any():
        return None
    # every value, then the first zeros of the group until `keep` positions are chosen
    preference = kept.long() * m + torch.arange(m - 1, -1, -1)
    chosen = torch.zeros_like(kept).scatter_(1, preference.topk(keep, dim=1).indices, True)
    codes = _patterns(m, keep)[1][(chosen.long() << torch.arange(m)).sum(-1)]
    bits = (codes.unsqueeze(-1) >> torch.arange(_code_bits(m, keep))) & 1
    return {"codes": pack_bits(bits.reshape(-1).bool()), "values": groups[chosen]}


def _bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


@dataclass
class Encoded:
    encoding: str  # dense, bitmask or nm
    parts: dict[str, torch.Tensor]  # stored as NAME (dense) or NAME::PART
    entry: dict = field(default_factory=dict)  # what decoding needs besides the parts


def encode(w: torch.Tensor, nm: tuple[int, int] | None = None) -> Encoded:
    """The smallest encoding of `w` (a matrix of floats; anything else stays dense)."""
    best = Encoded("dense", {"": w})
    if w.dim() != 2 or not w.is_floating_point():
        return best
    candidates = [Encoded("bitmask", _bitmask(w))]
    if nm is not None and (parts := _nm(w, *nm)) is not None:
        candidates.append(Encoded("nm", parts, {"n": nm[0], "m": nm[1]}))
    for c in candidates:
        if _bytes(c.parts) < _bytes(best.parts):
            best = c
    best.entry.update(encoding=best.encoding, shape=list(w.shape))
    return best


def decode(read, name: str, entry: dict) -> torch.Tensor:
    """The tensor `name` of a compressed file; `read(key)` gets one stored tensor. A part that does not fit its
    entry is refused (a damaged or altered file), never decoded into a wrong matrix."""
    if entry["encoding"] == "dense":
        return read(name)
    if entry["encoding"] not in PARTS:
        raise UserError(f"{name}: unknown encoding {entry['encoding']!r} (written by a newer sparsellm?)")
    shape, values = tuple(entry["shape"]), read(f"{name}::values")
    _expect(values.dim() == 1, name)
    if entry["encoding"] == "bitmask":
        return _decode_bitmask(read(f"{name}::bitmask"), values, shape, name)
    return _decode_nm(read(f"{name}::codes"), values, shape, int(entry["n"]), int(entry["m"]), name)


def _decode_bitmask(packed: torch.Tensor, values: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    _expect(packed.dtype == torch.uint8 and tuple(packed.shape) == (*shape[:-1], -(-shape[-1] // 8)), name)
    bits = unpack_bits(packed)
    # a set padding bit, its value stored too, would pass the count and move every later value one place on
    _expect(not bits[..., shape[-1] :].any() and values.numel() == np.count_nonzero(bits), name)
    mask = torch.from_numpy(bits).view(torch.bool)[..., : shape[-1]]  # 0/1 bytes are valid booleans
    return zeros_for_filling(shape, values.dtype).masked_scatter_(mask, values)


def _decode_nm(packed: torch.Tensor, values: torch.Tensor, shape: tuple, n: int, m: int, name: str) -> torch.Tensor:
    _expect(0 < n < m <= 16 and len(shape) == 2 and shape[1] % m == 0, name)
    groups, width, positions = shape[0] * shape[1] // m, _code_bits(m, m - n), _patterns(m, m - n)[0]
    _expect(packed.dtype == torch.uint8 and packed.numel() == -(-groups * width // 8), name)
    codes = _unpack_codes(packed, groups, width)
    _expect(int(codes.max()) < len(positions) and values.numel() == groups * (m - n), name)
    # Each group's values go to the positions its code names: no running count through the matrix as a bitmask
    # needs. numpy's take looks the positions up 4x faster than torch's index_select on rows this short.
    kept_at = torch.from_numpy(np.take(positions.numpy(), codes.numpy(), axis=0))
    out = zeros_for_filling(shape, values.dtype)
    out.view(groups, m).scatter_(1, kept_at, values.view(groups, m - n))
    return out


PARTS = {"dense": ("",), "bitmask": ("bitmask", "values"), "nm": ("codes", "values")}


def part_names(name: str, entry: dict) -> list[str]:
    """The stored tensors `name` is decoded from."""
    return [name + (f"::{part}" if part else "") for part in PARTS.get(entry["encoding"], ())]


def decode_all(stored: dict[str, torch.Tensor], table: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every tensor of `table` from its `stored` parts, several at once (decoding runs serially inside torch,
    and a model has many matrices)."""
    workers = max(1, min(torch.get_num_threads(), len(table)))
    with ThreadPoolExecutor(workers) as pool:
        decoded = pool.map(lambda name: decode(stored.__getitem__, name, table[name]), table)
        return dict(zip(table, decoded, strict=True))


def _expect(ok: bool, name: str) -> None:
    if not ok:
        raise UserError(f"{name}: its stored parts do not fit its encoding (a damaged compressed file)")


def header(f) -> dict | None:
    """What a compressed file records (None for a plain safetensors file); `f` is an open safe_open."""
    text = (f.metadata() or {}).get(_META)
    if text is None:
        return None
    record = json.loads(text)
    if record.get("format") != FORMAT:
        raise UserError(f"format {record.get('format')!r} is not {FORMAT} (written by a newer sparsellm?)")
    return record


def entries(f) -> dict[str, dict] | None:
    """The encodings a file records, by tensor (None for a plain safetensors file)."""
    record = header(f)
    return None if record is None else record["tensors"]


@dataclass
class Stored:
    """What a folder's conversion measured: bytes of its tensor files and how many tensors each encoding took."""

    dense_bytes: int = 0
    stored_bytes: int = 0
    encodings: dict[str, int] = field(default_factory=dict)


def compress_file(src: Path, dst: Path, nm: tuple[int, int] | None, stored: Stored) -> None:
    parts, table = {}, {}
    with reading(f"the safetensors file {src}"), safe_open(src, "pt") as f:
        metadata = f.metadata() or {}
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            encoded = encode(f.get_tensor(name), nm)
            parts.update({name + (f"::{k}" if k else ""): t.contiguous() for k, t in encoded.parts.items()})
            table[name] = encoded.entry or {"encoding": "dense"}
            stored.encodings[encoded.encoding] = stored.encodings.get(encoded.encoding, 0) + 1
    record = {"format": FORMAT, "tensors": table, "dense_file": src.name, "dense_sha256": sha256_file(src),
              "dense_metadata": metadata}  # fmt: skip
    save_file(parts, dst, metadata={_META: json.dumps(record, sort_keys=True)})
    stored.dense_bytes += src.stat().st_size
    stored.stored_bytes += dst.stat().st_size


def compress_folder(src: Path, dst: Path, nm: tuple[int, int] | None = None) -> Stored:
    """`src`'s tensor files compressed into `dst`, with its other files; `dst` may be `src` (in a folder being
    written: the dense files are then replaced). report.json and README.md are the caller's."""
    stored = Stored()
    for path in sorted(src.glob("*.safetensors")):
        if not path.name.endswith(SUFFIX):
            compress_file(path, dst / sparse_name(path.name), nm, stored)
            if src == dst:
                path.unlink()
    _copy_rest(src, dst, {DENSE_INDEX: SPARSE_INDEX})
    return stored


def decompress_folder(src: Path, dst: Path) -> None:
    """Write `src`'s dense twin into `dst`: each dense file back, checked against the sha256 recorded when it was
    compressed, with the other files. report.json and README.md are the caller's."""
    for path in sorted(src.glob("*" + SUFFIX)):
        _decompress_file(path, dst)
    _copy_rest(src, dst, {SPARSE_INDEX: DENSE_INDEX})


def _copy_rest(src: Path, dst: Path, renames: dict[str, str]) -> None:
    """Every file but the tensor files, report.json, README.md and hidden ones, an index renamed."""
    for path in sorted(src.iterdir()):
        if path.name.endswith(".safetensors") or path.name in ("report.json", "README.md") or path.name[0] == ".":
            continue
        target = dst / renames.get(path.name, path.name)
        if src == dst:
            path.rename(target)
        elif path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copyfile(path, target)


def _decompress_file(path: Path, dst: Path) -> None:
    with reading(f"the compressed file {path}"), safe_open(path, "pt") as f:
        record = header(f)
        if record is None:
            raise UserError(f"{path.name} records no {FORMAT} encodings: it is not a compressed file")
        tensors = decode_all({k: f.get_tensor(k) for k in f.keys()}, record["tensors"])  # noqa: SIM118
        dense_file, expected, metadata = record["dense_file"], record["dense_sha256"], record["dense_metadata"]
    if Path(dense_file).name != dense_file or not dense_file.endswith(".safetensors"):
        raise UserError(f"{path.name} names {dense_file!r} as its dense file: not a file name sparsellm writes")
    save_file(tensors, dst / dense_file, metadata=metadata or None)
    if sha256_file(dst / dense_file) != expected:
        raise UserError(f"{path.name} decodes to a file that differs from the one it was made from (damaged?)")
