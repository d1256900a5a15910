"""APT's per-row joint solves on CPU as one compiled, parallel loop (numba).

In a sub-block of ``b`` columns each row ``r`` solves its own small SPD system
``G[P_r, P_r] x = w[P_r]``. Batched LAPACK calls need the rows grouped by ``|P_r|``, gathers of
every system and two calls per group, and torch runs a batch of them on one thread; per system
that costs 1-3 us of mostly overhead. Here the rows are sorted by ``|P_r|`` and solved ``LANES``
at a time: each gathers its system into its own lane of a shared work array, and one Cholesky
factorization and two triangular solves run on all the lanes at once, every step a vector
multiply-add. A row's own loop is a chain of short dependent reductions; the lanes fill the
vector units instead. In float64, rows run in parallel on torch's thread count
(`bench/results/speed.md`). GPUs keep the batched path.

The loop compiles on its first call in each process (about 3 s, with numba's own start-up). It
is not cached on disk: numba's cache is pickled and needs a writable folder.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

# Rows solved side by side: one 512-bit vector of float64 (two or four narrower ones elsewhere).
LANES = 8


# LLVM does not vectorize a loop over 8 lanes by itself: it cannot tell the work array's reads
# from its writes. These emit the vector operations directly, on float64 offsets into one array.
def _lane_pointers(context, builder, sig, args):  # pragma: no cover - compiled
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    vector = ir.VectorType(ir.DoubleType(), LANES).as_pointer()
    return [builder.bitcast(builder.gep(data, [offset]), vector) for offset in args[1:]]


@intrinsic
def _sub_product(typingctx, buf, dst, x, y):  # pragma: no cover - compiled
    """``buf[dst:dst+LANES] -= buf[x:x+LANES] * buf[y:y+LANES]``, one fused multiply-add."""

    def codegen(context, builder, sig, args):
        pd, px, py = _lane_pointers(context, builder, sig, args)
        vd, vx, vy = (builder.load(p, align=8) for p in (pd, px, py))
        fma_type = ir.FunctionType(vd.type, [vd.type] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fma_type, f"llvm.fma.v{LANES}f64")
        builder.store(builder.call(fma, [builder.fneg(vx), vy, vd]), pd, align=8)
        return context.get_dummy_value()

    return types.void(buf, dst, x, y), codegen


@intrinsic
def _scale(typingctx, buf, dst, x):  # pragma: no cover - compiled
    """``buf[dst:dst+LANES] *= buf[x:x+LANES]``."""

    def codegen(context, builder, sig, args):
        pd, px = _lane_pointers(context, builder, sig, args)
        builder.store(builder.fmul(builder.load(pd, align=8), builder.load(px, align=8)), pd, align=8)
        return context.get_dummy_value()

    return types.void(buf, dst, x), codegen


@numba.njit
def _solve_groups(W1, G, P, X, bad, k, order, g0, g1):  # pragma: no cover - compiled
    """Solve the rows ``order[g0:g1]``, ``LANES`` at a time."""
    b = W1.shape[1]
    # Lane l of entry (i, j) of the factor sits at (i * kmax + j) * LANES + l, the right-hand sides
    # and then the pivots' reciprocals after them: a group's work stays in the L1 cache.
    Y = b * b * LANES
    R = Y + b * LANES
    buf = np.zeros(R + b * LANES, np.float64)
    idx = np.zeros((LANES, b), np.int64)
    kl = np.zeros(LANES, np.int64)
    ok = np.empty(LANES, np.bool_)
    for s in range(g0, g1, LANES):
        nl = min(LANES, g1 - s)
        kmax = k[order[s + nl - 1]]
        for l in range(LANES):
            ok[l] = True
            n = 0
            if l < nl:
                r = order[s + l]
                for j in range(b):
                    # Branch-free: every column is written, and only the pruned ones advance.
                    idx[l, n] = j
                    n += P[r, j]
            kl[l] = n
        # Each lane holds its row's system, padded to kmax with an identity block and a zero
        # right-hand side, which leaves its solution unchanged.
        for l in range(LANES):
            n = kl[l]
            il = idx[l]
            for i in range(n):
                Gi = G[il[i]]
                o = i * kmax * LANES + l
                for j in range(i + 1):
                    buf[o + j * LANES] = Gi[il[j]]
                buf[Y + i * LANES + l] = W1[order[s + l], il[i]]
            for i in range(n, kmax):
                o = i * kmax * LANES + l
                for j in range(i):
                    buf[o + j * LANES] = 0.0
                buf[o + i * LANES] = 1.0
                buf[Y + i * LANES + l] = 0.0
        # Cholesky G_PP = L L^T, right-looking, so that every update is a vector multiply-add.
        for j in range(kmax):
            d = (j * kmax + j) * LANES
            rj = R + j * LANES
            for l in range(LANES):
                v = buf[d + l]
                if not v > 0.0:  # also catches NaN; the lane goes on with 1 and is dropped
                    ok[l] = False
                    v = 1.0
                v = np.sqrt(v)
                buf[d + l] = v
                buf[rj + l] = 1.0 / v
            for i in range(j + 1, kmax):
                _scale(buf, (i * kmax + j) * LANES, rj)
            for i in range(j + 1, kmax):
                x = (i * kmax + j) * LANES
                for m in range(j + 1, i + 1):
                    _sub_product(buf, (i * kmax + m) * LANES, x, (m * kmax + j) * LANES)
        # L y = w_P, then L^T x = y, in place.
        for i in range(kmax):
            yi = Y + i * LANES
            _scale(buf, yi, R + i * LANES)
            for m in range(i + 1, kmax):
                _sub_product(buf, Y + m * LANES, (m * kmax + i) * LANES, yi)
        for i in range(kmax - 1, -1, -1):
            yi = Y + i * LANES
            _scale(buf, yi, R + i * LANES)
            for m in range(i):
                _sub_product(buf, Y + m * LANES, (i * kmax + m) * LANES, yi)
        for l in range(nl):
            r = order[s + l]
            if not ok[l]:
                bad[r] = True
                continue
            for i in range(kl[l]):
                X[r, idx[l, i]] = buf[Y + i * LANES + l]


@numba.njit(parallel=True)
def _solve_rows(W1, G, P, X, bad, k, order, first):  # pragma: no cover - compiled
    groups = (W1.shape[0] - first + LANES - 1) // LANES
    # A few chunks of groups per thread, each with its own work arrays.
    nchunks = min(groups, 4 * numba.get_num_threads())
    for c in numba.prange(nchunks):
        g0 = first + c * groups // nchunks * LANES
        g1 = min(W1.shape[0], first + (c + 1) * groups // nchunks * LANES)
        _solve_groups(W1, G, P, X, bad, k, order, g0, g1)


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
    # Rows in increasing |P|, so that a group of LANES rows pads little; rows with none need no solve.
    k = P.sum(1)
    order = torch.argsort(k, stable=True)
    first = int((k == 0).sum())
    _solve_rows(w, G.detach().to(torch.float64).contiguous().numpy(), P.contiguous().numpy(), X, bad,
                k.numpy(), order.numpy(), first)
    return torch.from_numpy(X), torch.from_numpy(bad)
