"""Property tests (hypothesis) on the layer solvers: random shapes, sparsities and N:M patterns.

Each property counts the cases it ran and prints the count past pytest's capture (and records it as a
junit property), so a note can quote it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apt_viz import METHODS, layer_error, sparsify_weight

CASES: Counter[str] = Counter()
# Fixed examples (derandomize) keep CI stable; database=None keeps no example database between runs.
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def random_layer(seed: int, rows: int, cols: int, tokens: int, dead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` and ``H = 2/n X X^T`` with unevenly scaled, correlated inputs; ``dead`` inputs never fire."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, tokens, generator=g) * (0.2 + 2 * torch.rand(cols, 1, generator=g))
    X += 0.5 * torch.randn(cols, 3, generator=g) @ torch.randn(3, tokens, generator=g)
    X[:dead] = 0
    W = torch.randn(rows, cols, generator=g)
    return W, 2 / tokens * X @ X.T


def check_common(W: torch.Tensor, H: torch.Tensor, res) -> None:
    assert res.weight.shape == W.shape and res.mask.shape == W.shape and res.mask.dtype == torch.bool
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[~res.mask] == 0)  # pruned means exactly zero
    err, rel = layer_error(W, res.weight, H)
    assert torch.isfinite(torch.tensor([err, rel, res.loss, res.damp])).all()
    assert err >= -1e-3 * max(1.0, abs(float(((W @ H) * W).sum())))


@st.composite
def nm_case(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 24))
    cols = m * draw(st.integers(1, 96 // m))
    return n, m, rows, cols


@settings(max_examples=40, **SETTINGS)
@given(case=nm_case(), method=st.sampled_from(METHODS), seed=st.integers(0, 2**16),
       token_ratio=st.sampled_from([0.5, 1, 4]), blocksize=st.sampled_from([8, 32, 128]))
def nm_masks_are_exact(case, method, seed, token_ratio, blocksize):
    n, m, rows, cols = case
    CASES["nm"] += 1
    W, H = random_layer(seed, rows, cols, max(2, int(cols * token_ratio)))
    res = sparsify_weight(W, H, f"{n}:{m}", method, blocksize=blocksize)
    check_common(W, H, res)
    assert torch.all((~res.mask).reshape(rows, cols // m, m).sum(-1) == n)


@settings(max_examples=40, **SETTINGS)
@given(rows=st.integers(1, 24), cols=st.integers(2, 96), frac=st.floats(0.0, 0.95), method=st.sampled_from(METHODS),
       seed=st.integers(0, 2**16), token_ratio=st.sampled_from([0.5, 1, 4]), dead=st.integers(0, 2),
       blocksize=st.sampled_from([8, 32, 128]))
# Few rows and several column blocks: rounding each block's count on its own drifts from the target.
@example(rows=1, cols=17, frac=0.0625, method="sparsegpt", seed=0, token_ratio=1, dead=0, blocksize=8)
@example(rows=1, cols=17, frac=0.0625, method="apt", seed=0, token_ratio=1, dead=0, blocksize=8)
def unstructured_sparsity_within_one_over_in(rows, cols, frac, method, seed, token_ratio, dead, blocksize):
    CASES["unstructured"] += 1
    W, H = random_layer(seed, rows, cols, max(2, int(cols * token_ratio)), dead=min(dead, cols - 1))
    res = sparsify_weight(W, H, frac, method, blocksize=blocksize)
    check_common(W, H, res)
    reached = float((~res.mask).float().mean())
    assert abs(reached - frac) <= 1 / cols


@settings(max_examples=25, **SETTINGS)
@given(rows=st.integers(4, 32), cols=st.sampled_from([16, 24, 32, 48]),
       spec=st.sampled_from(["0.3", "0.5", "0.7", "2:4", "4:8", "1:4"]), seed=st.integers(0, 2**16))
def apt_error_at_most_sparsegpt(rows, cols, spec, seed):
    CASES["apt<=sparsegpt"] += 1
    W, H = random_layer(seed, rows, cols, 8 * cols)
    e_apt = layer_error(W, sparsify_weight(W, H, spec, "apt").weight, H)[0]
    e_sgpt = layer_error(W, sparsify_weight(W, H, spec, "sparsegpt").weight, H)[0]
    assert e_apt <= e_sgpt * (1 + 1e-5)  # float32 rounding only



def run_property(prop, key: str, minimum: int, capsys: pytest.CaptureFixture, record_property) -> None:
    """Run a hypothesis property, report how many cases it tried, and check none were silently filtered away."""
    before = CASES[key]
    try:
        prop()
    finally:
        tried = CASES[key] - before
        record_property("hypothesis_cases", tried)
        with capsys.disabled():
            print(f"\n[hypothesis] {key}: {tried} cases tried")
    assert tried >= minimum, CASES


def test_nm_masks_are_exact(capsys, record_property):
    """Every group of M consecutive inputs of every row loses exactly N weights, even for rank-deficient H."""
    run_property(nm_masks_are_exact, "nm", 20, capsys, record_property)


def test_unstructured_sparsity_within_one_over_in(capsys, record_property):
    """The pruned fraction is the target within 1/in, with dead inputs and rank-deficient H included."""
    run_property(unstructured_sparsity_within_one_over_in, "unstructured", 20, capsys, record_property)


def test_apt_error_at_most_sparsegpt_when_well_conditioned(capsys, record_property):
    """APT's joint updates plus exact re-fit do no worse than SparseGPT when H is well conditioned (n >= 8 in)."""
    run_property(apt_error_at_most_sparsegpt, "apt<=sparsegpt", 15, capsys, record_property)
