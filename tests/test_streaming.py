"""Streaming prune from safetensors shards: same weights as in memory, and resumable after a crash."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import apt_viz.runner as runner
from apt_viz import Pruner, PruningPlan
from apt_viz.streaming import STATE, prune_streaming

from conftest import tiny_model


def _saved(tmp_path, arch: str):
    model = tiny_model(arch)
    src = tmp_path / "src"
    # Small shards, so blocks are spread over several files as in a real checkpoint.
    model.save_pretrained(src, safe_serialization=True, max_shard_size="100KB")
    return model, src


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_streaming_matches_in_memory(tmp_path, calib, arch, device):
    plan = PruningPlan(method="sparsegpt", sparsity=0.5)
    _, src = _saved(tmp_path, arch)
    # The calibration may already sit on the device.
    res = prune_streaming(src, tmp_path / "out", calib.to(device), plan, device=device, progress=False)

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    pruner = Pruner(ref, device=device)
    pruner.run(calib, plan, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = _weights(ref)
    for k, v in _weights(got).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    assert set(res.results) == set(pruner.results)
    for name, r in res.results.items():
        assert r.sparsity == pruner.results[name].sparsity
        assert r.rel_error == pytest.approx(pruner.results[name].rel_error, rel=1e-4)


def test_streaming_matches_in_memory_with_forwards_through_onednn(tmp_path, calib, monkeypatch):
    from apt_viz import cpu_matmul

    # Both runs send every linear of their forwards through oneDNN (the tiny model's are too small otherwise).
    monkeypatch.setattr(cpu_matmul, "MIN_MACS", 0)
    calls = []
    real = cpu_matmul._onednn_linear
    monkeypatch.setattr(cpu_matmul, "_onednn_linear", lambda x, w, b: calls.append(1) or real(x, w, b))
    plan = PruningPlan(method="apt", sparsity=0.5)
    _, src = _saved(tmp_path, "llama")
    prune_streaming(src, tmp_path / "out", calib, plan, progress=False)
    assert calls
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    Pruner(ref).run(calib, plan, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = _weights(ref)
    for k, v in _weights(got).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, calib, monkeypatch):
    plan = PruningPlan(method="apt", sparsity="2:4")
    _, src = _saved(tmp_path, "llama")
    prune_streaming(src, tmp_path / "full", calib, plan, progress=False)

    real = runner.sparsify_weight

    def crash_in_block_1(W, H, spec, method, **kw):
        if crash_in_block_1.calls >= 7:  # the first layer of block 1 (block 0 has 7 linears)
            raise RuntimeError("simulated crash")
        crash_in_block_1.calls += 1
        return real(W, H, spec, method, **kw)

    crash_in_block_1.calls = 0
    monkeypatch.setattr(runner, "sparsify_weight", crash_in_block_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prune_streaming(src, tmp_path / "resumed", calib, plan, progress=False)
    assert (tmp_path / "resumed" / STATE).exists()
    assert not (tmp_path / "resumed" / "model.safetensors.index.json").exists()  # not loadable half done
    monkeypatch.setattr(runner, "sparsify_weight", real)
    res = prune_streaming(src, tmp_path / "resumed", calib, plan, progress=False)
    assert res.resumed_from == 1

    full = _weights(AutoModelForCausalLM.from_pretrained(tmp_path / "full"))
    resumed = _weights(AutoModelForCausalLM.from_pretrained(tmp_path / "resumed"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_output_of_another_run_is_refused(tmp_path, calib):
    _, src = _saved(tmp_path, "llama")
    plan = PruningPlan(method="wanda", sparsity=0.5, include=["model.layers.0.*"])
    prune_streaming(src, tmp_path / "out", calib, plan, progress=False)
    with pytest.raises(ValueError, match="empty output folder"):
        prune_streaming(src, tmp_path / "out", calib, PruningPlan(method="wanda", sparsity=0.6), progress=False)


def test_low_precision_activations_keep_float32_hessians(tmp_path, calib):
    _, src = _saved(tmp_path, "llama")
    plan = PruningPlan(method="sparsegpt", sparsity=0.5)
    res = prune_streaming(src, tmp_path / "out", calib, plan, act_dtype=torch.bfloat16, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    q = got.model.layers[1].self_attn.q_proj.weight
    assert q.dtype == torch.float32 and float((q == 0).float().mean()) == 0.5
    assert all(0 < r.rel_error < 1 for r in res.results.values())


def test_device_map_places_each_block(tmp_path, calib, monkeypatch):
    """An accelerate-style map sends each block to the device of its longest matching name."""
    import apt_viz.streaming as streaming

    cpu, meta, cuda = torch.device("cpu"), torch.device("meta"), torch.device("cuda", 1)
    devmap = {"model.layers": cpu, "model.layers.1": cuda}
    assert streaming._mapped_device(devmap, "model.layers.0", meta) == cpu
    assert streaming._mapped_device(devmap, "model.layers.1", meta) == cuda
    assert streaming._mapped_device(devmap, "model.layers.11", meta) == cpu  # not a child of layers.1
    assert streaming._mapped_device({}, "model.layers.3", meta) == meta
    assert streaming._mapped_device({"": cpu}, "model.layers.3", meta) == cpu

    seen = []
    real = streaming._load

    def spy(model, src, weight_map, names, device, dtype):
        if names and names[0].startswith("model.layers."):
            seen.append((names[0].split(".")[2], str(device)))
        return real(model, src, weight_map, names, device, dtype)

    monkeypatch.setattr(streaming, "_load", spy)
    _, src = _saved(tmp_path, "llama")
    prune_streaming(src, tmp_path / "out", calib, PruningPlan(method="wanda", sparsity=0.5),
                    device_map={"model.layers": "cpu"}, progress=False)
    assert seen == [("0", "cpu"), ("1", "cpu")]
