"""The bf16 fast path: products in bf16, sums and solves in fp32, and `auto` choosing by the hardware."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_tokens, tiny_model

from sparsellm import evaluate
from sparsellm.core import linalg, precision
from sparsellm.data import texts
from sparsellm.engine.sequential import EngineOptions, prune_model
from sparsellm.engine.stats import recording
from sparsellm.methods import Target, make_method
from sparsellm.models.adapters import adapter_for, submodule
from sparsellm.models.layers import capture, run_layer

BF16 = precision.Precision("bf16", "test")
FP32 = precision.Precision("fp32", "test")
CPU = torch.device("cpu")


def test_auto_is_fp32_on_a_cpu_without_bf16_and_bf16_with_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "fma"})
    chosen = precision.resolve("auto", CPU)
    assert chosen.name == "fp32" and "amx_bf16" in chosen.reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    expected = "bf16" if torch.backends.mkldnn.is_available() else "fp32"
    assert precision.resolve("auto", CPU).name == expected
    assert precision.resolve("fp32", CPU) == precision.Precision("fp32", "requested")
    assert precision.resolve("bf16", CPU) == precision.Precision("bf16", "requested")
    with pytest.raises(precision.UserError, match="unknown --precision 'fp16'"):
        precision.resolve("fp16", CPU)


def test_bf16_products_are_summed_in_fp32_within_their_rounding():
    """Cross products and linears: each chunk's bf16 product is rounded once (2^-9 relative), the fp32 sum over
    chunks averages the roundings (the references: float64 products of the bf16-rounded operands). Grams stay
    fp32 products under bf16, so they are positive semi-definite like the fp32 ones."""
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(5000, 200, generator=g), torch.randn(5000, 30, generator=g)
    a16, t16 = a.bfloat16().double(), t.bfloat16().double()
    with precision.using(BF16):
        h16, c, y = linalg.gram(a), linalg.cross(t, a), linalg.linear(a, t.T[:, :200])
    for got, ref in ((c, t16.T @ a16), (y, a16 @ t16.T[:, :200].T)):
        assert got.dtype == torch.float32
        assert 1e-6 < ((got.double() - ref).norm() / ref.norm()).item() < 2e-3  # rounded, and only so much
    with precision.using(FP32):
        h32, reference = linalg.gram(a), a.double().T @ a.double()
        assert ((h32.double() - reference).abs().max() < 1e-5 * reference.abs().max()).item()
        assert torch.equal(linalg.cross(t, a), t.T @ a)
    assert torch.equal(h16, h32) and torch.equal(h16, h16.T)


@pytest.fixture(scope="module")
def layer_inputs(smollm2):
    """SmolLM2's decoder layer 3 and its inputs on 8 C4 windows of 512 tokens (a real layer)."""
    model, tok = smollm2
    adapter = adapter_for(model)
    captured = capture(model, adapter, texts.calibration(tok, texts.corpus("c4", "train"), 8, 512, 0), 8)
    x = captured.hidden
    for i in range(3):
        x = run_layer(adapter.decoder_layers(model)[i], x, captured.kwargs[i], 8)
    return adapter, adapter.decoder_layers(model)[3], x, captured.kwargs[3]


def test_bf16_hessians_and_sparsegpt_masks_agree_with_fp32_on_a_real_layer(layer_inputs):
    """The Hessians themselves are fp32 products; what bf16 changes is the forward pass that makes their inputs.
    Measured on this layer (8 windows): q/k/v's Hessian identical (same layer input, its norm runs in fp32), o_proj's,
    the MLP's and down_proj's within 0.17-0.42% (Frobenius), SparseGPT 70% masks 98.5-100% equal, and the pruned
    weights' reconstruction error under the fp32 Hessian within 0.3%."""
    adapter, layer, x, kwargs = layer_inputs
    hessians = {}
    for p in (FP32, BF16):
        with precision.using(p), recording({s.name: submodule(layer, s.linears[0]) for s in adapter.sites},
                                                 "hessian") as recorded:  # fmt: skip
            run_layer(layer, x, kwargs, 8)
        hessians[p.name] = {name: s.mean() for name, s in recorded.items()}
    sparsegpt = make_method("sparsegpt")
    for site in adapter.sites:
        h32, h16 = hessians["fp32"][site.name], hessians["bf16"][site.name]
        assert ((h32 - h16).norm() / h32.norm()).item() < 1e-2, site.name
        weight = submodule(layer, site.linears[0]).weight.data
        w32, w16 = (sparsegpt.prune(weight, h, Target(sparsity=0.7)).weight for h in (h32, h16))
        assert ((w32 == 0) == (w16 == 0)).float().mean().item() > 0.95, site.name
        assert (w16 == 0).sum() == (w32 == 0).sum()  # the count stays exact
        e32, e16 = (_error(w, weight, h32) for w in (w32, w16))
        assert e16 == pytest.approx(e32, rel=1e-2), site.name


def _error(w: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_dense) H (W - W_dense)^T): the layer-wise reconstruction error under the Hessian."""
    d = (w - dense).double()
    return torch.trace(d @ hessian.double() @ d.T).item()


def test_dense_perplexity_in_bf16_is_within_half_a_percent_of_fp32(smollm2):
    model, tok = smollm2
    ppl = {p: evaluate(model, tok, ["wikitext2"], "quick", seqlen=256, progress=False, precision_name=p)
           for p in ("fp32", "bf16")}  # fmt: skip
    (fp32, data32), (bf16, data16) = ppl["fp32"], ppl["bf16"]
    assert data32["wikitext2"]["precision"]["name"] == "fp32" and data16["wikitext2"]["precision"]["name"] == "bf16"
    assert bf16["wikitext2"] == pytest.approx(fp32["wikitext2"], rel=5e-3)
    assert bf16["wikitext2"] != fp32["wikitext2"]  # the bf16 products really ran


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_both_precisions_prune_exactly_with_close_errors(method):
    """On a tiny Llama: the sparsity is exact in both precisions, the weights stay fp32, and bf16's layer
    reconstruction errors are fp32's within a few percent (and not bit-equal: the bf16 products really ran)."""
    logs = {}
    for p in (FP32, BF16):
        model = tiny_model("llama")
        adapter = adapter_for(model)
        with precision.using(p):
            logs[p.name] = prune_model(model, adapter, make_method(method), Target(sparsity=0.6), random_tokens(16),
                                       {0, 1}, EngineOptions(), progress=False)  # fmt: skip
        for layer in adapter.decoder_layers(model):
            for linear in adapter.linears(layer).values():
                assert linear.weight.dtype == torch.float32
                assert (linear.weight == 0).float().mean().item() == pytest.approx(0.6, abs=1 / linear.in_features)
    for a, b in zip(logs["fp32"], logs["bf16"], strict=True):
        assert b.recon_error == pytest.approx(a.recon_error, rel=0.05)
        assert b.recon_error != a.recon_error


def test_the_report_says_which_precision_ran_and_why(tiny_folder, tmp_path):
    for name, reason in (("fp32", "requested"), ("auto", "auto: ")):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "sparsellm", "prune", str(tiny_folder), "--sparsity", "0.5",
                            "--seqlen", "32", "--nsamples", "2", "--eval", "wikitext2", "--precision", name,
                            "--out", str(out)], capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        report = json.loads((out / "report.json").read_text())
        chosen = precision.resolve(name, CPU)
        assert report["precision"] == chosen.as_dict() and chosen.reason.startswith(reason)
        assert report["data"]["evaluation"]["wikitext2"]["precision"] == chosen.as_dict()
