"""MLP activations with their first and second derivatives (for SparseLLM's per-element s-step)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..core.errors import UserError


class Activation(NamedTuple):
    f: Callable[[torch.Tensor], torch.Tensor]
    # s -> (f(s), f'(s), f''(s)), sharing the sigmoid or tanh: the s-step's hot loop needs all three at once
    derivatives: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    argmin: float | None = None  # where a non-monotone activation is lowest: its two branches meet there


def _silu_derivatives(s):
    sig = torch.sigmoid(s)
    f = s * sig
    df = sig * (1 + s - f)  # sig (1 + s (1 - sig))
    d2f = (sig - sig * sig) * (2 + s - 2 * f)  # sig (1 - sig) (2 + s (1 - 2 sig))
    return f, df, d2f


_C, _K = math.sqrt(2 / math.pi), 0.044715


def _gelu_tanh(s):
    return 0.5 * s * (1 + torch.tanh(_C * (s + _K * s**3)))


def _gelu_tanh_derivatives(s):
    s2 = s * s
    t = torch.tanh(_C * s * (1 + _K * s2))
    du, d2u = _C * (1 + 3 * _K * s2), _C * 6 * _K * s
    sech2 = 1 - t * t
    f = 0.5 * s * (1 + t)
    df = 0.5 * (1 + t) + 0.5 * s * sech2 * du
    d2f = sech2 * du + 0.5 * s * (sech2 * d2u - 2 * t * sech2 * du * du)
    return f, df, d2f


def _relu_derivatives(s):
    return torch.relu(s), (s > 0).to(s.dtype), torch.zeros_like(s)


ACTIVATIONS = {
    "silu": Activation(torch.nn.functional.silu, _silu_derivatives, argmin=-1.278465),
    "gelu_tanh": Activation(_gelu_tanh, _gelu_tanh_derivatives, argmin=-0.751792),
    "relu": Activation(torch.relu, _relu_derivatives),
}

# Hugging Face config names -> ours
_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}


def activation(hf_name: str) -> Activation:
    if hf_name not in _ALIASES:
        raise UserError(f"MLP activation '{hf_name}' is not supported by SparseLLM; supported: {sorted(_ALIASES)}")
    return ACTIVATIONS[_ALIASES[hf_name]]
