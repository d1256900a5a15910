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
    """Mask of the ``k`` smallest entries of ``score`` over the whole tensor (ties: lowest index first).

    Float32 scores go through a two-pass radix select on their bits, 2.4-3.7x faster on CPU than
    ``torch.kthvalue`` over a block of weights (which SparseGPT and APT select in every block).
    NaN scores are not supported.
    """
    flat = score.flatten()
    if k <= 0 or k >= flat.numel():
        return torch.full_like(score, k > 0, dtype=torch.bool)
    if flat.dtype != torch.float32:
        return _lowest_kthvalue(flat, k).view_as(score)
    # Adding +0.0 turns -0.0 into +0.0, which the bit order below would put first.
    bits = (flat + 0.0).view(torch.int32)
    # Flipping a negative float's magnitude bits makes the int32 order the float order.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    high = (key >> 16) + 32768
    cum = torch.cumsum(torch.bincount(high, minlength=1 << 16), 0)
    # The k-th smallest lies in the first bin of the high 16 bits whose running count reaches k.
    b = int((cum < k).sum())
    need = k - (int(cum[b - 1]) if b else 0)
    mask = high < b
    inside = torch.nonzero(high == b).squeeze(1)
    low = key[inside] & 0xFFFF
    lcum = torch.cumsum(torch.bincount(low, minlength=1 << 16), 0)
    lb = int((lcum < need).sum())
    mask[inside[low < lb]] = True
    # Ties at the k-th value: the lowest indices first, as ``inside`` is in increasing order.
    mask[inside[low == lb][: need - (int(lcum[lb - 1]) if lb else 0)]] = True
    return mask.view_as(score)


def _lowest_kthvalue(flat: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`lowest` of a flat tensor of any dtype, by a k-th value threshold."""
    kth = torch.kthvalue(flat, k).values
    mask = flat < kth
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == kth).squeeze(1)[:need]] = True
    return mask


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
