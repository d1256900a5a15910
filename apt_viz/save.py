"""Save a pruned model as a Hugging Face folder, with its masks and a record of the run, atomically.

The folder holds what ``save_pretrained`` writes (safetensors weights and config), the tokenizer,
``masks.safetensors`` (layer name -> bool mask, True = kept) and ``run.json`` (the plan, the
calibration settings, per-layer results, perplexities and library versions). Everything is written
into a hidden sibling folder first and renamed into place, so a crash mid-save never leaves a
half-written folder and never destroys the previous save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

MASKS_FILE = "masks.safetensors"
RUN_FILE = "run.json"
# run.json carries this key, so an existing folder is only ever replaced if an earlier save made it.
_MARKER = "apt_viz_save"


def save_pruned(
    model: torch.nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    *,
    masks: Mapping[str, torch.Tensor],
    record: Mapping[str, Any],
) -> Path:
    """Write ``model`` (safetensors), ``tokenizer``, ``masks`` and ``record`` to ``folder`` atomically.

    ``folder`` may not exist yet, be empty, or hold an earlier save (its ``run.json`` says so); any
    other existing folder is refused, so a typo can never replace unrelated files. Returns the folder.
    """
    out = check_save_target(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.saving-"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the save should get the usual folder mode
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors = {name: m.detach().to("cpu", torch.bool).contiguous() for name, m in masks.items()}
        save_file(tensors, str(tmp / MASKS_FILE), metadata={"format": "pt", "meaning": "True = weight kept"})
        payload = {_MARKER: 1, **dict(record), "versions": versions()}
        (tmp / RUN_FILE).write_text(json.dumps(payload, indent=2, default=_json_default))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_masks(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The masks of a saved run (layer name -> bool tensor, True = kept), read with safetensors only."""
    path = Path(folder) / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by save_pruned / `apt-viz prune --save`")
    return {name: t.to(torch.bool) for name, t in load_file(str(path)).items()}


def load_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` record of a saved run."""
    return json.loads((Path(folder) / RUN_FILE).read_text())


def versions() -> dict[str, str]:
    """Versions of the libraries that produced a save, for reproducing it."""
    import transformers

    from . import __version__

    return {"apt_viz": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_save_target(folder: str | os.PathLike) -> Path:
    """The absolute save folder; raises if it exists and is neither empty nor an earlier save."""
    out = Path(folder).expanduser().absolute()
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another path for --save")
    if any(out.iterdir()) and not _is_previous_save(out):
        raise FileExistsError(
            f"{out} already exists and is not an earlier apt_viz save (no run.json from save_pruned); "
            "choose a new folder for --save, or remove this one yourself"
        )
    return out


def _is_previous_save(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / RUN_FILE).read_text()).get(_MARKER))
    except (OSError, ValueError, AttributeError):
        return False


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside and removed only once ``tmp`` is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old)  # replacing an empty folder by rename is allowed on POSIX
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot write {type(value).__name__} to run.json")
