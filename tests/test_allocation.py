"""Per-layer sparsity allocation: the published formulas on hand-made scores, the exact overall sparsity through
the engine (in memory and streamed), and the refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsellm import PruneConfig, UserError, prune
from sparsellm.methods.allocation import Allocation, hill_alpha, median_score, outlier_fraction


def owl_reference(ratios, target, lam):
    """OWL's own arithmetic (its lib/prune.py): densities from the outlier ratios, then sparsity = 1 - density."""
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - target)
    return 1 - r


def test_owl_gives_the_published_formulas_sparsities():
    ratios = [0.012, 0.030, 0.007, 0.021, 0.015, 0.009]
    ours = Allocation("owl", 0.08).sparsities([-r for r in ratios], [100] * 6, 0.7)
    assert np.allclose(ours, owl_reference(ratios, 0.7, 0.08), atol=1e-12)
    assert min(ours) == ours[1] and max(ours) == ours[2]  # most outliers: pruned least


def dlp_reference(medians, target, alpha):
    """DLP's own arithmetic: importance 1 - median / sum of medians, min-max scaled to [0, 2 alpha], centred on the
    density 1 - target; sparsity = 1 - density."""
    m = np.array(medians)
    importance = 1 - m / m.sum()
    scaled = (importance - importance.min()) / (importance.max() - importance.min()) * alpha * 2
    return 1 - (scaled - scaled.mean() + (1 - target))


def test_dlp_gives_the_published_formulas_sparsities():
    medians = [0.31, 0.12, 0.45, 0.27, 0.19]
    ours = Allocation("dlp", 0.15).sparsities(medians, [100] * 5, 0.7)
    assert np.allclose(ours, dlp_reference(medians, 0.7, 0.15), atol=1e-12)
    assert min(ours) == ours[1] and max(ours) == ours[2]  # the highest median: pruned most


def test_the_median_score_is_over_the_whole_layer():
    w1, w2 = torch.ones(2, 3), torch.full((2, 2), 10.0)
    # scores: six 1s and four 10s; with ||X_j|| = 2 the first linear's become 2s: the median moves with X too
    assert median_score([(w1, torch.ones(3)), (w2, torch.ones(2))]) == 1.0
    assert median_score([(w1, torch.full((3,), 4.0)), (w2, torch.ones(2))]) == 2.0
    assert median_score([(w1, torch.ones(3)), (torch.full((4, 2), 10.0), torch.ones(2))]) == 10.0
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(6, 5, generator=g), torch.rand(5, generator=g)),
        (torch.randn(4, 3, generator=g), torch.rand(3, generator=g)),
    ]
    everything = torch.cat([(w.abs() * x.sqrt()).flatten() for w, x in pairs])
    assert median_score(pairs) == float(everything.median())  # an even count: the lower middle value


def test_unequal_layers_average_to_the_target_by_parameters():
    sizes = [10, 30, 60]
    ours = Allocation("alpha", 0.1).sparsities([1.0, 2.0, 3.0], sizes, 0.6)
    assert sum(s * n for s, n in zip(ours, sizes, strict=True)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert ours[0] < ours[1] < ours[2] and ours[2] - ours[0] == pytest.approx(0.2)


def test_the_outlier_fraction_is_over_the_whole_layer():
    w1, w2 = torch.ones(2, 4), torch.full((2, 4), 10.0)
    ones = torch.ones(4)
    # layer mean score 5.5; only w2's weights (10) exceed 1.5 x 5.5
    assert outlier_fraction([(w1, ones), (w2, ones)], 1.5) == 0.5
    assert outlier_fraction([(w1, ones * 3600.0), (w2, ones)], 1.5) == 0.5  # ||X_j|| = 60: now w1 holds them


def test_hill_alpha_sees_heavy_tails():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(256, 128, generator=g)
    heavy = gaussian.clone()
    heavy[:8] *= 30  # a few strong directions: a heavy-tailed spectrum
    assert hill_alpha(heavy) < hill_alpha(gaussian)


def test_bad_allocations_are_refused_in_one_line():
    for bad in (dict(rule="random"), dict(rule="owl", spread=0.6), dict(rule="owl", spread=float("nan")),
                dict(rule="owl", owl_m=0.0)):  # fmt: skip
        with pytest.raises(UserError):
            Allocation(**bad)
    with pytest.raises(UserError, match="N:M"):
        PruneConfig(nm="2:4", allocation="owl").validate()
    with pytest.raises(UserError, match="outside"):
        Allocation("owl", 0.4).sparsities([0.0, 1.0], [1, 1], 0.9)


@pytest.mark.parametrize("rule", ["owl", "dlp", "alpha"])
def test_the_overall_sparsity_is_exact_and_layers_differ(rule, tiny_folder):
    from sparsellm.models import loading

    model, tokenizer = loading.load(str(tiny_folder))
    config = PruneConfig(method="sparsegpt", sparsity=0.7, seqlen=64, nsamples=4, allocation=rule, owl_lambda=0.1)
    report = prune(model, tokenizer, config, progress=False)
    assert report.sparsity["measured"] == pytest.approx(0.7, abs=1e-4)
    targets = [layer["target"] for layer in report.layers]
    assert len(set(targets)) == 2 and np.mean(targets) == pytest.approx(0.7) and max(targets) - min(targets) > 0.1


def test_streamed_allocation_equals_the_in_memory_one(tiny_folder, tmp_path):
    def run(*extra):
        out = tmp_path / ("s" if extra else "m")
        cmd = [sys.executable, "-m", "sparsellm", "prune", str(tiny_folder), "--method", "wanda", "--sparsity", "0.6",
               "--seqlen", "64", "--nsamples", "4", "--allocation", "owl", "--out", str(out), *extra]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads((out / "report.json").read_text())

    memory, streamed = run(), run("--stream")
    assert (tmp_path / "m" / "plots" / "allocation.png").is_file()
    inspected = subprocess.run([sys.executable, "-m", "sparsellm", "inspect", str(tmp_path / "s")],
                               capture_output=True, text=True)  # fmt: skip
    assert inspected.returncode == 0, inspected.stdout
    assert f"{memory['layers'][0]['target']:.4f}" in inspected.stdout.split("layer  sparsity  target")[1]
    assert [lg["target"] for lg in memory["layers"]] == [lg["target"] for lg in streamed["layers"]]
    targets = [lg["target"] for lg in memory["layers"]]  # no --owl-lambda: Wanda's own spread ran and is reported
    assert memory["config"]["owl_lambda"] == 0.08 and max(targets) - min(targets) == pytest.approx(0.16)
    assert PruneConfig(method="sparsellm", sparsity=0.7, allocation="owl").allocator().spread == 0.2
    assert PruneConfig(method="wanda", sparsity=0.7, allocation="dlp").allocator().spread == 0.15
    assert PruneConfig(method="magnitude", sparsity=0.7, allocation="dlp").allocator().spread == 0.08
    capped = PruneConfig(method="wanda", sparsity=0.9, allocation="dlp").allocator().spread  # no layer at 100%
    assert capped == pytest.approx(0.08) and PruneConfig(sparsity=0.9, owl_lambda=0.3).allocator().spread == 0.3
    assert memory["sparsity"]["per_matrix"] == streamed["sparsity"]["per_matrix"]
