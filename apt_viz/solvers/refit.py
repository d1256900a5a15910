"""Exact least-squares re-fit of every row on a fixed mask: batched direct solves, or PCG.

For a row ``w`` with pruned set ``P`` and kept set ``K``, the optimum of ``(w'-w) H (w'-w)^T`` with
``w'_P = 0`` can be written two ways, and the smaller system is solved:

    kept form:   w'_K = (w H)_K  [H_KK]^-1
    pruned form: dw   = -w_P [Hinv_PP]^-1 Hinv_P,:      (the APT update; loss 1/2 w_P [Hinv_PP]^-1 w_P^T)

Rows differ in ``K``, so each row's system is gathered into a padded batch: padding entries get an
identity row and a zero right-hand side, which leaves the real unknowns unchanged. That costs
``rows * k^3``. :func:`refit_pcg` reaches the same optimum with matmuls only: conjugate gradients
on the pruned form for every row at once, one matmul with ``Hinv`` per iteration.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .. import cpu_matmul
from ..precision import ieee_float32
from . import cg_kernel, workspace

# The re-fit dtype names that name one dtype (config.REFIT_DTYPES adds "auto").
MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bfloat16 iterations without a new lowest residual estimate before float32 takes over. On SmolLM2
# layers calibrated on 32 x 512 tokens the estimate falls at every iteration; on 2 x 64 tokens it
# levels off at about 1.003x the optimum's error and then diverges.
STALL_ITERS = 5
# Narrower layers gain little from bfloat16 on CPU, where its float32 check and casts take a larger
# share (one AMD EPYC core: 1.16x at 128 columns, 1.7x at 192, 2.0x at 256, 2.6x at 512), so they
# keep float32 and weights that are the same on every machine.
BFLOAT16_MIN_COLS = 256


@ieee_float32()
def refit(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    *,
    Hinv: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_batch_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Return the weight with ``W``'s rows re-fitted on ``keep`` (True = kept) against damped ``H``.

    ``Hinv`` (the inverse of ``H``) enables the pruned form; without it the kept form is used.
    The solves run in ``dtype``; float32 matches float64 to the printed digits on real layers at half the time.
    """
    rows, cols = W.shape
    npruned = int((~keep).sum(1).max()) if rows else 0
    nkept = int(keep.sum(1).max()) if rows else 0
    out = torch.zeros(rows, cols, dtype=torch.float32, device=W.device)
    if npruned == 0:
        return out.copy_(W)
    use_pruned = Hinv is not None and npruned < nkept
    sel = ~keep if use_pruned else keep
    k = npruned if use_pruned else nkept
    if k == 0:
        return out
    # A stable sort puts each row's selected columns first, in increasing order.
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=W.device)[None, :] < sel.sum(1, keepdim=True)
    M = (Hinv if use_pruned else H).to(dtype)
    rhs_full = W.to(dtype) if use_pruned else (W.to(dtype) @ H.to(dtype))
    chunk = max(1, max_batch_bytes // (k * k * torch.finfo(dtype).bits // 8))
    eye = torch.eye(k, dtype=dtype, device=W.device)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        idx, v = order[r0:r1], valid[r0:r1]
        A = M[idx[:, :, None], idx[:, None, :]]
        vv = v[:, :, None] & v[:, None, :]
        A = torch.where(vv, A, eye)
        b = rhs_full[r0:r1].gather(1, idx) * v
        L = torch.linalg.cholesky(A)
        x = torch.cholesky_solve(b[:, :, None], L)[:, :, 0] * v
        if use_pruned:
            Z = torch.zeros(r1 - r0, cols, dtype=dtype, device=W.device).scatter_(1, idx, x)
            new = W[r0:r1].to(dtype) - Z @ M
            out[r0:r1] = new.masked_fill(~keep[r0:r1], 0.0).to(torch.float32)
        else:
            out[r0:r1].scatter_(1, idx, x.to(torch.float32))
    return out


class PCGResult(NamedTuple):
    """What :func:`refit_pcg` returns: the re-fitted weight, the iterations run, the layer
    error ``sum_rows (w'-w) H (w'-w)^T`` of that weight, how many of the iterations ran with
    float32 matmuls (all of them unless ``matmul_dtype`` is lower), and whether the stop was met
    (the error certified within ``error_rtol``, or with ``error_rtol = 0`` every row's residual
    under ``tol``) rather than ``max_iters`` reached."""

    weight: torch.Tensor
    iters: int
    error: float
    float32_iters: int
    converged: bool = True


@ieee_float32()
def refit_pcg(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    block: int = 128,
    tol: float = 1e-5,
    error_rtol: float = 0.0,
    max_iters: int = 200,
    matmul_dtype: torch.dtype = torch.float32,
    compiled: bool | None = None,
) -> PCGResult:
    """Re-fit ``W``'s rows on ``keep`` by preconditioned conjugate gradients on the pruned form.

    Every row solves ``a Hinv_PP = w_P`` for its multipliers ``a``; the weight is ``w - a Hinv``
    on the kept set (the APT update). CG runs on all rows at once in the full width, ``a`` held at
    zero off ``P``, so an iteration costs one matmul with ``Hinv``. The preconditioner is
    ``[(Hinv_bb)^-1]_PP`` on each diagonal block ``b`` of ``block`` columns, the same for every row.
    On SmolLM2 layers at 50% and 2:4 an iteration lowers the error about as much as one of CG on
    the kept form preconditioned by ``Hinv_KK``, which costs two matmuls.

    CG raises the dual bound ``a w_P^T + a s^T`` (``s`` the residual ``w_P - (a Hinv)_P``) towards
    the optimum's error, and the weight's error exceeds that bound by exactly ``s H s^T``. With
    ``error_rtol > 0`` iterations stop once that gap is below ``error_rtol`` times the bound, which
    certifies the error within ``error_rtol`` of the optimum's. The gap costs a matmul, so it is
    computed only when the preconditioned residual ``s z^T``, scaled by the last measured ratio
    of the two, says it may pass; that matmul also gives the returned error. Otherwise iterations stop
    when every row's preconditioned residual ``s z^T`` is below ``tol^2`` times its scale
    ``sum_j w_j^2 H_jj``.

    ``matmul_dtype=torch.bfloat16`` runs the iterations' matmuls (with ``Hinv``, ``H`` and the
    preconditioner's blocks) in bfloat16 and the rest in float32: re-fits 2-2.5x faster on an
    AVX512-BF16 CPU core (``bench/results/speed.md``), in the same number of iterations. Its rounding
    leaves the error about 3e-5 above the optimum's on SmolLM2 layers, far below a certified
    stop's ``error_rtol``, so it applies only with ``error_rtol > 0``. The stop is then checked
    again with the residual and the bound recomputed from ``a`` in float32 (one matmul); the gap
    ``s H s^T``, a correction of at most ``error_rtol`` to the bound, is measured with a bfloat16
    matmul, which is accurate to 0.06% on SmolLM2 layers, and the stop test allows it 1%. If that
    check fails, CG goes on in float32 from ``a``. On an ill-conditioned ``H`` (a layer calibrated
    on a few hundred tokens) bfloat16's rounding stalls CG short of the stop and would then make it
    diverge, so the bfloat16 pass also ends after ``STALL_ITERS`` iterations without a new lowest
    residual estimate, and float32 takes over.

    ``compiled``: on CPU, the bfloat16 iterations' vector work runs as two fused, compiled passes
    per iteration (:mod:`.cg_kernel`) where torch takes about ten (``None``, the default, or
    ``True``); ``False`` uses torch ops, as GPUs and float32 re-fits always do. Both give the same
    iterations.
    """
    if matmul_dtype not in MATMUL_DTYPES.values():
        raise ValueError(f"matmul_dtype must be torch.float32 or torch.bfloat16, got {matmul_dtype!r}")
    low = matmul_dtype != torch.float32 and error_rtol > 0
    if compiled and not (low and W.device.type == "cpu"):
        raise ValueError(
            "compiled PCG iterations run bfloat16 re-fits of CPU tensors with error_rtol > 0; "
            "pass compiled=None or False"
        )
    fused = low and W.device.type == "cpu" and compiled is not False
    # The weight-sized work tensors: P, w_P, s, t, p, z, and in bfloat16 also a and two buffers for
    # the casts and products (a fresh weight-sized temporary costs page faults, see .workspace).
    specs = [(W.shape, torch.float32)] * (7 if low else 6) + [(W.shape, matmul_dtype)] * (2 if low else 0)
    with workspace.buffers(specs, W.device) as work:
        return _pcg(W, H, keep, Hinv, work, block, tol, error_rtol, max_iters, matmul_dtype, low, fused)


def _pcg(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, Hinv: torch.Tensor, work: list[torch.Tensor], block: int,
    tol: float, error_rtol: float, max_iters: int, matmul_dtype: torch.dtype, low: bool, fused: bool,
) -> PCGResult:
    """:func:`refit_pcg` on its checked arguments, with its uninitialised work tensors ``work``."""
    Wf = W.to(torch.float32)
    P, wP, s, t, p, z = work[:6]
    P.copy_(~keep)
    cols = W.shape[1]
    blocks = [(i, min(i + block, cols)) for i in range(0, cols, block)]
    # (Hinv_bb)^-1 is the Schur complement of H on the block: SPD, and cheap at block width.
    prec = [torch.cholesky_inverse(torch.linalg.cholesky(Hinv[i:j, i:j])) for i, j in blocks]
    tiny = torch.finfo(torch.float32).tiny
    hdiag = torch.diagonal(H)
    torch.mul(Wf, P, out=wP)
    Hinv_m, H_m = (Hinv.to(matmul_dtype), H.to(matmul_dtype)) if low else (Hinv, H)
    prec_m = [B.to(matmul_dtype) for B in prec] if low else prec
    # Compiled iterations keep p or s in the first scratch buffer (bfloat16) and the products in the second.
    scratch = (work[7], work[8]) if low else None
    # They leave z unused: its bytes hold the in-loop gap's two bfloat16 buffers (a fresh cast and
    # product would fault their pages in, 0.5 ms on a 1536 x 576 weight).
    gap_scratch = tuple(z.view(-1).view(matmul_dtype).view(2, *W.shape)) if fused else scratch
    a = work[6].zero_() if low else None
    # In bfloat16, a Hinv is one product after the iterations. It becomes the returned weight, so
    # it is not a work buffer.
    aHinv = torch.empty_like(Wf) if low else torch.zeros_like(Wf)
    s.copy_(wP)
    stop = tol**2 * (torch.mul(Wf, Wf, out=t) @ hdiag[:, None]).clamp_min(tiny)
    # A bfloat16 product measures s H s^T within 0.06% on SmolLM2 layers: the float32 check allows
    # it 1%. The bfloat16 iterations' own s has drifted by a few percent more: their stop, which
    # leads to that check, allows 5%, so that the check rarely fails (it then goes on in float32).
    margin, check_margin = (1.05, 1.01) if low else (1.0, 1.0)

    def step(rz: torch.Tensor) -> torch.Tensor:
        """A CG step along p: updates the multipliers and s, returns alpha."""
        if fused:
            torch.mm(scratch[0], Hinv_m, out=scratch[1])
            return cg_kernel.step(scratch[1], p, P, a, s, rz, scratch[0])
        _product(p, Hinv_m, t, scratch)
        # p lives on P, so p t^T is p Hinv_PP p^T. Converged rows have p ~ 0: guard the division
        # instead of dropping them from the batch. A curvature that rounding made zero or negative
        # (bfloat16, on an ill-conditioned H) would send the row off: it takes no step.
        pt = _rowdot(p, t)
        alpha = torch.where(pt > 0, rz / pt.clamp_min(tiny), 0.0)
        # In bfloat16 the products accumulate rounding, so a is kept to recompute a Hinv once.
        if low:
            a.addcmul_(alpha, p)
        else:
            aHinv.addcmul_(alpha, t)
        s.addcmul_(alpha, t.mul_(P), value=-1.0)
        return alpha

    def direction(rz: torch.Tensor | None) -> torch.Tensor:
        """z = the preconditioned s, then p = z + (s z^T / rz) p (p = z when rz is None); returns s z^T."""
        if fused:
            xb, zb = scratch
            if rz is None:
                xb.copy_(s)
            for (i, j), B in zip(blocks, prec_m):
                torch.mm(xb[:, i:j], B, out=zb[:, i:j])
            return cg_kernel.direction(zb, P, s, p, xb, rz)
        if low:
            # One cast of the whole residual, then each block's product in place in the scratch (a
            # mixed-dtype ``torch.mul(rb, P, out=z)`` is 3x slower on CPU than the cast and the mask).
            xb, rb = scratch
            xb.copy_(s)
            for (i, j), B in zip(blocks, prec_m):
                torch.mm(xb[:, i:j], B, out=rb[:, i:j])
            z.copy_(rb)
        else:
            for (i, j), B in zip(blocks, prec_m):
                torch.mm(s[:, i:j], B, out=z[:, i:j])
        # A float mask multiplies several times faster than masked_fill with a bool one on CPU.
        z.mul_(P)
        rz_new = _rowdot(s, z)
        if rz is None:
            p.copy_(z)
        else:
            p.mul_(rz_new / rz.clamp_min(tiny)).add_(z)
        return rz_new

    # gap: s H s^T of the current s, when a check has measured it.
    bound, gap, it, low_iters = 0.0, None, 0, 0
    # At most two passes: bfloat16 iterations and their check, then float32 iterations
    # from the checked multipliers if the check failed.
    while True:
        rz = direction(None)
        ratio, sampled, best, since = 1.0, False, math.inf, 0
        while it < max_iters and bool((rz > stop).any()):
            alpha = step(rz)
            it += 1
            # A CG step along p raises the dual bound by exactly alpha * s z^T.
            bound += float((alpha * rz).sum())
            rz_new = direction(rz)
            # s z^T tracks the gap s H s^T up to a factor that drifts slowly. Near the stop the factor
            # is first measured on a sample of rows, so the full check (a matmul) rarely fails; each
            # full check re-measures it.
            if error_rtol > 0:
                estimate = float(rz_new.sum())
                if low:
                    # On an ill-conditioned H (few calibration tokens) bfloat16's rounding stalls CG, and
                    # left to run it diverges: float32 takes over once the residual stops falling.
                    best, since = (estimate, 0) if estimate < best else (best, since + 1)
                    if since >= STALL_ITERS or not math.isfinite(estimate):
                        break
                if not sampled and ratio * estimate <= 10 * error_rtol * bound:
                    rows_s = slice(None, None, max(1, W.shape[0] // 64))
                    g = float(_rowdot(_product(s[rows_s], H_m), s[rows_s]).sum())
                    ratio = max(ratio, g / max(float(rz_new[rows_s].sum()), tiny))
                    sampled = True
                if ratio * estimate <= error_rtol * bound:
                    # t is free until the next step; compiled iterations hold p in the scratch.
                    gap = float(_rowdot(_product(s, H_m, t, gap_scratch), s).sum())
                    if margin * gap <= error_rtol * bound:
                        break
                    ratio = gap / max(estimate, tiny)
                    gap = None
            rz = rz_new
        if not low:
            break
        low_iters = it
        # One sum is finite only if every entry is (torch.isfinite takes four passes): a breakdown the
        # guards missed, or rarely a sum that overflowed, starts float32 afresh.
        if not math.isfinite(float(a.sum())):
            a.zero_()
        # The bfloat16 products left s and the bound a rounding off: recompute both from a, in
        # float32. The gap s H s^T, a small correction to the bound, is measured in bfloat16.
        cpu_matmul.mm(a, Hinv, out=aHinv)
        torch.sub(wP, aHinv, out=s).mul_(P)
        bound = float(_rowdot(a, torch.add(wP, s, out=t)).sum())
        gap = float(_rowdot(_product(s, H_m, t, scratch), s).sum())
        if it >= max_iters or check_margin * gap <= error_rtol * bound:
            break
        low, fused, margin, Hinv_m, H_m, prec_m = False, False, 1.0, Hinv, H, prec
        gap = None
    if gap is None:
        gap = float(_rowdot(cpu_matmul.mm(s, H, out=t), s).sum())
    err = bound + gap
    converged = gap <= error_rtol * bound if error_rtol > 0 else not bool((rz > stop).any())
    # P is done with: it becomes the kept mask in place (``1.0 - P`` broadcasts a scalar, 20x slower on CPU).
    kept = P.neg_().add_(1.0)
    return PCGResult(aHinv.neg_().add_(Wf).mul_(kept), it, max(err, 0.0), it - low_iters, converged)


def refit_matmul_dtype(choice: str, device: torch.device | str, cols: int = BFLOAT16_MIN_COLS) -> torch.dtype:
    """The dtype of :func:`refit_pcg`'s matmuls for ``choice`` (``"auto"``, ``"float32"`` or ``"bfloat16"``).

    ``"auto"`` picks bfloat16 for layers of at least ``BFLOAT16_MIN_COLS`` input columns where it
    is several times faster than float32: CUDA GPUs of compute capability 8.0 or later (tensor
    cores), and CPUs with AVX512-BF16 or AMX instructions (1.8-4x measured on one AMD EPYC core).
    Elsewhere bfloat16 matmuls may be slower than float32 ones.
    """
    if choice == "auto":
        device = torch.device(device)
        if cols < BFLOAT16_MIN_COLS:
            fast = False
        elif device.type == "cuda":
            fast = torch.cuda.get_device_capability(device) >= (8, 0)
        else:
            fast = device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
        return torch.bfloat16 if fast else torch.float32
    if choice not in MATMUL_DTYPES:
        raise ValueError(f"refit_dtype must be 'auto', 'float32' or 'bfloat16', got {choice!r}")
    return MATMUL_DTYPES[choice]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's instruction set flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _product(
    x: torch.Tensor, M: torch.Tensor, out: torch.Tensor | None = None, scratch: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``x @ M`` in ``M``'s dtype, returned (or written into ``out``) in float32.

    ``scratch`` (with ``out``): two buffers of ``x``'s shape in ``M``'s dtype for the cast and the product.
    """
    if M.dtype == x.dtype:
        return cpu_matmul.mm(x, M, out=out)
    if scratch is None:
        r = torch.mm(x.to(M.dtype), M)
        return r.float() if out is None else out.copy_(r)
    xb, rb = scratch
    torch.mm(xb.copy_(x), M, out=rb)
    return out.copy_(rb)


# Elements of a chunk in _rowdot: small enough that a chunk's product is still in cache when summed.
ROWDOT_CHUNK = 1 << 17


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products, as a column."""
    rows, cols = a.shape
    if a.device.type != "cpu" or a.numel() <= ROWDOT_CHUNK:
        return torch.linalg.vecdot(a, b)[:, None]
    # On CPU a weight-sized ``a * b`` costs a memory pass and fresh pages, and einsum's batched
    # matmul is slower still: 4-5x slower than these chunks on 8192 x 2048.
    step = max(1, ROWDOT_CHUNK // cols)
    out = torch.empty(rows, 1, dtype=a.dtype, device=a.device)
    buf = torch.empty(step, cols, dtype=a.dtype, device=a.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        torch.sum(torch.mul(a[r0:r1], b[r0:r1], out=buf[: r1 - r0]), 1, keepdim=True, out=out[r0:r1])
    return out
