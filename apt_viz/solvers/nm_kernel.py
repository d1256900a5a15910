"""APT's N:M mask selection on CPU: a block's groups of ``m`` columns in one compiled loop (numba).

Each group picks, for every row, the N-subset of its ``m`` columns with the smallest joint loss,
removes it with its joint update and passes the update on to the block's later columns. The groups
run in order, since each sees the updates of those before it. In torch a group takes about ten
small ops over all rows (a batched product per subset, the minimum, the gathers, the update), and
on SmolLM2's layers those ops' overhead was most of the selection's time. Here the block is held
transposed, columns x rows, so that every step is a loop over a contiguous row of the block and
vectorizes; one call handles a whole block.

The loop runs on one thread: as a numba parallel loop it took 4-6 s to compile on first use, where
this one takes about 1.5 s (half a second once numba has compiled anything else in the process).
It is not cached on disk (see :mod:`.joint_kernel`). GPUs keep the torch loop.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit
def _prune_groups(Wt, U, Q, R, subsets, chosen, At, maskt):  # pragma: no cover - compiled
    blk, rows = Wt.shape
    groups, S, m, n = R.shape
    loss = np.empty(rows, np.float32)
    low = np.empty(rows, np.float32)
    best = np.zeros(rows, np.int64)
    for g in range(groups):
        c = g * m
        # Each subset's loss w_S Q w_S^T per row, over the upper triangle of the symmetric Q.
        for s in range(S):
            loss[:] = 0.0
            for i in range(n):
                wi = Wt[c + subsets[s, i]]
                for j in range(i, n):
                    q = Q[g, s, i, j] if i == j else np.float32(2.0) * Q[g, s, i, j]
                    wj = Wt[c + subsets[s, j]]
                    for r in range(rows):
                        loss[r] += wi[r] * q * wj[r]
            # The first minimum, as torch's min over the subsets picks.
            for r in range(rows):
                if s == 0 or loss[r] < low[r]:
                    low[r] = loss[r]
                    best[r] = s
        # The group's coefficients a = R_best w_S, and its mask.
        for t in range(m):
            at = At[c + t]
            mt = maskt[c + t]
            for r in range(rows):
                s = best[r]
                v = np.float32(0.0)
                for i in range(n):
                    v += R[g, s, t, i] * Wt[c + subsets[s, i], r]
                at[r] = v
                mt[r] = chosen[s, t]
        # The joint update -a U[group, c:] on this group's columns and the block's later ones.
        for col in range(c, blk):
            w = Wt[col]
            for t in range(m):
                u = U[c + t, col]
                at = At[c + t]
                for r in range(rows):
                    w[r] -= u * at[r]


def prune_groups(
    Wt: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, subsets: torch.Tensor, chosen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose and remove the N:M groups of one block of CPU tensors, in order; returns ``(At, maskt)``.

    ``Wt``: the block's weights transposed (``blk x rows``, float32), updated in place (pruned
    entries are left for the caller to zero). ``U``: the inverse factor's ``blk x blk`` diagonal
    block. Per group ``g`` and subset ``s``: ``Q[g, s]`` (``n x n``), the inverse of the subset's
    block, and ``R[g, s]`` (``m x n``), the map from ``w_S`` to the coefficients ``a``.
    ``subsets`` (``S x n``) lists each subset's columns, ``chosen`` (``S x m``) is its group mask.
    Returns the coefficients ``a`` (``blk x rows``) and the pruned mask (True = pruned), transposed.
    """
    At = torch.empty_like(Wt)
    maskt = torch.empty_like(Wt, dtype=torch.bool)
    _prune_groups(
        Wt.numpy(),
        U.contiguous().numpy(),
        Q.contiguous().numpy(),
        R.contiguous().numpy(),
        subsets.contiguous().numpy(),
        chosen.contiguous().numpy(),
        At.numpy(),
        maskt.numpy(),
    )
    return At, maskt
