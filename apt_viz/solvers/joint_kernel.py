"""APT's per-row joint solves on CPU as one compiled, parallel loop over rows (numba).

In a sub-block of ``b`` columns each row ``r`` solves its own small SPD system
``G[P_r, P_r] x = w[P_r]``. Batched LAPACK calls need the rows grouped by ``|P_r|``, gathers of
every system and two calls per group, and torch runs a batch of them on one thread; per system
that costs 1-3 us of mostly overhead. Here each row gathers, factors (Cholesky) and solves its
system in small loops, in float64, and rows run in parallel: 2-3x faster on one
thread and faster still on more (`bench/results/speed.md`). GPUs keep the batched path.

The loop compiles on its first call in each process (1.2-2.5 s, with numba's own start-up). It
is not cached on disk: numba's cache is pickled and needs a writable folder.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True)
def _solve_rows(W1: np.ndarray, G: np.ndarray, P: np.ndarray, X: np.ndarray, bad: np.ndarray) -> None:
    rows, b = W1.shape
    # A few chunks of rows per thread, each with its own work arrays: allocating them per row
    # cost a third of the time.
    nchunks = min(rows, 4 * numba.get_num_threads())
    for c in numba.prange(nchunks):
        idx = np.empty(b, np.int64)
        L = np.empty((b, b), np.float64)
        inv = np.empty(b, np.float64)
        y = np.empty(b, np.float64)
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            k = 0
            for j in range(b):
                if P[r, j]:
                    idx[k] = j
                    k += 1
            if k == 0:
                continue
            # Cholesky G_PP = L L^T, row by row; multiplying by 1 / L_jj keeps divisions out of the loops.
            ok = True
            for i in range(k):
                gi = idx[i]
                for j in range(i):
                    s = G[gi, idx[j]]
                    for m in range(j):
                        s -= L[i, m] * L[j, m]
                    L[i, j] = s * inv[j]
                s = G[gi, gi]
                for m in range(i):
                    s -= L[i, m] * L[i, m]
                if not s > 0.0:  # also catches NaN
                    ok = False
                    break
                L[i, i] = np.sqrt(s)
                inv[i] = 1.0 / L[i, i]
            if not ok:
                bad[r] = True
                continue
            # L y = w_P, then L^T x = y.
            for i in range(k):
                s = np.float64(W1[r, idx[i]])
                for m in range(i):
                    s -= L[i, m] * y[m]
                y[i] = s * inv[i]
            for i in range(k - 1, -1, -1):
                s = y[i]
                for m in range(i + 1, k):
                    s -= L[m, i] * y[m]
                y[i] = s * inv[i]
            for i in range(k):
                X[r, idx[i]] = y[i]


def use_torch_threads() -> None:
    """Run numba's parallel loops on torch's thread count (as the solvers' torch ops do)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def solve_pruned_rows(W1: torch.Tensor, G: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the CPU tensors ``W1`` (rows x b) and ``P`` (bool), ``x`` with ``x_P = w_P G_PP^-1``
    and zeros elsewhere, and a bool per row that is True where ``G_PP`` is not positive definite
    (that row's ``x`` is then zero). Runs on ``torch.get_num_threads()`` threads."""
    use_torch_threads()
    w = W1.detach().contiguous().numpy()
    X = np.zeros(w.shape, w.dtype)
    bad = np.zeros(w.shape[0], np.bool_)
    _solve_rows(
        w,
        G.detach().to(torch.float64).contiguous().numpy(),
        P.contiguous().numpy(),
        X,
        bad,
    )
    return torch.from_numpy(X), torch.from_numpy(bad)
