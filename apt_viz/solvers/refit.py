"""Exact least-squares re-fit of every row on a fixed mask, by batched direct solves.

For a row ``w`` with pruned set ``P`` and kept set ``K``, the optimum of ``(w'-w) H (w'-w)^T`` with
``w'_P = 0`` can be written two ways, and the smaller system is solved:

    kept form:   w'_K = (w H)_K  [H_KK]^-1
    pruned form: dw   = -w_P [Hinv_PP]^-1 Hinv_P,:      (the APT update; loss 1/2 w_P [Hinv_PP]^-1 w_P^T)

Rows differ in ``K``, so each row's system is gathered into a padded batch: padding entries get an
identity row and a zero right-hand side, which leaves the real unknowns unchanged.
"""

from __future__ import annotations

import torch


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
