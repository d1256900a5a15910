"""Sensitivity sweeps on a tiny model, and the non-uniform plan built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_viz import PlanError, Pruner, PruningPlan
from apt_viz.arch import get_weight
from apt_viz.data import perplexity
from apt_viz.sensitivity import block_sweep, layer_sizes, layer_sweep, plan_from_sensitivity, weighted_sparsity
from conftest import VOCAB, tiny_model

PROBE = torch.arange(24).remainder(VOCAB)[None]


def logits(model):
    with torch.no_grad():
        return model(PROBE).logits


def weights(pruner):
    return {n: get_weight(m).clone() for n, m in pruner.layers.items()}


def test_layer_sweep_records_errors_and_puts_every_layer_back(calib):
    model = tiny_model("llama")
    dense_logits = logits(model).clone()
    pruner = Pruner(model)
    plan = PruningPlan(method="sparsegpt", sparsity=0.5, overrides={"*.v_proj": {"sparsity": 0.25}})
    pruner.run(calib, plan, progress=False)
    q, v, up, down = (f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"))
    pruner.restore([down])  # calibrated but dense: must stay dense
    before, results = weights(pruner), {n: r.to_dict() for n, r in pruner.results.items()}
    overrides = {k: vars(o).copy() for k, o in pruner.plan.overrides.items()}

    rows = layer_sweep(pruner, [q, v, up, down], [0.0, 0.5, 0.7, "2:4"], progress=False)

    assert len(rows) == 16 and [r["layer"] for r in rows[:4]] == [q] * 4
    table = {(r["layer"], r["sparsity"], r["pattern"]): r for r in rows}
    for name in (q, v, up, down):
        errs = [table[name, s, "unstructured"]["rel_error"] for s in (0.0, 0.5, 0.7)]
        assert errs[0] == 0 and 0 < errs[1] < errs[2]
        assert table[name, 0.5, "2:4"]["achieved"] == pytest.approx(0.5)
        assert table[name, 0.7, "unstructured"]["method"] == "sparsegpt"
    # the sweep at the run's own setting reproduces the run's result
    assert table[q, 0.5, "unstructured"]["rel_error"] == results[q]["rel_error"]
    after = weights(pruner)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n: {k: x for k, x in r.to_dict().items() if k != "seconds"} for n, r in pruner.results.items()} == {
        n: {k: x for k, x in r.items() if k != "seconds"} for n, r in results.items()}
    assert down not in pruner.results
    assert {k: vars(o) for k, o in pruner.plan.overrides.items()} == overrides
    pruner.restore()
    assert torch.equal(logits(model), dense_logits)


def test_layer_sweep_needs_a_run(calib):
    pruner = Pruner(tiny_model("llama"))
    with pytest.raises(PlanError, match="run pruner.run"):
        layer_sweep(pruner, pruner.layer_names[:1], [0.5], progress=False)
    pruner.run(calib, PruningPlan(method="magnitude", include=["*.0.*"]), progress=False)
    with pytest.raises(PlanError, match="no cached Hessian"):
        layer_sweep(pruner, ["model.layers.1.mlp.up_proj"], [0.5], progress=False)


def test_block_sweep_measures_ppl_per_block_and_restores(calib):
    model = tiny_model("llama")
    dense_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    dense = perplexity(model, windows, progress=False)
    rows = block_sweep(model, calib, windows, [0.0, 0.6], method="sparsegpt", progress=False)
    assert [(r["block"], r["sparsity"]) for r in rows] == [(0, 0.0), (0, 0.6), (1, 0.0), (1, 0.6)]
    assert rows[0]["ppl"] == rows[2]["ppl"] == dense
    assert rows[1]["ppl"] != dense and rows[3]["ppl"] != dense and rows[1]["ppl"] != rows[3]["ppl"]
    assert all(torch.equal(p, dense_w[n]) for n, p in model.named_parameters())
    # one block pruned by hand gives the same perplexity as the sweep's point
    pruner = Pruner(model)
    pruner.run(calib, PruningPlan(method="sparsegpt", sparsity=0.6, include=["model.layers.1.*"]), progress=False)
    assert perplexity(model, windows, progress=False) == pytest.approx(rows[3]["ppl"], rel=1e-6)
    pruner.restore()


def test_plan_from_layer_sweep_keeps_the_weighted_sparsity(calib):
    model = tiny_model("llama")
    pruner = Pruner(model)
    pruner.run(calib, PruningPlan(method="magnitude", sparsity=0.5), progress=False)  # the cheapest solver will do here
    rows = layer_sweep(pruner, pruner.layer_names, [0.3, 0.5, 0.7], progress=False)
    sizes = layer_sizes(pruner)
    assert len(set(sizes.values())) > 1  # q/o, k/v and the MLP differ in size, so the weighting matters

    base = PruningPlan(method="magnitude", percdamp=0.02, blocksize=64, sequential=True, refit=False)
    plan = plan_from_sensitivity(rows, 0.5, sizes=pruner, spread=0.15, base=base)
    assert (plan.percdamp, plan.blocksize, plan.sequential, plan.refit) == (0.02, 64, True, False)  # the base's settings carry over
    fr = {n: plan.layer_settings(n)[1].fraction for n in sizes}
    total = sum(sizes.values())
    assert sum(fr[n] * sizes[n] for n in sizes) / total == pytest.approx(0.5, abs=1e-9)
    assert weighted_sparsity(plan, pruner) == pytest.approx(0.5, abs=1e-9)
    at_target = {r["layer"]: r["rel_error"] for r in rows if r["sparsity"] == 0.5}
    order = sorted(at_target, key=at_target.get)
    assert fr[order[-1]] == min(fr.values()) and fr[order[0]] == max(fr.values())  # fragile get less, robust more
    assert np.all(np.diff([fr[n] for n in order]) <= 1e-12)  # monotone in fragility
    assert max(fr.values()) - min(fr.values()) > 0.1
    assert PruningPlan.from_json(plan.to_json()).layer_settings(order[0]) == plan.layer_settings(order[0])

    # running the plan gives that parameter-weighted sparsity (up to rounding per layer)
    pruner.restore()
    pruner.run(calib, plan, progress=False)
    zeros = sum(float((get_weight(m) == 0).sum()) for m in pruner.layers.values())
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    pruner.restore()


def test_plan_from_block_table_clips_and_checks():
    sizes = {f"model.layers.{b}.{k}": s for b in range(3) for k, s in (("self_attn.q_proj", 100), ("mlp.up_proj", 300))}
    table = [{"block": b, "sparsity": s, "ppl": 10 + (b + 1) ** 3 * s} for b in range(3) for s in (0.4, 0.6)]
    plan = plan_from_sensitivity(table, 0.6, sizes=sizes, metric="ppl", spread=0.5, max_sparsity=0.8)
    fr = {n: plan.layer_settings(n)[1].fraction for n in sizes}
    assert np.average(list(fr.values()), weights=list(sizes.values())) == pytest.approx(0.6, abs=1e-9)
    by_block = [fr[f"model.layers.{b}.mlp.up_proj"] for b in range(3)]
    assert by_block[0] == pytest.approx(0.8) and by_block[0] > by_block[1] > by_block[2]  # block 2 is most fragile
    assert all(fr[f"model.layers.{b}.self_attn.q_proj"] == by_block[b] for b in range(3))
    log = plan_from_sensitivity(table, 0.6, sizes=sizes, metric="ppl", spread=0.2, scale="log")
    lf = [log.layer_settings(f"model.layers.{b}.mlp.up_proj")[1].fraction for b in range(3)]
    assert lf[0] > lf[1] > lf[2] and np.average(lf, weights=[1, 1, 1]) == pytest.approx(0.6, abs=1e-9)
    dev = np.log([10 + (b + 1) ** 3 * 0.6 for b in range(3)])
    dev -= dev.mean()
    assert lf[0] - lf[2] == pytest.approx(0.2 * (dev[2] - dev[0]) / np.abs(dev).max(), abs=1e-9)  # nothing clipped
    with pytest.raises(PlanError, match="unstructured"):
        plan_from_sensitivity(table, 0.5, sizes=sizes, metric="ppl", base=PruningPlan(pattern="2:4"))
    with pytest.raises(ValueError, match="needs sizes"):
        plan_from_sensitivity(table, 0.5, metric="ppl")
    with pytest.raises(PlanError, match="target_sparsity"):
        plan_from_sensitivity(table, 1.5, sizes=sizes, metric="ppl")


def test_block_sweep_prunes_on_the_device_and_measures_on_the_models_own(calib, device):
    model = tiny_model("llama")  # left on the CPU
    windows = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(7))
    rows = block_sweep(model, calib, windows, [0.0, 0.6], blocks=[0], method="sparsegpt", device=device, progress=False)
    assert rows[0]["ppl"] == perplexity(model, windows, progress=False)
    assert np.isfinite(rows[1]["ppl"]) and rows[1]["ppl"] != rows[0]["ppl"]
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
