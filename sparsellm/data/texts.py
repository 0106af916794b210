"""Calibration and evaluation texts, offline (bundled copies) or online (`datasets`), built by one set of rules.

Both paths first produce the *rows* Hugging Face `datasets` would give, then share the joining rules of the
SparseGPT/Wanda/SparseLLM evaluation code, so they give identical token streams:
  wikitext2  test rows joined with "\\n\\n"
  ptb        test sentences joined with " "
  c4         validation shard 0, first 1100 documents (1000 bundled) joined with " ", cut to 256 x seqlen tokens
Calibration samples a random seqlen window of a random document longer than seqlen (c4, .jsonl) or of the
joined training stream (ptb, .txt), seeded as in SparseGPT.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError

BUNDLED = Path(__file__).parent / "bundled"
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256

_OFFLINE_FILES = {
    ("wikitext2", "test"): "wiki.test.raw.gz",
    ("ptb", "test"): "ptb.test.txt.gz",
    ("ptb", "train"): "ptb.train.txt.gz",
    ("c4", "test"): "c4-validation-sample.json.gz",
    ("c4", "train"): "c4-train-sample.json.gz",
}
DATASETS = ("wikitext2", "ptb", "c4")


@dataclass
class Corpus:
    """Text ready for tokenising: documents (sampled one at a time) or one joined stream."""

    name: str
    documents: list[str]
    joined: bool  # True: `documents` holds a single joined stream
    source: str  # "bundled", "datasets" or a file path
    sha256: str


def read(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def _rows_from_text(name: str, text: str) -> list[str]:
    """Rows as `datasets` serves them for the raw file's text."""
    if name == "wikitext2":  # one row per line, "\n" kept, blank lines as ""
        return [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    if name == "ptb":  # ptb_text_only strips each line
        return [line.strip() for line in text.splitlines()]
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


def _rows_online(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        return load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    if name == "ptb":
        return load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    shard = "en/c4-validation.00000-of-00008.json.gz" if split == "validation" else "en/c4-train.00000-of-01024.json.gz"
    return load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]


def rows(name: str, split: str, online: bool = False) -> tuple[list[str], str]:
    """(rows, source) of a named dataset split ("test" or "train")."""
    if online:
        hf_split = {"c4": {"test": "validation"}}.get(name, {}).get(split, split)
        return _rows_online(name, hf_split), "datasets"
    key = (name, split)
    if key not in _OFFLINE_FILES:
        raise UserError(
            f"no bundled {split} split for '{name}' (WikiText-2 train is not redistributable here); "
            "use --calib c4, --calib ptb or a local .txt/.jsonl file"
        )
    return _rows_from_text(name, read(BUNDLED / _OFFLINE_FILES[key])), "bundled"


def text_sha256(texts: list[str]) -> str:
    """The sha256 of the texts' UTF-8 bytes, one after another (a corpus's content hash)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
    return h.hexdigest()


def corpus(name: str, split: str, online: bool = False) -> Corpus:
    """A named dataset (wikitext2, ptb, c4) or a local .txt / .jsonl(.gz) file."""
    if name in DATASETS:
        rs, source = rows(name, split, online)
        if name == "c4":
            docs = rs[:C4_EVAL_DOCS] if split == "test" else rs
            if split == "test":
                return Corpus(name, [" ".join(docs)], True, source, text_sha256(docs))
            return Corpus(name, docs, False, source, text_sha256(docs))
        joined = ("\n\n" if name == "wikitext2" else " ").join(rs)
        return Corpus(name, [joined], True, source, text_sha256([joined]))
    return _file_corpus(name)


def _file_corpus(path_str: str) -> Corpus:
    path = Path(path_str)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (expected wikitext2, ptb, c4, or a .txt/.jsonl file)")
    try:
        text = read(path)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path} is not UTF-8 text ({e.__class__.__name__}); give a .txt or .jsonl file") from e
    if not text.strip():
        raise UserError(f"data file is empty: {path}")
    if ".jsonl" in path.suffixes or ".json" in path.suffixes:
        try:
            docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
            if not all(isinstance(d, str) for d in docs):
                raise TypeError("a 'text' field is not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from e
        return Corpus(path.name, docs, False, str(path), text_sha256(docs))
    return Corpus(path.name, [text], True, str(path), text_sha256([text]))


def tokenize_stream(tokenizer, corpus: Corpus) -> torch.Tensor:
    """The whole corpus as one 1-D token tensor, tokenised once."""
    return tokenizer(
        corpus.documents[0] if corpus.joined else " ".join(corpus.documents), return_tensors="pt"
    ).input_ids[0]


def eval_windows(tokenizer, corpus: Corpus, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping seqlen windows of the test stream, tail dropped: [n, seqlen]."""
    ids = tokenize_stream(tokenizer, corpus)
    if corpus.name == "c4":
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"{corpus.name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """SparseGPT's sampler: [nsamples, seqlen] token windows, seeded with `random.seed(seed)`."""
    picks, encoded = calibration_picks(tokenizer, corpus, nsamples, seqlen, seed)
    return torch.stack([encoded(doc)[start : start + seqlen] for doc, start in picks])


def calibration_picks(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int = 0):
    """([(document, first token)] of each calibration window, the tokens of a document by index): the sampler's
    choices, so that training data can leave them out. A joined corpus is document 0."""
    rng = random.Random(seed)
    cache: dict[int, torch.Tensor] = {}

    def encoded(i: int) -> torch.Tensor:
        if i not in cache:
            cache[i] = tokenize_stream(tokenizer, corpus) if corpus.joined else tokenizer(
                corpus.documents[i], return_tensors="pt").input_ids[0]  # fmt: skip
        return cache[i]

    if corpus.joined:
        n = encoded(0).numel()
        if n <= seqlen:
            raise UserError(f"calibration text {corpus.name} has {n} tokens; need more than seqlen={seqlen}")
        return [(0, rng.randint(0, n - seqlen - 1)) for _ in range(nsamples)], encoded
    # A token spans at least one character (plus perhaps a BOS), so shorter documents can never qualify;
    # checking that one exists keeps the rejection loop below from spinning forever.
    if not any(encoded(i).numel() > seqlen for i in range(len(corpus.documents)) if len(corpus.documents[i]) >= seqlen):
        raise UserError(f"no calibration document in {corpus.name} is longer than seqlen={seqlen} tokens")
    picks = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(corpus.documents) - 1)
            if encoded(i).numel() > seqlen:
                break
        picks.append((i, rng.randint(0, encoded(i).numel() - seqlen - 1)))
    return picks, encoded


def default_online() -> bool:
    """Use `datasets` only when asked (SPARSELLM_ONLINE=1): the bundled copies are the same texts."""
    return os.environ.get("SPARSELLM_ONLINE", "") == "1"
