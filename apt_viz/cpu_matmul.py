"""Float32 matrix products on CPU through oneDNN, which is faster there than torch's BLAS call.

torch sends a float32 ``mm`` on CPU to MKL, and MKL runs its AVX2 code on AMD CPUs: about 90-95
GFLOP/s per core on a Zen 5 EPYC. oneDNN, which torch also carries, runs AVX-512 there: 150-215
GFLOP/s on the Hessians' and the re-fit's shapes, to float32 accuracy (about 1e-6 of the largest
entry, against MKL's 4e-7). The Hessian accumulation, the layer error and the re-fit's float32
products go through :func:`mm` and :func:`addmm_`. The inverse factor's products by halves and
the mask selection's block updates stay torch's: through oneDNN they were no faster (their
blocks must be copied dense, their results added back). Where oneDNN is missing, all are torch's.

The model's own forwards (calibration, perplexity) spend most of a prune's time in linear layers:
:func:`fast_linears` sends those through oneDNN too, while it is entered.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn

# Below about this many multiply-adds the call's fixed costs (a fresh output, the copy or sum into
# the caller's) outweigh the faster kernel: one and two EPYC cores broke even at 4-8M.
MIN_MACS = 1 << 23
# The speed bench turns it off to time torch's own products side by side.
enabled = True


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (written into ``out`` when given)."""
    if not _use_onednn(a, b):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    r = _onednn_mm(a, b)
    return r if out is None else out.copy_(r)


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``c += alpha * a @ b`` in place; returns ``c``."""
    if not _use_onednn(a, b):
        return c.addmm_(a, b, alpha=alpha)
    return c.add_(_onednn_mm(a, b), alpha=alpha)


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        enabled
        and a.device.type == "cpu"
        and a.dtype == b.dtype == torch.float32
        # oneDNN's op has no gradient; the solvers' tensors never need one.
        and not (a.requires_grad or b.requires_grad)
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS
        and available()
    )


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # oneDNN's linear takes the weight as (out, in): b's transpose, a view. A block of a larger
    # matrix (rows longer than the block) sends oneDNN to a slow path, 30-100x slower than the
    # copy that avoids it.
    return _onednn_linear(_dense(a), _dense(b).t(), None)


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() or x.t().is_contiguous() else x.contiguous()


@functools.cache
def available() -> bool:
    """Whether oneDNN's float32 product runs here and agrees with torch's (checked once per process)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(96, 80, generator=g), torch.randn(80, 72, generator=g)
        return bool(torch.allclose(_onednn_mm(a, b), a.double().mm(b.double()).float(), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@contextlib.contextmanager
def fast_linears(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, ``model``'s float32 linear layers on CPU compute through oneDNN.

    Covers ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), by their class's own forward; a
    module whose forward is already replaced (accelerate's offload hooks, say) is left alone. A
    call falls back to the module's own forward unless it is float32 on the CPU with a contiguous
    weight, at least ``MIN_MACS`` multiply-adds, and needs no gradient. On exit the modules'
    forwards are put back.
    """
    swapped: list[nn.Module] = []
    if enabled and available():
        for mod in model.modules():
            transposed = _linear_layout(mod)
            if transposed is not None and "forward" not in vars(mod):
                mod.forward = _FastForward(mod, type(mod).forward.__get__(mod), transposed)
                swapped.append(mod)
    try:
        yield model
    finally:
        for mod in swapped:
            if isinstance(vars(mod).get("forward"), _FastForward):
                del mod.forward


def _linear_layout(mod: nn.Module) -> bool | None:
    """False for an ``nn.Linear`` (weight out x in), True for a ``Conv1D`` (weight in x out), else None."""
    forward = getattr(type(mod), "forward", None)
    if forward is nn.Linear.forward:
        return False
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and getattr(mod, "nf", None) is not None:
        return True
    return None


class _FastForward:
    """A module's forward that runs eligible calls through oneDNN, others through ``own``."""

    def __init__(self, mod: nn.Module, own: Callable[[torch.Tensor], torch.Tensor], transposed: bool) -> None:
        self.mod, self.own, self.transposed = mod, own, transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.mod.weight, self.mod.bias
        if not (
            x.dtype == w.dtype == torch.float32
            and x.device.type == w.device.type == "cpu"
            and (b is None or (b.dtype == torch.float32 and b.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))
            and x.dim() >= 2
            # A strided weight (a view into a larger tensor) would take oneDNN's slow path.
            and w.is_contiguous()
            and x.numel() * w.shape[1 if self.transposed else 0] >= MIN_MACS
        ):
            return self.own(x)
        # oneDNN takes the weight as (out, in); Conv1D's transpose is a view, as in _onednn_mm.
        return _onednn_linear(x.contiguous(), w.t() if self.transposed else w, b)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
