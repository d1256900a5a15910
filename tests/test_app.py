"""The explorer panel, headless: set widget values, click buttons, check the plan, the model and the views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apt_viz import PlanError
from apt_viz.app import Explorer
from apt_viz.data import eval_windows, perplexity, tokenize_text

from conftest import VOCAB, tiny_model, word_llama, word_tokenizer

B1_Q, B1_UP = "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def small_calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def app_for(model: torch.nn.Module, calib: torch.Tensor, **kw) -> Explorer:
    return Explorer(model, None, calib, prompts=(), background=False, **kw)


def clicked_ok(app: Explorer, button) -> None:
    button.click()
    assert app.last_error is None, app.status.value


def test_run_from_widgets_sets_plan_progress_results_and_views(model, small_calib):
    dense = weights(model)
    app = app_for(model, small_calib)
    assert app.progress.value == 0 and not app.state.pruner.pruned
    app.method.value = "sparsegpt"
    app.pattern.value = "N:M"
    app.n.value, app.m.value = 2, 4
    app.blocks.value = (1,)
    app.kinds.value = ("q_proj", "up_proj")
    assert app.layer_select.value == (B1_Q, B1_UP)
    clicked_ok(app, app.run_button)

    plan = app.state.plan
    assert (plan.method, plan.pattern, plan.include, plan.exclude) == ("sparsegpt", "2:4", [B1_Q, B1_UP], [])
    assert app.state.selected_layers() == [B1_Q, B1_UP]
    # Only block 1 has chosen layers, so the run covers blocks 0..1.
    assert (app.progress.value, app.progress.max, app.progress.bar_style) == (2, 2, "success")
    results = app.state.shown.results
    assert list(results) == [B1_Q, B1_UP]
    for name, r in results.items():
        assert (r.method, r.pattern, r.target, r.sparsity) == ("sparsegpt", "2:4", 0.5, 0.5)
        w = model.get_submodule(name).weight.detach()
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    for key, w in model.state_dict().items():
        if not any(key.startswith(n) for n in (B1_Q, B1_UP)):
            assert torch.equal(w, dense[key]), key

    # Views: errors (drawn now, the first tab), then the masks of a chosen layer when their tabs are shown.
    fig = app.figures["errors"]
    assert {t.name for t in fig.data} == {"q_proj", "up_proj"}
    up = next(t for t in fig.data if t.name == "up_proj")
    assert list(up.y) == [results[B1_UP].rel_error] and list(up.x) == [1]
    app.view_layer.value = B1_UP
    app.tabs.selected_index = list(app.tab_boxes).index("masks")
    np.testing.assert_array_equal(np.asarray(app.figures["masks"].data[0].z), app.state.shown.masks[B1_UP].numpy().astype(np.int8))
    app.tabs.selected_index = list(app.tab_boxes).index("nm")
    assert app.figures["nm"].layout.meta["counts"] == {2: 128 * 64 // 4}
    app.tabs.selected_index = list(app.tab_boxes).index("histograms")
    assert len(app.figures["histograms"].data) == 2
    assert app.last_error is None


def test_mask_zoom_redraws_region_exactly(model, small_calib):
    app = app_for(model, small_calib)
    app.method.value = "magnitude"
    app.blocks.value = (0,)
    app.kinds.value = ("up_proj",)
    clicked_ok(app, app.run_button)
    app.mask_max_size.value = 16
    app.tabs.selected_index = list(app.tab_boxes).index("masks")
    fig = app.figures["masks"]
    mask = app.state.shown.masks["model.layers.0.mlp.up_proj"].numpy()  # 128 x 64
    assert fig.layout.meta["exact"] is False and np.asarray(fig.data[0].z).shape == (16, 16)
    with fig.batch_update():
        fig.layout.xaxis.range = [0, 9]
        fig.layout.yaxis.range = [9, 0]  # reversed, as the matrix is drawn
    assert fig.layout.meta["exact"] is True and list(fig.layout.meta["region"]) == [0, 10, 0, 10]
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), mask[:10, :10].astype(np.int8))


def test_restore_gives_back_dense_logits_exactly(model, small_calib, probe):
    before = logits(model, probe)
    app = app_for(model, small_calib)
    app.method.value = "magnitude"
    app.sparsity.value = 0.6
    clicked_ok(app, app.run_button)
    assert len(app.state.shown.results) == len(app.state.layer_names)
    assert not torch.equal(logits(model, probe), before)
    clicked_ok(app, app.restore_button)
    assert torch.equal(logits(model, probe), before)
    assert app.state.live is None and not app.state.pruner.pruned and app.progress.value == 0


def test_cancel_after_block_0_leaves_block_0_pruned_and_restorable(model, small_calib, probe):
    dense = weights(model)
    before = logits(model, probe)
    app = app_for(model, small_calib)
    app.method.value = "sparsegpt"

    def cancel_after_first_block(change):
        if change["new"] == 1:
            app.cancel_button.click()

    app.progress.observe(cancel_after_first_block, names="value")
    clicked_ok(app, app.run_button)
    record = app.state.live
    assert record.cancelled and app.progress.value == 1 and app.progress.bar_style == "warning"
    assert "Cancelled" in app.status.value
    assert record.results and {r.block for r in record.results.values()} == {0}
    for key, w in model.state_dict().items():
        if key.startswith("model.layers.1."):
            assert torch.equal(w, dense[key]), key
    assert not torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").weight, dense["model.layers.0.mlp.up_proj.weight"])
    clicked_ok(app, app.restore_button)
    assert torch.equal(logits(model, probe), before)
    for key, w in model.state_dict().items():
        assert torch.equal(w, dense[key]), key


def test_override_reprunes_only_that_layer_from_cached_hessians(model, small_calib, monkeypatch):
    app = app_for(model, small_calib)
    app.method.value = "sparsegpt"
    app.sparsity.value = 0.5
    app.kinds.value = tuple(k for k in app.state.kinds if k != "q_proj")
    clicked_ok(app, app.run_button)
    pruned = weights(model)
    other_results = {n: r.to_dict() for n, r in app.state.shown.results.items() if n != B1_UP}

    def no_calibration(*a, **k):
        raise AssertionError("a re-prune must not run a calibration pass")

    monkeypatch.setattr(app.state.pruner, "_capture", no_calibration)
    chart = app.figures["errors"]
    app.override_layer.value = B1_UP
    app.override_sparsity.value = "0.75"
    clicked_ok(app, app.override_apply)

    key = B1_UP + ".weight"
    w = model.state_dict()[key]
    assert float((w == 0).float().mean()) == 0.75
    assert not torch.equal(w, pruned[key])
    for k, v in model.state_dict().items():
        if k != key:
            assert torch.equal(v, pruned[k]), k
    ov = app.state.plan.overrides[B1_UP]
    assert (ov.sparsity, ov.pattern, ov.method) == (0.75, "unstructured", "sparsegpt")
    live = app.state.live
    assert (live.results[B1_UP].target, live.results[B1_UP].sparsity) == (0.75, 0.75)
    assert live.plan.overrides[B1_UP].sparsity == 0.75
    assert {n: r.to_dict() for n, r in live.results.items() if n != B1_UP} == other_results
    assert app.figures["errors"] is chart  # redrawn in place: a new FigureWidget would resend plotly.js
    up = next(t for t in chart.data if t.name == "up_proj")
    assert list(up.y)[1] == live.results[B1_UP].rel_error

    # A layer the run did not prune has no Hessian: its override waits for the next run.
    app.override_layer.value = B1_Q
    app.override_sparsity.value = "2:4"
    clicked_ok(app, app.override_apply)
    assert "next Run" in app.status.value and B1_Q not in live.results
    assert all(torch.equal(v, pruned[k] if k != key else w) for k, v in model.state_dict().items())
    monkeypatch.undo()
    clicked_ok(app, app.select_all)
    clicked_ok(app, app.run_button)
    results = app.state.live.results
    assert (results[B1_Q].pattern, results[B1_UP].target, results["model.layers.0.self_attn.q_proj"].target) == ("2:4", 0.75, 0.5)


def test_export_then_load_gives_the_same_plan_and_results(model, small_calib, tmp_path):
    app = app_for(model, small_calib)
    app.method.value = "wanda"
    app.sparsity.value = 0.4
    app.kinds.value = ("q_proj", "k_proj", "gate_proj")
    app.override_layer.value = "model.layers.0.mlp.gate_proj"
    app.override_sparsity.value = "0.7"
    clicked_ok(app, app.override_apply)  # before the run: recorded in the plan
    clicked_ok(app, app.run_button)
    plan, results = app.state.plan.to_dict(), {n: r.to_dict() for n, r in app.state.shown.results.items()}
    assert results["model.layers.0.mlp.gate_proj"]["target"] == 0.7 and len(results) == 6
    path = tmp_path / "run.json"
    app.export_path.value = str(path)
    clicked_ok(app, app.export_button)
    data = json.loads(path.read_text())
    assert data["plan"] == plan and [r["name"] for r in data["results"]] == list(results)

    clicked_ok(app, app.restore_button)
    other = app_for(model, small_calib)
    other.export_path.value = str(path)
    clicked_ok(other, other.load_button)
    assert other.state.plan.to_dict() == plan
    assert {n: r.to_dict() for n, r in other.state.shown.results.items()} == results
    assert all(isinstance(r.shape, tuple) for r in other.state.shown.results.values())
    assert (other.method.value, other.pattern.value, other.sparsity.value) == ("wanda", "unstructured", 0.4)
    assert list(other.layer_select.value) == list(results)
    assert "gate_proj" in other.overrides_html.value
    assert {t.name for t in other.figures["errors"].data} == {"q_proj", "k_proj", "gate_proj"}
    assert not other.state.pruner.pruned

    # Load validates: a result for a layer this model lacks, or a bad field, is refused with its name.
    bad = dict(data, results=[dict(data["results"][0], name="model.layers.9.mlp.up_proj")])
    with pytest.raises(PlanError, match="no layer 'model.layers.9.mlp.up_proj'"):
        other.load_json(json.dumps(bad))
    bad = dict(data, results=[dict(data["results"][0], sparsity="half")])
    with pytest.raises(PlanError, match=r"results\[0\]\.sparsity has the wrong type"):
        other.load_json(json.dumps(bad))
    with pytest.raises(PlanError, match="not an explorer export"):
        other.load_json(json.dumps({"plan": plan}))
    assert other.state.plan.to_dict() == plan  # a refused file changes nothing


def test_refit_checkbox_runs_apt_without_its_refit_and_round_trips(model, small_calib, tmp_path):
    app = app_for(model, small_calib)
    app.kinds.value = ("q_proj", "down_proj")
    clicked_ok(app, app.run_button)
    refitted = {n: r.error for n, r in app.state.shown.results.items()}
    clicked_ok(app, app.restore_button)
    app.refit.value = False
    assert app.state.plan.refit is False
    clicked_ok(app, app.run_button)
    assert [r.label for r in app.state.runs] == ["apt 50% (custom)", "apt (no re-fit) 50% (custom)"]
    assert all(r.error > refitted[n] for n, r in app.state.shown.results.items())

    path = tmp_path / "run.json"
    app.export_path.value = str(path)
    clicked_ok(app, app.export_button)
    other = app_for(tiny_model("llama"), small_calib)
    assert other.refit.value is True
    other.export_path.value = str(path)
    clicked_ok(other, other.load_button)
    assert other.refit.value is False and other.state.plan.refit is False


def test_invalid_plan_is_reported_and_nothing_runs(model, small_calib):
    dense = weights(model)
    app = app_for(model, small_calib)
    app.select_none.click()
    assert app.layer_select.value == () and isinstance(app.plan_error, PlanError)
    app.run_button.click()
    assert isinstance(app.last_error, PlanError) and "selects no layer" in str(app.last_error)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    app.select_all.click()
    assert app.layer_select.value == tuple(app.state.layer_names) and app.plan_error is None
    assert app.state.plan.include == ["*"]


def test_agreement_between_runs_and_sensitivity_sweep(model, small_calib):
    app = app_for(model, small_calib)
    app.kinds.value = ("up_proj",)
    app.method.value = "magnitude"
    clicked_ok(app, app.run_button)
    app.method.value = "wanda"
    clicked_ok(app, app.run_button)
    a, b = app.state.runs
    assert (app.agree_a.value, app.agree_b.value) == (a.label, b.label) == ("magnitude 50% (custom)", "wanda 50% (custom)")
    app.view_layer.value = B1_UP
    app.tabs.selected_index = list(app.tab_boxes).index("agreement")
    fig = app.figures["agreement"]
    expect = float((a.masks[B1_UP] == b.masks[B1_UP]).float().mean())
    assert fig.layout.meta["agreement"] == pytest.approx(expect, abs=1e-12)

    pruned = weights(model)
    app.sweep_sparsities.value = "0.25, 0.75"
    app.tabs.selected_index = list(app.tab_boxes).index("sensitivity")
    clicked_ok(app, app.sweep_button)
    table = app.state.sweep_table
    assert sorted((r["layer"], r["sparsity"]) for r in table) == sorted(
        (n, s) for n in ("model.layers.0.mlp.up_proj", B1_UP) for s in (0.25, 0.75))
    assert all(r["achieved"] == r["sparsity"] for r in table)
    assert all(torch.equal(v, pruned[k]) for k, v in model.state_dict().items())  # each layer put back
    heat = app.figures["sensitivity_heatmap"]
    assert len(heat.data[0].z) == 2 and len(heat.data[0].z[0]) == 2
    app.sweep_by.value = "block"
    assert app.figures["sensitivity_curves"].layout.meta["key"] == "block"
    assert app.last_error is None


def test_text_calibration_with_perplexity_and_generations(tmp_path):
    tok = word_tokenizer(40)
    model = word_llama(tok)
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(0, 40, 400))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    windows = eval_windows(tok, tokenize_text(tok, text), 16, 4)
    dense_ppl = perplexity(model, windows, progress=False)

    app = Explorer(model, tok, str(path), eval_text=str(path), nsamples=4, seqlen=16, prompts=["w1 w2 w3"], background=False)
    app.state.nwindows = 4
    app.method.value = "sparsegpt"
    app.sparsity.value = 0.7
    assert app.evaluate.value is True
    clicked_ok(app, app.run_button)
    assert app.state.calibration().shape == (4, 16)
    evals = {e["label"]: e for e in app.state.evaluations}
    assert list(evals) == ["dense", "sparsegpt 70%"]
    assert evals["dense"]["ppl"] == dense_ppl
    assert evals["sparsegpt 70%"]["ppl"] == perplexity(model, windows, progress=False)
    app.tabs.selected_index = list(app.tab_boxes).index("before_after")
    bars = app.figures["ppl"]
    assert list(bars.data[0].x) == ["sparsegpt 70%"] and list(bars.data[0].y) == [evals["sparsegpt 70%"]["ppl"]]
    assert "w1 w2 w3" in app.html["generations"].value
    assert app.last_error is None


def test_background_run_and_busy_guard(model, small_calib):
    app = Explorer(model, None, small_calib, prompts=(), background=True)
    app.method.value = "magnitude"
    app.run_button.click()
    app.wait(timeout=120)
    assert app.last_error is None and len(app.state.live.results) == len(app.state.layer_names)
    assert app.progress.value == app.progress.max == 2 and not app.run_button.disabled and app.cancel_button.disabled
    with app.state._exclusive():  # while a run holds the state, other actions are refused with a reason
        with pytest.raises(RuntimeError, match="in progress"):
            app.state.restore()
    assert app.state.pruner.pruned


def test_calibration_windows_are_checked(model, small_calib):
    with pytest.raises(ValueError, match="token ids"):
        Explorer(model, None, small_calib.float(), background=False)
    app = app_for(model, small_calib)
    assert (app.nsamples.value, app.seqlen.value) == (4, 16)
    app.seqlen.value = 32
    app.run_button.click()
    assert isinstance(app.last_error, ValueError) and "4 x 16" in str(app.last_error)
    assert not app.state.pruner.pruned and not app.run_button.disabled


def test_switch_model_restores_the_old_one_and_redraws_in_place(tmp_path):
    tok = word_tokenizer(40)
    old = word_llama(tok)
    dense = weights(old)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"w{i % 40}" for i in range(400)))
    other = tiny_model("opt")  # another architecture, saved as a local folder with the same tokenizer
    other.resize_token_embeddings(len(tok))
    other.save_pretrained(tmp_path / "opt", safe_serialization=True)
    tok.save_pretrained(tmp_path / "opt")

    app = Explorer(old, tok, str(path), nsamples=2, seqlen=16, prompts=[], background=False)
    root = app.root
    app.method.value = "wanda"
    clicked_ok(app, app.run_button)
    assert any(bool((v == 0).any()) for k, v in weights(old).items() if k.endswith("proj.weight"))
    app.model_name.value = str(tmp_path / "opt")
    clicked_ok(app, app.load_model_button)
    assert all(torch.equal(v, dense[k]) for k, v in weights(old).items())  # the old model is dense again
    assert app.root is root and root.children == (app.panel,)
    assert app.state.model is not old and any(".fc1" in n for n in app.state.layer_names)
    assert set(app.layer_select.options) == set(app.state.layer_names)
    clicked_ok(app, app.run_button)
    assert set(app.state.live.results) == set(app.state.layer_names)

    with pytest.raises(ValueError, match="not token ids"):
        Explorer(word_llama(tok), tok, torch.zeros(2, 16, dtype=torch.long), background=False).switch_model(str(tmp_path / "opt"))
