"""IEEE float32 matmuls for the Hessians and solves, whatever the caller chose for its own.

``torch.set_float32_matmul_precision("high")`` or ``("medium")`` lets float32 matmuls run as
TF32 on GPUs and in bfloat16 on CPUs with oneDNN, and cuBLAS may sum bfloat16 products in
bfloat16. Users set these for fast forwards; the solvers' tolerances and the re-fit's certified
error assume float32 products and float32 sums, so they run under :func:`ieee_float32`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# torch 2.9 added a setting per backend; mixing it with the older global one makes torch raise
# when the global one is read, so each torch gets only the API it has.
_BACKENDS = tuple(
    b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)) if hasattr(b, "fp32_precision")
)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 matmuls in full float32, and bfloat16 ones with float32 sums, inside the block.

    The caller's settings come back on exit. Usable as a decorator.
    """
    cuda = torch.backends.cuda.matmul
    reduced = cuda.allow_bf16_reduced_precision_reduction
    saved = [b.fp32_precision for b in _BACKENDS]
    legacy = None if _BACKENDS else torch.get_float32_matmul_precision()
    try:
        for b in _BACKENDS:
            b.fp32_precision = "ieee"
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")
        cuda.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        cuda.allow_bf16_reduced_precision_reduction = reduced
        for b, value in zip(_BACKENDS, saved):
            b.fp32_precision = value
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
