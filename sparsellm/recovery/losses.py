"""The recovery losses, each a mean over the batch's tokens.

kl          KL(teacher || student) of the next-token distributions (temperature 1), summed over the vocabulary.
kl+hidden   kl plus SquareHead's (Kurtic et al., 2023) hidden-state term: for every decoder layer's output,
            ||h_student - h_teacher||^2 / ||h_teacher||^2 (the teacher's energy normalises each layer, so deep
            layers with large activations do not dominate), averaged over the layers.
ce          next-token cross-entropy on the text itself (no teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kl", "kl+hidden", "ce")
_CHUNK = 1024  # tokens per log-softmax: the vocabulary makes whole-batch fp32 copies large


class _KLDivergence(torch.autograd.Function):
    """Sum over tokens of KL(teacher || student) in fp32, chunk by chunk, with its gradient (softmax(student) -
    softmax(teacher)) made in the same pass: autograd through log_softmax and kl_div would keep several fp32 copies
    of the [tokens x vocabulary] logits and read them all again backwards."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        grad = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, student.shape[0], _CHUNK):
            log_q = student[a : a + _CHUNK].float().log_softmax(-1)
            log_p = teacher[a : a + _CHUNK].float().log_softmax(-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum(dtype=torch.float64)
            grad[a : a + _CHUNK] = log_q.exp_().sub_(p)
        ctx.save_for_backward(grad)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student)."""
    return _KLDivergence.apply(student_logits.flatten(0, -2), teacher_logits.flatten(0, -2).detach())


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Token-summed, layer-averaged normalised MSE of the decoder layers' outputs (index 0, the embeddings, left
    out: they are not pruned)."""
    terms = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        hs, ht = hs.float(), ht.float()
        per_token = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).mean().clamp_min(1e-12)
        terms.append(per_token.sum())
    return torch.stack(terms).mean()


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over predicted tokens of the cross-entropy of the next token."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
