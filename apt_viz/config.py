"""Validated configuration: sparsity specs and the pruning plan.

Everything a user (or a widget) can set is checked here, in one place, so that solvers and the
runner can trust their inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = ("magnitude", "wanda", "sparsegpt", "apt")
# The choices of APT's re-fit matmul dtype (solvers.refit.MATMUL_DTYPES maps the last two to torch dtypes).
REFIT_DTYPES = ("auto", "float32", "bfloat16")


class PlanError(ValueError):
    """A pruning plan or sparsity spec that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Sparsity:
    """How many weights of a layer to remove.

    Unstructured: ``fraction`` of the weights become zero. N:M: in every group of ``m``
    consecutive input weights of a row, exactly ``n`` become zero (so ``fraction == n / m``).
    """

    fraction: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m or self.n:
            if not (isinstance(self.n, int) and isinstance(self.m, int)):
                raise PlanError(f"N:M needs integers, got {self.n!r}:{self.m!r}")
            if not 1 <= self.n < self.m:
                raise PlanError(
                    f"N:M pattern {self.n}:{self.m} is invalid: need 1 <= N < M "
                    "(N zeros in every group of M), e.g. 2:4 or 4:8"
                )
            if not math.isclose(self.fraction, self.n / self.m):
                raise PlanError(f"N:M {self.n}:{self.m} implies sparsity {self.n / self.m}, got {self.fraction}")
        elif not (isinstance(self.fraction, (int, float)) and 0.0 <= self.fraction < 1.0):
            raise PlanError(f"sparsity must be in [0, 1), got {self.fraction!r}; e.g. 0.5 removes half the weights")

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, value: "Sparsity | float | str", pattern: str | None = None) -> "Sparsity":
        """Parse ``0.5``, ``"50%"``, ``"2:4"``; or a fraction plus ``pattern="2:4"``/``"unstructured"``."""
        if isinstance(value, Sparsity):
            return value
        if pattern not in (None, "", "unstructured"):
            return cls.parse(pattern)
        if isinstance(value, str):
            text = value.strip()
            nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
            if nm:
                n, m = int(nm.group(1)), int(nm.group(2))
                if m == 0:
                    raise PlanError(f"N:M pattern {text!r} has M = 0; use e.g. 2:4")
                return cls(n / m, n, m)
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise PlanError(f"cannot read sparsity {value!r}: use a fraction like 0.5, a percentage like '50%', or N:M like '2:4'") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"sparsity must be a number or 'N:M', got {type(value).__name__}")
        return cls(float(value))

    def __str__(self) -> str:
        return self.pattern if self.structured else f"{self.fraction:.0%}"


@dataclass
class LayerOverride:
    """Per-layer settings that replace the plan's global ones for matching layers."""

    sparsity: float | None = None
    pattern: str | None = None
    method: str | None = None


@dataclass
class PruningPlan:
    """Which layers to prune, how much, with which method. Serialises to JSON.

    Layer names are the model's module names (``model.layers.3.self_attn.q_proj``); ``include``,
    ``exclude`` and the keys of ``overrides`` are shell-style globs over them (``*.mlp.*``). A later
    override wins over an earlier one. ``refit`` (APT only) re-fits every row exactly on its chosen
    mask, the default; ``False`` runs the paper's algorithm alone: about SparseGPT's speed, with a
    layer error 1.2-1.6x the re-fitted one on the benchmark's layers (still below SparseGPT's).
    ``refit_dtype`` is the re-fit's matmul dtype: ``"auto"`` (bfloat16 where the device has bfloat16
    matmul units, float32 elsewhere), ``"float32"`` (the same weights on every machine) or
    ``"bfloat16"``; the re-fit's error is certified within ``refit_rtol`` either way.
    ``sequential`` calibrates each group of layers that share an input (q/k/v, o, gate/up, down)
    on the outputs of the block's already pruned groups, as SparseGPT's ``--true-sequential``: more
    forwards per block, and while a group's successor shares a submodule with it (Llama's MLP) the
    inputs of that submodule are held as well, one more set of calibration activations.
    """

    method: str = "apt"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = False
    refit: bool = True
    refit_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.overrides = {
            k: v if isinstance(v, LayerOverride) else _from_dict(LayerOverride, v, f"overrides[{k!r}]")
            for k, v in dict(self.overrides).items()
        }
        self.validate()

    def validate(self) -> "PruningPlan":
        _check_method(self.method)
        Sparsity.parse(self.sparsity, self.pattern)
        for name in ("include", "exclude"):
            globs = getattr(self, name)
            if isinstance(globs, str) or not all(isinstance(g, str) for g in globs):
                raise PlanError(f"{name} must be a list of name globs, e.g. ['*.mlp.*'], got {globs!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise PlanError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if not isinstance(self.percdamp, (int, float)) or not 0 <= self.percdamp < 1:
            raise PlanError(f"percdamp must be in [0, 1) (0.01 is usual), got {self.percdamp!r}")
        if not isinstance(self.refit, bool):
            raise PlanError(f"refit must be True or False, got {self.refit!r}")
        if self.refit_dtype not in REFIT_DTYPES:
            raise PlanError(f"refit_dtype must be one of {', '.join(map(repr, REFIT_DTYPES))}, got {self.refit_dtype!r}")
        for glob, ov in self.overrides.items():
            method = ov.method or self.method
            _check_method(method)
            frac = self.sparsity if ov.sparsity is None else ov.sparsity
            pattern = self.pattern if ov.pattern is None else ov.pattern
            try:
                Sparsity.parse(frac, pattern)
            except PlanError as e:
                raise PlanError(f"override {glob!r}: {e}") from None
        return self

    @property
    def method_label(self) -> str:
        """The method as tables and run labels show it: ``apt (no re-fit)`` for APT without its re-fit."""
        return f"{self.method} (no re-fit)" if self.method == "apt" and not self.refit else self.method

    def selects(self, name: str) -> bool:
        """True if the layer ``name`` is part of this plan."""
        hit = any(fnmatch.fnmatchcase(name, g) for g in self.include)
        return hit and not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)

    def layer_settings(self, name: str) -> tuple[str, Sparsity]:
        """The (method, sparsity) that applies to layer ``name``."""
        method, frac, pattern = self.method, self.sparsity, self.pattern
        for glob, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, glob):
                method = ov.method or method
                if ov.sparsity is not None:
                    frac = ov.sparsity
                    if ov.pattern is None:
                        pattern = "unstructured"
                if ov.pattern is not None:
                    pattern = ov.pattern
        return method, Sparsity.parse(frac, pattern)

    def check_names(self, names: list[str]) -> None:
        """Raise if an include glob or override matches none of ``names`` (lists the nearest ones, and says
        when the plan was made for another model), or if the plan selects no layer."""
        from .checks import check_plan_names  # checks imports this module

        check_plan_names(self, list(names))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        return _from_dict(cls, data, "plan")

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "sparsity": (int, float), "pattern": (str,), "include": (list,), "exclude": (list,),
    "overrides": (dict,), "blocksize": (int,), "percdamp": (int, float), "sequential": (bool,),
    "refit": (bool,), "refit_dtype": (str,),
}


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass from JSON data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PlanError(f"{where} has unknown keys {unknown}; allowed: {sorted(names)}")
    for key, value in data.items():
        if cls is LayerOverride:
            ok = value is None or isinstance(value, (str,) if key != "sparsity" else (int, float))
        else:
            ok = isinstance(value, _TYPES[key])
        # bool is an int to isinstance: refuse it wherever the field is not itself a bool.
        if not ok or (isinstance(value, bool) and bool not in _TYPES.get(key, ())):
            raise PlanError(f"{where}.{key} has the wrong type {type(value).__name__}")
    return cls(**data)


def nearest(query: str, names: list[str], k: int = 3) -> list[str]:
    """The ``k`` names closest to ``query`` by edit similarity (for error messages)."""
    import difflib

    return difflib.get_close_matches(query, names, n=k, cutoff=0.0)
