"""Model plumbing: find the decoder blocks and the prunable linears of any causal LM.

Nothing here is written per model family. Blocks are the longest ``nn.ModuleList`` of same-class
modules that hold linears; linears are ``nn.Linear`` and GPT-2's ``Conv1D`` (which stores its
weight transposed, as in x out).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment]

PRUNABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


class ArchitectureError(ValueError):
    """The model's structure is not one the runner can walk; the message says what is missing."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(prefix, blocks)``: the decoder blocks, e.g. ``("model.layers", ModuleList)``."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1 or not any(isinstance(m, PRUNABLE) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        lists = [f"{n} ({type(m).__name__}, {len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ArchitectureError(
            f"found no decoder blocks in {type(model).__name__}: expected an nn.ModuleList of identical blocks "
            f"that contain nn.Linear or Conv1D layers; module lists seen: {lists or 'none'}. Pass a causal LM whose "
            "decoder layers sit in an nn.ModuleList (any Hugging Face AutoModelForCausalLM, e.g. from load_model), "
            "or put your model's repeated blocks in an nn.ModuleList"
        )
    return best


def find_linears(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The prunable linears of ``block`` by full name (``prefix.self_attn.q_proj``), in module order."""
    found = {f"{prefix}.{n}" if prefix else n: m for n, m in block.named_modules() if isinstance(m, PRUNABLE)}
    if not found:
        raise ArchitectureError(f"block {prefix or type(block).__name__} has no nn.Linear or Conv1D layer to prune")
    return found


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear inside the decoder blocks, by full module name."""
    prefix, blocks = find_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(find_linears(block, f"{prefix}.{i}"))
    return out


# Linears whose weight the model multiplies directly, without calling the module, get their
# input from a sibling's output instead: (parent class, child) -> (sibling, input from its output).
DERIVED_INPUTS: dict[tuple[str, str], tuple[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]] = {
    ("MambaMixer", "dt_proj"): ("x_proj", lambda mixer, out: out[..., : mixer.time_step_rank]),
}


def input_source(model: nn.Module, name: str) -> tuple[nn.Module, Callable[[nn.Module, tuple, Any], torch.Tensor], bool]:
    """The module whose hook sees layer ``name``'s input, how to read it from the hook's
    ``(module, inputs, output)``, and whether that is a pre-hook (``output`` is then None).

    A layer that is called reads its own input before it runs, so that a forward which only
    gathers inputs can stop there without the layer's product.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    derived = DERIVED_INPUTS.get((type(parent).__name__, leaf))
    if derived is None:
        return model.get_submodule(name), lambda mod, inp, out: inp[0], True
    sibling, read = derived
    return getattr(parent, sibling), lambda mod, inp, out: read(parent, out), False


def shared_parent(names: Iterable[str]) -> str:
    """The dotted path of the deepest module that holds every module in ``names`` ("" for the root)."""
    return ".".join(os.path.commonprefix([n.split(".")[:-1] for n in names]))


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out x in); a view of the parameter (transposed for Conv1D)."""
    w = module.weight.data
    return w.t() if _transposed(module) else w


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out x in) weight back in the module's own layout and dtype."""
    target = module.weight.data
    target.copy_(W.t() if _transposed(module) else W)


def _transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def sublayer_kind(name: str) -> str:
    """Short kind of a layer for grouping in views: ``q_proj``, ``down_proj``, ``attn.c_attn``..."""
    parts = name.split(".")
    idx = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), None)
    tail = parts[idx + 1 :] if idx is not None else parts[-1:]
    # Keep the parent where the leaf alone is ambiguous (GPT-2 has attn.c_proj and mlp.c_proj).
    return ".".join(tail[-2:]) if len(tail) >= 2 and tail[-1] in {"c_proj", "out_proj", "dense"} else tail[-1]


def block_index(name: str) -> int:
    """The decoder block a layer belongs to (the first integer component of its name)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"layer name {name!r} has no block index")
