"""Catch what the decoder blocks receive: block 0's hidden states, and each block's other arguments.

No block runs while this happens. Each block's ``forward`` is swapped for a recorder that passes
the hidden state straight through, so the blocks may stay on the CPU, or on the ``meta`` device
when a model is streamed from disk. Only the parts outside the blocks (embeddings, rotary
tables, mask builders) run, on ``device``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Stop(Exception):
    """Raised inside a hook or recorder to end a forward pass early."""


BlockArgs = tuple[tuple, dict]


def capture_block_inputs(
    model: nn.Module,
    prefix: str,
    blocks: list[nn.Module],
    calib: torch.Tensor,
    device: torch.device,
    *,
    act_dtype: torch.dtype | None = None,
    act_device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], list[BlockArgs]]:
    """Return block 0's input for each calibration window, and every block's extra arguments.

    The extra arguments (masks, positions, rotary embeddings) come from the first window; all
    windows share one length, so they hold for every window. They are taken per block because
    some models pass different ones to different blocks (Gemma 3 alternates local and global
    attention). ``act_dtype``/``act_device`` store the captured activations in, e.g., bfloat16
    on the CPU, to bound memory on big models.
    """
    extra: list[BlockArgs | None] = [None] * len(blocks)
    inps: list[torch.Tensor] = []
    state = {"first": True}

    def recorder(i: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            args, kwargs, hidden = split_hidden(args, kwargs)
            if i == 0:
                inps.append(hidden.detach().to(act_device or hidden.device, act_dtype or hidden.dtype))
            if state["first"]:
                extra[i] = (args, kwargs)
            if i == len(blocks) - 1 or not state["first"]:
                raise Stop
            return hidden

        return forward

    moved = move_outside_blocks(model, prefix, device)
    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute shadows the class's forward
    try:
        with torch.no_grad():
            for j in range(calib.shape[0]):
                state["first"] = j == 0
                try:
                    model(calib[j : j + 1].to(device), use_cache=False)
                except Stop:
                    pass
    finally:
        for block in blocks:
            del block.forward
        restore_devices(moved)
    return inps, extra  # type: ignore[return-value]


def first_output(out: Any) -> torch.Tensor:
    """A block's hidden-state output, whether it returns a tensor or a tuple (older transformers)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def split_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
    """Separate a block call's hidden state (first positional or ``hidden_states=``) from the rest."""
    if args:
        return tuple(args[1:]), dict(kwargs), args[0]
    kwargs = dict(kwargs)
    return (), kwargs, kwargs.pop("hidden_states")


def move_outside_blocks(model: nn.Module, prefix: str, device: torch.device) -> list[tuple[nn.Module, str, str, torch.device]]:
    """Move parameters and buffers that are not inside the blocks to ``device``; return how to undo it."""
    moved = []
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        if mname == prefix or mname.startswith(prefix + "."):
            continue
        for store in ("_parameters", "_buffers"):
            for key, t in getattr(mod, store).items():
                # Meta tensors (a streamed model's unloaded head) have nothing to move.
                if t is None or t.is_meta:
                    continue
                # A tied weight (embedding = lm_head) is one Parameter under two names, moved by
                # its .data: recording it twice would make the second record's home the device it
                # was just moved to. (A buffer is replaced per name, so each name has its own record.)
                if store == "_parameters":
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                if t.device != device:
                    moved.append((mod, store, key, t.device))
                    _swap(mod, store, key, t, device)
    return moved


def restore_devices(moved: list[tuple[nn.Module, str, str, torch.device]]) -> None:
    """Undo :func:`move_outside_blocks`, last move first."""
    for mod, store, key, dev in reversed(moved):
        _swap(mod, store, key, getattr(mod, store)[key], dev)


def _swap(mod: nn.Module, store: str, key: str, t: torch.Tensor, device: torch.device) -> None:
    # Replacing .data keeps the Parameter object, so tied weights (embedding = lm_head) stay tied.
    if store == "_parameters":
        t.data = t.data.to(device)
    else:
        getattr(mod, store)[key] = t.to(device)
