"""The CLI end to end on a tiny model folder, and bad input: one line on stderr, exit status 2, no traceback."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, PreTrainedModel

from sparsellm import cli
from sparsellm.models import loading

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


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
    "M not dividing the width": (["--nm", "2:5"], "M=5 does not divide the 64 inputs"),
    "unknown eval dataset": (["--sparsity", "0.5", "--eval", "imagenet"], "unknown evaluation dataset"),
    "batch size 0": (["--sparsity", "0.5", "--batch-size", "0"], "--batch-size must be at least 1"),
    "too few calibration tokens": (["--sparsity", "0.5", "--calib", "{tmp}/short.txt"], "need more than seqlen"),
    "empty calibration file": (["--sparsity", "0.5", "--calib", "{tmp}/empty.txt"], "data file is empty"),
    "binary calibration file": (["--sparsity", "0.5", "--calib", "{tmp}/binary.txt"], "is not UTF-8 text"),
    "unknown zero-shot task": (["--sparsity", "0.5", "--tasks", "mmlu"], "unknown zero-shot task 'mmlu'"),
    "unknown precision": (["--sparsity", "0.5", "--precision", "fp16"], "unknown --precision 'fp16'"),
    "zero-shot limit 0": (["--sparsity", "0.5", "--tasks", "rte", "--limit", "0"], "--limit must be at least 1"),
    "alps rho 0": (["--sparsity", "0.5", "--refit", "alps", "--alps-rho", "0"], "initial rho must be in (0, 1e6)"),
    "damping 0": (["--sparsity", "0.5", "--damping", "0"], "--damping must be a finite positive number"),
    "damping nan": (["--sparsity", "0.5", "--method", "sparsellm", "--damping", "nan"], "finite positive number"),
    "damping with wanda": (["--sparsity", "0.5", "--method", "wanda", "--damping", "0.1"], "sparsegpt or sparsellm"),
    "missing hellaswag file": (
        ["--sparsity", "0.5", "--tasks", "hellaswag", "--hellaswag-file", "{tmp}/none.jsonl"],
        "--hellaswag-file",
    ),
    "altered hellaswag file": (
        ["--sparsity", "0.5", "--tasks", "hellaswag", "--hellaswag-file", "{tmp}/short.txt"],
        "not the original HellaSwag",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, tiny_folder, tmp_path):
    (tmp_path / "short.txt").write_text("a few words only")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    args, message = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
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
    r = run("prune", str(gpt2_folder), "--sparsity", "0.5", "--out", str(tmp_path / "new" / "parents" / "o"))
    assert (tmp_path / "new" / "parents").is_dir()  # a missing parent is created (then the architecture is refused)


def test_a_full_disk_is_one_line_and_leaves_no_output(tiny_folder, tmp_path, monkeypatch, capsys):
    """Too little free space is refused before pruning; a disk that fills up while saving removes the partial folder
    (the checkpoint stays, for --resume)."""
    out = tmp_path / "o"
    argv = ["prune", str(tiny_folder), "--sparsity", "0.5", "--seqlen", "16", "--nsamples", "1", "--out", str(out)]
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sparsellm: error: --out {out} needs about ") and "1 MB free" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def save_until_the_disk_is_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_until_the_disk_is_full)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("sparsellm: error: the disk filled up while writing")
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["o.checkpoint"]


def test_bench_refuses_a_missing_model_in_one_line_and_leaves_no_folder(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(BENCH), "--model", str(tmp_path / "nothing-here"), "--no-peer", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench: error: model not found")
    assert not out.exists()


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ratios_over_seeds_pair_each_seed_with_its_own_peer_run():
    bench = load_bench()
    assert bench.parse_args(["--seed", "3"]).seeds == [3]
    assert bench.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    for bad in ("0,x", "1,1"):  # argparse's one-line error, exit status 2
        with pytest.raises(SystemExit, match="2"):
            bench.parse_args(["--seeds", bad])

    def run(toolkit, method, seed, ppl, seconds):
        return {"toolkit": toolkit, "method": method, "target": "3:4", "seed": seed,
                "perplexity": {"wikitext2": ppl}, "prune_s": seconds}  # fmt: skip

    rows = [
        run("sparsellm", "sparsegpt", 0, 110.0, 30.0),
        run("sparsellm", "sparsellm", 0, 90.0, 90.0),  # no peer run: not paired
        run("llmcompressor", "sparsegpt", 0, 100.0, 60.0),
        run("sparsellm", "sparsegpt", 1, 80.0, 20.0),
        run("llmcompressor", "sparsegpt", 1, 100.0, 50.0),
    ]
    paired = bench.pairs(rows)
    assert [(ours["method"], ours["seed"], theirs["seed"]) for ours, theirs in paired] == [
        ("sparsegpt", 0, 0),
        ("sparsegpt", 1, 1),
    ]
    row = bench.over_seeds(rows).splitlines()[-1]
    # ratios 1.1 and 0.8: geometric mean sqrt(0.88) = 0.938; seconds 0.5 and 0.4: sqrt(0.2) = 0.447
    assert row == "| sparsegpt | 3:4 | 1.100, 0.800 | **0.938** | 1 of 2 | 0.45 |"


def test_bench_runs_each_seed_on_its_own_calibration_tokens(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_folder), "--methods", "magnitude", "--sparsities", "0.5"]
    cmd += ["--all-datasets", "none", "--no-peer", "--seeds", "0,1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "bench.json").read_text())
    assert result["seeds"] == [0, 1] and [run["seed"] for run in result["runs"]] == [0, 1]
    shas = [
        json.loads((out / f"seed-{k}" / "magnitude-0.5" / "report.json").read_text())["data"]["calibration"][
            "tokens_sha256"
        ]
        for k in (0, 1)
    ]
    assert shas[0] != shas[1]  # and bench.py refuses a run whose tokens are not its seed's
    text = (out / "bench.md").read_text()
    assert "calibration seeds 0, 1" in text and "Seed 0:" in text and "Seed 1:" in text
    assert not list(out.rglob("*.safetensors"))  # weights dropped once read


def test_bench_resume_reads_the_rows_and_dense_row_already_in_out(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_folder), "--sparsities", "0.5", "--all-datasets", "none"]
    cmd += ["--no-peer", "--out", str(out)]
    assert subprocess.run([*cmd, "--methods", "magnitude"], capture_output=True, text=True).returncode == 0
    first = {p: p.stat().st_mtime_ns for p in (out / "dense.json", out / "magnitude-0.5" / "report.json")}
    r = subprocess.run([*cmd, "--methods", "magnitude,wanda", "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in first} == first  # neither measured again
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [(run["method"], "reused" in run) for run in runs] == [("magnitude", True), ("wanda", False)]
    assert "Rows measured by an earlier run in OUT: sparsellm magnitude 0.5 seed 0 (" in (out / "bench.md").read_text()
    r = subprocess.run([*cmd, "--methods", "magnitude", "--seed", "1", "--resume"], capture_output=True, text=True)
    assert (
        r.returncode == 0
        and first[out / "magnitude-0.5" / "report.json"] != (out / "magnitude-0.5" / "report.json").stat().st_mtime_ns
    )  # another seed's tokens: run again


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path):
    folder = tmp_path / "mismatch"
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(loading.resolve("smollm2-135m")).save_pretrained(folder)
    for command in (["prune", str(folder), "--sparsity", "0.5", "--out", str(tmp_path / "o")], ["eval", str(folder)]):
        r = run(*command)
        assert r.returncode == 2 and "do not belong together" in r.stderr and "Traceback" not in r.stderr


def test_sparsellm_options_reach_the_solver(tiny_folder, tmp_path):
    """--rounds/--alpha/... were once parsed and silently dropped: the report must show them used."""
    out = tmp_path / "two-rounds"
    args = ["--method", "sparsellm", "--sparsity", "0.5", "--seqlen", "64", "--nsamples", "2"]
    r = run("prune", str(tiny_folder), *args, "--rounds", "2", "--beta", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method_options"] == {"rounds": 2, "beta": 5.0}
    assert all(len(layer["mlp"]["objective"]) == 2 for layer in report["layers"])
    r = run("prune", str(tiny_folder), *args, "--rounds", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--rounds must be at least 1" in r.stderr
    r = run("prune", str(tiny_folder), "--method", "wanda", *args[2:], "--rounds", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "apply to --method sparsellm only" in r.stderr


def test_damping_reaches_the_solver_and_the_refit(tiny_folder, tmp_path):
    """--damping is SparseGPT's percdamp: in the report, in the factorisation, and in the engine's PCG refit."""
    from sparsellm import api
    from sparsellm.methods import sparsegpt

    base = ["--method", "sparsegpt", "--sparsity", "0.5", "--seqlen", "64", "--nsamples", "2"]
    plain, damped = tmp_path / "plain", tmp_path / "damped"
    assert run("prune", str(tiny_folder), *base, "--out", str(plain)).returncode == 0
    r = run("prune", str(tiny_folder), *base, "--damping", "0.5", "--out", str(damped))
    assert r.returncode == 0, r.stderr
    assert json.loads((damped / "report.json").read_text())["config"]["method_options"] == {"percdamp": 0.5}
    weights = [load_file(folder / "model.safetensors") for folder in (plain, damped)]
    name = next(k for k in weights[0] if k.endswith("mlp.down_proj.weight"))
    assert not torch.equal(weights[0][name], weights[1][name])  # another ridge, other kept weights
    config = api.PruneConfig(method="sparsegpt", sparsity=0.5, refit="pcg", method_options={"percdamp": 0.5})
    assert config.refitter().damping == 0.5 and config.make_method().percdamp == 0.5
    assert sparsegpt.SparseGPT().percdamp == api.PruneConfig(refit="pcg").refitter().damping  # the same default


def test_offloaded_activations_that_cannot_fit_are_refused_in_one_line(tiny_folder, tmp_path, monkeypatch, capsys):
    """Under --offload-dir a full disk would be a SIGBUS (the files are memory-mapped): refused before pruning."""
    out, scratch = tmp_path / "o", tmp_path / "scratch"
    scratch.mkdir()
    argv = ["prune", str(tiny_folder), "--sparsity", "0.5", "--seqlen", "16", "--nsamples", "256", "--out", str(out),
            "--max-memory", "1KB", "--offload-dir", str(scratch)]  # fmt: skip
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**20 if p == scratch else 2**40))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sparsellm: error: --offload-dir {scratch} needs about ") and "1 MB free" in err
    assert [p.name for p in tmp_path.iterdir()] == ["scratch"] and not list(scratch.iterdir())


def test_a_pruned_folder_carries_a_model_card_the_hub_can_read(tiny_folder, tmp_path):
    import yaml

    from sparsellm.card import model_card

    out = tmp_path / "carded"
    r = run("prune", str(tiny_folder), "--method", "wanda", "--nm", "2:4", "--seqlen", "32", "--nsamples", "2",
            "--eval", "ptb", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "wanda", "2:4-sparsity"} <= set(meta["tags"]) and meta["datasets"] == ["allenai/c4"]
    assert "base_model" not in meta  # a local folder has no Hub id
    assert f"measured sparsity {report['sparsity']['measured']:.4f}" in body
    assert f"{report['perplexity']['ptb']:.2f}" in body and report["manifest"]["command"] in body
    named = yaml.safe_load(model_card({**report, "model": "smollm2-135m"}, "HuggingFaceTB/SmolLM2-135M-Instruct")
                           .split("---\n")[1])  # fmt: skip
    assert named["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli._threads_per_rank() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cli._threads_per_rank() == (os.cpu_count() or 1)
