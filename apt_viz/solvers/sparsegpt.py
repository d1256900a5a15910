"""SparseGPT (Frantar & Alistarh, 2023): column-blocked sequential OBS.

Columns are visited left to right. Each pruned weight's error is spread over the not yet visited
columns of its row through the inverse of the trailing Hessian, which the rows of ``U`` (the upper
Cholesky factor of ``H^-1``) give without re-inverting. Updates inside a block are applied at once;
the block's accumulated error ``Err1`` reaches the later columns in one matmul ("lazy batch").
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from ..hessian import inverse_factor, prepare
from .masks import block_count, check_shape, lowest, lowest_per_row
from .result import SolverResult


def prune_sparsegpt(
    W: torch.Tensor, H: torch.Tensor, spec: Sparsity, *, blocksize: int = 128, percdamp: float = 0.01
) -> SolverResult:
    """Prune ``W`` (out x in) against ``H`` with SparseGPT; returns the updated weight and mask."""
    check_shape(W, H, spec)
    W, H, damp = prepare(W, H, percdamp)
    Hinv, extra = inverse_factor(H)
    rows, cols = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        # The factor is column-major; a row-major copy of the block keeps the row reads below
        # contiguous, which makes the column loop several times faster on CPU.
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        d = torch.diag(Hinv1)
        if spec.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = lowest(W1**2 / d**2, block_count(rows, i1, i2, spec.fraction))

        for i in range(i2 - i1):
            if spec.structured and i % spec.m == 0:
                group = W1[:, i : i + spec.m] ** 2 / d[i : i + spec.m] ** 2
                mask1[:, i : i + spec.m] = lowest_per_row(group, spec.n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err1 = (w - q) / d[i]
            loss += err1**2 / 2
            W1[:, i:].addcmul_(err1[:, None], Hinv1[i, i:], value=-1.0)
            W1[:, i] = q
            Err1[:, i] = err1

        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return SolverResult(W, ~pruned, float(loss.sum()), damp + extra)
