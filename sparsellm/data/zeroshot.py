"""Zero-shot task data offline: the bundled files, turned into the rows the Hugging Face datasets behind
lm-eval's stock tasks serve, so lm-eval builds its own prompts from them (see bundled/zeroshot/README.md).

HellaSwag is the exception: only a preprocessed text copy ships (not lm-eval-exact, and labelled so). The
original `hellaswag_val.jsonl` is used instead when a user supplies it (checked against its known sha256).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from . import texts
from .texts import BUNDLED

ZEROSHOT = BUNDLED / "zeroshot"
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
EXTRA_TASKS = ("piqa", "lambada_openai")
TASKS = PAPER_TASKS + EXTRA_TASKS
HELLASWAG_ORIGINAL = "hellaswag_val.jsonl"
HELLASWAG_ORIGINAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


def _read(path: Path) -> str:
    try:
        return texts.read(path)
    except FileNotFoundError as e:
        raise UserError(f"zero-shot data file {path} is missing (bundled files come with the package)") from e


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _boolq(text: str) -> list[dict]:  # SuperGLUE's JSON booleans are HF's ClassLabel ints
    return [{**row, "label": int(row["label"])} for row in _jsonl(text)]


def _ai2(question_key: str) -> Callable[[str], list[dict]]:
    """ARC and OpenBookQA as HF serves them: the stem under `question_key`, choices as {text: [...], label: [...]}."""

    def to_rows(text: str) -> list[dict]:
        return [
            {
                "id": row["id"],
                question_key: row["question"]["stem"],
                "choices": {k: [c[k] for c in row["question"]["choices"]] for k in ("text", "label")},
                "answerKey": row["answerKey"],
            }
            for row in _jsonl(text)
        ]

    return to_rows


def _piqa(text: str) -> list[dict]:  # HF baber/piqa merges the separate labels file in as `label`
    labels = _read(ZEROSHOT / "piqa" / "valid-labels.lst").split()
    rows = _jsonl(text)
    if len(labels) != len(rows):
        raise UserError("piqa/valid-labels.lst does not match piqa/valid.jsonl; reinstall sparsellm")
    return [{**row, "label": int(label)} for row, label in zip(rows, labels, strict=True)]


def _hellaswag_derived(text: str) -> list[dict]:
    """6 lines per item: "activity_label: ctx", label, 4 endings. ctx_b is lost, so it is left empty."""
    lines = text.split("\n")
    rows = []
    for k in range(0, len(lines) - 5, 6):
        activity_label, _, ctx = lines[k].partition(": ")
        endings = lines[k + 2 : k + 6]
        rows.append(
            {
                "activity_label": activity_label,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": lines[k + 1].strip(),
            }
        )
    return rows


@dataclass(frozen=True)
class LocalTask:
    path: str  # under bundled/zeroshot
    sha256: str  # of the decompressed content
    to_rows: Callable[[str], list[dict]]
    exact: bool = True  # the rows are exactly what the stock lm-eval task reads


LOCAL = {
    "boolq": LocalTask(
        "boolq/val.jsonl.gz", "0c86a5045886e5795fe9052003873f7d94b88ed3028a33007c51d99e44fd66d9", _boolq
    ),
    "rte": LocalTask(
        "rte/glue_validation.jsonl", "9f0f73768b89a5f932419851a8ed2bfe7bcef098c0f5f36a40ba9aac579e6669", _jsonl
    ),
    "winogrande": LocalTask(
        "winogrande/dev.jsonl", "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8", _jsonl
    ),
    "arc_easy": LocalTask(
        "arc/ARC-Easy-Test.jsonl", "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be", _ai2("question")
    ),
    "arc_challenge": LocalTask(
        "arc/ARC-Challenge-Test.jsonl",
        "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
        _ai2("question"),
    ),
    "openbookqa": LocalTask(
        "openbookqa/test.jsonl",
        "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",
        _ai2("question_stem"),
    ),
    "piqa": LocalTask("piqa/valid.jsonl", "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d", _piqa),
    "lambada_openai": LocalTask(
        "lambada_openai/lambada_test.jsonl.gz",
        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        _jsonl,
    ),
    "hellaswag": LocalTask(
        "hellaswag/hellaswag_val_full.klosax-derived.txt.gz",
        "d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1",
        _hellaswag_derived,
        exact=False,
    ),
}
HELLASWAG_EXACT = LocalTask(f"hellaswag/{HELLASWAG_ORIGINAL}", HELLASWAG_ORIGINAL_SHA256, _jsonl)


@dataclass
class TaskData:
    rows: list[dict]
    source: str
    sha256: str
    exact: bool


def parse_tasks(spec: str) -> list[str]:
    """'zeroshot' is the papers' seven; names are lm-eval's."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    names = [n for t in names for n in (PAPER_TASKS if t == "zeroshot" else (t,))]
    for name in names:
        if name not in TASKS:
            raise UserError(f"unknown zero-shot task '{name}'; choose from: zeroshot, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


@functools.cache  # the CLI checks the files before loading the model, then uses them
def load(name: str, hellaswag_file: Path | None = None) -> TaskData:
    """The bundled (or user-supplied HellaSwag) file of a task as HF-layout rows, after checking its sha256."""
    task, path = LOCAL[name], ZEROSHOT / LOCAL[name].path
    if name == "hellaswag":
        supplied = hellaswag_file or (ZEROSHOT / HELLASWAG_EXACT.path)
        if hellaswag_file is not None or supplied.exists():
            task, path = HELLASWAG_EXACT, Path(supplied)
    text = _read(path)
    sha = hashlib.sha256(text.encode()).hexdigest()
    if sha != task.sha256:
        what = "the original HellaSwag hellaswag_val.jsonl" if task is HELLASWAG_EXACT else "the bundled copy"
        raise UserError(f"{path} has sha256 {sha[:12]}..., not {what} ({task.sha256[:12]}...); use the right file")
    return TaskData(task.to_rows(text), str(path), sha, task.exact)
