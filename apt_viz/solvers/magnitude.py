"""Magnitude pruning: drop the smallest |W| (per matrix, or per N:M group), no update."""

from __future__ import annotations

import torch

from ..config import Sparsity
from .masks import by_score, check_shape
from .result import SolverResult


def prune_magnitude(W: torch.Tensor, H: torch.Tensor, spec: Sparsity) -> SolverResult:
    """Prune by a per-matrix magnitude threshold, as the SparseGPT and Wanda papers define it."""
    check_shape(W, H, spec)
    W = W.to(torch.float32)
    pruned = by_score(W.abs(), spec, per_row=False)
    return _apply(W, H, pruned)


def _apply(W: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor) -> SolverResult:
    new = W.masked_fill(pruned, 0.0)
    D = new - W
    return SolverResult(new, ~pruned, 0.5 * float(((D @ H.to(torch.float32)) * D).sum()))
