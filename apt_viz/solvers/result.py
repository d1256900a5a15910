"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SolverResult:
    """A pruned weight and how it was obtained.

    ``mask`` is True where a weight was kept. ``loss`` is the solver's own estimate of
    ``1/2 (W'-W) H (W'-W)^T`` summed over rows (exact for magnitude, wanda and apt).
    ``damp`` is the damping added to the Hessian diagonal (0 when the method uses none).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    damp: float = 0.0
