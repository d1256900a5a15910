"""The benchmarks run in a quick mode, so they cannot rot between full runs."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"

def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def test_speed_quick_writes_every_method_and_pattern(tmp_path):
    import torch

    out = tmp_path / "speed.md"
    speed = _load("speed")
    speed.main(["--quick", "--repeats", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 x 128") or line.startswith("| 128 x 64")]
    # 2 shapes x 2 patterns x every solver variant, each with a finite error.
    labels = [label for label, _, _ in speed.variants(torch.device("cpu"))]
    assert {"magnitude", "wanda", "sparsegpt", "apt (no re-fit)", "apt"} <= set(labels)
    assert len(rows) == 4 * len(labels)
    for method in labels:
        assert sum(f"| {method} |" in r for r in rows) == 4
    assert all(math.isfinite(float(r.split("|")[-2])) for r in rows)
    assert "fraction of matmul peak" in out.read_text() and "exact re-fit (PCG" in out.read_text()
    # The inverse factor's two paths on each width, the one the solvers take marked.
    factor = out.read_text().split("## Inverse factor")[1].split("## ")[0]
    factor_rows = [r for r in factor.splitlines() if r.startswith(("| 64 |", "| 128 |"))]
    assert len(factor_rows) == 4 and sum("(used here)" in r for r in factor_rows) == 2

def test_speed_real_layer_hessians_match_the_pruners():
    """The --real section's Hessians equal those the Pruner accumulates for the same layers."""
    import torch
    from conftest import VOCAB, tiny_model

    from apt_viz import Pruner, PruningPlan

    model = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    got = _load("speed").layer_hessians(model, calib, names, torch.device("cpu"))
    pruner = Pruner(model)
    pruner.run(calib, PruningPlan(method="magnitude", sparsity=0.5), progress=False)
    for name in names:
        assert got[name].shape == (64, 64)
        torch.testing.assert_close(got[name], pruner.hessians.get(name), rtol=1e-5, atol=1e-6)


def test_memory_quick_records_peak_rss(tmp_path):
    out = tmp_path / "memory.md"
    _load("memory").main(["--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "128",
                          "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert "peak RSS of the pruning process" in text
    rss_gib = float(text.split("peak RSS of the pruning process | ")[1].split(" GiB")[0])
    base_gib = float(text.split("transformers) | ")[1].split(" GiB")[0])
    assert 0 < base_gib <= rss_gib < 8


def test_gpu_check_rehearses_on_cpu(tmp_path):
    """bench/gpu_check.sh is run only when a GPU is lent, so its steps are rehearsed here on CPU."""
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in (tmp_path / "tests.log").read_text() and "failed" not in (tmp_path / "tests.log").read_text()
    assert "| 64 x 128 | 2:4 | apt |" in (tmp_path / "speed-gpu.md").read_text()
    assert "peak RSS of the pruning process" in (tmp_path / "memory-gpu.md").read_text()


def test_speed_calls_timed_adds_up_each_call_and_puts_the_function_back():
    import time
    import types

    import pytest
    import torch

    speed = _load("speed")
    ns = types.SimpleNamespace(f=lambda x: time.sleep(0.01) or x + 1)
    own = ns.f
    with speed.calls_timed(ns, "f", torch.device("cpu")) as total:
        assert ns.f(1) == 2 and ns.f(2) == 3
        with pytest.raises(TypeError):
            ns.f()
    assert ns.f is own
    assert 0.02 <= total[0] < 1.0
