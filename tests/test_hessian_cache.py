"""Hessians kept in memory, spilled to disk as safetensors past the budget, and aliased."""

from __future__ import annotations

import pytest
import torch

from apt_viz import HessianCache


def test_spill_to_disk_round_trip(tmp_path):
    cache = HessianCache(max_memory_bytes=16 * 16 * 4, spill_dir=tmp_path)
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    cache.put("a", a, 10)
    cache.put("b", b, 20)
    assert cache.memory_bytes() == 16 * 16 * 4
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]
    assert torch.equal(cache.get("a"), a) and torch.equal(cache.get("b"), b)
    cache.alias("c", "b")
    assert torch.equal(cache.get("c"), b) and cache.tokens["c"] == 20
    cache.clear()
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyError, match="run calibration"):
        cache.get("a")
