"""Shared types: what architecture adapters hand to the engine and the methods, and the engine's layer hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    """Linears fed by one tensor, e.g. q/k/v. `part` is "attn" or "mlp"."""

    name: str
    linears: tuple[str, ...]
    part: str


@dataclass
class MLP:
    """A decoder layer's MLP as the math sees it.

    relu:  Y = down(act(up X + b1)) + b2          (OPT: up = fc1, down = fc2)
    gated: Y = down(act(gate X) * up X)           (LLaMA family: SiLU; Gemma 3: GELU-tanh)
    """

    kind: str
    up: nn.Linear
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    act_name: str  # the Hugging Face config name, e.g. "silu", "gelu_pytorch_tanh", "relu"
    gate: nn.Linear | None = None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input p for MLP input x."""
        if self.kind == "gated":
            return self.act(self.gate(x)) * self.up(x)
        return self.act(self.up(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


class LayerIO:
    """Hooks around each decoder layer's turn: `enter` before it is used, `leave` once the engine is done with
    it. The default keeps the whole model in memory; models.streaming loads and writes layers here."""

    def enter(self, i: int, layer: nn.Module) -> None:
        pass

    def leave(self, i: int, layer: nn.Module) -> None:
        pass

    def release(self, i: int, layer: nn.Module) -> None:
        """Done with a layer that was only read (a pass before pruning): nothing of it is written."""
