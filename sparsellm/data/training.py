"""Training text for recovery: seqlen windows that share no token with the prune's calibration windows and never
come from an evaluation text.

Documents (C4, .jsonl) the calibration sampler drew from are left out whole; in a joined stream (PTB train, .txt)
every window that overlaps a calibration window is. The rest is tokenised once, documents joined by the
tokenizer's end-of-text token, cut into windows and shuffled by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError
from . import texts

_EVALUATION_FILES = {"wikitext2 test": "wiki.test.raw.gz", "ptb test": "ptb.test.txt.gz",
                     "c4 validation": "c4-validation-sample.json.gz"}  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """What the prune sampled (its report's config and data): the windows to leave out of training."""

    sha256: str  # the calibration corpus's content hash
    nsamples: int
    seqlen: int
    seed: int


def evaluation_hashes() -> dict[str, str]:
    """{content sha256: name} of the bundled evaluation texts, decompressed."""
    return {texts.text_sha256([texts.read(texts.BUNDLED / f)]): name for name, f in _EVALUATION_FILES.items()}


def check_source(name: str) -> None:
    """Refuse WikiText-2 (only its test text is here) and a file whose text is a bundled evaluation text."""
    if name == "wikitext2":
        raise UserError(
            "wikitext2 is an evaluation text here (its train split is not bundled); train on c4, ptb or a text file"
        )
    if name not in texts.DATASETS and Path(name).is_file():
        try:
            held = evaluation_hashes().get(texts.text_sha256([texts.read(Path(name))]))
        except (UnicodeDecodeError, OSError, EOFError):
            return  # texts.corpus says what is wrong with the file
        if held:
            raise UserError(f"{name} is the {held} text, an evaluation text: training on it would make its "
                            "perplexity meaningless; give training text")  # fmt: skip


def training_corpus(name: str, online: bool) -> texts.Corpus:
    """C4 or PTB train, or a local file (check_source's refusals first)."""
    check_source(name)
    return texts.corpus(name, "train", online=online)


def training_windows(tokenizer, corpus: texts.Corpus, seqlen: int, calibration: Calibration | None, seed: int):
    """[n, seqlen] shuffled windows of `corpus`, none overlapping the calibration windows if `calibration` was
    drawn from this same corpus."""
    drawn = calibration if calibration is not None and calibration.sha256 == corpus.sha256 else None
    picks = texts.calibration_picks(tokenizer, corpus, drawn.nsamples, drawn.seqlen, drawn.seed)[0] if drawn else []
    if corpus.joined:
        ids = texts.tokenize_stream(tokenizer, corpus)
        taken = [(start, start + drawn.seqlen) for _, start in picks]
        starts = [s for s in range(0, ids.numel() - seqlen + 1, seqlen)
                  if not any(s < b and a < s + seqlen for a, b in taken)]  # fmt: skip
        windows = torch.stack([ids[s : s + seqlen] for s in starts]) if starts else torch.empty(0, seqlen)
    else:
        used = {doc for doc, _ in picks}
        kept = [d for i, d in enumerate(corpus.documents) if i not in used]
        eos = tokenizer.eos_token_id
        encoded = tokenizer(kept)["input_ids"]
        ids = torch.tensor([t for doc in encoded for t in [*doc, *([eos] if eos is not None else [])]])
        n = ids.numel() // seqlen
        windows = ids[: n * seqlen].view(n, seqlen)
    if windows.shape[0] == 0:
        raise UserError(f"{corpus.name} holds no training window of {seqlen} tokens outside the calibration windows")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order].to(torch.int64)
