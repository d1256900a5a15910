"""APT (Zhao et al., 2024): prune several weights of a row together, with their joint optimal update.

For a row ``w`` and a pruned set ``P``, removing ``P`` at once and re-fitting the rest costs

    loss = 1/2 w_P [Hinv_PP]^-1 w_P^T,      dw = -w_P [Hinv_PP]^-1 Hinv_P,:

Mask selection walks the columns in blocks, like SparseGPT: each block of ``blocksize`` columns
gets its pruned set from SparseGPT's score on the current weights. The set is then removed in
sub-blocks of ``joint_block`` columns (or one N:M group at a time), each sub-block's weights jointly
against the trailing inverse Hessian ``U_FF^T U_FF`` instead of one column at a time. With
``V = U[sub, sub]`` the trailing inverse restricted to the sub-block is ``V^T V``, so the joint
update of a row is ``dw_F = -a U[sub, F]`` with ``a = w_P (V_P^T V_P)^-1 V_P^T``. N:M groups pick,
for every row, the N-subset with the smallest group-local joint loss among all C(M, N). The chosen
mask is then re-fitted exactly, row by row.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from .. import cpu_matmul
from ..config import Sparsity
from ..hessian import inverse_and_factor, inverse_factor, prepare
from ..precision import ieee_float32
from .joint_kernel import solve_pruned_rows
from .masks import block_count, check_shape, lowest
from .nm_kernel import prune_groups
from .refit import refit, refit_matmul_dtype, refit_pcg
from .result import SolverResult

JOINT_BLOCK = 32
# The re-fit's certified tolerance. At 1e-3, SmolLM2 layer errors land 0.03-0.07% above the exact
# optimum's, and the re-fit needs 6-10 iterations where 1e-4 needs 8-19.
REFIT_RTOL = 1e-3


@ieee_float32()
def prune_apt(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: Sparsity,
    *,
    blocksize: int = 128,
    joint_block: int = JOINT_BLOCK,
    percdamp: float = 0.01,
    final_refit: bool = True,
    refit_solver: str = "pcg",
    refit_rtol: float = REFIT_RTOL,
    refit_dtype: str = "auto",
) -> SolverResult:
    """Prune ``W`` (out x in) against ``H`` with APT; returns the updated weight and mask.

    ``blocksize``: columns whose pruned set is chosen at once (SparseGPT's 128: the block's count
    can go to its least salient columns, wherever they are). ``joint_block``: columns whose pruned
    weights are removed together; the joint solves cost ``|P|^3`` per row. On SmolLM2 layers 32
    is within 0.4% of 128 after the re-fit and halves the mask selection time. (Choosing the mask
    in blocks of 32 as well was 1-2% better on those layers but 85% worse than 128 on a layer whose
    outlier inputs sit in adjacent columns: each small block must then prune them.)
    ``final_refit``: re-fit the chosen mask exactly (the default). Without it the weights are the
    block-joint updates alone, the paper's algorithm: 0.4-0.8x SparseGPT's time on CPU at N:M and
    0.6-1.1x unstructured, with a slightly lower error; the re-fit lowers the error by a fifth to over
    a third. (``PruningPlan.refit`` sets this for a whole run.)
    ``refit_solver``: ``"pcg"`` (conjugate gradients on the pruned form, one matmul per
    iteration) or ``"direct"`` (batched Cholesky, ``rows * k^3``); both reach the same
    least-squares optimum. ``refit_rtol``: PCG stops once the layer error is certified within this
    fraction of the optimum's (0 runs to the residual tolerance instead; ``"direct"`` is exact).
    ``refit_dtype``: the PCG matmuls' dtype, ``"float32"``, ``"bfloat16"`` or ``"auto"`` (bfloat16
    where the device has bfloat16 matmul units, see :func:`refit_matmul_dtype`). The certified
    stop is checked on float32 multipliers and residual either way, so the error meets
    ``refit_rtol`` on both.
    """
    if refit_solver not in ("pcg", "direct"):
        raise ValueError(f"refit_solver must be 'pcg' or 'direct', got {refit_solver!r}")
    if not isinstance(joint_block, int) or joint_block < 1:
        raise ValueError(f"joint_block must be a positive integer (32 is the default), got {joint_block!r}")
    matmul_dtype = refit_matmul_dtype(refit_dtype, W.device, W.shape[-1])
    check_shape(W, H, spec)
    W, H, damp = prepare(W, H, percdamp)
    # Only the re-fit needs H^-1 itself; without it, skip keeping an n x n copy.
    Hinv, U, extra = inverse_and_factor(H) if final_refit else (None, *inverse_factor(H))
    if extra:
        H.diagonal().add_(extra)
    pruned, W_seq, seq_err = select_mask(W, U, spec, blocksize, joint_block)
    err = None
    if final_refit:
        if refit_solver == "pcg":
            fit = refit_pcg(W, H, ~pruned, Hinv, error_rtol=refit_rtol, matmul_dtype=matmul_dtype)
            W_new, err = fit.weight, fit.error
            if not fit.converged:
                warnings.warn(
                    f"APT's re-fit stopped after {fit.iters} iterations without certifying the layer error within "
                    f"{refit_rtol:g} of the optimum (an ill-conditioned Hessian); its weights are used as they are. "
                    "Calibrate on more tokens, raise percdamp, or pass refit_solver='direct'",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            W_new = refit(W, H, ~pruned, Hinv=Hinv)
    else:
        W_new, err = W_seq, seq_err
    if err is None:
        D = W_new - W
        err = float((cpu_matmul.mm(D, H) * D).sum())
    return SolverResult(W_new, ~pruned, 0.5 * err, damp + extra)


def select_mask(
    W: torch.Tensor, U: torch.Tensor, spec: Sparsity, blocksize: int, joint_block: int = JOINT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Choose the pruned set block by block with joint updates.

    Returns the pruned mask, the updated ``W`` and its error ``(W'-W) H (W'-W)^T``. Every update
    is ``-a U[cols, :]`` and ``U H U^T = I``, so that error is ``||a||^2`` summed over all the
    coefficients: it costs nothing, where the product with ``H`` would cost a weight-sized matmul.
    """
    W = W.clone()
    rows, cols = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    err = torch.zeros((), dtype=W.dtype, device=W.device)
    failures: list[torch.Tensor] = []
    if spec.structured:
        blocksize = max(spec.m, blocksize // spec.m * spec.m)
        subsets = _subsets(spec.n, spec.m, W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if spec.structured:
            A = _nm_block(W, U, i1, i2, spec, subsets, pruned, failures)
            W[:, i2:].addmm_(A, U[i1:i2, i2:], alpha=-1.0)
            err += A.square().sum()
            continue
        score = W[:, i1:i2] ** 2 / torch.diag(U[i1:i2, i1:i2]) ** 2
        pruned[:, i1:i2] = lowest(score, block_count(rows, i1, i2, spec.fraction))
        # Sub-blocks update the rest of their block at once; the columns past the block get the
        # block's summed update in one matmul (SparseGPT's lazy batch).
        A_blk = torch.empty(rows, i2 - i1, dtype=W.dtype, device=W.device)
        for j1 in range(i1, i2, joint_block):
            j2 = min(j1 + joint_block, i2)
            V = U[j1:j2, j1:j2]
            A = A_blk[:, j1 - i1 : j2 - i1] = joint_coefficients(W[:, j1:j2], V, pruned[:, j1:j2], failures=failures)
            W[:, j1:j2].addmm_(A, V, alpha=-1.0)
            W[:, j2:i2].addmm_(A, U[j1:j2, j2:i2], alpha=-1.0)
        # Later sub-blocks never write earlier columns, so the block's pruned entries are zeroed once.
        # (A bool multiply: masked_fill_ is 5x slower on a strided CPU slice.)
        W[:, i1:i2].mul_(~pruned[:, i1:i2])
        W[:, i2:].addmm_(A_blk, U[i1:i2, i2:], alpha=-1.0)
        err += A_blk.square().sum()
    check_factorizations(failures)
    return pruned, W, float(err)


def joint_coefficients(
    W1: torch.Tensor,
    V: torch.Tensor,
    P: torch.Tensor,
    max_batch: int = 1 << 20,
    min_rows: int = 16,
    failures: list[torch.Tensor] | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Per row, ``a = w_P (V_P^T V_P)^-1 V_P^T``: the joint update of the block is ``-a V``.

    On CPU (``compiled=None`` or ``True``) each row's system is solved by the compiled loop of
    :mod:`.joint_kernel`. Otherwise (GPUs, or ``compiled=False``) rows are batched by ``|P|``, so
    most systems need no padding: a batched Cholesky's cost grows with the padded size, and
    padding every row of a large chunk to its largest ``|P|`` made the solves 2-4x slower at 32
    columns. A size with fewer than ``min_rows`` rows joins the next
    larger one (its systems padded with identity rows), since per-call overhead dominates tiny
    batches. A batch holds at most about ``max_batch`` matrix entries. Each batch's Cholesky status
    is appended to ``failures`` when it is given, for the caller to check once (a check reads the
    device); otherwise a failed factorization raises here.
    """
    rows, b = W1.shape
    G = V.t() @ V
    on_cpu = W1.device.type == "cpu"
    if compiled and not on_cpu:
        raise ValueError(f"compiled joint solves run on CPU tensors; got {W1.device} (pass compiled=None or False)")
    if on_cpu if compiled is None else compiled:
        X, bad = solve_pruned_rows(W1, G, P)
        if failures is None:
            check_factorizations([bad])
        else:
            failures.append(bad)
        return X @ V.t()
    count, by_size = torch.sort(P.sum(1))
    Ps = P.index_select(0, by_size)
    # Each row's pruned columns first, in increasing order, then its kept ones: a column's place
    # is a running count, which is cheaper than a stable sort of the mask.
    run = torch.cumsum(Ps, 1)
    place = torch.where(Ps, run - 1, (count[:, None] + torch.arange(b, device=W1.device)) - run)
    order = torch.empty_like(place).scatter_(1, place, torch.arange(b, device=W1.device).expand(rows, -1))
    # Rows sorted by |P| and columns in that order, so each batch below is a slice.
    Ws = W1.index_select(0, by_size).gather(1, order)
    Xs = torch.zeros_like(Ws)
    eye = torch.eye(b, dtype=W1.dtype, device=W1.device)
    # The batches come from the sizes' histogram, so the loop needs no further device syncs.
    for r0, r1, k, padded in _size_groups(torch.bincount(count, minlength=b + 1).tolist(), min_rows, max_batch):
        idx = order[r0:r1, :k]
        # G[idx_i, idx_j] per row, as two plain gathers (one advanced index over both is 5x slower on CPU).
        M = torch.gather(G.index_select(0, idx.reshape(-1)).view(r1 - r0, k, b), 2, idx[:, None, :].expand(-1, k, k))
        rhs = Ws[r0:r1, :k]
        valid = None
        if padded:
            valid = torch.arange(k, device=W1.device)[None, :] < count[r0:r1, None]
            M = torch.where(valid[:, :, None] & valid[:, None, :], M, eye[:k, :k])
            rhs = rhs * valid
        L, info = torch.linalg.cholesky_ex(M)
        x = torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0]
        Xs[r0:r1, :k] = x if valid is None else x * valid
        if failures is None:
            check_factorizations([info])
        else:
            failures.append(info)
    X = torch.empty_like(W1)
    X[by_size] = torch.zeros_like(Xs).scatter_(1, order, Xs)
    return X @ V.t()


def check_factorizations(infos: list[torch.Tensor]) -> None:
    """Raise a clear error if any joint solve's factorization failed (a Cholesky, or an N:M subset's inverse)."""
    if infos and bool(torch.cat([i.reshape(-1) for i in infos]).any()):
        raise ValueError(
            "APT's joint solve met a pruned set whose inverse-Hessian block is not positive definite "
            "in float32 (an ill-conditioned Hessian); raise percdamp (default 0.01), or prune this layer "
            "with method='sparsegpt'"
        )


def _size_groups(sizes: list[int], min_rows: int, max_batch: int) -> list[tuple[int, int, int, bool]]:
    """``(start, stop, k, padded)`` batches over rows sorted by ``|P|``, where ``sizes[k]`` rows have ``|P| = k``.

    Each batch's systems are solved at its largest ``|P|``, ``k``; ``padded`` says some of its rows
    have a smaller one. Rows with ``|P| = 0`` need no solve.
    """
    groups, start, stop, low = [], sizes[0], sizes[0], None
    last = max((k for k, n in enumerate(sizes) if n), default=0)
    for k in range(1, last + 1):
        stop += sizes[k]
        if low is None and sizes[k]:
            low = k
        if stop - start >= min_rows or (k == last and stop > start):
            step = max(1, max_batch // (k * k))
            groups += [(r, min(r + step, stop), k, low < k) for r in range(start, stop, step)]
            start, low = stop, None
    return groups


def _subsets(n: int, m: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long, device=device)


def _nm_block(
    W: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i2: int,
    spec: Sparsity,
    subsets: torch.Tensor,
    pruned: torch.Tensor,
    failures: list[torch.Tensor],
    compiled: bool | None = None,
) -> torch.Tensor:
    """Prune the N:M groups of columns ``[i1, i2)`` one group at a time; returns the block's ``a``.

    The block is held transposed, so that a group's columns are contiguous rows and the small
    per-subset products run over all rows at once: in the compiled loop of :mod:`.nm_kernel` on
    CPU (``compiled=None`` or ``True``), else (GPUs, or ``compiled=False``) as batched torch ops.
    """
    m, n = spec.m, spec.n
    on_cpu = W.device.type == "cpu"
    if compiled and not on_cpu:
        raise ValueError(f"the compiled N:M loop runs on CPU tensors; got {W.device} (pass compiled=None or False)")
    Wt = W[:, i1:i2].t().contiguous()
    # Row c of ``chosen`` is the group mask of subset c: one row gather sets a group's mask.
    chosen = torch.zeros(len(subsets), m, dtype=torch.bool, device=W.device)
    chosen[torch.arange(len(subsets), device=W.device)[:, None], subsets] = True
    # The same for every row, so computed for all the block's groups at once: each subset's
    # inverse block Q and the map Rt from w_S to a. One batched inverse, checked once.
    groups = (i2 - i1) // m
    Vd = U[i1:i2, i1:i2].reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    Hd = Vd.transpose(1, 2) @ Vd
    Qd, info = torch.linalg.inv_ex(Hd[:, subsets[:, :, None], subsets[:, None, :]])
    Rd = (Qd @ Vd.transpose(1, 2)[:, subsets]).transpose(2, 3)
    failures.append(info)
    if on_cpu if compiled is None else compiled:
        At, maskt = prune_groups(Wt, U[i1:i2, i1:i2], Qd, Rd, subsets, chosen)
    else:
        At = torch.empty_like(Wt)
        maskt = torch.empty_like(Wt, dtype=torch.bool)
        flat = subsets.reshape(-1)
        for c in range(0, i2 - i1, m):
            g = slice(i1 + c, i1 + c + m)
            Q, Rt = Qd[c // m], Rd[c // m]
            Ws = Wt[c : c + m].index_select(0, flat).view(len(subsets), n, -1)
            losses = (Ws * (Q @ Ws)).sum(1)
            # min's indices: the same first-minimum argmin, and several times faster over dim 0 on CPU.
            best = losses.min(dim=0).indices
            coef = Rt @ Ws
            a = coef.gather(0, best[None, None, :].expand(1, m, -1))[0]
            maskt[c : c + m] = chosen[best].t()
            Wt[c:].addmm_(U[g, i1 + c : i2].t(), a, alpha=-1.0)
            At[c : c + m] = a
    Wt.mul_(~maskt)
    W[:, i1:i2] = Wt.t()
    pruned[:, i1:i2] = maskt.t()
    return At.t()
