"""Wanda: score |W_ij| * ||X_j||, compared within each output row, no update."""

from __future__ import annotations

import torch

from ..config import Sparsity
from .magnitude import _apply
from .masks import by_score, check_shape
from .result import SolverResult


def prune_wanda(W: torch.Tensor, H: torch.Tensor, spec: Sparsity) -> SolverResult:
    """Prune the lowest ``|W| * ||X_j||`` in each row (or N:M group).

    ``diag(H) = 2/n ||X_j||^2``; the constant factor does not change a per-row ranking.
    """
    check_shape(W, H, spec)
    W = W.to(torch.float32)
    norms = torch.diag(H).to(torch.float32).clamp_min(0).sqrt()
    pruned = by_score(W.abs() * norms, spec, per_row=True)
    return _apply(W, H, pruned)
