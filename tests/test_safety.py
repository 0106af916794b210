"""Adversarial input, class by class: every one refused in one line with a non-zero exit, nothing half-written,
no code from a model folder run, no folder removed that the tool did not write, no silently wrong model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsellm import api, cli
from sparsellm.core.errors import UserError
from sparsellm.core.files import strict_json

TINY_RUN = ["--sparsity", "0.5", "--seqlen", "32", "--nsamples", "2"]


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsellm", *args], capture_output=True, text=True, cwd=cwd)


def refused(r: subprocess.CompletedProcess, message: str, code: int = 2) -> bool:
    lines = r.stderr.strip().splitlines()
    return (
        r.returncode == code
        and "Traceback" not in r.stderr
        and bool(lines)
        and lines[-1].startswith("sparsellm: error: ")
        and message in lines[-1]
    )


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nm", "4:0"], "0 < N < M"),
        (["--nm", "0:0"], "0 < N < M"),
        (["--sparsity", "nan"], "sparsity must be in [0, 1)"),
        (["--method", "sparsellm", "--sparsity", "0.5", "--alpha", "nan"], "--alpha must be a finite positive"),
        (["--method", "sparsellm", "--sparsity", "0.5", "--gamma", "inf"], "--gamma must be a finite positive"),
        (["--sparsity", "0.5", "--max-memory", "nanGB"], "--max-memory must be a positive, finite size"),
        (["--sparsity", "0.5", "--nsamples", "100000000"], "use fewer --nsamples"),
        (["--sparsity", "0.5", "--checkpoint-every", "nan"], "--checkpoint-every must be 0 or more"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(args, message, tiny_folder, tmp_path):
    out = tmp_path / "out"
    r = run("prune", str(tiny_folder), *args, "--seqlen", "32", "--out", str(out))
    assert refused(r, message), r.stderr
    assert not out.exists()


def test_bad_threads_and_output_names(tiny_folder, tmp_path):
    r = run("--threads", "-1", "prune", str(tiny_folder), *TINY_RUN, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--threads" in r.stderr
    assert refused(run("prune", str(tiny_folder), *TINY_RUN, "--out", "x" * 250, cwd=tmp_path), "at most 200")
    assert refused(run("prune", str(tiny_folder), *TINY_RUN, "--out", ".", cwd=tmp_path), "the working folder")


def test_overwrite_replaces_only_what_the_tool_wrote(tiny_folder, tmp_path):
    work = tmp_path / "work"
    (work / "inside").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    r = run("prune", str(tiny_folder), *TINY_RUN, "--out", "..", "--overwrite", cwd=work / "inside")
    assert refused(r, "the working folder, one of its parents")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not sparsellm's")
    assert refused(run("prune", str(tiny_folder), *TINY_RUN, "--out", str(foreign), "--overwrite"), "did not write")
    assert (foreign / "notes.txt").read_text() == "not sparsellm's" and (work / "keep.txt").is_file()
    link = tmp_path / "link"
    link.symlink_to(foreign, target_is_directory=True)
    assert refused(run("prune", str(tiny_folder), *TINY_RUN, "--out", str(link), "--overwrite"), "symbolic link")
    ours = tmp_path / "ours"
    assert run("prune", str(tiny_folder), *TINY_RUN, "--out", str(ours)).returncode == 0
    assert run("prune", str(tiny_folder), *TINY_RUN, "--out", str(ours), "--overwrite").returncode == 0


def test_a_second_writer_of_the_same_out_is_refused(tiny_folder, tmp_path):
    from sparsellm.pipeline import _exclusive

    out = tmp_path / "busy"
    with _exclusive(out):  # another run holds it
        r = run("prune", str(tiny_folder), *TINY_RUN, "--out", str(out))
    assert refused(r, "another sparsellm run is writing --out")
    assert not out.exists()
    assert run("prune", str(tiny_folder), *TINY_RUN, "--out", str(out)).returncode == 0  # free again


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "truncated"])
def test_damaged_model_files_are_refused_in_one_line(damage, stream, tiny_folder, tmp_path):
    """Never transformers' random initialisation of a missing tensor, in memory or streamed."""
    folder = copy_of(tiny_folder, tmp_path, "model")
    key = "model.layers.1.mlp.down_proj.weight"
    if damage == "missing":
        edit_tensors(folder, lambda t: t.pop(key))
    elif damage == "unexpected":
        edit_tensors(folder, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    elif damage == "shape":
        edit_tensors(folder, lambda t: t.update({key: torch.zeros(3, 5)}))
    else:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    r = run("prune", str(folder), *TINY_RUN, *(["--stream"] if stream else []), "--out", str(out))
    assert refused(r, ""), r.stderr
    assert not out.exists()
    assert refused(run("eval", str(folder), "--datasets", "ptb", "--seqlen", "32", *(["--stream"] * stream)), "")


def test_unreadable_model_files_are_one_line(tmp_path, tiny_folder):
    gguf = tmp_path / "random.gguf"
    gguf.write_bytes(os.urandom(4096))
    assert refused(run("prune", str(gguf), *TINY_RUN, "--out", str(tmp_path / "a")), "cannot read the GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + os.urandom(60))
    assert refused(run("prune", str(truncated), *TINY_RUN, "--out", str(tmp_path / "b")), "cannot read")
    unknown = copy_of(tiny_folder, tmp_path, "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    assert refused(run("prune", str(unknown), *TINY_RUN, "--out", str(tmp_path / "c")), "cannot read")
    (unknown / "config.json").write_text("{not json")
    assert refused(run("prune", str(unknown), *TINY_RUN, "--out", str(tmp_path / "d")), "cannot read")
    pickled = copy_of(tiny_folder, tmp_path, "pickled")  # weights as a pickle, the format that can run code
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    r = run("prune", str(pickled), *TINY_RUN, "--out", str(tmp_path / "e"))
    assert "Traceback" not in r.stderr and (r.returncode == 0 or refused(r, "")), r.stderr
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_code_in_a_model_folder_never_runs(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path, "remote")
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass EvilModel: pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-remote", auto_map={"AutoConfig": "evil.EvilModel", "AutoModelForCausalLM":
                  "evil.EvilModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "sparsellm", "prune", str(folder), *TINY_RUN, "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, input="y\ny\n", timeout=600)  # fmt: skip
    assert refused(r, ""), r.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def pruned(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "out"
    r = run("prune", str(tiny_folder), "--method", "sparsegpt", *TINY_RUN, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["sparsity"].update(measured=0.9), "overall:"),
        (lambda r: r["sparsity"].update(target="0.3"), "target: 0.3 is a fraction of 0.3"),
        (lambda r: r["sparsity"].update(target="0.9", target_fraction=0.9), "target not met"),
        (lambda r: next(iter(r["sparsity"]["per_matrix"].values())).update(zeros=1), "zero on disk"),
        (lambda r: r["config"].update(layers_pruned=[0]), "layers pruned"),
    ],
)
def test_inspect_recomputes_what_it_prints_and_catches_an_edited_report(edit, message, pruned, tmp_path):
    folder = copy_of(pruned, tmp_path, "edited")
    report = json.loads((folder / "report.json").read_text())
    edit(report)
    (folder / "report.json").write_text(json.dumps(report))
    r = run("inspect", str(folder))
    assert r.returncode == 1 and message in r.stdout and "OK:" not in r.stdout, r.stdout


def test_inspect_of_a_damaged_report_or_file_is_one_line(pruned, tmp_path):
    folder = copy_of(pruned, tmp_path, "damaged")
    (folder / "report.json").write_text('{"method": "sparsegpt", "sparsity": ')
    assert refused(run("inspect", str(folder)), "cannot read")
    shutil.copy(pruned / "report.json", folder / "report.json")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    assert refused(run("inspect", str(folder)), "cannot read the safetensors file")


def test_reports_are_strict_json():
    text = strict_json({"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf, "e": 2}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None, "e": 2},
    }


def _tiny_llama(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_a_tampered_checkpoint_or_a_changed_model_is_not_resumed(tiny_folder, tmp_path):
    config = api.PruneConfig(method="sparsegpt", sparsity=0.5, seqlen=32, nsamples=2)
    checkpoint = tmp_path / "run.checkpoint"
    model, tok = _tiny_llama(tiny_folder)
    api.prune(model, tok, config, progress=False, checkpoint_dir=checkpoint, checkpoint_every=0)
    layer_file = checkpoint / "layer_0001.safetensors"
    saved = load_file(layer_file)
    name = next(iter(saved))
    save_file({**saved, name: saved[name] + 1}, layer_file)  # altered after the kill
    with pytest.raises(UserError, match="changed after it was written"):
        api.prune(*_tiny_llama(tiny_folder), config, progress=False, checkpoint_dir=checkpoint)
    save_file(saved, layer_file)
    changed, tok = _tiny_llama(tiny_folder)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0  # the model folder edited in place
    with pytest.raises(UserError, match="weights_sha256"):
        api.prune(changed, tok, config, progress=False, checkpoint_dir=checkpoint)
    report = api.prune(*_tiny_llama(tiny_folder), config, progress=False, checkpoint_dir=checkpoint)
    assert report.config["resumed"]


DAMAGES = st.tuples(
    st.sampled_from(["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]),
    st.sampled_from(["truncate", "flip", "delete", "empty"]),
    st.floats(0.0, 1.0),
)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=DAMAGES, stream=st.booleans())
def test_random_damage_to_model_files_never_gives_a_traceback(damage, stream, tiny_folder, tmp_path, capsys):
    """A file of the model folder truncated, with a byte flipped, deleted or emptied: the run either refuses in
    one line or (a flip inside the weights' data) succeeds; never a traceback, never a half-written folder."""
    name, how, where = damage
    folder = tmp_path / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_folder, folder)
    path = folder / name
    data = path.read_bytes()
    at = min(int(where * len(data)), len(data) - 1)
    if how == "truncate":
        path.write_bytes(data[:at])
    elif how == "flip":
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["prune", str(folder), *TINY_RUN, "--out", str(out), *(["--stream"] if stream else [])]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2) and "Traceback" not in err, (damage, err)
    if code == 2:
        assert err.splitlines()[-1].startswith("sparsellm: error: "), (damage, err)
        assert not out.exists()
    else:
        assert (out / "report.json").is_file()


def test_split_builtins_assemble_in_part_order_and_are_checked_by_hash(tmp_path, monkeypatch):
    import hashlib

    from sparsellm.models import loading

    parts = [bytes([i]) * (100 + i) for i in range(1, 12)]  # part10 and part11 must follow part9, not part1
    for i, data in enumerate(parts, 1):
        (tmp_path / f"part{i}" / "data").mkdir(parents=True)
        (tmp_path / f"part{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    whole = b"".join(parts)
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_package_dir", lambda name, install: tmp_path / name)
    packages = tuple(f"part{i}" for i in range(1, 12))
    good = loading.Builtin(packages, "data", "pip install parts", "x/y", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(loading.BUILTINS, "split-test", good)
    assert loading.builtin_gguf("split-test").read_bytes() == whole

    bad = loading.Builtin(packages, "data", "pip install parts", "x/y", "0" * 64)
    monkeypatch.setitem(loading.BUILTINS, "split-bad", bad)
    with pytest.raises(UserError, match="do not assemble into the expected file"):
        loading.builtin_gguf("split-bad")
    assert sorted(f.name for f in (tmp_path / "cache" / "gguf").iterdir()) == ["split-test.gguf"]
