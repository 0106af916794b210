"""Tiny random models of every supported family, and the real SmolLM2 checkpoint (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, OPTConfig

torch.set_num_threads(2)

settings.register_profile("ci", max_examples=50)
settings.register_profile("long", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VOCAB = 256
SEQLEN = 32


def tiny_config(family: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
    )
    if family == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    if family == "llama":
        return LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "gemma3":
        # a sliding window shorter than the test windows, so per-layer-type masks matter
        return Gemma3TextConfig(
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            **common,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def random_tokens(n: int, seqlen: int = SEQLEN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


FAMILIES = ["opt", "llama", "gemma3"]


@pytest.fixture(scope="session")
def smollm2():
    from sparsellm.models import loading

    return loading.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random tiny Llama with the real SmolLM2 tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    from sparsellm.models import loading

    tok = AutoTokenizer.from_pretrained(loading.resolve("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
