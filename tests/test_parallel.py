"""Data-parallel pruning: 2 gloo ranks under torchrun give the single process's model and perplexity."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def prune(folder, out, method: str, ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    args = ["-m", "sparsellm", "prune", str(folder), "--method", method, "--sparsity", "0.6", "--seqlen", "64"]
    args += ["--nsamples", "5", "--batch-size", "2", "--eval", "ptb", "--out", str(out)]
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsellm"])
def test_two_gloo_ranks_give_the_single_process_result(method, tiny_folder, tmp_path):
    prune(tiny_folder, tmp_path / "one", method, 1)
    r = prune(tiny_folder, tmp_path / "two", method, 2)
    assert r.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for name, w in one.items():
        assert ((w == 0) == (two[name] == 0)).all(), f"{name}: masks differ"
        assert (w - two[name]).abs().max().item() <= 1e-5, name
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert [r["config"]["ranks"] for r in reports] == [1, 2]
    assert reports[1]["sparsity"]["measured"] == reports[0]["sparsity"]["measured"]
    assert reports[1]["perplexity"]["ptb"] == pytest.approx(reports[0]["perplexity"]["ptb"], rel=1e-5)
    errors = [[layer["recon_error"] for layer in r["layers"]] for r in reports]
    assert errors[1] == pytest.approx(errors[0], rel=1e-4)
