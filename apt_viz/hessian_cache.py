"""Keeps each layer's Hessian after calibration, in memory or spilled to disk as safetensors."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class HessianCache:
    """Per-layer Hessians by layer name, so a layer can be re-pruned without re-calibrating.

    Layers that read the same input (q/k/v, gate/up) share one Hessian through an alias. Once the
    in-memory total passes ``max_memory_bytes``, further Hessians go to ``spill_dir`` (a temporary
    folder if not given).
    """

    def __init__(self, max_memory_bytes: int = 2 << 30, spill_dir: str | os.PathLike | None = None) -> None:
        self.max_memory_bytes = max_memory_bytes
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._mem: dict[str, torch.Tensor] = {}
        self._disk: dict[str, Path] = {}
        self._alias: dict[str, str] = {}
        self.tokens: dict[str, int] = {}

    def put(self, name: str, H: torch.Tensor, tokens: int) -> None:
        """Store ``H`` for ``name`` (moved to the CPU)."""
        self.drop(name)
        H = H.detach().to("cpu", torch.float32)
        self.tokens[name] = tokens
        if self.memory_bytes() + H.numel() * 4 <= self.max_memory_bytes:
            self._mem[name] = H
            return
        path = self._dir() / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")
        save_file({"H": H.contiguous()}, str(path))
        self._disk[name] = path

    def alias(self, name: str, target: str) -> None:
        """Make ``name`` share the Hessian of ``target`` (same input)."""
        self.drop(name)
        self._alias[name] = self._alias.get(target, target)
        self.tokens[name] = self.tokens.get(target, 0)

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The Hessian of ``name`` on ``device``; KeyError if the layer was never calibrated."""
        key = self._alias.get(name, name)
        if key in self._mem:
            return self._mem[key].to(device)
        if key in self._disk:
            return load_file(str(self._disk[key]), device=str(device))["H"]
        raise KeyError(f"no cached Hessian for layer {name!r}; run calibration for it first")

    def __contains__(self, name: str) -> bool:
        key = self._alias.get(name, name)
        return key in self._mem or key in self._disk

    def drop(self, name: str) -> None:
        self._alias.pop(name, None)
        self._mem.pop(name, None)
        path = self._disk.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        for name in list(self._mem) + list(self._disk) + list(self._alias):
            self.drop(name)
        self.tokens.clear()

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    def _dir(self) -> Path:
        if self._spill_dir is not None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            return self._spill_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="apt_viz_hessians_")
        return Path(self._tmp.name)
