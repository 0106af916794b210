"""The CUDA paths, against the CPU: pruning and evaluation on a GPU give the CPU's model and perplexity.

Skipped where torch sees no CUDA device (every CI machine so far); `bash bench/gpu_check.sh` runs them on a GPU.
"""

import pytest
import torch

from sparsellm.api import PruneConfig, evaluate, prune
from sparsellm.core import precision
from sparsellm.models import loading

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SETTINGS = dict(seqlen=64, nsamples=8, batch_size=4, precision="fp32", calib="c4")


def pruned(folder, device: str, method: str, **target):
    model, tokenizer = loading.load(str(folder), device=device)
    report = prune(model, tokenizer, PruneConfig(method=method, **target, **SETTINGS), progress=False)
    return model, tokenizer, report


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsellm"])
@pytest.mark.parametrize("target", [{"sparsity": 0.6}, {"nm": "2:4"}])
def test_gpu_pruning_gives_the_cpu_model(method, target, tiny_folder):
    """Same masks but for near-ties (GPU and CPU sum in other orders), the exact target, weights within 1e-3."""
    cpu_model, _, cpu_report = pruned(tiny_folder, "cpu", method, **target)
    gpu_model, _, gpu_report = pruned(tiny_folder, "cuda", method, **target)
    assert gpu_report.sparsity["measured"] == cpu_report.sparsity["measured"]
    cpu_w, gpu_w = weights(cpu_model), weights(gpu_model)
    for name, w in cpu_w.items():
        agree = ((w == 0) == (gpu_w[name] == 0)).float().mean().item()
        assert agree >= 0.99, f"{name}: masks agree on {agree:.4f} of entries"
        both = (w != 0) & (gpu_w[name] != 0)
        assert torch.allclose(w[both], gpu_w[name][both], atol=1e-3, rtol=1e-3), name


def test_gpu_perplexity_equals_the_cpu_one(tiny_folder):
    values = []
    for device in ("cpu", "cuda"):
        model, tokenizer = loading.load(str(tiny_folder), device=device)
        values.append(evaluate(model, tokenizer, ["ptb"], seqlen=64, progress=False, precision_name="fp32")[0]["ptb"])
    assert values[1] == pytest.approx(values[0], rel=1e-4)


def test_auto_precision_on_the_gpu_follows_its_bf16_support():
    chosen = precision.resolve("auto", torch.device("cuda"))
    assert chosen.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
