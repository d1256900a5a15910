"""Work buffers that the solvers keep on the CPU from one layer to the next.

glibc returns a freed tensor of a few MiB to the system once its heap top grows past the trim
threshold (and streaming fixes the mmap threshold at 1 MiB, so every such tensor is its own
mapping). The next layer's fresh tensors then fault in every 4 KiB page on first write, which on
a virtual machine costs about 1.8 us a page: for the re-fit's nine weight-sized buffers on a
1536 x 576 layer, 5,000-7,000 faults, 10-16% of its time. One byte arena, reused, has none.
GPUs keep torch's caching allocator, which already reuses its blocks.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch

# A larger request gets fresh tensors, and the kept arena is freed first, so that the peak memory
# is never above what fresh tensors take. Kept between calls, the arena is memory the forwards
# and Hessians cannot use; on wide layers (2048 columns: the re-fit needs 144 MiB) the faults
# are also a smaller share of the work. SmolLM2's largest re-fit needs 30 MiB.
MAX_KEPT_BYTES = 64 << 20
_ALIGN = 64


class _Arena(threading.local):
    """Each thread's arena, so that a background run and the caller never share buffers."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.busy = False


_arena = _Arena()


@contextlib.contextmanager
def buffers(specs: Sequence[tuple[Sequence[int], torch.dtype]], device: torch.device | str) -> Iterator[list[torch.Tensor]]:
    """Uninitialised tensors of the given ``(shape, dtype)``s, valid only inside the ``with`` block.

    On the CPU they are views of one arena that is kept for the next call (while it stays under
    ``MAX_KEPT_BYTES``); elsewhere, or when a call is already inside, they are fresh tensors.
    """
    device = torch.device(device)
    sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs]
    spans = [-(-n // _ALIGN) * _ALIGN for n in sizes]
    total = sum(spans)
    kept = device.type == "cpu" and not _arena.busy
    if kept and total > MAX_KEPT_BYTES:
        release()  # fresh tensors for this one, and no kept arena beside them
        kept = False
    if not kept:
        yield [torch.empty(tuple(shape), dtype=dtype, device=device) for shape, dtype in specs]
        return
    if _arena.buf is None or _arena.buf.numel() < total:
        _arena.buf = None  # the old arena is freed before the larger one is taken
        _arena.buf = torch.empty(total, dtype=torch.uint8)
    views, offset = [], 0
    for (shape, dtype), n, span in zip(specs, sizes, spans):
        views.append(_arena.buf[offset : offset + n].view(dtype).view(tuple(shape)))
        offset += span
    _arena.busy = True
    try:
        yield views
    finally:
        _arena.busy = False


def kept_bytes() -> int:
    """The size of this thread's kept arena (0 when none)."""
    return 0 if _arena.buf is None else _arena.buf.numel()


def release() -> None:
    """Free this thread's arena (the next call takes a new one)."""
    if not _arena.busy:
        _arena.buf = None
