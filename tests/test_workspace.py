"""The solvers' CPU work arena: reused between calls, never shared by nested calls or threads, and
invisible in the results (the re-fit gives the same weights with stale data in it)."""

from __future__ import annotations

import threading

import pytest
import torch

from apt_viz.hessian import prepare
from apt_viz.solvers import sparsify_weight, workspace
from apt_viz.solvers.refit import refit_pcg

from test_solvers import layer

SPECS = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.float64)]


def test_buffers_are_reused_aligned_and_never_shared_while_in_use():
    workspace.release()
    with workspace.buffers(SPECS, "cpu") as first:
        assert [(tuple(t.shape), t.dtype) for t in first] == [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.float64)]
        assert all(t.data_ptr() % 64 == 0 for t in first)
        ptrs = [t.data_ptr() for t in first]
        # The buffers do not overlap.
        for t in first:
            t.fill_(1)
        assert float(first[0].sum()) == 15 and float(first[2].sum()) == 4
        with workspace.buffers(SPECS, "cpu") as nested:
            assert not {t.data_ptr() for t in nested} & set(ptrs)
    kept = workspace.kept_bytes()
    assert kept >= 15 * 4 + 7 * 2 + 4 * 8
    with workspace.buffers(SPECS, "cpu") as again:
        assert [t.data_ptr() for t in again] == ptrs
    # Another thread has an arena of its own.
    seen = []

    def other():
        with workspace.buffers(SPECS, "cpu") as bufs:
            seen.extend(t.data_ptr() for t in bufs)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert seen and not set(seen) & set(ptrs)
    workspace.release()
    assert workspace.kept_bytes() == 0


def test_large_requests_are_not_kept_and_free_the_kept_arena(monkeypatch):
    workspace.release()
    monkeypatch.setattr(workspace, "MAX_KEPT_BYTES", 1000)
    with workspace.buffers([((16,), torch.float32)], "cpu"):
        pass
    assert workspace.kept_bytes() == 64
    with workspace.buffers([((640,), torch.float32)], "cpu") as (t,):
        assert t.shape == (640,)
        assert workspace.kept_bytes() == 0
    assert workspace.kept_bytes() == 0


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.bfloat16])
def test_refit_gives_the_same_weights_with_stale_data_in_the_arena(matmul_dtype):
    W, X, H = layer(3, rows=48, cols=256)
    keep = sparsify_weight(W, H, "0.5", "wanda").mask
    Wp, Hd, _ = prepare(W, H, 0.01)
    Hinv = torch.linalg.inv(Hd.double()).float()
    workspace.release()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workspace, "MAX_KEPT_BYTES", 0)
        fresh = refit_pcg(Wp, Hd, keep, Hinv, error_rtol=1e-3, matmul_dtype=matmul_dtype)
    assert workspace.kept_bytes() == 0
    for _ in range(2):
        # Fill the arena, made larger than the re-fit needs, with NaN: a bigger layer's leftovers.
        with workspace.buffers([((16 * W.numel(),), torch.float32)], "cpu") as (junk,):
            junk.fill_(float("nan"))
        size = workspace.kept_bytes()
        got = refit_pcg(Wp, Hd, keep, Hinv, error_rtol=1e-3, matmul_dtype=matmul_dtype)
        assert workspace.kept_bytes() == size
        assert torch.equal(got.weight, fresh.weight) and got.iters == fresh.iters and got.error == fresh.error
        # The result is not a view of the arena: the next call cannot overwrite it.
        assert got.weight.untyped_storage().data_ptr() != workspace._arena.buf.untyped_storage().data_ptr()
