"""compare: many methods on one calibration set equal separate runs, and share exactly what is documented."""

from __future__ import annotations

import copy
import csv
import json
import random

import pytest
import torch

from conftest import word_llama, word_tokenizer

from apt_viz import Pruner, PruningPlan
from apt_viz.cli import main
from apt_viz.compare import compare, quality_table, run_folder_name
from apt_viz.config import Sparsity
from apt_viz.pipeline import calibration_ids
from test_cli import fake_lm_eval
from test_models import _save_tiny_llama


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(20)}" for _ in range(3000)))
    return path


@pytest.fixture(scope="module")
def tiny():
    tok = word_tokenizer(20)
    return word_llama(tok), tok


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_runs_equal_fresh_pruners_and_share_block0(tiny, text):
    model, tok = tiny
    dense = _state(model)
    methods, specs = ["sparsegpt", "wanda"], ["0.5", "4:8"]
    res = compare(model, tok, methods, specs, calib=text, evaluate=None, nsamples=4, seqlen=16, prompts=(), progress=False)
    assert [(r.plan["method"], str(Sparsity.parse(r.plan["sparsity"], r.plan["pattern"]))) for r in res.runs] == [
        (m, str(Sparsity.parse(s))) for s in specs for m in methods
    ]
    # One capture of block-0 inputs and one pass over dense block 0; its 7 layers reused by the 3 later runs.
    assert res.shared == {"captures": 1, "block0_passes": 1, "block0_reused": 7 * 3}
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # dense again

    calib = calibration_ids(tok, text, 4, 16, 0)
    for run in res.runs:
        fresh = copy.deepcopy(model)
        pruner = Pruner(fresh)
        pruner.run(calib, PruningPlan.from_dict(run.plan), progress=False)
        want = [r.to_dict() for r in pruner.results.values()]
        assert len(run.layers) == len(want) == 14
        for got, exp in zip(run.layers, want):
            for key in ("name", "sparsity", "rel_error", "error", "loss", "damp", "tokens"):
                assert got[key] == exp[key], (run.plan["method"], got["name"], key)


def test_sequential_shares_only_the_first_group_of_block0(tiny, text):
    model, tok = tiny
    res = compare(model, tok, ["sparsegpt", "wanda"], ["0.5"], calib=text, evaluate=None, nsamples=2, seqlen=16,
                  sequential=True, prompts=(), progress=False)
    # q/k/v read block 0's dense input: shared. o, gate/up and down see pruned sublayers: recomputed per run.
    assert res.shared == {"captures": 1, "block0_passes": 1, "block0_reused": 3}
    calib = calibration_ids(tok, text, 2, 16, 0)
    fresh = copy.deepcopy(model)
    pruner = Pruner(fresh)
    pruner.run(calib, PruningPlan.from_dict(res.runs[1].plan), progress=False)
    assert [layer["rel_error"] for layer in res.runs[1].layers] == [r.rel_error for r in pruner.results.values()]


def test_model_is_dense_again_after_a_failed_run(tiny, text, monkeypatch):
    import apt_viz.compare as cmp

    model, tok = tiny
    dense = _state(model)
    real = cmp.prune_and_measure

    def fail_after_pruning(pruner, *args, **kwargs):
        real(pruner, *args, **kwargs)
        assert pruner.pruned
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(cmp, "prune_and_measure", fail_after_pruning)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        compare(model, tok, ["wanda"], ["0.5"], calib=text, evaluate=None, nsamples=2, seqlen=16, prompts=(), progress=False)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_bad_spec_fails_before_any_work(tiny, text):
    model, tok = tiny
    with pytest.raises(ValueError, match="N:M"):
        compare(model, tok, ["wanda"], ["0.5", "4:2"], calib=text, evaluate=None, progress=False)


def test_cli_compare_rows_equal_separate_prune_runs(tmp_path, text, capsys):
    model_dir = _save_tiny_llama(tmp_path / "model")
    common = ["--model", str(model_dir), "--calib", str(text), "--eval", str(text), "--nsamples", "4", "--seqlen", "32",
              "--nwindows", "4", "--sequential"]
    assert main(["compare", *common, "--methods", "sparsegpt", "wanda", "--specs", "2:4", "--report", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| sparsegpt | 2:4 |" in out and "| wanda | 2:4 |" in out
    quality = json.loads((tmp_path / "cmp" / "quality.json").read_text())
    rows = {r["method"]: r for r in quality["rows"]}
    assert list(rows) == ["dense", "sparsegpt", "wanda"]
    md = (tmp_path / "cmp" / "quality.md").read_text()
    assert "| method | pattern | words.txt ppl | prune time (s) |" in md and "Seed" not in md and "seed 0" in md

    for method in ("wanda",):  # the second run: the one that takes block-0 inputs and Hessians from the first
        report = tmp_path / f"prune-{method}"
        assert main(["prune", *common, "--method", method, "--pattern", "2:4", "--report", str(report)]) == 0
        summary = json.loads((report / "summary.json").read_text())
        assert rows[method]["ppl"]["words.txt"] == summary["ppl_pruned"]
        assert rows["dense"]["ppl"]["words.txt"] == summary["ppl_dense"]
        run_dir = tmp_path / "cmp" / "runs" / run_folder_name(method, Sparsity.parse("2:4"))
        assert _layers(run_dir) == _layers(report)
        assert (run_dir / "generations.md").read_text() == (report / "generations.md").read_text()


def _layers(folder) -> list[dict[str, str]]:
    rows = list(csv.DictReader((folder / "layers.csv").open()))
    assert rows
    for r in rows:
        r.pop("seconds")
    return rows


def test_quality_table_columns_and_zero_shot(tiny, text, monkeypatch):
    """Two labelled corpora and zero-shot scores through a stand-in lm-eval (the real one needs the hub)."""
    model, tok = tiny
    calls = []

    def count_zeros(lm):
        assert lm.model is model and lm.tokenizer is tok
        calls.append(sum(int((p == 0).sum()) for p in model.parameters()))

    def simple_evaluate(model, tasks, num_fewshot, limit, log_samples):
        zeros = calls[-1]
        return {"results": {t: {"alias": t, "acc,none": 0.25 + zeros * 1e-6, "acc_stderr,none": 0.01} for t in tasks}}

    fake_lm_eval(monkeypatch, simple_evaluate, on_init=count_zeros)
    res = compare(model, tok, ["magnitude"], ["0.5"], calib=text, evaluate={"wikitext2": text, "ptb": text}, nsamples=2,
                  seqlen=16, nwindows=2, tasks=["piqa"], prompts=(), progress=False)
    lines = quality_table(res).splitlines()
    assert lines[0] == "| method | pattern | wikitext2 ppl | ptb ppl | piqa acc | prune time (s) |"
    dense, pruned = lines[2].split(" | "), lines[3].split(" | ")
    assert dense[0] == "| dense" and dense[1] == "-" and dense[2] == dense[3] == f"{res.dense.ppl['wikitext2']:.2f}"
    assert pruned[:2] == ["| magnitude", "50%"]
    assert pruned[2] == f"{res.runs[0].perplexity['ptb']['pruned']:.2f}"
    assert len(calls) == 2 and calls[1] > calls[0]  # the pruned model, with its new zeros, was evaluated in memory
    assert dense[4] == f"{0.25 + calls[0] * 1e-6:.4f}" and pruned[4] == f"{0.25 + calls[1] * 1e-6:.4f}"


def test_apt_without_refit_is_labelled_in_rows_tables_and_folders(tiny, text, tmp_path):
    from apt_viz.compare import write_compare_report

    model, tok = tiny
    res = compare(model, tok, ["apt"], ["0.5"], calib=text, evaluate=None, nsamples=4, seqlen=16, prompts=(),
                  progress=False, refit=False)
    assert res.runs[0].plan["refit"] is False and res.settings["refit"] is False
    assert [r["method"] for r in res.rows()] == ["dense", "apt (no re-fit)"]
    assert "| apt (no re-fit) | 50% |" in quality_table(res)
    write_compare_report(res, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "runs" / "apt-no-re-fit-50pct" / "plan.json").is_file()


def test_explicit_runs_follow_the_cross_product_in_order(tiny, text):
    model, tok = tiny
    res = compare(model, tok, ["magnitude"], ["0.5"], calib=text, evaluate=None, nsamples=2, seqlen=16, prompts=(),
                  progress=False, runs=[("wanda", "2:4"), ("magnitude", 0.25)])
    got = [(r.plan["method"], r.plan["pattern"], r.plan["sparsity"]) for r in res.runs]
    assert got == [("magnitude", "unstructured", 0.5), ("wanda", "2:4", 0.5), ("magnitude", "unstructured", 0.25)]


def test_nothing_to_compare_is_an_error(tiny, text):
    model, tok = tiny
    with pytest.raises(ValueError, match="nothing to compare"):
        compare(model, tok, [], ["0.5"], calib=text, evaluate=None, progress=False)
