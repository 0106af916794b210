"""Bundled texts follow the Hugging Face row rules and the papers' joining rules; the sampler is SparseGPT's."""

import gzip
import hashlib
import json

import pytest
import torch

from sparsellm.core.errors import UserError
from sparsellm.data import texts

# sha256 of the decompressed files, from ../shared/data/README.md
SHA256 = {
    "wiki.test.raw.gz": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "ptb.test.txt.gz": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "ptb.train.txt.gz": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "c4-validation-sample.json.gz": "17f8203ba13f9fe0a9e71db9dafbce2eef34bcc665c856c10df284cfa92b0abf",
    "c4-train-sample.json.gz": "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32",
}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_bundled_files_are_the_published_ones(name):
    with gzip.open(texts.BUNDLED / name, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256[name]


def test_wikitext2_rows_and_join_match_huggingface():
    rows, _ = texts.rows("wikitext2", "test")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(texts.corpus("wikitext2", "test").documents[0]) == 1_294_336  # the README's HF-derived figure


def test_ptb_and_c4_rows():
    ptb, _ = texts.rows("ptb", "test")
    assert len(ptb) == 3761 and ptb[0] == ptb[0].strip()
    c4 = texts.corpus("c4", "test")
    assert c4.joined and c4.documents[0].startswith("The woman who died after falling from a bridge over the A21")
    assert len(texts.rows("c4", "train")[0]) == 1000


class CharTokenizer:
    """One token per byte: enough to check window arithmetic without a real tokenizer."""

    def __call__(self, text, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([list(text.encode("utf-8"))])

        return Out()


def test_eval_windows_are_non_overlapping_and_c4_is_cut():
    tok = CharTokenizer()
    wiki = texts.corpus("wikitext2", "test")
    w = texts.eval_windows(tok, wiki, 1000)
    assert w.shape == (len(wiki.documents[0].encode()) // 1000, 1000)
    assert texts.eval_windows(tok, wiki, 1000, max_windows=5).shape == (5, 1000)
    assert texts.eval_windows(tok, texts.corpus("c4", "test"), 100).shape == (texts.C4_EVAL_WINDOWS, 100)


def test_calibration_is_seeded_and_from_long_documents():
    tok = CharTokenizer()
    c4 = texts.corpus("c4", "train")
    a = texts.calibration(tok, c4, 6, 2000, seed=0)
    assert a.shape == (6, 2000)
    assert torch.equal(a, texts.calibration(tok, c4, 6, 2000, seed=0))
    assert not torch.equal(a, texts.calibration(tok, c4, 6, 2000, seed=1))
    encoded = [bytes(d.encode()) for d in c4.documents]
    for row in a:
        window = bytes(row.tolist())
        assert any(len(d) > 2000 and window in d for d in encoded)


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 100)
    assert texts.corpus(str(txt), "train").joined
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(3)))
    c = texts.corpus(str(jl), "train")
    assert not c.joined and len(c.documents) == 3
    with pytest.raises(UserError, match="not found"):
        texts.corpus(str(tmp_path / "missing.txt"), "train")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        texts.corpus(str(tmp_path / "empty.txt"), "train")
    with pytest.raises(UserError, match="longer than seqlen"):
        texts.calibration(CharTokenizer(), c, 2, 10_000)
    with pytest.raises(UserError, match="WikiText-2 train"):
        texts.corpus("wikitext2", "train")
