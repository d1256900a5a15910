"""The block runner on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from apt_viz import ArchitectureError, PlanError, Pruner, PruningPlan, prunable_layers
from apt_viz.arch import block_index, find_blocks, get_weight, input_source
from apt_viz.capture import move_outside_blocks, restore_devices
from apt_viz.checks import check_device
from apt_viz.hessian import accumulate_hessian
from conftest import ARCHS, VOCAB, tiny_model

PROBE = torch.arange(24).remainder(VOCAB)[None]


def logits(model):
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sequential", [False, True])
def test_full_prune_then_restore_is_exact(arch, sequential, calib, device):
    model = tiny_model(arch).to(device)
    dense = logits(model.cpu()).clone()
    model.to(device)
    pruner = Pruner(model, device=device)
    pruner.run(calib, PruningPlan(method="apt", sparsity=0.5, sequential=sequential), progress=False)
    model.cpu()
    out = logits(model)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, dense)
    assert set(pruner.results) == set(pruner.layer_names)
    for r in pruner.results.values():
        assert abs(r.sparsity - 0.5) <= 1 / r.shape[1]
        assert 0 < r.rel_error < 1
        assert torch.equal(pruner.masks[r.name], get_weight(pruner.layers[r.name]).cpu() != 0)
    pruner.restore()
    assert torch.equal(logits(model), dense)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "apt"])
def test_nm_on_a_model_and_untouched_layers(method, calib):
    model = tiny_model("llama")
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    plan = PruningPlan(method=method, pattern="2:4", sparsity=0.5, exclude=["*.mlp.*"])
    pruner = Pruner(model)
    pruner.run(calib, plan, progress=False)
    for name, module in prunable_layers(model).items():
        W = module.weight.detach()
        if ".mlp." in name:
            assert torch.equal(W, before[name])
        else:
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2)


def test_sparsity_zero_changes_nothing(calib):
    model = tiny_model("llama")
    dense = logits(model).clone()
    Pruner(model).run(calib, PruningPlan(method="apt", sparsity=0.0), progress=False)
    assert torch.equal(logits(model), dense)


def test_apt_layer_error_at_most_sparsegpt_on_model(calib):
    errs = {}
    for method in ("sparsegpt", "apt"):
        model = tiny_model("llama")
        p = Pruner(model)
        p.run(calib, PruningPlan(method=method, sparsity=0.5, include=["model.layers.0.*"]), progress=False)
        errs[method] = {n: r.error for n, r in p.results.items()}
    for name in errs["apt"]:
        assert errs["apt"][name] <= errs["sparsegpt"][name] * (1 + 1e-5)


def test_plan_without_refit_runs_the_paper_form_and_the_refit_lowers_every_error(calib):
    from apt_viz import sparsify_weight

    errs, weights = {}, {}
    for refit in (True, False):
        model = tiny_model("llama")
        dense = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
        p = Pruner(model)
        p.run(calib, PruningPlan(method="apt", sparsity=0.5, include=["model.layers.0.*"], refit=refit), progress=False)
        errs[refit] = {n: r.error for n, r in p.results.items()}
        weights[refit] = {n: get_weight(p.layers[n]).detach().clone() for n in p.results}
    name = "model.layers.0.self_attn.q_proj"  # block 0 sees the dense model's inputs in both runs
    H = p.hessians.get(name, "cpu")
    want = sparsify_weight(dense[name], H, 0.5, "apt", final_refit=False).weight
    assert torch.equal(weights[False][name], want)
    for name in errs[True]:
        assert errs[True][name] < errs[False][name]


def test_plan_refit_dtype_reaches_the_solver(calib):
    """The plan's re-fit dtype is the one the solver runs: each run's weights are sparsify_weight's for that dtype."""
    from apt_viz import sparsify_weight

    name = "model.layers.0.self_attn.q_proj"  # block 0 sees the dense model's inputs in every run
    got = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model("llama")
        dense = prunable_layers(model)[name].weight.detach().clone()
        p = Pruner(model)
        p.run(calib, PruningPlan(method="apt", sparsity=0.5, include=["model.layers.0.*"], refit_dtype=dtype), progress=False)
        got[dtype] = get_weight(p.layers[name]).detach().clone()
        want = sparsify_weight(dense, p.hessians.get(name, "cpu"), 0.5, "apt", refit_dtype=dtype).weight
        assert torch.equal(got[dtype], want)
    assert not torch.equal(got["float32"], got["bfloat16"])


def test_sequential_groups_follow_the_data_flow(calib):
    model = tiny_model("llama")
    p = Pruner(model)
    block = p.blocks[0]
    names = [n for n in p.layer_names if n.startswith("model.layers.0.")]
    inps, extra = p._capture(calib[:1])
    groups, once = p._groups(block, {n: p.layers[n] for n in names}, inps[0], extra[0])
    short = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert {block.self_attn, block.mlp, block.mlp.down_proj} <= once


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_groups_inside_one_submodule_run_it_alone_with_the_same_weights(arch, calib, monkeypatch):
    import apt_viz.runner as runner_module

    weights, attention_calls = {}, {}
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(runner_module, "shared_parent", lambda names: "")
        model = tiny_model(arch)
        p = Pruner(model)
        block = p.blocks[0]
        attention = next(m for n, m in block.named_children() if n in ("self_attn", "attn", "mixer"))
        calls = []
        attention.register_forward_pre_hook(lambda mod, args: calls.append(1))
        p.run(calib, PruningPlan(method="sparsegpt", sparsity=0.5, sequential=True), progress=False)
        weights[shortcut] = {n: get_weight(m).clone() for n, m in p.layers.items()}
        attention_calls[shortcut] = len(calls)
    for n in weights[False]:
        assert torch.equal(weights[True][n], weights[False][n]), n
    if arch in ("llama", "gemma3", "gpt2"):
        # The MLP's last group runs the MLP alone: one attention call fewer per sample.
        assert attention_calls[True] == attention_calls[False] - len(calib)


@pytest.mark.parametrize("arch", ARCHS)
def test_hessian_forwards_stop_before_the_last_layers_product_with_the_same_hessians(arch, calib):
    model = tiny_model(arch)
    p = Pruner(model)
    block = p.blocks[0]
    names = [n for n in p.layer_names if block_index(n) == 0]
    inps, extra = p._capture(calib[:3])
    # The reference: every layer's input from whole forwards of the block.
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ran: list[str] = []
    inputs = p._input_hooks({n: p.layers[n] for n in names}, lambda n, x: seen[n].append(x.detach().clone()))
    calls = [p.layers[n].register_forward_hook(lambda mod, inp, out, n=n: ran.append(n)) for n in names]
    with torch.no_grad():
        for x in inps:
            block(x, *extra[0][0], **extra[0][1])
    for h in inputs:
        h.remove()
    last = ran[-1]
    ran.clear()
    with torch.no_grad():
        p._accumulate(block, {n: p.layers[n] for n in names}, inps, extra[0])
    for h in calls:
        h.remove()
    assert last not in ran, f"{last}'s product ran in a forward that only gathers inputs"
    # Every other layer that the block calls ran once per sample (Mamba's dt_proj is never called).
    assert sorted(ran) == sorted(n for n in names for _ in inps if n != last and input_source(model, n)[2])
    for n in names:
        want, count = None, 0
        for x in seen[n]:
            want, count = accumulate_hessian(want, count, x)
        torch.testing.assert_close(p.hessians.get(n, "cpu"), want, rtol=1e-5, atol=1e-6)


def test_reprune_uses_cached_hessian_and_changes_one_layer(calib):
    model = tiny_model("llama")
    p = Pruner(model)
    p.run(calib, PruningPlan(method="apt", sparsity=0.5), progress=False)
    others = {n: m.weight.detach().clone() for n, m in p.layers.items()}
    name = "model.layers.1.mlp.down_proj"
    r = p.reprune(name, 0.8)
    assert abs(r.sparsity - 0.8) <= 1 / r.shape[1]
    for n, m in p.layers.items():
        if n != name:
            assert torch.equal(m.weight.detach(), others[n])
    assert p.plan.layer_settings(name)[1].fraction == pytest.approx(0.8)
    p.restore()
    assert torch.equal(logits(model), logits(tiny_model("llama")))


class Boom(Exception):
    pass


@pytest.mark.parametrize("fault", [Boom, KeyboardInterrupt])
def test_restore_after_a_fault_mid_run(fault, calib, monkeypatch):
    model = tiny_model("llama")
    dense = logits(model).clone()
    p = Pruner(model)
    import apt_viz.runner as runner

    real = runner.sparsify_weight
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # inside block 1, after block 0 was pruned
            raise fault()
        return real(*a, **k)

    monkeypatch.setattr(runner, "sparsify_weight", flaky)
    with pytest.raises(fault):
        p.run(calib, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert p.pruned
    p.restore()
    assert torch.equal(logits(model), dense)


def test_should_stop_ends_early_and_restores(calib):
    model = tiny_model("llama")
    dense = logits(model).clone()
    p = Pruner(model)
    p.run(calib, PruningPlan(method="wanda", sparsity=0.5), progress=False, should_stop=lambda: len(p.results) >= 3)
    assert len(p.results) == 3
    p.restore()
    assert torch.equal(logits(model), dense)


def test_progress_callback_counts_blocks(calib):
    seen = []
    Pruner(tiny_model("llama")).run(calib, PruningPlan(method="magnitude"), progress=False, callback=lambda d, t, m: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


def test_plan_pattern_matching_nothing_names_nearest(calib):
    p = Pruner(tiny_model("llama"))
    with pytest.raises(PlanError, match="nearest names"):
        p.run(calib, PruningPlan(include=["model.layer.0.self_attn.q_pro"]), progress=False)


def test_unknown_architecture_is_named():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.ReLU())
    with pytest.raises(ArchitectureError, match="found no decoder blocks in Sequential"):
        Pruner(model)


def test_reprune_does_not_change_the_callers_plan(calib):
    model = tiny_model("llama")
    plan = PruningPlan(method="wanda", sparsity=0.5)
    pruner = Pruner(model)
    pruner.run(calib, plan, progress=False)
    pruner.reprune("model.layers.0.mlp.up_proj", 0.75)
    assert plan.overrides == {} and "model.layers.0.mlp.up_proj" in pruner.plan.overrides


def test_the_device_is_named_as_its_tensors_name_it(device):
    # torch.device("cuda") != torch.device("cuda:0"), which is what a CUDA tensor reports.
    assert check_device(device) == torch.empty(0, device=device).device
    assert check_device(str(device)) == torch.empty(0, device=device).device


def test_a_model_left_on_the_cpu_is_whole_on_the_cpu_after_pruning_on_the_device(calib, device):
    """The capture moves what lies outside the blocks (embeddings, the tied head) to the device and back."""
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    pruner = Pruner(model, device=device)
    pruner.run(calib, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {torch.device("cpu")}
    assert torch.isfinite(logits(model)).all()


def test_a_tied_weight_is_moved_and_recorded_once():
    model = tiny_model("gpt2")
    prefix, _ = find_blocks(model)
    # "cpu:0" never equals a tensor's device ("cpu"), as "cuda" never equals "cuda:0": everything
    # outside the blocks is moved, and the head shares the embedding's Parameter.
    moved = move_outside_blocks(model, prefix, torch.device("cpu", 0))
    params = [getattr(m, s)[k] for m, s, k, _ in moved if s == "_parameters"]
    assert len(params) == len({id(p) for p in params})
    assert any(p is model.lm_head.weight for p in params)
    restore_devices(moved)
    assert torch.isfinite(logits(model)).all()
