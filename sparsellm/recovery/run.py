"""`recover(student, tokenizer, config, teacher, pruned)`: fine-tune a pruned model in place with its zeros fixed.

`pruned` is the prune's report (report.json, or the Report just made): it names the pruned matrices, whose zeros
are held, and the calibration windows, which training leaves out. The result is the report's "recovery" section.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..core import parallel, precision
from ..core.errors import UserError
from ..core.files import state_sha256
from ..data import texts, training
from ..models.adapters import adapter_for, context_length, submodule
from .checkpoint import TrainingCheckpoint
from .masks import Masks
from .trainer import RecoverConfig, Trainer


def pruned_linears(model: nn.Module, pruned: dict) -> dict[str, nn.Linear]:
    """The linears the report lists as pruned ("layers.i.path"), by name."""
    decoder = adapter_for(model).decoder_layers(model)
    linears = {}
    for name in pruned["sparsity"]["per_matrix"]:
        _, index, path = name.split(".", 2)
        linears[name] = submodule(decoder[int(index)], path)
    return linears


def _teacher(teacher: nn.Module | None, student: nn.Module, config: RecoverConfig, arithmetic) -> nn.Module | None:
    """The teacher ready to run: without gradients, in bf16 when the products are bf16 (it only runs forward)."""
    if config.loss == "ce":
        return None
    if teacher is None:
        raise UserError(f"--loss {config.loss} distils from the dense model: give --teacher")
    if teacher.config.vocab_size != student.config.vocab_size or type(teacher) is not type(student):
        raise UserError(f"the teacher ({type(teacher).__name__}, vocabulary {teacher.config.vocab_size}) is not the "
                        f"pruned model's kind ({type(student).__name__}, {student.config.vocab_size})")  # fmt: skip
    teacher.requires_grad_(False).eval()
    return teacher.to(torch.bfloat16) if arithmetic.name == "bf16" else teacher


def _windows(tokenizer, config: RecoverConfig, pruned: dict) -> tuple[torch.Tensor, dict]:
    """The step's windows in order, and where they came from."""
    corpus = training.training_corpus(config.data, texts.default_online())
    cal = pruned["data"]["calibration"]
    calibration = training.Calibration(cal["sha256"], pruned["config"]["nsamples"], pruned["config"]["seqlen"],
                                       pruned["config"]["seed"])  # fmt: skip
    windows = training.training_windows(tokenizer, corpus, config.seqlen, calibration, config.seed)
    needed = config.steps() * config.batch_size
    if windows.shape[0] < needed:
        raise UserError(f"{corpus.name} holds {windows.shape[0] * config.seqlen} training tokens outside the "
                        f"calibration windows; --tokens {config.tokens} needs {needed * config.seqlen}: ask for fewer "
                        "or give a larger --data file")  # fmt: skip
    source = {"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "windows": needed,
              "seqlen": config.seqlen, "calibration_excluded": calibration.sha256 == corpus.sha256}  # fmt: skip
    return windows[:needed], source


def recover(
    student: nn.Module,
    tokenizer,
    config: RecoverConfig,
    teacher: nn.Module | None,
    pruned: dict,
    checkpoint_dir: Path | None = None,
    checkpoint_every: float = 600.0,
    progress: bool = True,
) -> dict:
    """Train `student` in place; the report's "recovery" section (its loss curve, masks, data and timing)."""
    config.validate()
    if config.seqlen > context_length(student):
        raise UserError(f"--seqlen {config.seqlen} is beyond the model's context of {context_length(student)}")
    masks = Masks(pruned_linears(student, pruned))
    source_masks = masks.hashes()
    recorded = {n: r.get("mask_sha256", source_masks[n]) for n, r in pruned["sparsity"]["per_matrix"].items()}
    if recorded != source_masks:
        raise UserError("the pruned model's zeros are not the ones its report records; `sparsellm inspect` says more")
    device = next(student.parameters()).device
    arithmetic = precision.resolve(config.precision, device)
    teacher = _teacher(teacher, student, config, arithmetic)
    windows, data = _windows(tokenizer, config, pruned)
    trainer = Trainer(student, teacher, masks, config, arithmetic)
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = {**asdict(config), "student_sha256": state_sha256(student.state_dict()),
                       "teacher_sha256": state_sha256(teacher.state_dict()) if teacher is not None else None,
                       "windows_sha256": state_sha256({"windows": windows})}  # fmt: skip
        checkpoint = TrainingCheckpoint(checkpoint_dir, fingerprint, checkpoint_every)
    resumed = checkpoint is not None and checkpoint.exists()
    t0 = time.perf_counter()
    curve = trainer.run(windows, checkpoint, progress)
    seconds = time.perf_counter() - t0
    if masks.hashes() != source_masks:
        raise RuntimeError("a pruned matrix's zero pattern changed during recovery")  # masks.check passed: a new zero
    return {
        "config": {**asdict(config), "freeze": list(config.freeze), "steps": config.steps(), "ranks": parallel.world()},
        "data": data,
        "precision": arithmetic.as_dict(),
        "resumed": resumed,
        "tokens": config.steps() * config.batch_size * config.seqlen,
        "train_s": seconds,
        "tokens_per_s": config.steps() * config.batch_size * config.seqlen / sum(s.seconds for s in curve),
        "curve": [asdict(s) for s in curve],
        "source_masks": source_masks,
    }
