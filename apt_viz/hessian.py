"""Pure tensor helpers around the layer-wise Hessian ``H = 2/n X X^T``."""

from __future__ import annotations

import torch

from . import cpu_matmul
from .precision import ieee_float32


# Rows of H that one product of ``accumulate_hessian(..., upper=True)`` updates.
GRAM_ROWS = 384


@ieee_float32()
def accumulate_hessian(
    H: torch.Tensor | None, nsamples: int, inp: torch.Tensor, *, upper: bool = False
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = 2/n sum x x^T`` (float32).

    ``inp`` has shape ``(..., in_features)``; every row counts as one token. Returns ``(H, n)``.
    ``upper``: update only the blocks of ``GRAM_ROWS`` rows on and above the diagonal, 22-37% of the
    product's flops fewer at 576-2048 columns; :func:`mirror_upper_` completes ``H`` once every
    batch is in (the runner's path).
    """
    X = inp.reshape(-1, inp.shape[-1]).to(torch.float32)
    t, n = X.shape
    if H is None:
        H = torch.zeros(n, n, dtype=torch.float32, device=X.device)
    total = nsamples + t
    if nsamples:
        H.mul_(nsamples / total)
    # The 2/n scaling is folded into alpha.
    if upper:
        for i in range(0, n, GRAM_ROWS):
            cpu_matmul.addmm_(H[i : i + GRAM_ROWS, i:], X[:, i : i + GRAM_ROWS].t(), X[:, i:], alpha=2.0 / total)
    else:
        cpu_matmul.addmm_(H, X.t(), X, alpha=2.0 / total)
    return H, total


def mirror_upper_(H: torch.Tensor) -> torch.Tensor:
    """Complete in place a Hessian accumulated with ``upper=True``: its blocks below the diagonal
    become the transposes of those above."""
    for i in range(0, H.shape[0], GRAM_ROWS):
        j = i + GRAM_ROWS
        H[j:, i:j] = H[i:j, j:].t()
    return H


@ieee_float32()
def layer_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """Reconstruction error ``||WX - W'X||^2`` from ``H``, and the same relative to ``||WX||^2``.

    Both carry the ``2/n`` factor of ``H``, which cancels in the ratio.
    """
    W = W.to(torch.float32)
    D = W_new.to(torch.float32) - W
    err = float((cpu_matmul.mm(D, H) * D).sum())
    ref = float((cpu_matmul.mm(W, H) * W).sum())
    return err, err / ref if ref > 0 else float("inf") if err > 0 else 0.0


def prepare(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Copy ``W``, ``H`` to float32, zero dead input columns and add damping.

    Returns ``(W, H_damped, damp)``. A dead column (no activation) carries no information, so its
    weights are removed and its diagonal set to 1 to keep ``H`` invertible, as SparseGPT does.
    """
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * float(torch.mean(torch.diag(H)))
    H.diagonal().add_(damp)
    return W, H, damp


@ieee_float32()
def inverse_factor(H: torch.Tensor, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``U^T U = H^-1``), with extra damping if needed.

    Rows ``j:`` of ``U`` give the inverse of the trailing sub-Hessian ``H[j:, j:]``:
    ``(H_FF)^-1 = U_FF^T U_FF``. If ``H`` is not numerically positive definite, damping is raised
    tenfold per try (starting from 1% of the mean diagonal); the extra damping is returned.
    """
    U, extra, _ = _factor(H, max_tries, keep_inverse=False)
    return U, extra


@ieee_float32()
def inverse_and_factor(H: torch.Tensor, max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(H^-1, U, extra)``: :func:`inverse_factor` that also returns the inverse, as ``U^T U``."""
    U, extra, Hinv = _factor(H, max_tries, keep_inverse=True)
    return Hinv, U, extra


def _factor(H: torch.Tensor, max_tries: int, keep_inverse: bool) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    extra = 0.0
    mean_diag = float(torch.mean(torch.diag(H)))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(max_tries + 1):
        # With J the reversal of rows and columns, J H J = R^T R (R upper) makes H = V V^T with
        # V = J R^T J upper, so U = V^-1 = J R^-T J: one factorization and one triangular inverse,
        # n^3/3 flops each, where factoring H, inverting it and factoring the inverse took 4 n^3/3
        # (measured 1.7-2x faster). Upper factors of a row-major matrix are LAPACK's own layout,
        # so cusolver's factorization runs in place, as the CPU's by halves does. Peak: H plus two
        # n x n matrices, with H^-1 or without (and a sixteenth of one for the largest off-diagonal
        # block of a product by halves).
        F = H.flip(0, 1)
        if extra:
            F.diagonal().add_(extra)
        # LAPACK's factorization ran at 26-40 GFLOP/s on one AMD EPYC core where MKL's matmuls run
        # at 95: on CPU, factoring and inverting together by halves puts both into matmuls (1536:
        # 58 -> 38 ms, 4096: 0.84 -> 0.60 s). Multiplying by a half's inverse instead of solving
        # with its factor left H^-1 2-3x further from float64's on rank-deficient Hessians
        # (1.1e-4 relative at worst, against 4.3e-5), and SmolLM2's layer errors the same to five
        # digits. GPUs keep cusolver's factorization until it is measured there.
        _inverse_cholesky_(F, info, by_halves=factors_by_halves(F.device))
        if int(info) == 0:
            U = F.t().flip(0, 1)
            del F
            # One reduction, no mask: isfinite().all() took 3.7 ms at 1536, a tenth of the factor.
            if torch.isfinite(torch.stack(torch.aminmax(U))).all():
                return U, extra, (_gram_upper(U, torch.empty_like(U)) if keep_inverse else None)
            del U
        else:
            del F
        extra = mean_diag * 0.01 * (10**attempt)
    raise torch.linalg.LinAlgError(
        f"the Hessian is not positive definite even with damping {extra:.3g}; "
        "check the calibration inputs for NaN/Inf or use more calibration samples"
    )


# Below this size a triangular inverse or product is one library call.
_HALVING_MIN = 128


def factors_by_halves(device: torch.device) -> bool:
    """Whether the inverse factor on ``device`` factors and inverts by halves (CPUs) or by the library (GPUs)."""
    return device.type == "cpu"


def _inverse_cholesky_(A: torch.Tensor, info: torch.Tensor, by_halves: bool) -> torch.Tensor:
    """Overwrite the symmetric ``A`` with ``R^-1``, ``R`` its upper Cholesky factor (``A = R^T R``).

    ``by_halves``: the factorization and the triangular inverse in one recursion (each half's
    ``R^-1`` turns the triangular solve for the off-diagonal block into a triangular product);
    otherwise the library's factorization, then :func:`_invert_upper_`. ``info`` (an int32 scalar)
    is nonzero afterwards if ``A`` is not positive definite; ``A`` is then not usable.
    """
    info.zero_()
    if by_halves:
        return _inverse_cholesky_by_halves_(A, info)
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
    return _invert_upper_(A) if int(info) == 0 else A


def _inverse_cholesky_by_halves_(A: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """:func:`_inverse_cholesky_` by halves; adds to ``info`` where a diagonal block is not positive definite."""
    n = A.shape[0]
    if n <= _HALVING_MIN:
        R, bad = torch.linalg.cholesky_ex(A, upper=True)
        info.add_(bad)
        return A.copy_(_invert_upper_(R))
    h = n // 2
    A11, B, C = A[:h, :h], A[:h, h:], A[h:, h:]
    # A = [[A11, B], [B^T, C]] = R^T R with R = [[R11, R12], [0, R22]]: R12 = R11^-T B and
    # R22^T R22 = C - R12^T R12; then R^-1 = [[R11^-1, -R11^-1 R12 R22^-1], [0, R22^-1]].
    _inverse_cholesky_by_halves_(A11, info)
    _trmm_right_(B.t(), A11)
    _inverse_cholesky_by_halves_(_syrk_add_(B, C, alpha=-1.0), info)
    _trmm_left_(A11, B)
    _trmm_right_(B, C).neg_()
    A[h:, :h].zero_()
    return A


def _invert_upper_(R: torch.Tensor) -> torch.Tensor:
    """Invert the upper-triangular ``R`` (zero below the diagonal) in place, by halves.

    LAPACK's ``trtri``, which torch does not expose, in matmuls: a triangular solve against the
    identity would take three times the flops.
    """
    n = R.shape[0]
    if n <= _HALVING_MIN:
        return R.copy_(torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True))
    h = n // 2
    A, B, C = R[:h, :h], R[:h, h:], R[h:, h:]
    _invert_upper_(A)
    _invert_upper_(C)
    # [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]
    _trmm_left_(A, B)
    _trmm_right_(B, C).neg_()
    return R


def _gram_upper(U: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = U^T U`` for the upper-triangular ``U``, by halves (LAPACK's ``lauum``, in matmuls)."""
    n = U.shape[0]
    if n <= _HALVING_MIN:
        return _mirror_upper_(torch.mm(U.t(), U, out=out))
    h = n // 2
    A, B, C = U[:h, :h], U[:h, h:], U[h:, h:]
    # [[A, B], [0, C]]^T [[A, B], [0, C]] = [[A^T A, A^T B], [B^T A, B^T B + C^T C]]
    _gram_upper(A, out[:h, :h])
    _trmm_right_(out[h:, :h].copy_(B.t()), A)
    out[:h, h:].copy_(out[h:, :h].t())
    _syrk_add_(B, _gram_upper(C, out[h:, h:]))
    return out


# A triangular factor halves the flops of a product, if the product goes by halves as well:
# LAPACK's trmm and syrk, which torch does not expose either. Each takes n^2 m flops where a full
# matmul takes 2 n^2 m (measured 1.3x faster on the inverse and Gram products at 1536 and 2048).


def _trmm_left_(T: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``X = T X`` in place, ``T`` upper-triangular (zero below the diagonal)."""
    n = T.shape[0]
    if n <= _HALVING_MIN:
        return X.copy_(torch.mm(T, X))
    h = n // 2
    # Rows h: of X are read by the top half's update, so they are overwritten last.
    _trmm_left_(T[:h, :h], X[:h]).addmm_(T[:h, h:], X[h:])
    _trmm_left_(T[h:, h:], X[h:])
    return X


def _trmm_right_(X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``X = X T`` in place, ``T`` upper-triangular (zero below the diagonal)."""
    n = T.shape[0]
    if n <= _HALVING_MIN:
        return X.copy_(torch.mm(X, T))
    h = n // 2
    # Columns :h of X are read by the right half's update, so they are overwritten last.
    _trmm_right_(X[:, h:], T[h:, h:]).addmm_(X[:, :h], T[:h, h:])
    _trmm_right_(X[:, :h], T[:h, :h])
    return X


def _syrk_add_(X: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha X^T X`` (both triangles), by halves."""
    n = X.shape[1]
    if n <= _HALVING_MIN:
        return _mirror_upper_(out.addmm_(X.t(), X, alpha=alpha))
    h = n // 2
    _syrk_add_(X[:, :h], out[:h, :h], alpha)
    _syrk_add_(X[:, h:], out[h:, h:], alpha)
    off = torch.mm(X[:, :h].t(), X[:, h:])
    out[:h, h:].add_(off, alpha=alpha)
    out[h:, :h].add_(off.t(), alpha=alpha)
    return out


def _mirror_upper_(M: torch.Tensor) -> torch.Tensor:
    """Copy ``M``'s upper triangle onto its lower one, in place, off the CPU.

    A GPU library's matmul need not round entries ``(i, j)`` and ``(j, i)`` of ``X^T X`` alike (its
    tiles may sum them in other orders), so the base blocks of the products by halves are mirrored
    and ``H^-1`` is exactly symmetric there too. The CPU's matmuls sum both in the same order (a
    test checks the symmetry), and there the mirror's 20 us a block would add 3-12% to the product.
    """
    if M.device.type != "cpu":
        M.copy_(torch.where(torch.ones_like(M, dtype=torch.bool).triu_(), M, M.t()))
    return M
