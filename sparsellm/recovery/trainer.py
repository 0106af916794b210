"""The recovery loop: AdamW on the kept weights, linear warmup then cosine decay, gradient accumulation, clipping,
bf16 autocast where the hardware has it (fp32 master weights), the dense teacher alongside without gradients.

One optimizer step reads `batch_size` windows, split into micro-batches of `micro_batch`; with torchrun the ranks
take turns at the micro-batches and their gradients are summed, so any number of ranks computes the one-process
step up to summation order. Every loss is a sum over tokens divided by the step's token count.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..core import parallel, precision
from ..core.errors import UserError
from ..data import training
from . import losses
from .checkpoint import TrainingCheckpoint
from .masks import Masks

FREEZABLE = ("embeddings", "norms", "head")


@dataclass
class RecoverConfig:
    tokens: int  # training tokens in all; steps = tokens // (batch_size x seqlen)
    loss: str = "kl"  # kl, kl+hidden or ce (recovery/losses.py)
    data: str = "c4"  # c4 or ptb (train splits) or a .txt/.jsonl file
    seqlen: int = 512
    # More, smaller steps won on C4 validation windows (SparseLLM 70%, 65,536 tokens: C4 102.12 at 8 windows a step,
    # 96.48 at 4, 90.96 at 2; a higher lr at 4 windows did worse): a few hundred thousand tokens are few steps.
    batch_size: int = 2  # windows per optimizer step
    micro_batch: int = 2  # windows per forward pass
    lr: float = 1e-3  # chosen on C4 validation windows (BENCHMARKS.md, "Recovery")
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm
    seed: int = 0  # order of the training windows
    freeze: tuple[str, ...] = ("embeddings", "head")
    precision: str = "auto"

    def validate(self) -> None:
        """The one-line errors of the CLI, before any model is loaded."""
        if self.loss not in losses.LOSSES:
            raise UserError(f"unknown --loss '{self.loss}'; choose from: {', '.join(losses.LOSSES)}")
        for name in ("tokens", "seqlen", "batch_size", "micro_batch"):
            if not getattr(self, name) >= 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.batch_size % (self.micro_batch * parallel.world()):
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch {self.micro_batch} "
                            f"x {parallel.world()} ranks")  # fmt: skip
        if self.steps() < 1:
            raise UserError(f"--tokens {self.tokens} is less than one step ({self.batch_size} x {self.seqlen} tokens)")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.warmup < 1 or not self.weight_decay >= 0:
            raise UserError("--lr must be positive and finite, --warmup in [0, 1), --weight-decay at least 0")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise UserError(f"--clip must be positive and finite; got {self.clip}")
        if unknown := set(self.freeze) - set(FREEZABLE):
            raise UserError(f"--freeze {','.join(sorted(unknown))}: choose from {', '.join(FREEZABLE)} (or none)")
        precision.check(self.precision)
        training.check_source(self.data)

    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seqlen)


def trainable(model: nn.Module, freeze: tuple[str, ...]) -> list[nn.Parameter]:
    """Set which parameters train: all but the frozen kinds (a tied head freezes with the embeddings)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    frozen: set[int] = set()
    if "embeddings" in freeze:
        frozen |= {id(p) for p in embeddings.parameters()}
    if "head" in freeze and head is not None:
        frozen |= {id(p) for p in head.parameters()}
    if "norms" in freeze:
        frozen |= {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append(p)
    return params


@dataclass
class Step:
    """One optimizer step as the loss curve records it."""

    step: int
    tokens: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float


class Trainer:
    """Trains `student` in place towards `teacher` (None for `ce`) on `windows` [n, seqlen], masks held."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, masks: Masks, config: RecoverConfig,
                 arithmetic: precision.Precision):  # fmt: skip
        self.student, self.teacher, self.masks, self.config = student, teacher, masks, config
        self.arithmetic = arithmetic
        self.params = trainable(student, config.freeze)
        fused = {"foreach": True} if next(student.parameters()).device.type == "cpu" else {"fused": True}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, **fused)
        steps = config.steps()
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, round(config.warmup * steps), steps)
        self.curve: list[Step] = []

    def state(self) -> dict:
        """What a resumed run needs besides the data: the weights that train, the optimizer, the schedule, the curve."""
        named = {n: p.detach() for n, p in self.student.named_parameters() if p.requires_grad}
        return {"weights": named, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "curve": [asdict(s) for s in self.curve]}  # fmt: skip

    def restore(self, state: dict) -> None:
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.curve = [Step(**s) for s in state["curve"]]

    def run(self, windows: torch.Tensor, checkpoint: TrainingCheckpoint | None = None, progress: bool = True):
        """Train for config.steps() steps (continuing from `checkpoint` if it holds a state); the curve."""
        config, per_step = self.config, self.config.batch_size * self.config.seqlen
        if checkpoint is not None and checkpoint.exists():
            self.restore(checkpoint.load())
        self.student.train()
        bar = tqdm(total=config.steps(), initial=len(self.curve), desc="recover", unit="step",
                   disable=not (progress and parallel.is_main()))  # fmt: skip
        for step in range(len(self.curve), config.steps()):
            t0 = time.perf_counter()
            batch = windows[step * config.batch_size : (step + 1) * config.batch_size]
            with precision.using(self.arithmetic):
                loss, grad_norm = self._step(batch)
            seconds = time.perf_counter() - t0
            self.curve.append(Step(step + 1, (step + 1) * per_step, loss, self.schedule.get_last_lr()[0], grad_norm,
                                   seconds))  # fmt: skip
            self.schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{per_step / seconds:.0f}")
            if checkpoint is not None:
                checkpoint.save(step + 1, self.state, last=step + 1 == config.steps())
        bar.close()
        self.student.eval()
        self.masks.check()
        return self.curve

    def _step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on `batch`: (its mean loss, the clipped-before gradient norm)."""
        config = self.config
        micro = batch.split(config.micro_batch)
        count = batch.shape[0] * (batch.shape[1] - (config.loss == "ce"))  # tokens the loss is averaged over
        total = torch.zeros((), dtype=torch.float64)
        for k in range(parallel.rank(), len(micro), parallel.world()):
            loss = self._loss(micro[k].to(next(self.student.parameters()).device)) / count
            loss.backward()
            total += loss.detach().double().cpu()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            parallel.all_sum(p.grad)
        self.masks.mask_grads()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masks.apply()
        (loss_value,) = parallel.all_sum_floats(float(total))
        return loss_value, grad_norm

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The summed loss of one micro-batch."""
        hidden = self.config.loss == "kl+hidden"
        with precision.forward(ids.device):
            out = self.student(ids, output_hidden_states=hidden)
            if self.config.loss == "ce":
                return losses.next_token_ce(out.logits, ids)
            with torch.no_grad():
                target = self.teacher(ids, output_hidden_states=hidden)
        loss = losses.kl_divergence(out.logits, target.logits)
        if hidden:
            loss = loss + losses.hidden_mse(out.hidden_states, target.hidden_states)
        return loss
