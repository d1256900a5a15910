"""Prune a model larger than memory: one decoder block at a time, from and to safetensors shards.

The model is built on the ``meta`` device (no weights). The parts outside the blocks are loaded
to capture block 0's inputs, then released. Each block is then loaded from the source shards,
pruned against the calibration activations, run once to give the next block its inputs, written
to its own shard and released. Peak memory is about one block, its Hessians and the activations.

After each block, the block's shard, its per-layer results and the next block's inputs are on
disk, so a run that stops (interrupt, crash, out of memory) resumes from the last finished
block and gives the same weights as a run that never stopped. The source folder is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .allocator import fix_mmap_threshold
from .arch import block_index
from .atomic import atomic_save_tensors, atomic_write
from .capture import capture_block_inputs, first_output
from .checks import check_calibration, check_device, check_plan, check_weight_files
from .config import PruningPlan
from .cpu_matmul import fast_linears
from .runner import LayerResult, Pruner

STATE = "stream-state.json"
INDEX = "model.safetensors.index.json"


@dataclass
class StreamResult:
    """Where the pruned model is, and what pruning each layer did."""

    folder: Path
    results: dict[str, LayerResult]
    resumed_from: int
    seconds: float


def prune_streaming(
    source: str | os.PathLike,
    output: str | os.PathLike,
    calib: torch.Tensor,
    plan: PruningPlan,
    *,
    device: str | torch.device = "cpu",
    device_map: Mapping[str, str | torch.device] | None = None,
    dtype: torch.dtype | None = None,
    act_dtype: torch.dtype | None = None,
    act_device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, int, str], None] | None = None,
    trust_remote_code: bool = False,
) -> StreamResult:
    """Prune the safetensors checkpoint in ``source`` block by block into the folder ``output``.

    ``dtype``: the dtype blocks are loaded and saved in (default: the checkpoint's). ``act_dtype``
    and ``act_device`` keep the calibration activations in, e.g., ``torch.bfloat16`` on ``"cpu"``
    while blocks run on ``device``; Hessians and solves stay float32. ``device_map`` (accelerate
    style: module name -> device, e.g. ``{"model.layers.0": "cuda:0", "model.layers.16": "cuda:1"}``;
    the longest matching name wins) spreads the blocks over several GPUs: each block is loaded,
    pruned and run on its own device, and the activations follow it. With ``resume`` (default), a
    previous run into ``output`` with the same source, calibration and plan continues from its last
    finished block. ``output`` loads with ``from_pretrained`` once the run has finished.
    On glibc this sets the process-wide mmap threshold (:mod:`apt_viz.allocator`), which keeps the
    resident memory flat from block to block.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    t_start = time.perf_counter()
    fix_mmap_threshold()
    src, out = Path(source), Path(output)
    check_weight_files(src)
    weight_map = _weight_map(src)
    device = check_device(device)
    devmap = {k: check_device(v) for k, v in (device_map or {}).items()}
    calib = check_calibration(torch.as_tensor(calib), None)
    plan = plan.validate()

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    from accelerate import init_empty_weights

    # Buffers (rotary tables) are computed at construction, so only parameters are left empty.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    pruner = Pruner.unchecked(model, device=device)
    selected = check_plan(plan, pruner.layers)
    prefix, blocks = pruner.prefix, pruner.blocks
    missing = [n for n, _ in model.named_parameters() if n not in weight_map and not _tied(model, n)]
    if missing:
        raise ValueError(
            f"{len(missing)} parameters of {type(model).__name__} (e.g. {missing[0]}) are not in the checkpoint {src}; "
            "pass the folder that save_pretrained wrote for this model"
        )

    fingerprint = _fingerprint(src, calib, plan, dtype, act_dtype)
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out)
    if state is not None and not (resume and state["fingerprint"] == fingerprint):
        raise ValueError(
            f"{out} holds a streaming run with another source, calibration or plan"
            + ("" if resume else " (resume=False)")
            + "; choose an empty output folder or delete this one"
        )
    done = state["done"] if state else -1
    results = {r["name"]: LayerResult.from_dict(r) for r in (state or {}).get("results", [])}

    # The output head never runs while block inputs are captured, so it is not loaded for that.
    head = model.get_output_embeddings()
    head_names = {n for n, p in model.named_parameters() if head is not None and any(p is q for q in head.parameters())}
    outside = [n for n in weight_map if not _in_blocks(n, prefix) and n not in head_names]
    _load(model, src, weight_map, outside, device, dtype)
    model.tie_weights()
    if done < 0:
        inps, extra = capture_block_inputs(model, prefix, blocks, calib, device, act_dtype=act_dtype, act_device=act_device)
    else:
        inps = [x.to(act_device or device) for x in _ordered(load_file(str(out / _acts_name(done))))]
        # The blocks' extra arguments do not depend on the tokens, so one window recovers them.
        _, extra = capture_block_inputs(model, prefix, blocks, calib[:1], device)
    _release(model, [n for n, _ in model.named_parameters() if not _in_blocks(n, prefix)])

    chosen: dict[int, list[str]] = {b: [] for b in range(len(blocks))}
    for n in selected:
        chosen[block_index(n)].append(n)
    bar = tqdm(total=len(blocks), initial=done + 1, desc="pruning blocks (streaming)", unit="block", disable=not progress)
    with torch.no_grad(), fast_linears(model):
        for b in range(done + 1, len(blocks)):
            block = blocks[b]
            dev = _mapped_device(devmap, f"{prefix}.{b}", device)
            args = _to_device(extra[b], dev)
            names = [n for n in weight_map if n.startswith(f"{prefix}.{b}.")]
            _load(model, src, weight_map, names, dev, dtype)
            compute = next(block.parameters()).dtype
            if chosen[b]:
                run = [x.to(dev, compute) for x in inps]
                pruner.device = dev
                pruner._prune_block(b, block, chosen[b], run, args, plan, None)
                del run
                for n in chosen[b]:
                    results[n] = pruner.results.pop(n)
                    pruner.hessians.drop(n)
            inps = [first_output(block(x.to(dev, compute), *args[0], **args[1])).to(act_device or dev, act_dtype or x.dtype)
                    for x in inps]
            params = {n: t.detach().to("cpu").contiguous() for n, t in block.named_parameters(prefix=f"{prefix}.{b}")}
            atomic_save_tensors(params, out / _shard_name(b))
            del params  # else this block stays in memory while the next one is pruned
            if b < len(blocks) - 1:
                atomic_save_tensors({f"{i:06d}": x.contiguous() for i, x in enumerate(inps)}, out / _acts_name(b))
            state = {"fingerprint": fingerprint, "done": b, "blocks": len(blocks),
                     "results": [r.to_dict() for r in results.values()]}
            atomic_write(out / STATE, json.dumps(state))
            if b > 0:
                (out / _acts_name(b - 1)).unlink(missing_ok=True)
            _release(model, names)
            bar.update(1)
            if callback:
                callback(b + 1, len(blocks), f"block {b}")
    bar.close()
    _finish(src, out, weight_map, prefix, len(blocks), dtype)
    return StreamResult(out, results, done + 1, time.perf_counter() - t_start)


# ------------------------------------------------------------------------------------------ files
def _weight_map(src: Path) -> dict[str, str]:
    """Parameter name -> shard file, from the index or the single ``model.safetensors``."""
    index = src / INDEX
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = src / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no {INDEX} or model.safetensors in {src}; save the model with save_pretrained first")
    with safe_open(str(single), "pt") as f:
        return {k: single.name for k in f.keys()}


def _load(model: nn.Module, src: Path, weight_map: dict[str, str], names: list[str], device: torch.device,
          dtype: torch.dtype | None) -> None:
    """Read ``names`` from their shards into ``model`` on ``device``, one shard file open at a time."""
    from accelerate.utils import set_module_tensor_to_device

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(weight_map[n], []).append(n)
    for file, keys in by_file.items():
        with safe_open(str(src / file), "pt", device="cpu") as f:
            for k in keys:
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                set_module_tensor_to_device(model, k, device, value=t)


def _release(model: nn.Module, names: list[str]) -> None:
    """Put parameters back on ``meta`` so their memory is freed."""
    from accelerate.utils import set_module_tensor_to_device

    params = dict(model.named_parameters())
    for n in names:
        if n in params:
            set_module_tensor_to_device(model, n, "meta")


def _finish(src: Path, out: Path, weight_map: dict[str, str], prefix: str, nblocks: int, dtype: torch.dtype | None) -> None:
    """Write the shard of everything outside the blocks, copy config and tokenizer, then the index."""
    outside = [n for n in weight_map if not _in_blocks(n, prefix)]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({weight_map[n] for n in outside}):
        with safe_open(str(src / file), "pt") as f:
            for k in outside:
                if weight_map[k] == file:
                    t = f.get_tensor(k)
                    tensors[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    atomic_save_tensors(tensors, out / "model-outside-blocks.safetensors")
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX:
            shutil.copy2(p, out / p.name)
    if dtype is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write(out / "config.json", json.dumps(cfg, indent=2))
    new_map = {n: "model-outside-blocks.safetensors" for n in outside}
    for b in range(nblocks):
        with safe_open(str(out / _shard_name(b)), "pt") as f:
            new_map.update({k: _shard_name(b) for k in f.keys()})
    # The index is written last: until it exists the folder does not load as a model.
    atomic_write(out / INDEX, json.dumps({"metadata": {}, "weight_map": new_map}, indent=2))


def _read_state(out: Path) -> dict[str, Any] | None:
    p = out / STATE
    return json.loads(p.read_text()) if p.exists() else None


def _fingerprint(src: Path, calib: torch.Tensor, plan: PruningPlan, dtype: Any, act_dtype: Any) -> str:
    h = hashlib.sha256()
    h.update(str(src.resolve()).encode())
    h.update(calib.to(torch.int64).cpu().numpy().tobytes())
    h.update(plan.to_json().encode())
    h.update(f"{dtype}|{act_dtype}".encode())
    return h.hexdigest()


def _shard_name(b: int) -> str:
    return f"model-block-{b:05d}.safetensors"


def _acts_name(b: int) -> str:
    return f".acts-after-block-{b:05d}.safetensors"


def _mapped_device(devmap: Mapping[str, torch.device], name: str, default: torch.device) -> torch.device:
    """The device of the longest ``devmap`` key that is ``name`` or one of its parents ("" = all)."""
    best = max((k for k in devmap if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    return default if best is None else devmap[best]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _ordered(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[k] for k in sorted(tensors)]


def _in_blocks(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _tied(model: nn.Module, name: str) -> bool:
    """True if ``name`` is a tied copy (lm_head = embeddings) that checkpoints leave out."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(name == k or name.startswith(k.rstrip("$").split("(")[0]) for k in keys)
