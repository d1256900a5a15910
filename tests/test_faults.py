"""Fault injection: failures mid-run never lose the dense weights; numerical trouble stops or is repaired."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import apt_viz.runner as runner
import apt_viz.solvers as solvers
from apt_viz import HessianCache, NumericalError, Pruner, PruningPlan
from apt_viz.arch import get_weight
from conftest import VOCAB

CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
BLOCK0 = 7  # linears in a Llama block: q, k, v, o, gate, up, down


def small_llama(seed: int = 0) -> nn.Module:
    """A two-block Llama half the width of conftest's, to keep these many runs fast."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return tf.LlamaForCausalLM(cfg).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in now.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


class Boom(Exception):
    pass


# --------------------------------------------------------------------------- nothing lost


def test_exception_inside_a_solver_then_exact_restore(monkeypatch, device):
    model = small_llama()
    dense = snapshot(model)
    real = solvers.SOLVERS["sparsegpt"]
    calls = {"n": 0}

    def failing(W, H, spec, **kw):
        calls["n"] += 1
        res = real(W, H, spec, **kw)  # the solver has done its work when it fails
        if calls["n"] == BLOCK0 + 3:
            raise Boom("solver failed")
        return res

    monkeypatch.setitem(solvers.SOLVERS, "sparsegpt", failing)
    p = Pruner(model, device=device)
    with pytest.raises(Boom):
        p.run(CALIB, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert len(p.results) == BLOCK0 + 2
    assert len(changed(model, dense)) == BLOCK0 + 2
    p.restore()
    assert_bit_identical(model, dense)
    assert not p.results and not p.masks and not p.pruned


def test_keyboard_interrupt_in_the_middle_of_a_block_then_exact_restore(device):
    model = small_llama()
    dense = snapshot(model)
    p = Pruner(model, device=device)
    fired = []

    def interrupt(mod, inp):
        # Ctrl-C during a forward pass of block 1, once its attention linears are already pruned: as
        # the forward that gathers down_proj's input reaches it (that forward never runs its product).
        if "model.layers.1.self_attn.o_proj" in p.results:
            fired.append(True)
            raise KeyboardInterrupt

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        p.run(CALIB, PruningPlan(method="wanda", sparsity=0.5, sequential=True), progress=False)
    assert fired
    assert {r.block for r in p.results.values()} == {0, 1}
    assert "model.layers.1.mlp.down_proj" not in p.results
    assert model.training is False
    p.restore()
    assert_bit_identical(model, dense)


def test_cancel_through_should_stop_mid_block_then_exact_restore(device):
    model = small_llama()
    dense = snapshot(model)
    p = Pruner(model, device=device)
    stop_after = BLOCK0 + 2
    out = p.run(CALIB, PruningPlan(method="magnitude", sparsity=0.5), progress=False,
                should_stop=lambda: len(p.results) >= stop_after)
    assert len(out) == stop_after and len(changed(model, dense)) == stop_after
    p.restore()
    assert_bit_identical(model, dense)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights_stops_before_any_change(value):
    model = small_llama()
    bad = "model.layers.1.mlp.up_proj"
    model.get_submodule(bad).weight.data[3, 5] = value
    dense = snapshot(model)
    p = Pruner(model)
    with pytest.raises(NumericalError, match=rf"block 1, layer {bad}: NaN or Inf in the weights.*dense weights left untouched"):
        p.run(CALIB, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert not p.pruned and not p.results
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), dense[k].nan_to_num()), k


def _nan_after(module_path: str, value: float):
    def hook(mod, inp, out):
        out = out.clone()
        out[..., 0, 3] = value
        return out

    return module_path, hook


@pytest.mark.parametrize("where,value,block,layer", [
    ("model.embed_tokens", float("inf"), 0, "model.layers.0.self_attn.q_proj"),
    ("model.layers.1.post_attention_layernorm", float("nan"), 1, "model.layers.1.mlp.gate_proj"),
], ids=["inf-embeddings", "nan-mid-block-1"])
def test_nan_or_inf_in_activations_stops_and_keeps_dense(where, value, block, layer):
    model = small_llama()
    dense = snapshot(model)
    path, hook = _nan_after(where, value)
    model.get_submodule(path).register_forward_hook(hook)
    p = Pruner(model)
    with pytest.raises(NumericalError, match=rf"block {block}, layer {layer}: NaN or Inf in the calibration inputs"):
        p.run(CALIB, PruningPlan(method="wanda", sparsity=0.5), progress=False)
    # Block 0 and block 1's attention were pruned before the NaN showed up; the run put them back itself.
    assert not p.pruned and not p.results and not p.masks
    assert_bit_identical(model, dense)


# --------------------------------------------------------------------------- Hessian repair


class ShiftedCache(HessianCache):
    """Hands out ``H - shift * mean(diag H) * I`` for one layer: an indefinite Hessian."""

    def __init__(self, layer: str, shift: float) -> None:
        super().__init__()
        self.layer, self.shift = layer, shift

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        H = super().get(name, device)
        if name == self.layer:
            H = H - self.shift * float(H.diagonal().mean()) * torch.eye(H.shape[0], device=H.device)
        return H


@pytest.mark.parametrize("method", ["sparsegpt", "apt"])
def test_non_pd_hessian_is_retried_with_stronger_damping_and_recorded(method):
    layer = "model.layers.0.self_attn.o_proj"
    cache = ShiftedCache(layer, 0.05)
    model = small_llama()
    p = Pruner(model, hessians=cache)
    percdamp = 0.01
    p.run(CALIB, PruningPlan(method=method, sparsity=0.5, percdamp=percdamp, include=["model.layers.0.*"]), progress=False)
    H = cache.get(layer)
    assert torch.linalg.eigvalsh(H.double()).min() < -0.01 * H.diagonal().mean()  # percdamp alone cannot fix it
    base = percdamp * float(H.diagonal().mean())
    r = p.results[layer]
    assert r.damp > 2 * base  # retried with more damping, and the damping used is on the record
    assert torch.isfinite(get_weight(p.layers[layer])).all() and abs(r.sparsity - 0.5) <= 1 / r.shape[1]
    for name, other in p.results.items():
        if name != layer:  # healthy layers keep the plain percdamp damping
            assert other.damp == pytest.approx(percdamp * float(cache.get(name).diagonal().mean()), rel=1e-5)


def test_hessian_no_damping_repairs_stops_and_keeps_dense():
    layer = "model.layers.1.self_attn.v_proj"
    model = small_llama()
    dense = snapshot(model)
    p = Pruner(model, hessians=ShiftedCache(layer, 1e7))
    with pytest.raises(NumericalError, match=rf"block 1, layer {layer}: the Hessian is not positive definite.*check the calibration inputs"):
        p.run(CALIB, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert not p.pruned
    assert_bit_identical(model, dense)


def test_dead_input_columns_are_pruned_not_fatal():
    """A column no calibration token activates (OPT's ReLU makes many) is zeroed, as SparseGPT does."""
    layer = "model.layers.0.mlp.down_proj"

    class DeadCache(HessianCache):
        def get(self, name, device="cpu"):
            H = super().get(name, device).clone()
            if name == layer:
                H[:, 7] = 0
                H[7, :] = 0
            return H

    p = Pruner(small_llama(), hessians=DeadCache())
    p.run(CALIB, PruningPlan(method="apt", sparsity=0.5, include=[layer]), progress=False)
    W = get_weight(p.layers[layer])
    assert torch.isfinite(W).all() and torch.all(W[:, 7] == 0)
    assert abs(p.results[layer].sparsity - 0.5) <= 1 / W.shape[1]


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype,method", [(torch.bfloat16, "apt"), (torch.float16, "sparsegpt"), (torch.bfloat16, "wanda")])
def test_half_precision_models_solve_in_float32_and_restore_exactly(dtype, method, monkeypatch, device):
    model = small_llama().to(dtype)
    dense = snapshot(model)
    seen = []
    real = runner.sparsify_weight

    def spy(W, H, spec, m, **kw):
        seen.append((W.dtype, H.dtype))
        return real(W, H, spec, m, **kw)

    monkeypatch.setattr(runner, "sparsify_weight", spy)
    p = Pruner(model, device=device)
    p.run(CALIB, PruningPlan(method=method, pattern="2:4", include=["model.layers.0.*"]), progress=False)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    for name, r in p.results.items():
        assert p.hessians.get(name).dtype == torch.float32
        W = get_weight(p.layers[name])
        assert W.dtype == dtype and torch.isfinite(W).all()
        assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2)
        assert torch.equal(p.masks[name], W != 0)
        assert 0 < r.rel_error < 1
    p.restore()
    assert_bit_identical(model, dense)
