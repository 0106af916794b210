"""The CLI end to end on a tiny model folder, and bad input: one line on stderr, exit status 2, no traceback."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsellm.models import loading


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsellm", *args], capture_output=True, text=True, cwd=cwd)


def test_prune_writes_a_loadable_folder_and_inspect_verifies_it(tiny_folder, tmp_path):
    out = tmp_path / "pruned"
    r = run(
        "prune",
        str(tiny_folder),
        "--method",
        "sparsegpt",
        "--nm",
        "2:4",
        "--seqlen",
        "64",
        "--nsamples",
        "4",
        "--eval",
        "wikitext2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["target"] == "2:4" and report["sparsity"]["measured"] >= 0.5
    assert set(report["timing"]) >= {"prune_s", "eval_s", "load_s"} and report["peak_rss_mb"] > 0
    assert report["perplexity"]["wikitext2"] > 1 and report["data"]["calibration"]["sha256"]
    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.all((q.reshape(q.shape[0], -1, 4) == 0).sum(-1) >= 2)
    ok = run("inspect", str(out))
    assert ok.returncode == 0 and "OK: file checksums and tensors match the report and are valid 2:4" in ok.stdout
    # a tampered tensor is caught
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.ones_like(tensors["model.layers.0.mlp.down_proj.weight"])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    bad = run("inspect", str(out))
    assert bad.returncode == 1 and "MISMATCH layers.0.mlp.down_proj" in bad.stdout
    assert "MISMATCH model.safetensors: sha256 differs" in bad.stdout


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(loading.resolve("smollm2-135m"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


BAD = {
    "sparsity 1.5": (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    "nm 4:4": (["--nm", "4:4"], "N:M needs 0 < N < M"),
    "nm garbage": (["--nm", "two:four"], "--nm must look like N:M"),
    "unknown method": (["--sparsity", "0.5", "--method", "obc"], "unknown method 'obc'"),
    "seqlen over context": (["--sparsity", "0.5", "--seqlen", "4096"], "outside the model's context"),
    "missing calibration file": (["--sparsity", "0.5", "--calib", "/nonexistent/calib.txt"], "data file not found"),
    "bad layers": (["--sparsity", "0.5", "--layers", "5:9"], "selects no valid layer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, tiny_folder, tmp_path):
    args, message = BAD[case]
    seqlen = [] if "--seqlen" in args else ["--seqlen", "64"]
    r = run("prune", str(tiny_folder), *args, *seqlen, "--nsamples", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines[-1].startswith("sparsellm: error: ") and message in lines[-1]
    assert not (tmp_path / "o").exists()


def test_unknown_architecture_missing_model_and_busy_output(gpt2_folder, tmp_path):
    r = run("prune", str(gpt2_folder), "--sparsity", "0.5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr and "llama" in r.stderr
    r = run("eval", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "model not found" in r.stderr and "Traceback" not in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = run("prune", str(gpt2_folder), "--sparsity", "0.5", "--out", str(busy))
    assert r.returncode == 2 and "not empty; pass --overwrite" in r.stderr
    r = run("prune", str(gpt2_folder), "--sparsity", "0.5", "--out", "/proc/forbidden/out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
