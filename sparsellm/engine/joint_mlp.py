"""The engine's side of joint-MLP methods (SparseLLM): the MLP's inputs, and the replay of its outputs.

The method gets the whole MLP and its inputs X for every calibration token, taken after the layer's attention
was pruned (or, with the method's `dense_attention_input`, before, as the reference code does). The final pass
of the layer then replays what was already computed instead of running it again: the attention's outputs,
recorded on the way to X, and the MLP linears' outputs, which the method stored.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core import parallel
from ..core.errors import UserError
from ..core.memory import Alloc, Sink, in_ram
from ..methods.base import Method, MLPResult, Target
from ..models.adapters import Adapter, submodule
from ..models.layers import StopForward, call_layer


@torch.no_grad()
def mlp_inputs(
    layer: nn.Module,
    adapter: Adapter,
    x: torch.Tensor,
    kwargs: dict,
    batch_size: int,
    alloc: Alloc = in_ram,
    keep_attention: bool = False,
) -> tuple[torch.Tensor, list]:
    """The MLP's input for every calibration token, [N, d] fp32, as the layer currently computes it, and with
    `keep_attention` the attention's output of every batch (for `replaying`; its attention weights, which layers
    discard, dropped; otherwise the list is empty), both kept in tensors made by `alloc`.

    The forward stops as soon as the MLP's first linear is reached: the MLP itself need not run.
    """
    tokens = x.shape[0] * x.shape[1]
    inputs, attention = Sink(tokens, alloc), Sink(x.shape[0], alloc)
    extra: list[int] = []  # how many outputs the attention returns besides the hidden states (empty: a bare tensor)

    def record(_module, args):
        inputs.write(args[0].reshape(-1, args[0].shape[-1]).float())
        raise StopForward

    def record_attention(_module, _args, out):
        attention.write(out[0] if isinstance(out, tuple) else out)
        extra[:] = [len(out) - 1] if isinstance(out, tuple) else []

    mlp = adapter.mlp(layer)
    handles = [lin.register_forward_pre_hook(record) for lin in (mlp.up, mlp.gate) if lin is not None]
    if keep_attention:
        handles.append(submodule(layer, adapter.attention).register_forward_hook(record_attention))
    try:
        for start in range(0, x.shape[0], batch_size):
            with contextlib.suppress(StopForward):
                call_layer(layer, x[start : start + batch_size], kwargs)
    finally:
        for h in handles:
            h.remove()
    (bad,) = parallel.all_sum_floats(float(not torch.isfinite(inputs.tensor).all()))  # every rank stops together
    if bad:
        raise UserError("the MLP inputs hold NaN/Inf (the model or its data is broken); nothing was saved")
    if attention.tensor is None:
        return inputs.tensor, []
    return inputs.tensor, [(out, *(None,) * extra[0]) if extra else out for out in attention.tensor.split(batch_size)]


def per_batch(rows: torch.Tensor, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Token rows [N, k] of the windows x [n, T, d], cut into the outputs of the engine's batches, [b, T, k]."""
    seqlen = x.shape[1]
    return [rows[start * seqlen : (start + batch_size) * seqlen].view(-1, seqlen, rows.shape[-1])
            for start in range(0, x.shape[0], batch_size)]  # fmt: skip


@contextlib.contextmanager
def replaying(outputs: dict[nn.Module, list]):
    """While active, each module in `outputs` returns its recorded outputs, one per call, in order, instead of
    computing; on exit every one must have been returned exactly once.

    SparseLLM's final pass feeds each layer the inputs it was just run on: the attention's outputs were
    recorded on the way to the MLP inputs, and the solver computed its kept MLP's outputs, so replaying them
    leaves only the norms and residual adds to run (no architecture knowledge needed here).
    """
    served = dict.fromkeys(outputs, 0)

    def replay(module: nn.Module):
        def forward(*args, **_kwargs):
            if served[module] == len(outputs[module]):
                raise RuntimeError("a replayed module was called more often than recorded (the final pass changed)")
            served[module] += 1
            out = outputs[module][served[module] - 1]
            if torch.is_tensor(out) and args and torch.is_tensor(args[0]):  # a linear's: shaped as its input asks
                out = out.reshape(*args[0].shape[:-1], -1)  # (OPT flattens the tokens before fc1)
            return out

        return forward

    for module in outputs:
        module.forward = replay(module)
    try:
        yield
    finally:
        for module in outputs:
            del module.forward
    if any(served[module] != len(outputs[module]) for module in outputs):
        raise RuntimeError("replayed outputs were not consumed exactly once (the final pass changed)")


class JointMLP:
    """One layer's MLP under a joint method: created before attention is pruned (so the dense-input variant can
    record its inputs then), pruned after."""

    def __init__(
        self,
        layer: nn.Module,
        adapter: Adapter,
        method: Method,
        x: torch.Tensor,
        kwargs: dict,
        batch: int,
        alloc: Alloc,
    ):
        self.layer, self.adapter, self.method = layer, adapter, method
        self.x, self.kwargs, self.batch, self.alloc = x, kwargs, batch, alloc
        self.dense_x = mlp_inputs(layer, adapter, x, kwargs, batch, alloc)[0] if method.dense_attention_input else None

    def prune(self, target: Target) -> tuple[MLPResult, dict[nn.Module, list]]:
        """Prune the MLP in place; (the method's result, the outputs the layer's final pass replays)."""
        replay: dict[nn.Module, list] = {}
        x_mlp = self.dense_x
        if x_mlp is None:  # taken after attention was pruned: the final pass runs this attention on these inputs
            attention = submodule(self.layer, self.adapter.attention)
            x_mlp, replay[attention] = mlp_inputs(
                self.layer, self.adapter, self.x, self.kwargs, self.batch, self.alloc, keep_attention=True
            )
        result = self.method.prune_mlp(self.adapter.mlp(self.layer), x_mlp, target, self.alloc)
        # The final pass feeds the MLP x_mlp again, unless x_mlp was taken before attention was pruned.
        if result.outputs and self.dense_x is None:
            replay |= {linear: per_batch(rows, self.x, self.batch) for linear, rows in result.outputs.items()}
        result.outputs = None  # replayed or dropped: N x f tensors the report must not keep
        return result, replay
