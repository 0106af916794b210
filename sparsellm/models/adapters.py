"""Architecture knowledge, and only here: where the decoder layers, linears, MLP and output head are.

An adapter names, for one model family, the *sites* of a decoder layer: groups of linears that read the
same input tensor (so one Hessian serves the whole group), in forward order. The engine and the methods
only ever see sites, linears and an `MLP` view; no other module names a module path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError
from ..core.types import MLP, Site


def submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class Adapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    sites: tuple[Site, ...] = ()
    attention: str = "self_attn"  # the layer's attention module, whose first output joins the residual stream

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> MLP:
        raise NotImplementedError

    def linears(self, layer: nn.Module, part: str | None = None) -> dict[str, nn.Linear]:
        """Every prunable linear of a layer (of one part, if given), by path, in forward order."""
        return {
            path: submodule(layer, path)
            for site in self.sites
            if part is None or site.part == part
            for path in site.linears
        }


_LLAMA_SITES = (
    Site("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn"),
    Site("attn_out", ("self_attn.o_proj",), "attn"),
    Site("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Site("mlp_out", ("mlp.down_proj",), "mlp"),
)


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    sites = _LLAMA_SITES

    def decoder_layers(self, model):
        return model.model.layers

    def logits(self, model, hidden):
        return model.lm_head(model.model.norm(hidden))

    def mlp(self, layer):
        m = layer.mlp
        name = getattr(m.config, "hidden_activation", None) or m.config.hidden_act
        return MLP("gated", up=m.up_proj, gate=m.gate_proj, down=m.down_proj, act=m.act_fn, act_name=name)


class Gemma3Adapter(LlamaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)

    def logits(self, model, hidden):
        logits = super().logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    sites = (
        Site("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn"),
        Site("attn_out", ("self_attn.out_proj",), "attn"),
        Site("mlp_in", ("fc1",), "mlp"),
        Site("mlp_out", ("fc2",), "mlp"),
    )

    def decoder_layers(self, model):
        return model.model.decoder.layers

    def logits(self, model, hidden):
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return model.lm_head(hidden)

    def mlp(self, layer):
        if not isinstance(layer.activation_fn, nn.ReLU):
            raise UserError(
                f"OPT MLP activation {layer.activation_fn!r} is not ReLU; only ReLU OPT models are supported"
            )
        return MLP("relu", up=layer.fc1, down=layer.fc2, act=layer.activation_fn, act_name="relu")


ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), Gemma3Adapter(), OPTAdapter())


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UserError(f"unsupported architecture '{model_type}'; supported model types: {supported}")


def context_length(model: nn.Module) -> int:
    return int(model.config.max_position_embeddings)
