"""The teaching demo: OBS, SparseGPT and APT on a toy layer, checked against the closed forms."""

from __future__ import annotations

import pytest
import torch

from apt_viz.teaching import (
    apt_demo, gram, obs_one_at_a_time, reconstruction_error, sparsegpt_demo, teaching_demo, toy_layer,
)


def test_toy_layer_is_seeded():
    W, X = toy_layer(8, 16, seed=3)
    assert W.shape == (8, 16) and X.shape == (16, 128)
    W2, X2 = toy_layer(8, 16, seed=3)
    assert torch.equal(W, W2) and torch.equal(X, X2)
    assert not torch.equal(W, toy_layer(8, 16, seed=4)[0])


def test_obs_one_weight_is_the_closed_form():
    W, X = toy_layer(6, 10, seed=1)
    H = gram(X).double()
    res = obs_one_at_a_time(W, H, 1)
    Hinv = torch.linalg.inv(H)
    d = torch.diagonal(Hinv)
    Wd = W.double()
    q = torch.argmin(Wd**2 / d, dim=1)
    expected = Wd - (Wd[torch.arange(6), q] / d[q])[:, None] * Hinv[q]
    assert torch.allclose(res.weight.double(), expected, atol=1e-5)
    assert (res.weight[torch.arange(6), q] == 0).all()
    assert torch.equal(~res.mask, torch.nn.functional.one_hot(q, 10).bool())
    loss = float((Wd[torch.arange(6), q] ** 2 / (2 * d[q])).sum())
    assert res.loss == pytest.approx(loss, rel=1e-9)
    # the loss is exactly half the error it causes
    D = res.weight.double() - Wd
    assert float(((D @ H) * D).sum()) == pytest.approx(2 * loss, rel=1e-5)


def test_greedy_obs_leaves_the_least_squares_optimum_on_its_mask():
    W, X = toy_layer(5, 12, seed=2)
    H = gram(X).double()
    res = obs_one_at_a_time(W, H, 6)
    assert ((~res.mask).sum(1) == 6).all()
    for r in range(5):
        K = res.mask[r].nonzero().flatten()
        w = W[r].double()
        best = torch.zeros(12, dtype=torch.float64)
        best[K] = torch.linalg.solve(H[K][:, K], (w @ H)[K])  # w'_K = (w H)_K H_KK^-1
        assert torch.allclose(res.weight[r].double(), best, atol=1e-4)


def test_obs_obeys_nm_groups():
    W, X = toy_layer(4, 16, seed=0)
    res = obs_one_at_a_time(W, gram(X), 8, nm=(2, 4))
    assert ((~res.mask).reshape(4, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="removes 8"):
        obs_one_at_a_time(W, gram(X), 6, nm=(2, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_apt_error_is_at_most_sparsegpt(seed, sparsity):
    W, X = toy_layer(8, 16, seed=seed)
    H = gram(X)
    apt, sgpt = apt_demo(W, H, sparsity), sparsegpt_demo(W, H, sparsity)
    assert int((~apt.mask).sum()) == int((~sgpt.mask).sum()) == 64
    assert apt.error <= sgpt.error


def test_demo_errors_from_h_equal_errors_from_x():
    demo = teaching_demo(8, 16, 0.5, seed=0)
    assert list(demo.steps) == ["OBS", "SparseGPT", "APT"]
    for step in demo.steps.values():
        assert step.error == pytest.approx(reconstruction_error(demo.W, step.weight, demo.X), rel=1e-4)
        assert step.rel_error == pytest.approx(step.error / float(((demo.W @ demo.X) ** 2).sum()), rel=1e-4)
        assert torch.equal(step.dw, step.weight - demo.W)
        assert (step.weight[~step.mask] == 0).all() and int((~step.mask).sum()) == 64
        assert step.dw[step.mask].abs().max() > 0  # the kept weights were updated, not just masked
    assert demo.errors()["APT"] <= demo.errors()["SparseGPT"]
