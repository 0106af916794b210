"""The sequential engine and layer-wise evaluation on tiny random models of every family."""

import math
import resource
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, random_tokens, tiny_model

from sparsellm.engine.sequential import EngineOptions, prune_model
from sparsellm.eval import perplexity as perplexity_module
from sparsellm.eval.perplexity import perplexity
from sparsellm.methods import METHODS, Target, make_method
from sparsellm.models.adapters import adapter_for


def full_forward_ppl(model, windows):
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_perplexity_equals_full_forward(family, monkeypatch):
    monkeypatch.setattr(perplexity_module, "LOGIT_ROWS", 5)  # logits in several chunks, the last one shorter
    model = tiny_model(family)
    windows = random_tokens(6)
    assert (windows.shape[1] - 1) % 5 != 0
    assert perplexity(model, adapter_for(model), windows, batch_size=4) == pytest.approx(
        full_forward_ppl(model, windows), rel=1e-5
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("target", [Target(sparsity=0.6), Target(n=2, m=4)])
def test_every_method_prunes_every_family(family, method, target):
    model = tiny_model(family)
    adapter = adapter_for(model)
    logs = prune_model(
        model,
        adapter,
        make_method(method),
        target,
        random_tokens(8),
        {0, 1},
        EngineOptions(batch_size=3),
        progress=False,
    )
    assert [log.index for log in logs] == [0, 1]
    for layer in adapter.decoder_layers(model):
        for path, linear in adapter.linears(layer).items():
            w = linear.weight
            if target.is_nm:
                assert torch.all((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2), path
            else:
                assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1 / w.shape[1]), path
    assert all(0 < log.recon_error < 1 and math.isfinite(log.recon_error) for log in logs)
    assert math.isfinite(perplexity(model, adapter, random_tokens(2, seed=5)))


def sparsegpt_on_tiny_llama(sparsity: float, n_samples: int, layers: set[int], true_sequential: bool):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    opts = EngineOptions(true_sequential=true_sequential)
    target = Target(sparsity=sparsity)
    logs = prune_model(model, adapter, make_method("sparsegpt"), target, random_tokens(n_samples), layers, opts, False)
    return model, adapter, logs


def test_layer_selection_and_true_sequential():
    dense = tiny_model("llama")
    dense_layer0 = adapter_for(dense).decoder_layers(dense)[0].state_dict()
    model, adapter, logs = sparsegpt_on_tiny_llama(0.5, 8, {1}, true_sequential=True)
    assert [log.index for log in logs] == [1]
    for k, v in adapter.decoder_layers(model)[0].state_dict().items():
        assert torch.equal(v, dense_layer0[k]), k


def test_true_sequential_differs_and_reconstructs_no_worse():
    """Recomputing inputs after earlier sites are pruned lets later sites compensate."""
    errors = {ts: sparsegpt_on_tiny_llama(0.7, 16, {0}, ts)[2][0].recon_error for ts in (False, True)}
    assert errors[True] != errors[False]
    assert errors[True] < errors[False] * 1.05


@pytest.mark.parametrize("width", [24, 576, 1000])
def test_gram_is_the_gram_matrix_and_exactly_symmetric(width):
    """The Hessian product: upper blocks multiplied, the lower ones mirrored; widths below, at and across the
    384-column block size. Also summed over chunks of rows, mirrored once at the end."""
    from sparsellm.core.linalg import add_gram_upper, gram, mirror_upper

    a = torch.randn(300, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64).float()
    reference = a.double().T @ a.double()
    summed = torch.zeros(width, width)
    for rows in a.split(70):  # the same sum accumulated over chunks of rows (the last one shorter)
        add_gram_upper(summed, rows)
    for h in (gram(a), mirror_upper(summed)):
        assert torch.equal(h, h.T)
        assert (h.double() - reference).abs().max() < 1e-5 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqnorm_statistic_is_the_mean_square_and_leaves_the_input_alone(dtype):
    """Wanda's and OWL's per-column mean square, summed in row chunks (here across two calls and a short chunk)."""
    from sparsellm.engine.stats import InputStats

    x = torch.randn(2, 300, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = x.clone()
    stats = InputStats("sqnorm")
    for part in x:
        stats.add(part)
    reference = x.double().reshape(-1, 40).square().mean(0)
    assert torch.equal(x, before)
    assert stats.tokens == 600
    assert (stats.mean().double() - reference).abs().max() < 1e-6 * reference.max()


FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from sparsellm.core.memory import keep_freed_memory
assert keep_freed_memory()  # the CLI calls this first
for _ in range(4):  # glibc may place the first few blocks of 64 MB (above its largest default mmap threshold, 32 MB)
    torch.ones(1 << 24)  # anew before it settles on reusing one: the count starts after them
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(1 << 24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again():
    # In a fresh process: how much this one's heap already holds decides whether glibc trims the freed block.
    run = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_ALLOCATIONS], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pages = (1 << 26) // resource.getpagesize()
    # Returned to the kernel, each allocation would fault in all its 16384 pages again (81920 in all).
    assert int(run.stdout) < pages
