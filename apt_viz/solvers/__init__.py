"""Layer solvers: pure tensor functions ``(W, H, spec) -> SolverResult`` that know no model."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import PlanError, Sparsity, METHODS
from .apt import prune_apt
from .magnitude import prune_magnitude
from .refit import refit
from .result import SolverResult
from .sparsegpt import prune_sparsegpt
from .wanda import prune_wanda

SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
    "apt": prune_apt,
}
assert tuple(SOLVERS) == METHODS

_SOLVER_OPTIONS = {
    "sparsegpt": ("blocksize", "percdamp"),
    "apt": ("blocksize", "joint_block", "percdamp", "final_refit", "refit_solver", "refit_rtol", "refit_dtype"),
}


def sparsify_weight(
    W: torch.Tensor, H: torch.Tensor, sparsity: Sparsity | float | str, method: str = "apt", **options: Any
) -> SolverResult:
    """Prune one weight matrix ``W`` (out x in) given its Hessian ``H`` (in x in).

    ``options`` (``blocksize``, ``percdamp``, and for apt ``joint_block``, ``final_refit``,
    ``refit_solver``, ``refit_rtol``, ``refit_dtype``) reach the methods that use them and are ignored by the others;
    ``None`` keeps the method's default. Sparsity 0 returns ``W`` unchanged. ``W`` may be a
    module's parameter (``layer.weight``): the solvers work on detached copies.
    """
    # The solvers write into their inputs' copies in place, which autograd refuses.
    W, H = W.detach(), H.detach()
    spec = Sparsity.parse(sparsity)
    if method not in SOLVERS:
        raise PlanError(f"unknown method {method!r}; choose one of {', '.join(SOLVERS)}")
    if spec.fraction == 0:
        return SolverResult(W.to(torch.float32).clone(), torch.ones_like(W, dtype=torch.bool), 0.0)
    allowed = _SOLVER_OPTIONS.get(method, ())
    kwargs = {k: v for k, v in options.items() if k in allowed and v is not None}
    return SOLVERS[method](W, H.to(W.device), spec, **kwargs)


__all__ = ["SOLVERS", "SolverResult", "sparsify_weight", "refit", "prune_apt", "prune_sparsegpt", "prune_wanda", "prune_magnitude"]
