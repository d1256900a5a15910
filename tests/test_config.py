"""Sparsity specs and the pruning plan: parsing, validation and JSON round trips."""

from __future__ import annotations

import pytest

from apt_viz import LayerOverride, PlanError, PruningPlan, Sparsity


@pytest.mark.parametrize("text,frac,n,m", [("0.5", 0.5, 0, 0), ("50%", 0.5, 0, 0), ("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8), (0.7, 0.7, 0, 0)])
def test_parse(text, frac, n, m):
    s = Sparsity.parse(text)
    assert (s.fraction, s.n, s.m) == (pytest.approx(frac), n, m)


@pytest.mark.parametrize("bad,fix", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), ("4:4", "N < M"), ("5:4", "N < M"), ("2:0", "M = 0"), ("half", "fraction like 0.5")])
def test_bad_sparsity_says_what_to_change(bad, fix):
    with pytest.raises(PlanError, match=fix):
        Sparsity.parse(bad)


def test_plan_json_round_trip():
    plan = PruningPlan(method="sparsegpt", sparsity=0.6, exclude=["*.down_proj"], refit=False, refit_dtype="float32",
                       overrides={"*.layers.0.*": LayerOverride(sparsity=0.3), "*.q_proj": LayerOverride(pattern="2:4")})
    back = PruningPlan.from_json(plan.to_json())
    assert back == plan
    assert back.layer_settings("model.layers.0.mlp.up_proj")[1].fraction == pytest.approx(0.3)
    assert back.layer_settings("model.layers.3.self_attn.q_proj")[1].pattern == "2:4"
    assert back.layer_settings("model.layers.0.self_attn.q_proj")[1].pattern == "2:4"
    assert not back.selects("model.layers.2.mlp.down_proj")
    assert back.refit is False and back.refit_dtype == "float32"
    # A plan written before the fields existed reads as the defaults: the re-fit on, its dtype chosen by the device.
    assert PruningPlan.from_dict({"method": "apt"}).refit is True
    assert PruningPlan.from_dict({"method": "apt"}).refit_dtype == "auto"


def test_method_label_names_apt_without_its_refit():
    assert PruningPlan(method="apt").method_label == "apt"
    assert PruningPlan(method="apt", refit=False).method_label == "apt (no re-fit)"
    assert PruningPlan(method="sparsegpt", refit=False).method_label == "sparsegpt"


@pytest.mark.parametrize("data,msg", [({"methd": "apt"}, "unknown keys"), ({"sparsity": "lots"}, "wrong type"),
                                      ({"method": "obs"}, "choose one of"), ({"blocksize": 0}, "positive integer"),
                                      ({"refit": "yes"}, "wrong type"), ({"refit": 1}, "wrong type"),
                                      ({"refit_dtype": "fp16"}, "refit_dtype must be one of 'auto', 'float32', 'bfloat16'"),
                                      ({"refit_dtype": 32}, "wrong type"),
                                      ({"overrides": {"x": {"sparsity": 2.0}}}, "override 'x'")])
def test_plan_schema_rejects_bad_json(data, msg):
    with pytest.raises(PlanError, match=msg):
        PruningPlan.from_dict(data)
