"""Mask selection helpers shared by the solvers. A mask here is True where a weight is pruned."""

from __future__ import annotations

import torch

from ..config import PlanError, Sparsity


def check_shape(W: torch.Tensor, H: torch.Tensor, spec: Sparsity) -> None:
    """Raise a clear error if ``W``, ``H`` and ``spec`` do not fit together."""
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(W.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight in_features {W.shape[1]}")
    if spec.structured and W.shape[1] % spec.m:
        raise PlanError(
            f"N:M {spec.pattern} needs the layer's input width to be a multiple of {spec.m}, got {W.shape[1]}; "
            "exclude this layer from the plan or choose another M"
        )


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest entries of ``score`` over the whole tensor (ties: lowest index first)."""
    flat = score.flatten()
    if k <= 0 or k >= flat.numel():
        return torch.full_like(score, k > 0, dtype=torch.bool)
    # A k-th value threshold is 4-5x faster on CPU than topk over half a block of weights.
    kth = torch.kthvalue(flat, k).values
    mask = flat < kth
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == kth).squeeze(1)[:need]] = True
    return mask.view_as(score)


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest entries of each row of ``score``."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def lowest_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the ``n`` smallest entries in every group of ``m`` consecutive columns."""
    rows, cols = score.shape
    return lowest_per_row(score.reshape(rows * cols // m, m), n).reshape(rows, cols)


def by_score(score: torch.Tensor, spec: Sparsity, per_row: bool) -> torch.Tensor:
    """Prune the lowest scores: per N:M group, per row, or over the whole matrix."""
    if spec.structured:
        return lowest_nm(score, spec.n, spec.m)
    if per_row:
        return lowest_per_row(score, int(score.shape[1] * spec.fraction))
    return lowest(score, int(round(score.numel() * spec.fraction)))


def block_count(rows: int, i1: int, i2: int, fraction: float) -> int:
    """Weights to prune in columns ``[i1, i2)``: differences of cumulative counts, so the blocks'
    rounding errors cancel and the whole matrix reaches the target to within one weight."""
    return int(round(rows * i2 * fraction)) - int(round(rows * i1 * fraction))
