"""The vector work of :func:`.refit.refit_pcg`'s bfloat16 iterations on CPU, as two fused, compiled
passes over the rows (numba).

Between its two products (with ``Hinv``, and with the preconditioner's blocks) an iteration casts
to and from bfloat16, takes two row-wise dot products and makes four vector updates: about ten
passes over weight-sized float32 tensors in separate torch ops, which take as long as the products
on CPUs with fast bfloat16 matmuls. Here each pass handles one row at a time while it is in cache:

- :func:`step`, after ``t = p Hinv``: ``alpha = rz / (p t^T)``, ``a += alpha p``,
  ``s -= alpha (t * P)``, and ``s`` cast to bfloat16 for the preconditioner;
- :func:`direction`, after ``zb = s_bf16 M``: ``z = zb * P``, ``rz' = s z^T``,
  ``p = z + (rz' / rz) p``, and ``p`` cast to bfloat16 for the next product.

bfloat16 tensors are passed as their 16-bit patterns; casts round to nearest even, as torch's do.
Dot products accumulate in float64. Like :mod:`.joint_kernel`, the loops compile on first use in
each process (1.5-2 s, not cached on disk for the same reasons) and run on torch's thread count.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic

from .joint_kernel import use_torch_threads

_TINY = float(np.finfo(np.float32).tiny)


# Bit casts between float32 and its pattern, as LLVM bitcasts: type punning through two views of
# one array is undefined for the optimizer, which may reorder the two accesses.
@intrinsic
def _f32(typingctx, u):  # pragma: no cover - compiled
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _u32(typingctx, x):  # pragma: no cover - compiled
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@numba.njit(inline="always")
def _from_bf16(h: np.uint16) -> np.float32:  # pragma: no cover - compiled
    return _f32(np.uint32(h) << np.uint32(16))


@numba.njit(inline="always")
def _to_bf16(x: np.float32) -> np.uint16:  # pragma: no cover - compiled
    # Round to nearest even on the upper 16 bits of the pattern.
    u = _u32(x)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(parallel=True, fastmath={"reassoc", "contract"})
def _step(tb, p, P, a, s, rz, sb, alpha):  # pragma: no cover - compiled
    rows, cols = p.shape
    for r in numba.prange(rows):
        pt = 0.0
        for j in range(cols):
            pt += np.float64(p[r, j]) * np.float64(_from_bf16(tb[r, j]))
        # A curvature that rounding made zero or negative (or NaN) takes no step, as in refit_pcg.
        al = np.float32(rz[r] / max(np.float32(pt), np.float32(_TINY))) if pt > 0.0 else np.float32(0.0)
        alpha[r] = al
        for j in range(cols):
            a[r, j] += al * p[r, j]
            v = s[r, j] - al * (_from_bf16(tb[r, j]) * P[r, j])
            s[r, j] = v
            sb[r, j] = _to_bf16(v)


@numba.njit(parallel=True, fastmath={"reassoc", "contract"})
def _direction(zb, P, s, p, pb, rz_old, rz_new, first):  # pragma: no cover - compiled
    rows, cols = p.shape
    for r in numba.prange(rows):
        rzn = 0.0
        for j in range(cols):
            rzn += np.float64(s[r, j]) * np.float64(_from_bf16(zb[r, j]) * P[r, j])
        rz_new[r] = rzn
        # The first direction is z itself: p holds no values yet (0 * NaN would be NaN).
        beta = np.float32(0.0) if first else np.float32(rz_new[r] / max(rz_old[r], np.float32(_TINY)))
        for j in range(cols):
            v = _from_bf16(zb[r, j]) * P[r, j]
            if not first:
                v += beta * p[r, j]
            p[r, j] = v
            pb[r, j] = _to_bf16(v)


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def step(
    tb: torch.Tensor, p: torch.Tensor, P: torch.Tensor, a: torch.Tensor, s: torch.Tensor, rz: torch.Tensor, sb: torch.Tensor
) -> torch.Tensor:
    """One CG step along ``p`` given ``tb = p Hinv`` (bfloat16): updates ``a`` and ``s`` in place,
    writes ``s`` in bfloat16 into ``sb`` and returns ``alpha`` (a column, float32)."""
    use_torch_threads()
    alpha = torch.empty(p.shape[0], 1, dtype=torch.float32)
    _step(_bits(tb), p.numpy(), P.numpy(), a.numpy(), s.numpy(), rz[:, 0].numpy(), _bits(sb), alpha[:, 0].numpy())
    return alpha


def direction(
    zb: torch.Tensor, P: torch.Tensor, s: torch.Tensor, p: torch.Tensor, pb: torch.Tensor, rz: torch.Tensor | None
) -> torch.Tensor:
    """The next search direction from ``zb`` (the preconditioner's bfloat16 product with ``s``):
    ``p = zb * P + (rz' / rz) p`` in place (``p = zb * P`` when ``rz`` is None), written in
    bfloat16 into ``pb``; returns ``rz' = s z^T`` (a column, float32)."""
    use_torch_threads()
    rz_new = torch.empty(p.shape[0], 1, dtype=torch.float32)
    old = rz[:, 0].numpy() if rz is not None else rz_new[:, 0].numpy()
    _direction(_bits(zb), P.numpy(), s.numpy(), p.numpy(), _bits(pb), old, rz_new[:, 0].numpy(), rz is None)
    return rz_new
