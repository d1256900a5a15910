"""The benchmarks run in a quick mode, so they cannot rot between full runs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"

def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def test_speed_quick_writes_every_method_and_pattern(tmp_path):
    out = tmp_path / "speed.md"
    _load("speed").main(["--quick", "--repeats", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 x 128") or line.startswith("| 128 x 64")]
    # 2 shapes x 2 patterns x 5 solvers, each with a finite error.
    assert len(rows) == 20
    for method in ("magnitude", "wanda", "sparsegpt", "apt (no re-fit)", "apt"):
        assert sum(f"| {method} |" in r for r in rows) == 4
    assert all(math.isfinite(float(r.split("|")[-2])) for r in rows)
    assert "fraction of matmul peak" in out.read_text() and "exact re-fit (PCG" in out.read_text()

def test_memory_quick_records_peak_rss(tmp_path):
    out = tmp_path / "memory.md"
    _load("memory").main(["--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "128",
                          "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert "peak RSS of the pruning process" in text
    rss_gib = float(text.split("peak RSS of the pruning process | ")[1].split(" GiB")[0])
    assert 0 < rss_gib < 8
