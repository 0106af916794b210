"""Reliability: a killed run resumes to the identical model; broken numbers stop the run; random CLI input
never gives a traceback."""

import errno
import itertools
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sparsellm import api, cli
from sparsellm.core.errors import UserError
from sparsellm.engine.checkpoint import Checkpoint
from sparsellm.engine.sequential import EngineOptions, prune_model
from sparsellm.methods import Target, make_method
from sparsellm.models import loading
from sparsellm.models.adapters import adapter_for

SMALL_RUN = ["--method", "sparsegpt", "--sparsity", "0.6", "--layers", "0:3", "--nsamples", "4", "--seqlen", "128",
             "--checkpoint-every", "0"]  # fmt: skip


def sparsellm_cmd(*args):
    return [sys.executable, "-m", "sparsellm", "--threads", "2", *args]


def run(*args):
    return subprocess.run(sparsellm_cmd(*args), capture_output=True, text=True)


def kill_after_layer(out, layer: int, *extra) -> int:
    """Start a run and SIGKILL it as soon as the checkpoint of decoder layer `layer` is on disk."""
    cmd = sparsellm_cmd("prune", "smollm2-135m", *SMALL_RUN, "--out", str(out), *extra)
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    marker = out.with_name(out.name + ".checkpoint") / f"layer_{layer:04d}.safetensors"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    return proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_to_the_identical_model(tmp_path):
    reference = tmp_path / "reference"
    assert run("prune", "smollm2-135m", *SMALL_RUN, "--out", str(reference)).returncode == 0
    assert not (tmp_path / "reference.checkpoint").exists()  # removed once the result is in place

    out = tmp_path / "resumed"
    checkpoint = tmp_path / "resumed.checkpoint"
    # killed twice: after layer 1, then (resumed) after layer 2; -9 means it was still running
    assert kill_after_layer(out, 1) == -9
    assert kill_after_layer(out, 2, "--resume") == -9
    assert not out.exists() and (checkpoint / "state.pt").exists()

    again = run("prune", "smollm2-135m", *SMALL_RUN, "--out", str(out))
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr
    other = run("prune", "smollm2-135m", *SMALL_RUN[:3], "0.7", *SMALL_RUN[4:], "--out", str(out), "--resume")
    assert other.returncode == 2 and "differs in: sparsity" in other.stderr and "Traceback" not in other.stderr

    resumed = run("prune", "smollm2-135m", *SMALL_RUN, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["resumed"] and [log["index"] for log in report["layers"]] == [0, 1, 2]
    assert not checkpoint.exists()
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"] * 0)


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_the_checkpoint_is_written_when_its_interval_has_passed_and_after_the_last_layer(every, tmp_path, monkeypatch):
    from sparsellm.engine import checkpoint as ckpt

    written, real = [], ckpt.write_atomic
    monkeypatch.setattr(ckpt, "write_atomic", lambda path, write: written.append(path.name) or real(path, write))
    model, calib = tiny_model("llama"), torch.randint(0, 100, (4, 32))
    adapter, layers = adapter_for(model), {0, 1}
    checkpoint = Checkpoint(tmp_path, {"run": 1}, every)
    prune_model(
        model, adapter, make_method("sparsegpt"), Target(0.5), calib, layers, EngineOptions(), False, checkpoint
    )
    per_layer = ["layer_0000.safetensors", "state.pt", "layer_0001.safetensors", "state.pt"]
    assert written == (per_layer if every == 0 else ["layer_0000.safetensors", "layer_0001.safetensors", "state.pt"])
    again = tiny_model("llama")  # the dense model: the checkpoint restores both pruned layers into it
    decoder = adapter.decoder_layers(again)
    start, _, logs = Checkpoint(tmp_path, {"run": 1}).load(decoder, adapter)
    assert start == 2 and [log["index"] for log in logs] == [0, 1]
    for i in layers:
        pruned, restored = adapter.linears(adapter.decoder_layers(model)[i]), adapter.linears(decoder[i])
        assert all(torch.equal(pruned[k].weight, restored[k].weight) for k in pruned)


def test_a_run_with_allocation_and_alps_resumes_to_the_identical_model(tmp_path, monkeypatch):
    """Stopped after layer 0's checkpoint, then resumed: the per-layer targets (computed before layer 0, from the
    dense model) and ALPS's masks are those of the run that never stopped, to the bit."""
    from sparsellm.engine import checkpoint as ckpt
    from sparsellm.methods.allocation import Allocation
    from sparsellm.methods.alps import Alps

    opts = EngineOptions(refit=Alps(iterations=10), allocation=Allocation("owl", spread=0.1))
    calib = torch.randint(0, 100, (4, 32))

    def prune(model, checkpoint=None):
        adapter = adapter_for(model)
        logs = prune_model(
            model, adapter, make_method("sparsegpt"), Target(0.6), calib, {0, 1}, opts, False, checkpoint
        )
        return model, logs

    whole, logs = prune(tiny_model("llama"))
    real = ckpt.write_atomic

    def stop_after_layer_0(path, write):
        real(path, write)
        if path.name == "state.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_atomic", stop_after_layer_0)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_model("llama"), Checkpoint(tmp_path, {"run": 1}, 0.0))
    written = []
    monkeypatch.setattr(ckpt, "write_atomic", lambda path, write: written.append(path.name) or real(path, write))
    resumed, resumed_logs = prune(tiny_model("llama"), Checkpoint(tmp_path, {"run": 1}, 0.0))
    assert written == ["layer_0001.safetensors", "state.pt"]  # layer 0 came from the checkpoint
    assert [log.target for log in resumed_logs] == [log.target for log in logs] and logs[0].target != logs[1].target
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_write_that_fails_leaves_no_partial_file(tmp_path):
    from sparsellm.core.files import write_atomic

    def fill_the_disk(path):
        path.write_bytes(b"half a state")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "state.pt", fill_the_disk)
    assert list(tmp_path.iterdir()) == []


def test_the_dequantised_gguf_cache_is_keyed_by_content_not_by_path(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "cache_dir", lambda: tmp_path / "cache")
    first, second = tmp_path / "install-1" / "m.gguf", tmp_path / "install-2" / "m.gguf"
    for path in (first, second):  # the same file in two installs (two virtual environments)
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes")
    cached = tmp_path / "cache" / "models" / f"m-{loading._gguf_cache_key(first)}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert loading._cached_from_gguf(second) == cached  # found, not dequantised again (these bytes are no GGUF)
    second.write_bytes(b"GGUF other bytes")
    assert loading._gguf_cache_key(second) != loading._gguf_cache_key(first)


def _prune_tiny(model, tok_folder, **overrides):
    tok = AutoTokenizer.from_pretrained(tok_folder)
    config = api.PruneConfig(**{"method": "sparsegpt", "sparsity": 0.5, "seqlen": 32, "nsamples": 2, **overrides})
    return api.prune(model, tok, config, progress=False)


def _tiny_llama_with_smollm2_vocab():
    tok = AutoTokenizer.from_pretrained(loading.resolve("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("where", ["weight", "embedding"])
def test_nan_in_the_model_stops_the_run_with_a_clear_message(where, tiny_folder):
    model = _tiny_llama_with_smollm2_vocab()
    with torch.no_grad():
        if where == "weight":
            model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
        else:
            model.model.embed_tokens.weight[:, 0] = float("inf")
    with pytest.raises(UserError, match="NaN/Inf"):
        _prune_tiny(model, tiny_folder)


def test_engine_refuses_an_nm_pattern_whose_m_does_not_divide_the_width(tiny_folder):
    with pytest.raises(UserError, match="M=5 does not divide the 64 inputs"):
        _prune_tiny(_tiny_llama_with_smollm2_vocab(), tiny_folder, sparsity=None, nm="2:5")


def test_sparsegpt_layer_is_finite_and_exact_on_a_rank_deficient_hessian():
    """All calibration tokens equal: every Hessian has rank 1. Damping keeps the result finite and exact."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    calib = torch.full((4, 32), 7)
    logs = prune_model(model, adapter, make_method("sparsegpt"), Target(0.5), calib, {0, 1}, EngineOptions(), False)
    for linear in adapter.linears(model.model.layers[1]).values():
        assert torch.isfinite(linear.weight).all() and (linear.weight == 0).sum() == linear.weight.numel() // 2
    assert all(log.recon_error < 1 for log in logs)


def test_a_failed_cholesky_is_retried_and_counted_in_the_report(tiny_folder, monkeypatch):
    """Fault injection: the first three factorisations fail; each retry is an event the report counts."""
    from sparsellm.methods import sparsegpt

    real, failures = sparsegpt.cholesky, iter(range(3))

    def flaky(h, upper=False):
        return None if next(failures, None) is not None else real(h, upper)

    monkeypatch.setattr(sparsegpt, "cholesky", flaky)
    report = _prune_tiny(_tiny_llama_with_smollm2_vocab(), tiny_folder)
    assert report.hardening == {"events": 3, "cholesky_damping_raised": 3, "cholesky_in_fp64": 0}
    assert all("raising damping" in e["detail"] for e in report.events) and len(report.events) == 3


# 50 random argument sets per test run; `HYPOTHESIS_PROFILE=long` (see conftest) tries 1000. Half are drawn
# from any values (mostly bad input), half from good values only, so the success path is exercised too.
GOOD = st.fixed_dictionaries(
    {
        "--method": st.sampled_from(["magnitude", "wanda", "sparsegpt", "sparsellm"]),
        "--seqlen": st.sampled_from(["16", "64"]),
        "--nsamples": st.sampled_from(["1", "2"]),
        "--limit": st.just("2"),  # only read with --tasks
    },
    optional={
        "--tasks": st.sampled_from(["rte", "winogrande,lambada_openai"]),
        "--layers": st.sampled_from(["all", "first-half", "1", "0,1"]),
        "--calib": st.sampled_from(["c4", "ptb"]),
        "--eval": st.sampled_from(["", "ptb"]),
        "--batch-size": st.sampled_from(["1", "3"]),
    },
).flatmap(
    lambda good: st.sampled_from(
        [{**good, "--sparsity": v} for v in ("0", "0.5", "0.9")] + [{**good, "--nm": v} for v in ("2:4", "1:8")]
    )
)
ANY = st.fixed_dictionaries(
    {},
    optional={
        "--method": st.sampled_from(["magnitude", "wanda", "sparsegpt", "sparsellm", "sparsellm", "obc", ""]),
        "--sparsity": st.sampled_from(["0", "0.5", "0.5", "0.99", "1", "1.5", "-0.1", "nan", "abc"]),
        "--nm": st.sampled_from(["2:4", "1:2", "4:4", "3:2", "0:4", "2:3", "2:5", "x:y", "2:0"]),
        "--seqlen": st.sampled_from(["1", "2", "16", "64", "256", "257", "0", "-5", "q"]),
        "--nsamples": st.sampled_from(["0", "1", "2", "-1", "z"]),
        "--layers": st.sampled_from(["all", "first-half", "0:1", "1", "5:9", "0,7", "a:b", ":"]),
        "--calib": st.sampled_from(["c4", "ptb", "wikitext2", "nope", "/nonexistent.txt"]),
        "--protocol": st.sampled_from(["quick", "fast"]),  # standard: full test sets, too slow for 60 runs
        "--rounds": st.sampled_from(["1", "2", "0", "-1"]),
        "--alpha": st.sampled_from(["0.3", "0", "-1"]),
        "--eval": st.sampled_from(["", "wikitext2", "imagenet", ","]),
        "--batch-size": st.sampled_from(["1", "8", "0", "-2"]),
        "--tasks": st.sampled_from(["", "mmlu", "zeroshot,nope", "rte"]),
        "--limit": st.sampled_from(["1", "0", "-3", "x"]),
    },
)


RUNS = itertools.count()


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.one_of(ANY, GOOD), overwrite=st.booleans())
def test_random_cli_arguments_never_give_a_traceback(options, overwrite, tiny_folder, tmp_path, capsys):
    out = tmp_path / ("fuzz" if overwrite else f"fuzz-{next(RUNS)}")  # a busy --out is test_cli's case
    argv = ["prune", str(tiny_folder), "--out", str(out), *[v for kv in options.items() for v in kv]]
    argv += ["--overwrite"] if overwrite else []
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    event(f"exit {code}")
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:  # progress bars may precede it; the error itself is one line, the last
        lines = err.splitlines()
        assert lines[-1].startswith("sparsellm: error: ") and sum("error" in line for line in lines) == 1, (argv, err)
        assert not out.exists() or (out / "report.json").is_file()  # never a half-written folder
    else:
        assert (out / "report.json").is_file()
        assert cli.main(["inspect", str(out)]) == 0
    if not overwrite:  # 50 examples share one tmp_path; "fuzz" stays, for the next --overwrite to replace
        shutil.rmtree(out, ignore_errors=True)
