"""Tests for apt_viz.data: corpora, windows, perplexity, generation. Offline and fast."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch

from conftest import word_llama, word_tokenizer

from apt_viz import data
from apt_viz.data import (
    CorpusUnavailableError,
    calibration_windows,
    eval_windows,
    generate,
    load_text,
    max_seqlen,
    perplexity,
    shared_data_path,
    tokenize_text,
)

N_WORDS = 40


def _make_tokenizer():
    return word_tokenizer(N_WORDS)


def _make_text(n_words: int, seed: int = 123) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(0, n_words, 10):
        lines.append(" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(10)))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def text():
    return _make_text(2000)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    model = word_llama(tokenizer)
    # Larger random weights than the default init, so predictions are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


# --------------------------------------------------------------------------- load_text


def test_load_text_local_file(tmp_path, text):
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    assert load_text(p) == text
    assert load_text(str(p), split="train") == text  # split is ignored for files


def test_load_text_empty_file_raises(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_text(p)


def test_load_text_missing_file_or_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a named corpus"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="wikitext2"):
        load_text("not-a-corpus")


def test_named_corpus_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(CorpusUnavailableError, match="local text file") as info:
        load_text("wikitext2")
    assert "datasets" in str(info.value)


def test_named_corpus_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for name in ("wikitext2", "ptb", "c4"):
        with pytest.raises(CorpusUnavailableError) as info:
            load_text(name, split="validation")
        msg = str(info.value)
        assert "local text file" in msg and "load_text(" in msg and name in msg
        assert "ConnectionError" in msg
    assert len(calls) == 3


class _FakeDataset:
    def __init__(self, column: str, rows: list[str]):
        self.column, self.rows = column, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        assert key == self.column
        return list(self.rows)

    def select(self, idx):
        return _FakeDataset(self.column, [self.rows[i] for i in idx])


def test_named_corpora_use_current_hub_names(monkeypatch):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path == "ptb-text-only/ptb_text_only":
            return _FakeDataset("sentence", ["a b", "c d"])
        return _FakeDataset("text", ["first", "second"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("wikitext2", split="test") == "first\n\nsecond"
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", {"split": "test"})
    assert load_text("ptb", split="valid") == "a b c d"
    assert calls[-1] == ("ptb-text-only/ptb_text_only", None, {"split": "validation"})
    load_text("c4", split="train")
    path, name, kwargs = calls[-1]
    assert path == "allenai/c4" and kwargs["split"] == "train"
    assert kwargs["data_files"] == {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    with pytest.raises(ValueError, match="split"):
        load_text("c4", split="test")


# --------------------------------------------------------------------------- windows


def test_calibration_windows_reproducible(tokenizer, text):
    a = calibration_windows(tokenizer, text, nsamples=8, seqlen=16, seed=0)
    random.seed(999)
    torch.manual_seed(999)  # global RNG state must not matter
    b = calibration_windows(tokenizer, text, nsamples=8, seqlen=16, seed=0)
    c = calibration_windows(tokenizer, text, nsamples=8, seqlen=16, seed=1)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_are_slices_at_seeded_starts(tokenizer, text):
    ids = tokenize_text(tokenizer, text)
    seqlen, seed = 16, 7
    w = calibration_windows(tokenizer, text, nsamples=5, seqlen=seqlen, seed=seed)
    rng = random.Random(seed)
    for row in w:
        s = rng.randint(0, ids.numel() - seqlen - 1)
        assert torch.equal(row, ids[s : s + seqlen])
    # Pre-tokenised input gives the same windows.
    assert torch.equal(w, calibration_windows(tokenizer, ids, nsamples=5, seqlen=seqlen, seed=seed))


def test_calibration_short_text_raises(tokenizer):
    with pytest.raises(ValueError, match=r"found 3 tokens, need at least 17"):
        calibration_windows(tokenizer, "w1 w2 w3", nsamples=2, seqlen=16)
    with pytest.raises(ValueError, match=r"found 0 tokens"):
        calibration_windows(tokenizer, "", nsamples=2, seqlen=16)


def test_eval_windows_non_overlapping(tokenizer, text):
    ids = tokenize_text(tokenizer, text)
    w = eval_windows(tokenizer, text, seqlen=64)
    n = ids.numel() // 64
    assert w.shape == (n, 64)
    assert torch.equal(w.reshape(-1), ids[: n * 64])
    w3 = eval_windows(tokenizer, text, seqlen=64, nwindows=3)
    assert torch.equal(w3, w[:3])


def test_eval_windows_bos(tokenizer, text):
    ids = tokenize_text(tokenizer, text)
    w = eval_windows(tokenizer, text, seqlen=64, bos=True, nwindows=4)
    assert w.shape == (4, 64)
    assert (w[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[: 4 * 63])


def test_eval_windows_short_text_raises(tokenizer):
    with pytest.raises(ValueError, match=r"found 2 tokens, need at least 64"):
        eval_windows(tokenizer, "w1 w2", seqlen=64)


# --------------------------------------------------------------------------- perplexity


def _hand_perplexity(model, windows):
    total = 0.0
    n, seqlen = windows.shape
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0].double()  # (seqlen, vocab)
            m = logits.max(dim=-1, keepdim=True).values
            logp = logits - m - torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True))
            picked = logp[:-1].gather(1, w[1:, None]).squeeze(1)
            total += float(-picked.mean()) * seqlen
    return math.exp(total / (n * seqlen))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_hand_computation(tiny_llama, tokenizer, text, batch_size):
    windows = eval_windows(tokenizer, text, seqlen=32, nwindows=5)
    ppl = perplexity(tiny_llama, windows, batch_size=batch_size, progress=False)
    expected = _hand_perplexity(tiny_llama, windows)
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert 1.0 < ppl < 1e6


def test_perplexity_rejects_bad_shape(tiny_llama):
    with pytest.raises(ValueError):
        perplexity(tiny_llama, torch.zeros(8, dtype=torch.long), progress=False)


def test_max_seqlen_caps(tiny_llama):
    assert max_seqlen(tiny_llama, 2048) == 128
    assert max_seqlen(tiny_llama, 64) == 64
    assert max_seqlen(types.SimpleNamespace(config=types.SimpleNamespace()), 300) == 300


# --------------------------------------------------------------------------- generation


def test_generate_greedy_returns_new_text_only(tiny_llama, tokenizer):
    prompts = ["w1 w2 w3", "w7"]
    out = generate(tiny_llama, tokenizer, prompts, max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 2
    assert out == generate(tiny_llama, tokenizer, prompts, max_new_tokens=6)  # deterministic
    for prompt, got in zip(prompts, out):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(tiny_llama(ids).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- shared data


def test_shared_data_path(monkeypatch, tmp_path):
    assert shared_data_path("no/such/file.txt") is None
    (tmp_path / "ptb").mkdir()
    f = tmp_path / "ptb" / "ptb.valid.txt"
    f.write_text("w1 w2\n")
    monkeypatch.setenv("APT_VIZ_SHARED_DATA", str(tmp_path))
    assert shared_data_path("ptb/ptb.valid.txt") == f


def test_shared_wikitext_file_loads_when_present():
    p = shared_data_path("wikitext-2-raw/wiki.test.raw")
    if p is None:
        pytest.skip("../shared/data/wikitext-2-raw/wiki.test.raw is absent on this machine")
    text = load_text(p)
    assert len(text) > 1_000_000
    assert data.load_text(str(p)) == text
