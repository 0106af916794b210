"""Perplexity computed one decoder layer at a time (so a model need not run whole), ppl = exp(mean token NLL)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import parallel, precision
from ..core.types import LayerIO
from ..models.adapters import Adapter
from ..models.layers import capture, run_layer

# Tokens whose logits exist at once: the vocabulary-sized logits and their log-softmax dominate the evaluation's
# memory (SmolLM2: 100 MB each for a 512-token window, 25 MB for 128 tokens).
LOGIT_ROWS = 128


@torch.no_grad()
def window_nll(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    io: LayerIO | None = None,
) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over non-overlapping windows [n, seqlen]."""
    io = io or LayerIO()
    inputs = capture(model, adapter, windows, batch_size)
    x = inputs.hidden
    decoder = adapter.decoder_layers(model)
    for i in tqdm(range(len(decoder)), desc="eval", unit="layer", disable=not progress, leave=False):
        io.enter(i, decoder[i])
        run_layer(decoder[i], x, inputs.kwargs[i], batch_size, out=x)  # in place: each batch reads only itself
        io.leave(i, decoder[i])
    total, predicted = 0.0, windows.shape[1] - 1
    targets = windows[:, 1:].to(x.device)
    for j in range(windows.shape[0]):
        for start in range(0, predicted, LOGIT_ROWS):
            sl = slice(start, min(start + LOGIT_ROWS, predicted))
            with precision.forward(x.device):
                logits = adapter.logits(model, x[j : j + 1, sl])[0].float()
            total += nn.functional.cross_entropy(logits, targets[j, sl], reduction="sum").item()
    return total, windows.shape[0] * predicted


def perplexity(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    io: LayerIO | None = None,
) -> float:
    """exp(mean NLL) over the windows of every rank (each passes its own share)."""
    nll, count = parallel.all_sum_floats(*window_nll(model, adapter, windows, batch_size, progress, io))
    return math.exp(nll / count)
