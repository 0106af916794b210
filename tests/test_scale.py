"""Scale: streamed (layer-by-layer) pruning and evaluation, activations on disk, and data parallelism under
torchrun. Each must give exactly the model of the plain in-memory single-process run."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sparsellm.models import loading

# fp32: these runs must equal each other to the bit or to 1e-5, which bf16 products, rounded to 8 bits per chunk
# of tokens that differ between ranks, would not (test_precision.py compares the precisions).
COMMON = ["--sparsity", "0.6", "--seqlen", "64", "--nsamples", "5", "--batch-size", "2", "--eval", "ptb",
          "--precision", "fp32"]  # fmt: skip


def sparsellm(*args, ranks: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    r = subprocess.run([*launcher, "-m", "sparsellm", *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def assert_same_model(a, b, atol: float = 0.0) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name, w in ta.items():
        assert ((w == 0) == (tb[name] == 0)).all(), f"{name}: masks differ"
        assert (w - tb[name]).abs().max().item() <= atol, name


@pytest.fixture(scope="module")
def in_memory(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("in-memory") / "sparsellm"
    sparsellm("prune", tiny_folder, "--method", "sparsellm", *COMMON, "--out", out)
    return out


def test_streamed_pruning_and_evaluation_equal_the_in_memory_run(tiny_folder, in_memory, tmp_path):
    out = tmp_path / "streamed"
    sparsellm("prune", tiny_folder, "--method", "sparsellm", *COMMON, "--stream", "--out", out)
    assert_same_model(in_memory, out)
    assert len(list(out.glob("layer-*.safetensors"))) == 2 and (out / "model.safetensors.index.json").is_file()
    assert report(out)["perplexity"] == report(in_memory)["perplexity"]
    assert report(out)["sparsity"] == report(in_memory)["sparsity"]
    model = AutoModelForCausalLM.from_pretrained(out)  # the sharded folder is a normal Hugging Face model
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, tensors(in_memory)["model.layers.1.mlp.down_proj.weight"]
    )
    evaluated = sparsellm(
        "eval", out, "--datasets", "ptb", "--seqlen", "64", "--stream", "--precision", "fp32", "--json"
    )
    streamed = json.loads(evaluated.stdout)
    assert streamed["perplexity"]["ptb"] == pytest.approx(report(in_memory)["perplexity"]["ptb"], rel=1e-6)
    assert sparsellm("inspect", out).returncode == 0


@pytest.mark.parametrize("budget", ["nothing", "activations"])
def test_tensors_offloaded_to_disk_give_the_same_model(budget, tiny_folder, in_memory, tmp_path):
    """A budget smaller than the layer activations sends them and SparseLLM's auxiliaries to disk; one that holds
    the activations alone sends only the auxiliaries. Either way the model is the in-memory run's, to the bit."""
    planned = report(in_memory)["config"]["activations"]
    assert planned["offload_dir"] is None and planned["auxiliary_dir"] is None
    assert planned["auxiliary_bytes"] > planned["bytes"] > 1024
    max_memory = {"nothing": "1KB", "activations": f"{planned['bytes']}B"}[budget]
    offload = tmp_path / "offload"
    offload.mkdir()
    out = tmp_path / "offloaded"
    sparsellm("prune", tiny_folder, "--method", "sparsellm", *COMMON, "--max-memory", max_memory,
              "--offload-dir", offload, "--out", out)  # fmt: skip
    assert_same_model(in_memory, out)
    plan = report(out)["config"]["activations"]
    assert plan["offload_dir"] == (str(offload) if budget == "nothing" else None)
    assert plan["auxiliary_dir"] == str(offload)
    assert not list(offload.iterdir())  # the backing files are gone


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsellm"])
def test_two_gloo_ranks_give_the_single_process_result(method, tiny_folder, in_memory, tmp_path):
    one = in_memory if method == "sparsellm" else tmp_path / "one"
    if method != "sparsellm":
        sparsellm("prune", tiny_folder, "--method", method, *COMMON, "--out", one)
    r = sparsellm("prune", tiny_folder, "--method", method, *COMMON, "--out", tmp_path / "two", ranks=2)
    two = tmp_path / "two"
    assert r.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    assert_same_model(one, two, atol=1e-5)
    assert [report(d)["config"]["ranks"] for d in (one, two)] == [1, 2]
    assert report(two)["sparsity"]["measured"] == report(one)["sparsity"]["measured"]
    assert report(two)["perplexity"]["ptb"] == pytest.approx(report(one)["perplexity"]["ptb"], rel=1e-5)
    errors = [[layer["recon_error"] for layer in report(d)["layers"]] for d in (one, two)]
    assert errors[1] == pytest.approx(errors[0], rel=1e-4)


def with_outliers(folder, out):
    """`folder`'s model with a few large input columns in layer 1: OWL's scores of its two layers then differ by
    far more than a sum's rounding (the random tiny layers nearly tie, and a tie decides by summation order)."""
    shutil.copytree(folder, out)
    weights = load_file(out / "model.safetensors")
    for name in ("q_proj", "k_proj", "v_proj"):
        weights[f"model.layers.1.self_attn.{name}.weight"][:, :4] *= 30
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_allocation_and_alps_stream_exactly_and_split_across_ranks_closely(method, tiny_folder, tmp_path):
    """OWL's per-layer targets and ALPS's moving masks: streamed, the in-memory model to the bit. Under two gloo
    ranks the Hessians are sums in another order, and ALPS's thirty top-k projections turn their last-bit
    differences into a few near-tie weights kept instead of their neighbours (as a different thread count does):
    the targets and every matrix's zero count are exact, the masks agree on at least 95% of each matrix, the layers'
    errors within 5% and the perplexity within 1%."""
    folder = with_outliers(tiny_folder, tmp_path / "model")
    both = ["--method", method, *COMMON, "--allocation", "owl", "--owl-lambda", "0.1", "--refit", "alps"]
    runs = {mode: tmp_path / mode for mode in ("memory", "stream", "ranks")}
    sparsellm("prune", folder, *both, "--out", runs["memory"])
    sparsellm("prune", folder, *both, "--stream", "--out", runs["stream"])
    sparsellm("prune", folder, *both, "--out", runs["ranks"], ranks=2)
    assert_same_model(runs["memory"], runs["stream"])
    memory, stream, ranks = (report(runs[mode]) for mode in ("memory", "stream", "ranks"))
    targets = [layer["target"] for layer in memory["layers"]]
    assert targets[1] < targets[0] and memory["config"]["refit"] == "alps"  # the outliers' layer is pruned less
    assert [layer["target"] for layer in stream["layers"]] == [layer["target"] for layer in ranks["layers"]] == targets
    assert stream["perplexity"] == memory["perplexity"]
    one, two = tensors(runs["memory"]), tensors(runs["ranks"])
    for name, w in one.items():
        assert int((w == 0).sum()) == int((two[name] == 0).sum()), name
        assert ((w == 0) == (two[name] == 0)).float().mean() >= 0.95, name
    errors = [[layer["recon_error"] for layer in r["layers"]] for r in (memory, ranks)]
    assert errors[1] == pytest.approx(errors[0], rel=0.05)
    assert ranks["perplexity"]["ptb"] == pytest.approx(memory["perplexity"]["ptb"], rel=0.01)


def random_llama(folder, layers: int):
    tok = AutoTokenizer.from_pretrained(loading.resolve("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_streamed_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    """Same width, 4 vs 32 layers (16 MB each): streamed, peak RSS stays within 15%; in memory, it grows."""
    rss = {}
    for layers in (4, 32):
        folder = random_llama(tmp_path / f"llama-{layers}", layers)
        for mode in ("--stream", "--overwrite"):
            out = tmp_path / f"out-{layers}{mode}"
            sparsellm("prune", folder, "--method", "wanda", "--sparsity", "0.5", "--seqlen", "32", "--nsamples", "2",
                      mode, "--out", out)  # fmt: skip
            rss[layers, mode] = report(out)["peak_rss_mb"]
            shutil.rmtree(out)  # 0.5 GB each at 32 layers: the suite must fit a nearly full disk
        shutil.rmtree(folder)
    assert rss[32, "--stream"] < 1.15 * rss[4, "--stream"], rss
    assert rss[32, "--overwrite"] > rss[4, "--overwrite"] + 300, rss  # 28 more layers of 16 MB, held at once
