"""The command line end to end on a tiny random model saved to a temp folder."""

from __future__ import annotations

import csv
import json
import logging
import random
import sys

import pytest
import torch

from apt_viz import PruningPlan
from apt_viz.cli import main
from apt_viz.save import load_masks, load_record
from test_models import _save_tiny_llama

REPORT_FILES = {"plan.json", "summary.json", "layers.csv", "generations.md", "error.png", "sparsity.png"}


@pytest.fixture
def setup(tmp_path):
    model_dir = _save_tiny_llama(tmp_path / "model")
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(20)}" for _ in range(3000)))
    return model_dir, text


def _args(model_dir, text, report, *extra):
    return ["prune", "--model", str(model_dir), *extra, "--calib", str(text), "--eval", str(text),
            "--nsamples", "4", "--seqlen", "32", "--nwindows", "4", "--report", str(report)]


@pytest.mark.parametrize("extra", [["--sparsity", "0.5", "--refit-dtype", "float32"], ["--pattern", "2:4", "--sequential", "--no-refit"]])
def test_cli_prune_writes_every_report_file(tmp_path, setup, extra, capsys):
    report = tmp_path / "report"
    assert main(_args(*setup, report, "--method", "apt", *extra)) == 0
    assert {p.name for p in report.iterdir()} == REPORT_FILES
    plan = PruningPlan.from_json((report / "plan.json").read_text())
    assert plan.method == "apt" and plan.refit == ("--no-refit" not in extra)
    assert plan.refit_dtype == ("float32" if "--refit-dtype" in extra else "auto")
    summary = json.loads((report / "summary.json").read_text())
    assert summary["ppl_dense"] > 1 and summary["ppl_pruned"] > 1
    assert summary["perplexity"] == {"text.txt": {"dense": summary["ppl_dense"], "pruned": summary["ppl_pruned"]}}
    assert "zeroshot" not in summary
    rows = list(csv.DictReader((report / "layers.csv").open()))
    assert len(rows) == 14 and all(abs(float(r["sparsity"]) - 0.5) < 1 / 32 for r in rows)
    for png in ("error.png", "sparsity.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(report.resolve()) in capsys.readouterr().out


def test_cli_save_writes_a_loadable_pruned_model(tmp_path, setup, capsys):
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "saved"
    assert main(_args(*setup, tmp_path / "report", "--method", "sparsegpt", "--pattern", "4:8", "--save", str(saved))) == 0
    assert str(saved) in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(saved)
    weights = dict(model.named_parameters())
    masks = load_masks(saved)
    layers = list(csv.DictReader((tmp_path / "report" / "layers.csv").open()))
    assert sorted(masks) == sorted(r["name"] for r in layers) and len(masks) == 14
    for name, mask in masks.items():
        w = weights[name + ".weight"]
        assert torch.equal(mask, w != 0)
        assert (w.reshape(-1, 8) == 0).sum(1).eq(4).all()
    rec = load_record(saved)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert rec["plan"]["pattern"] == "4:8" and rec["perplexity"] == summary["perplexity"]
    assert (rec["seed"], rec["nsamples"], rec["seqlen"]) == (0, 4, 32)
    assert set(rec["versions"]) == {"apt_viz", "torch", "transformers"}


def test_cli_save_refuses_a_foreign_folder_before_pruning(tmp_path, setup):
    other = tmp_path / "important"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not an earlier apt_viz save"):
        main(_args(*setup, tmp_path / "report", "--method", "wanda", "--save", str(other)))
    assert not (tmp_path / "report").exists()  # refused before any work
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]


def test_cli_tasks_without_lm_eval_say_why_and_still_report(tmp_path, setup, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    report = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        assert main(_args(*setup, report, "--method", "wanda", "--tasks", "hellaswag", "arc_easy")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "zero-shot" in r.getMessage()]
    assert len(warnings) == 1  # said once, not again after pruning
    assert "lm-eval is not importable" in warnings[0] and 'pip install -e ".[eval]"' in warnings[0]
    assert {p.name for p in report.iterdir()} == REPORT_FILES
    summary = json.loads((report / "summary.json").read_text())
    assert summary["zeroshot"] == {"tasks": ["hellaswag", "arc_easy"], "message": warnings[0], "dense": {}, "pruned": {}}
    assert summary["ppl_pruned"] > 1


# --------------------------------------------------------------------------- zero-shot glue (lm-eval stand-in)


def fake_lm_eval(monkeypatch, simple_evaluate, on_init=None) -> None:
    """Install a stand-in ``lm_eval`` (the real one needs its datasets from the hub) and pretend the hub is up."""
    import types

    import apt_viz.zeroshot as zs

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model, self.tokenizer = pretrained, tokenizer
            if on_init:
                on_init(self)

    mod = types.ModuleType("lm_eval")
    mod.simple_evaluate = simple_evaluate
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", mod)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    monkeypatch.setattr(zs, "hub_unreachable", lambda timeout=3.0: None)


def test_zero_shot_failure_inside_lm_eval_is_reported_not_raised(monkeypatch):
    from conftest import word_llama, word_tokenizer

    from apt_viz.zeroshot import zero_shot

    def simple_evaluate(**kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub")

    fake_lm_eval(monkeypatch, simple_evaluate)
    tok = word_tokenizer(5)
    res = zero_shot(word_llama(tok), tok, ["piqa"])
    assert not res.ran and res.scores == {}
    assert "ConnectionError: Couldn't reach 'baber/piqa'" in res.message and "hub" in res.message


def test_zero_shot_scores_come_from_simple_evaluate_on_the_model_in_memory(monkeypatch):
    from conftest import word_llama, word_tokenizer

    from apt_viz.zeroshot import headline, zero_shot

    tok = word_tokenizer(5)
    model = word_llama(tok)
    seen = {}

    def simple_evaluate(model, tasks, num_fewshot, limit, log_samples):
        seen.update(lm=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit)
        return {"results": {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_norm,none": 0.75, "acc_stderr,none": float("nan")}}}

    fake_lm_eval(monkeypatch, simple_evaluate)
    res = zero_shot(model, tok, ["piqa"], limit=8)
    assert seen["lm"].model is model and seen["lm"].tokenizer is tok
    assert (seen["tasks"], seen["num_fewshot"], seen["limit"]) == (["piqa"], 0, 8)
    assert res.ran and res.scores == {"piqa": {"acc,none": 0.5, "acc_norm,none": 0.75}}  # text and NaN dropped
    assert headline(res.scores["piqa"]) == ("acc_norm", 0.75)


def test_hub_probe_says_unreachable_and_trusts_offline_mode(monkeypatch):
    import socket

    from apt_viz.zeroshot import hub_unreachable

    with socket.socket() as s:  # a local port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    msg = hub_unreachable(timeout=1.0)
    assert msg and "127.0.0.1" in msg and "unreachable" in msg and "HF_DATASETS_OFFLINE=1" in msg
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_unreachable(timeout=1.0) is None
