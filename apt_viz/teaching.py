"""A toy layer to show what OBS, SparseGPT and APT do to the weights that remain. Knows no model.

The layer-wise objective is ``||(W - W') X||^2`` with ``X`` the layer inputs (in x tokens). With the
Gram matrix ``H = X X^T`` it equals ``sum_rows (w - w') H (w - w')^T``, so every method here sees
only ``W`` and ``H``. (The runner uses ``H = 2/n X X^T``; the solvers are invariant to that scale.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import Sparsity
from .hessian import layer_error
from .solvers import SolverResult, sparsify_weight


def toy_layer(rows: int = 8, cols: int = 16, seed: int = 0, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``(W, X)``: weights ``rows x cols`` and correlated inputs ``cols x tokens`` (float32).

    The inputs mix their features and have uneven scales, like LLM activations, so that pruning
    one weight is best compensated by changing the others.
    """
    if rows < 1 or cols < 2:
        raise ValueError(f"a toy layer needs rows >= 1 and cols >= 2, got {rows} x {cols}")
    g = torch.Generator().manual_seed(seed)
    n = tokens or 8 * cols
    W = torch.randn(rows, cols, generator=g)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.exp(0.7 * torch.randn(cols, 1, generator=g))
    X = scale * (mix @ torch.randn(cols, n, generator=g))
    return W, X


def gram(X: torch.Tensor) -> torch.Tensor:
    """``H = X X^T`` for inputs ``X`` (in x tokens): ``||(W - W') X||^2 = tr(dW H dW^T)``."""
    X = X.to(torch.float32)
    return X @ X.t()


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """``||(W - W') X||^2`` computed from the inputs themselves."""
    return float((((W - W_new).to(torch.float64)) @ X.to(torch.float64)).pow(2).sum())


def _damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    H = H.to(torch.float64).clone()
    if percdamp:
        H.diagonal().add_(percdamp * float(H.diagonal().mean()))
    return H


def obs_one_at_a_time(
    W: torch.Tensor, H: torch.Tensor, k: int, *, nm: tuple[int, int] | None = None, percdamp: float = 0.0
) -> SolverResult:
    """Greedy OBS: in each row, remove ``k`` weights one at a time, re-inverting ``H`` over the rest each step.

    Each step removes the weight ``q`` with the smallest saliency ``w_q^2 / [Hinv]_qq`` and applies
    the OBS update ``dw = -w_q / [Hinv]_qq * Hinv[q, :]`` (``Hinv`` the inverse of ``H`` restricted to
    the weights still present), which costs ``w_q^2 / (2 [Hinv]_qq)``. ``loss`` sums those costs.
    ``nm=(n, m)`` only considers weights whose group of ``m`` columns has fewer than ``n`` removed
    (then ``k`` must be ``n * cols // m``).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight in_features {cols}")
    if not 0 <= k < cols:
        raise ValueError(f"k must be in [0, {cols}) weights per row, got {k}")
    if nm is not None:
        n, m = nm
        if cols % m or k != n * cols // m:
            raise ValueError(f"N:M {n}:{m} on {cols} columns removes {n * cols // m} weights per row (cols must be a multiple of m), got k={k}")
    group = torch.arange(cols) // (nm[1] if nm else cols)
    Hd = _damped(H, percdamp)
    out = W.to(torch.float64).clone()
    keep = torch.ones(rows, cols, dtype=torch.bool)
    loss = 0.0
    for r in range(rows):
        w = out[r]
        for _ in range(k):
            F = keep[r].nonzero().flatten()
            Hinv = torch.linalg.inv(Hd[F][:, F])  # recomputed on purpose: this is what SparseGPT avoids
            d = torch.diagonal(Hinv)
            sal = w[F] ** 2 / d
            if nm is not None:
                removed = torch.bincount(group[~keep[r]], minlength=int(group[-1]) + 1)
                sal = torch.where(removed[group[F]] < nm[0], sal, torch.inf)
            j = int(torch.argmin(sal))
            q = int(F[j])
            loss += 0.5 * float(sal[j])
            w[F] -= w[q] / d[j] * Hinv[j]
            w[q] = 0.0
            keep[r, q] = False
    return SolverResult(out.to(torch.float32), keep, loss, percdamp * float(H.diagonal().mean()) if percdamp else 0.0)


@dataclass
class MethodStep:
    """What one method did to the toy layer: new weights, mask (True = kept), update and errors."""

    method: str
    weight: torch.Tensor
    mask: torch.Tensor
    dw: torch.Tensor
    error: float  # tr(dW H dW^T) = ||(W - W') X||^2 with H = X X^T
    rel_error: float
    loss: float


def _step(method: str, W: torch.Tensor, H: torch.Tensor, res: SolverResult) -> MethodStep:
    Wn = res.weight.to(torch.float32)
    err, rel = layer_error(W, Wn, H)
    return MethodStep(method, Wn, res.mask.cpu(), Wn - W.to(torch.float32), err, rel, res.loss)


def obs_demo(W: torch.Tensor, H: torch.Tensor, k: int, *, nm: tuple[int, int] | None = None, percdamp: float = 0.01) -> MethodStep:
    """Greedy OBS with ``k`` weights removed per row (see :func:`obs_one_at_a_time`)."""
    return _step("OBS", W, H, obs_one_at_a_time(W, H, k, nm=nm, percdamp=percdamp))


def sparsegpt_demo(W: torch.Tensor, H: torch.Tensor, sparsity: float | str = 0.5, *, percdamp: float = 0.01) -> MethodStep:
    """SparseGPT (sequential, column by column) on the toy layer, with the real solver."""
    return _step("SparseGPT", W, H, sparsify_weight(W, H, sparsity, "sparsegpt", percdamp=percdamp))


def apt_demo(W: torch.Tensor, H: torch.Tensor, sparsity: float | str = 0.5, *, percdamp: float = 0.01) -> MethodStep:
    """APT (several weights of a row together, joint update and exact re-fit) with the real solver."""
    return _step("APT", W, H, sparsify_weight(W, H, sparsity, "apt", percdamp=percdamp))


@dataclass
class TeachingDemo:
    """The toy layer and what each method made of it (``steps`` in the order OBS, SparseGPT, APT)."""

    W: torch.Tensor
    X: torch.Tensor
    H: torch.Tensor
    sparsity: Sparsity
    steps: dict[str, MethodStep] = field(default_factory=dict)

    def errors(self) -> dict[str, float]:
        """``{method: ||(W - W') X||^2}``."""
        return {m: s.error for m, s in self.steps.items()}


def teaching_demo(
    rows: int = 8, cols: int = 16, sparsity: float | str = 0.5, *, seed: int = 0, percdamp: float = 0.01
) -> TeachingDemo:
    """Prune one toy layer with OBS (``sparsity * cols`` weights per row), SparseGPT and APT at the same sparsity.

    SparseGPT's and APT's unstructured masks are chosen over the whole layer (rows may differ in
    count); OBS removes the same number in every row. All three remove the same total. With an
    N:M ``sparsity`` all three obey the groups.
    """
    spec = Sparsity.parse(sparsity)
    W, X = toy_layer(rows, cols, seed)
    H = gram(X)
    k = spec.n * cols // spec.m if spec.structured else int(round(spec.fraction * cols))
    demo = TeachingDemo(W, X, H, spec)
    demo.steps["OBS"] = obs_demo(W, H, k, nm=(spec.n, spec.m) if spec.structured else None, percdamp=percdamp)
    demo.steps["SparseGPT"] = sparsegpt_demo(W, H, spec, percdamp=percdamp)
    demo.steps["APT"] = apt_demo(W, H, spec, percdamp=percdamp)
    return demo
