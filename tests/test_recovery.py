"""Recovery: every zero stays zero, the loss falls, accumulation and ranks compute the one-process step, a resumed
run repeats the uninterrupted one bit for bit, and evaluation or calibration text never becomes training data."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, random_tokens, tiny_model
from safetensors.torch import load_file

from sparsellm.core import precision
from sparsellm.core.errors import UserError
from sparsellm.data import texts, training
from sparsellm.models.adapters import adapter_for
from sparsellm.recovery import losses
from sparsellm.recovery.checkpoint import TrainingCheckpoint
from sparsellm.recovery.masks import Masks
from sparsellm.recovery.trainer import RecoverConfig, Trainer

FP32 = precision.Precision("fp32", "test")


def pruned_tiny(sparsity: float = 0.6, seed: int = 0):
    """(teacher, student with each linear's smallest weights zeroed, masks of the student's linears)."""
    teacher = tiny_model("llama", seed)
    teacher.lm_head.weight.data *= 20  # peaked next-token distributions: a random tiny model's are near uniform
    student = copy.deepcopy(teacher)
    adapter = adapter_for(student)
    linears = {}
    for i, layer in enumerate(adapter.decoder_layers(student)):
        for path, linear in adapter.linears(layer).items():
            w = linear.weight.data
            w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
            linears[f"layers.{i}.{path}"] = linear
    return teacher, student, Masks(linears)


def trainer(config: RecoverConfig, seed: int = 0) -> tuple[Trainer, Masks]:
    teacher, student, masks = pruned_tiny(seed=seed)
    return Trainer(student, teacher.requires_grad_(False), masks, config, FP32), masks


def config(**kw) -> RecoverConfig:
    base = dict(tokens=8 * 4 * 32, seqlen=32, batch_size=4, micro_batch=4, lr=1e-3, warmup=0.0, precision="fp32")
    return RecoverConfig(**{**base, **kw})


def test_kl_and_its_gradient_equal_autograd_through_kl_div():
    torch.manual_seed(0)
    s = torch.randn(3, 700, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 700, 50, dtype=torch.float64)
    ours = losses.kl_divergence(s, t)
    ours.backward()
    grad, s.grad = s.grad.clone(), None
    reference = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    reference.backward()
    assert abs(ours.item() - reference.item()) < 1e-4 * reference.item()
    assert (grad - s.grad).abs().max() < 1e-6


def test_hidden_term_is_each_layers_error_over_the_teachers_energy():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(3))
    student = tuple(h + 0.1 * torch.randn_like(h) for h in teacher)
    expected = (
        sum(((s - t) ** 2).sum() / (t**2).sum(-1).mean() for s, t in zip(student[1:], teacher[1:], strict=True)) / 2
    )
    assert torch.allclose(losses.hidden_mse(student, teacher), expected)
    assert losses.hidden_mse(teacher, teacher) == 0


@pytest.mark.parametrize("loss", ["kl", "kl+hidden", "ce"])
def test_every_zero_stays_zero_while_the_kept_weights_learn(loss):
    run, masks = trainer(config(loss=loss, tokens=30 * 4 * 32, weight_decay=0.1, lr=3e-3, freeze=()))
    before = {name: lin.weight.detach().clone() for name, lin in masks.linears.items()}
    hashes = masks.hashes()
    windows = random_tokens(30 * 4, 32, seed=3) % VOCAB
    curve = run.run(windows[:8].repeat(15, 1), progress=False)  # the same 8 windows again and again: it must learn
    assert masks.hashes() == hashes
    for name, lin in masks.linears.items():
        w = lin.weight.detach()
        assert torch.equal(w == 0, before[name] == 0), name  # not one zero moved, and no new zero
        assert not torch.equal(w, before[name]), f"{name} did not train"
    assert curve[-1].loss < 0.5 * curve[0].loss, [s.loss for s in curve]
    assert [s.step for s in curve] == list(range(1, 31))


def test_frozen_parts_do_not_change():
    run, _ = trainer(config(freeze=("embeddings", "norms")))
    embed = run.student.get_input_embeddings().weight.detach().clone()
    norm = run.student.model.norm.weight.detach().clone()
    run.run(random_tokens(32, 32) % VOCAB, progress=False)
    assert torch.equal(run.student.get_input_embeddings().weight, embed)
    assert torch.equal(run.student.model.norm.weight, norm)
    assert not run.student.model.layers[0].input_layernorm.weight.requires_grad


def test_gradient_accumulation_computes_the_whole_batch_step():
    windows = random_tokens(32, 32) % VOCAB
    whole, _ = trainer(config(micro_batch=4))
    accumulated, _ = trainer(config(micro_batch=1))
    a = whole.run(windows, progress=False)
    b = accumulated.run(windows, progress=False)
    assert abs(a[-1].loss - b[-1].loss) < 1e-5
    for (name, p), q in zip(whole.student.named_parameters(), accumulated.student.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5, name


class _KilledAfter(TrainingCheckpoint):
    """A checkpoint whose run is killed right after the state of step `at` is written."""

    def __init__(self, *args, at: int):
        super().__init__(*args)
        self.at = at

    def save(self, step, state, last):
        super().save(step, state, last)
        if step == self.at:
            raise KeyboardInterrupt


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    windows = random_tokens(32, 32) % VOCAB
    reference, _ = trainer(config())
    reference.run(windows, progress=False)

    fingerprint = {"run": "a"}
    killed, _ = trainer(config())
    with pytest.raises(KeyboardInterrupt):
        killed.run(windows, _KilledAfter(tmp_path, fingerprint, 0.0, at=3), progress=False)
    assert [f.name for f in tmp_path.glob("recovery_step_*.pt")] == ["recovery_step_000003.pt"]
    resumed, _ = trainer(config())
    curve = resumed.run(windows, TrainingCheckpoint(tmp_path, fingerprint, 0.0), progress=False)
    assert len(curve) == 8
    for (name, p), q in zip(reference.student.named_parameters(), resumed.student.parameters(), strict=True):
        assert torch.equal(p, q), name

    with pytest.raises(UserError, match="differs in: run"):
        trainer(config())[0].run(windows, TrainingCheckpoint(tmp_path, {"run": "b"}, 0.0), progress=False)
    step_file = next(tmp_path.glob("recovery_step_*.pt"))
    step_file.write_bytes(step_file.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="changed after it was written"):
        trainer(config())[0].run(windows, TrainingCheckpoint(tmp_path, fingerprint, 0.0), progress=False)


def test_bad_settings_are_one_line_errors():
    for kw, message in [({"loss": "mse"}, "unknown --loss"), ({"micro_batch": 3}, "multiple of --micro-batch"),
                        ({"tokens": 10}, "less than one step"), ({"lr": float("nan")}, "--lr"),
                        ({"freeze": ("attention",)}, "--freeze attention")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            config(**kw).validate()


class _Chars:
    """A tokenizer of one token per character (enough to check which text a window came from)."""

    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        ids = torch.tensor([[ord(c) for c in text]])
        return type("Encoded", (), {"input_ids": ids})()


def _windows_as_text(windows: torch.Tensor) -> list[str]:
    return ["".join(chr(int(c)) for c in w if c) for w in windows]


def test_training_windows_leave_out_the_calibration_windows(tmp_path):
    words = [f"w{i:05d} " for i in range(4000)]  # every 8-character piece occurs once
    stream = tmp_path / "stream.txt"
    stream.write_text("".join(words))
    corpus = texts.corpus(str(stream), "train")
    picks, _ = texts.calibration_picks(_Chars(), corpus, 6, 40, seed=1)
    calibration = training.Calibration(corpus.sha256, 6, 40, 1)
    windows = training.training_windows(_Chars(), corpus, 50, calibration, seed=0)
    text = "".join(words)
    taken = {c for _, start in picks for c in range(start, start + 40)}
    for w in _windows_as_text(windows):
        start = text.index(w)
        assert not taken & set(range(start, start + 50))
    assert windows.shape[0] == len(text) // 50 - len({s // 50 for _, s in picks} | {(s + 39) // 50 for _, s in picks})

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc{d:03d} " * 30}) + "\n" for d in range(50)))
    corpus = texts.corpus(str(docs), "train")
    picks, _ = texts.calibration_picks(_Chars(), corpus, 5, 40, seed=2)
    windows = training.training_windows(_Chars(), corpus, 20, training.Calibration(corpus.sha256, 5, 40, 2), 0)
    seen = _windows_as_text(windows)  # windows are shuffled: a document's name is whole only inside one
    assert not any(f"doc{d:03d}" in w for d, _ in picks for w in seen)
    kept = {d for d in range(50) if any(f"doc{d:03d}" in w for w in seen)}
    assert kept == set(range(50)) - {d for d, _ in picks}
    other = training.training_windows(_Chars(), corpus, 20, training.Calibration("another text", 5, 40, 2), 0)
    assert other.shape[0] > windows.shape[0]  # calibration drawn from another text leaves this one whole


def test_an_evaluation_text_is_refused_as_training_data(tmp_path):
    copy_of_test = tmp_path / "my_training.txt"
    copy_of_test.write_text(texts.read(texts.BUNDLED / "wiki.test.raw.gz"))
    with pytest.raises(UserError, match="wikitext2 test text, an evaluation text"):
        training.training_corpus(str(copy_of_test), online=False)
    with pytest.raises(UserError, match="evaluation text"):
        training.training_corpus("wikitext2", online=False)
    assert training.training_corpus("ptb", online=False).name == "ptb"


def _cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sparsellm", "--threads", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


TINY_PRUNE = ["--method", "sparsegpt", "--sparsity", "0.6", "--seqlen", "64", "--nsamples", "4", "--precision", "fp32"]
TINY_RECOVER = ["--tokens", "2048", "--train-seqlen", "64", "--batch-size", "8", "--micro-batch", "2",
                "--precision", "fp32", "--lr", "1e-3", "--protocol", "quick", "--seqlen", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pruned(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("recover") / "pruned"
    r = _cli("prune", tiny_folder, *TINY_PRUNE, "--eval", "ptb", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_recover_command_writes_a_folder_with_the_same_zeros(tiny_folder, tiny_pruned, tmp_path):
    out = tmp_path / "recovered"
    r = _cli("recover", tiny_pruned, *TINY_RECOVER, "--eval", "ptb", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["teacher"] == str(tiny_folder) and rec["tokens"] == 2048 and len(rec["curve"]) == 4
    assert rec["before"]["source"] == "the pruned folder's report"
    pruned_report = json.loads((tiny_pruned / "report.json").read_text())
    assert rec["before"]["perplexity"]["ptb"] == pruned_report["perplexity"]["ptb"]
    evaluated = _cli("eval", out, "--datasets", "ptb", "--seqlen", "64", "--precision", "fp32", "--json")
    assert json.loads(evaluated.stdout)["perplexity"]["ptb"] == rec["after"]["perplexity"]["ptb"]
    assert rec["after"]["perplexity"] == report["perplexity"] != rec["before"]["perplexity"]
    assert (out / "plots" / "recovery.png").is_file()
    a, b = _tensors(tiny_pruned), _tensors(out)
    for name in report["sparsity"]["per_matrix"]:
        key = f"model.{name}.weight"
        assert torch.equal(a[key] == 0, b[key] == 0) and not torch.equal(a[key], b[key]), name
    inspected = _cli("inspect", out)
    assert inspected.returncode == 0 and "recovered" in inspected.stdout, inspected.stdout[-1500:]

    again = _cli("recover", out, *TINY_RECOVER, "--out", tmp_path / "twice")
    assert again.returncode == 2 and "recovered already" in again.stderr
    refused = _cli("recover", tiny_pruned, *TINY_RECOVER, "--data", "wikitext2", "--out", tmp_path / "x")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "evaluation text" in refused.stderr
    too_many = _cli("recover", tiny_pruned, *TINY_RECOVER[:-8], "--tokens", "10000000", "--out", tmp_path / "y")
    assert too_many.returncode == 2 and "training tokens outside the calibration windows" in too_many.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_two_ranks_train_the_one_rank_model(tiny_pruned, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli("recover", tiny_pruned, *TINY_RECOVER, "--eval", "", "--out", one).returncode == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sparsellm"]
    r = subprocess.run([*launcher, "recover", str(tiny_pruned), *TINY_RECOVER, "--eval", "", "--out", str(two)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((two / "report.json").read_text())["recovery"]["config"]["ranks"] == 2
    a, b = _tensors(one), _tensors(two)
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key
        assert (a[key] - b[key]).abs().max() <= 1e-4, key  # summation order of the gradients only


def test_prune_with_recover_tokens_reports_both(tiny_folder, tiny_pruned, tmp_path):
    out = tmp_path / "both"
    r = _cli("prune", tiny_folder, *TINY_PRUNE, "--eval", "ptb", "--recover-tokens", "1024", "--recover-lr", "1e-3",
             "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    before = report["recovery"]["before"]
    assert before["source"] == "measured" and report["recovery"]["teacher"] == str(tiny_folder)
    assert before["perplexity"] == json.loads((tiny_pruned / "report.json").read_text())["perplexity"]
    assert report["perplexity"] == report["recovery"]["after"]["perplexity"] != before["perplexity"]
    assert _cli("inspect", out).returncode == 0


@pytest.mark.slow
def test_smollm2_keeps_its_masks_through_recovery(tmp_path):
    pruned, out = tmp_path / "pruned", tmp_path / "recovered"
    prune = _cli("prune", "smollm2-135m", "--sparsity", "0.5", "--layers", "0:2", "--nsamples", "4", "--seqlen",
                 "128", "--out", pruned)  # fmt: skip
    assert prune.returncode == 0, prune.stderr[-2000:]
    r = _cli("recover", pruned, "--tokens", "1024", "--train-seqlen", "128", "--batch-size", "4", "--micro-batch",
             "2", "--eval", "", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _tensors(pruned), _tensors(out)
    changed = 0
    for key, w in a.items():
        if ".layers.0." in key or ".layers.1." in key:
            assert torch.equal(w == 0, b[key] == 0), key
            changed += not torch.equal(w, b[key])
    assert changed > 10
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # frozen by default
    assert _cli("inspect", out).returncode == 0
