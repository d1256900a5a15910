"""Validation of what a user hands the runner and the loaders: model, device, calibration, plan, records.

Every check raises an error whose message says what to change. The checks run before anything is
modified, so a bad input never leaves a model half pruned. Heavy modules (``arch``, which imports
transformers, and ``data``) are imported inside the functions that need them, so ``data`` can import
this module cheaply.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from .config import PlanError, PruningPlan, Sparsity, nearest

if TYPE_CHECKING:  # pragma: no cover
    from .runner import LayerResult


class ModelError(ValueError):
    """A model the runner cannot prune as given (no values on the meta device, quantized weights)."""


class DeviceError(ValueError):
    """A device that does not exist on this machine."""


class DataError(ValueError):
    """Calibration or evaluation text or tokens that cannot be used (empty, too short, wrong ids)."""


class ReportError(ValueError):
    """A saved run record (per-layer results) with unknown keys or wrong types."""


class NumericalError(RuntimeError):
    """NaN/Inf in a layer's inputs or weights, or a Hessian no damping repairs; the dense weights are kept."""


# --------------------------------------------------------------------------- device


def available_devices() -> list[str]:
    """Names of the devices torch can use here, ``"cpu"`` first."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def check_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a ``torch.device``, or raise :class:`DeviceError` listing the real ones."""
    available = available_devices()
    fix = f"available devices: {', '.join(available)}; pass one of them, e.g. device='cpu'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"invalid device {device!r}: not a device name torch knows; {fix}") from None
    if dev.type == "cpu":
        return dev
    ok = str(dev) in available or (dev.type in available and dev.index is None)
    if not ok:
        raise DeviceError(f"device {str(device)!r} does not exist on this machine; {fix}")
    warn_tf32_override(dev)
    # Tensors report an index ("cuda:0"), and torch.device("cuda") compares unequal to it.
    return dev if dev.index is not None else torch.empty(0, device=dev).device


# torch's switch that makes cuBLAS run float32 matmuls as TF32 past torch's own setting; NVIDIA's
# PyTorch containers set it. (NVIDIA_TF32_OVERRIDE only turns TF32 off: no other value is honoured.)
TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


def warn_tf32_override(dev: torch.device) -> None:
    """Warn when the environment makes cuBLAS run float32 matmuls as TF32 whatever torch asks for.

    That switch overrides the IEEE float32 setting that the Hessians and solves run under
    (:func:`apt_viz.precision.ieee_float32`): their products then keep 10 bits of mantissa, and
    the re-fit's certified error no longer holds.
    """
    if dev.type == "cuda" and os.environ.get(TF32_OVERRIDE) == "1":
        warnings.warn(
            f"{TF32_OVERRIDE}=1 in the environment: cuBLAS then runs the Hessians' and solvers' float32 matmuls "
            f"as TF32 whatever apt_viz asks for; set {TF32_OVERRIDE}=0 before starting Python for float32 solves",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- model

# Class names of the quantized linears of bitsandbytes, GPTQ/AutoGPTQ, AWQ, HQQ, EETQ, FBGEMM-FP8,
# optimum-quanto and torchao: none of them holds a float weight the solvers can update.
_QUANT_MODULES = re.compile(
    r"^(Linear8bitLt|Linear4bit|LinearFP4|LinearNF4|QuantLinear|QuantizedLinear|WQLinear\w*|HQQLinear\w*|"
    r"EetqLinear|FP8Linear|FbgemmFp8Linear|QLinear|MarlinQuantLinear|ExllamaQuantLinear\w*|Int8\w*Linear\w*)$"
)
_FLOAT_FIX = (
    "pruning needs the float weights: load the original float checkpoint instead, e.g. "
    "load_model('<model id or folder>', dtype='float32' or 'bfloat16'), or from_pretrained(...) without "
    "load_in_8bit / load_in_4bit / quantization_config"
)


def quantization(model: nn.Module) -> str | None:
    """Why ``model`` looks quantized (int8 / 4-bit / GPTQ / AWQ ...), or ``None`` if it holds float weights."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
        method = getattr(method, "value", method)
        return f"its config has a quantization_config (quant_method={method!r})"
    if getattr(model, "is_quantized", False) is True or getattr(model, "hf_quantizer", None) is not None:
        return "it was loaded with a quantizer (model.is_quantized)"
    for name, mod in model.named_modules():
        if _QUANT_MODULES.match(type(mod).__name__):
            return f"module {name} is a quantized {type(mod).__name__}"
    for name, p in model.named_parameters():
        if not (p.dtype.is_floating_point or p.dtype.is_complex):
            return f"parameter {name} is stored as {str(p.dtype).replace('torch.', '')}"
    return None


def check_model(model: nn.Module) -> None:
    """Raise :class:`ModelError` if ``model`` has no parameters, holds no values (meta) or is quantized."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch nn.Module (a causal LM), got {type(model).__name__}; load one with apt_viz.models.load_model")
    params = list(model.named_parameters())
    if not params:
        raise ModelError(f"{type(model).__name__} has no parameters to prune; pass a causal LM, e.g. from apt_viz.models.load_model")
    meta = [n for n, t in [*params, *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelError(
            f"{len(meta)} tensors of the model (e.g. {meta[0]}) are on the 'meta' device and hold no values, "
            "so there is nothing to prune: load the model with real weights on one device "
            "(load_model(...), or from_pretrained(...) without device_map='meta', init_empty_weights or disk offload), "
            "or materialise it with model.to_empty(device='cpu') followed by load_state_dict; "
            "for a model larger than memory, prune it from its safetensors folder with apt_viz.streaming.prune_streaming"
        )
    why = quantization(model)
    if why:
        raise ModelError(f"the model is quantized ({why}); {_FLOAT_FIX}")


def check_weight_files(folder: str | os.PathLike) -> None:
    """Raise :class:`ModelError` if a local model folder has pickle weights but no safetensors ones.

    Pickle files (``pytorch_model.bin``, ``*.pt``) can run code when loaded, so they are never read.
    """
    path = Path(folder)
    if not path.is_dir():
        return
    if any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"})
    if pickles:
        raise ModelError(
            f"{str(path)!r} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded and are "
            "never read here: convert the folder to safetensors once, in an environment you trust "
            "(model.save_pretrained(folder, safe_serialization=True)), or use a checkpoint that ships model.safetensors"
        )


# --------------------------------------------------------------------------- calibration


def check_calibration(calib: Any, model: nn.Module | None = None) -> torch.Tensor:
    """Return ``calib`` as an (nsamples x seqlen) LongTensor, or raise :class:`DataError` saying what to change.

    With ``model``, token ids must lie inside its vocabulary and ``seqlen`` within its positions.
    """
    try:
        calib = torch.as_tensor(calib)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"calibration tokens must be a tensor of token ids; build one with data.calibration_windows(tokenizer, text): {e}") from None
    if calib.dtype.is_floating_point or calib.dtype.is_complex or calib.dtype == torch.bool:
        raise DataError(
            f"calibration tokens must be integer token ids, got dtype {str(calib.dtype).replace('torch.', '')}; "
            "build them with data.calibration_windows(tokenizer, text, nsamples, seqlen)"
        )
    if calib.dim() != 2 or calib.numel() == 0:
        hint = " (for one sample use ids[None])" if calib.dim() == 1 and calib.numel() else ""
        raise DataError(
            f"calibration tokens must be a non-empty (nsamples x seqlen) tensor, got shape {tuple(calib.shape)}{hint}; "
            "build them with data.calibration_windows(tokenizer, text, nsamples, seqlen)"
        )
    if model is not None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
        lo, hi = int(calib.min()), int(calib.max())
        if lo < 0 or (isinstance(vocab, int) and hi >= vocab):
            bad = lo if lo < 0 else hi
            raise DataError(
                f"calibration token id {bad} is outside the model's vocabulary (0 .. {vocab - 1 if vocab else '?'}): "
                "tokenize the calibration text with the model's own tokenizer"
            )
        from .data import max_seqlen

        seqlen = calib.shape[1]
        limit = max_seqlen(model, seqlen)
        if limit < seqlen:
            raise DataError(f"calibration windows of seqlen {seqlen} are longer than the model's {limit} positions; use seqlen <= {limit}")
    return calib.long()


# --------------------------------------------------------------------------- plan


def _in_features(module: nn.Module) -> int:
    from .arch import get_weight

    return int(get_weight(module).shape[1])


def check_layer_fits(name: str, module: nn.Module, spec: Sparsity) -> None:
    """Raise :class:`PlanError` if an N:M ``spec`` does not tile layer ``name``'s input width."""
    width = _in_features(module)
    if spec.structured and width % spec.m:
        raise PlanError(
            f"N:M {spec.pattern} needs the input width of {name} ({width}) to be a multiple of {spec.m}: "
            f"exclude it (PruningPlan(exclude=[{name!r}])) or choose an M that divides {width}"
        )


def check_plan(plan: PruningPlan, layers: Mapping[str, nn.Module]) -> list[str]:
    """Check ``plan`` against the model's prunable ``layers`` before anything changes; returns the chosen names.

    Raises :class:`PlanError` as :func:`check_plan_names` does, and when an N:M pattern does not tile a
    chosen layer's input width.
    """
    chosen = check_plan_names(plan, list(layers))
    misfit = []
    for n in chosen:
        spec = plan.layer_settings(n)[1]
        if spec.structured and _in_features(layers[n]) % spec.m:
            misfit.append((n, spec))
    if misfit:
        n, spec = misfit[0]
        widths = sorted({_in_features(layers[x]) for x, _ in misfit})
        raise PlanError(
            f"N:M {spec.pattern} needs each layer's input width to be a multiple of {spec.m}, but {len(misfit)} chosen layers "
            f"(e.g. {n}) have widths {widths}: exclude them (PruningPlan(exclude=[{n!r}, ...])) or choose another M"
        )
    return chosen


def check_plan_names(plan: PruningPlan, names: list[str]) -> list[str]:
    """Check ``plan``'s name patterns against the layer ``names``; returns the names it selects.

    Raises :class:`PlanError` when an include or override pattern matches no layer (naming the nearest
    layers, and saying the plan was made for another model when none of its patterns fit) or when the
    plan selects nothing.
    """
    plan.validate()
    if not names:
        raise PlanError("the model has no prunable layers")

    def matches(glob: str) -> bool:
        return any(fnmatch.fnmatchcase(n, glob) for n in names)

    specific = [("include", g) for g in plan.include if g != "*"] + [("exclude", g) for g in plan.exclude]
    specific += [("override", g) for g in plan.overrides]
    missed = [(kind, g) for kind, g in specific if not matches(g)]
    looks = f"this model's layers look like {names[:2]}"
    # Every pattern missing, with parts no name of this model has (not a near-miss typo): another model's plan.
    if specific and len(missed) == len(specific) and any(kind != "exclude" for kind, _ in missed) and any(
        _foreign(g, names) for _, g in missed
    ):
        globs = [g for _, g in missed]
        raise PlanError(
            f"the plan was made for another model: none of its layer patterns {globs[:4]} matches a layer of this model "
            f"(nearest names to {globs[0]!r}: {nearest(globs[0], names)}; {looks}); "
            "rewrite the patterns for this model's layer names or make a new plan"
        )
    for kind, g in missed:
        if kind != "exclude":
            raise PlanError(
                f"{kind} pattern {g!r} matches no layer; nearest names: {nearest(g, names)}; "
                f"fix the pattern ({looks}; globs like '*.mlp.*' work)"
            )
    chosen = [n for n in names if plan.selects(n)]
    if not chosen:
        raise PlanError(f"the plan selects no layer (include={plan.include}, exclude={plan.exclude}); {looks}: widen include or narrow exclude")
    return chosen


def _foreign(glob: str, names: list[str]) -> bool:
    """True if a part of ``glob`` is neither in the layer names nor a near-miss of one (``decoder``, ``fc1``, ``31``)."""
    import difflib

    parts = {p for n in names for p in n.split(".")}
    for tok in re.split(r"[.*?\[\]]+", glob):
        if not tok or tok in parts:
            continue
        if tok.isdigit() or not difflib.get_close_matches(tok, parts, n=1, cutoff=0.75):
            return True
    return False


# --------------------------------------------------------------------------- numbers


def check_finite_weights(layers: Mapping[str, nn.Module], names: Iterable[str]) -> None:
    """Raise :class:`NumericalError` naming the block and layer whose weight holds NaN or Inf."""
    from .arch import block_index, get_weight

    for name in names:
        W = get_weight(layers[name])
        if not torch.isfinite(W).all():
            raise NumericalError(
                f"block {block_index(name)}, layer {name}: NaN or Inf in the weights, found before pruning; "
                "dense weights left untouched: reload the checkpoint, or exclude this layer"
            )


# --------------------------------------------------------------------------- run records

_RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "block": (int,), "kind": (str,), "shape": (list, tuple), "method": (str,), "pattern": (str,),
    "target": (int, float), "sparsity": (int, float), "rel_error": (int, float), "error": (int, float),
    "loss": (int, float), "damp": (int, float), "seconds": (int, float), "tokens": (int,),
}


def layer_result_from_dict(data: Any, where: str = "layer result") -> "LayerResult":
    """Build a :class:`~apt_viz.runner.LayerResult` from saved JSON, rejecting unknown, missing or mistyped keys."""
    from .config import METHODS
    from .runner import LayerResult

    if not isinstance(data, Mapping):
        raise ReportError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_RESULT_TYPES))
    missing = sorted(set(_RESULT_TYPES) - set(data))
    if unknown or missing:
        raise ReportError(
            f"{where} has unknown keys {unknown} and lacks {missing}; a layer result has exactly {sorted(_RESULT_TYPES)} "
            "(write it with LayerResult.to_dict)"
        )
    for key, types in _RESULT_TYPES.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ReportError(f"{where}.{key} has the wrong type {type(value).__name__}; expected {' or '.join(t.__name__ for t in types)}")
    shape = data["shape"]
    if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ReportError(f"{where}.shape must be two positive integers [out, in], got {shape!r}")
    if data["method"] not in METHODS:
        raise ReportError(f"{where}.method {data['method']!r} is not one of {', '.join(METHODS)}")
    for key in ("target", "sparsity"):
        if not 0 <= data[key] <= 1:
            raise ReportError(f"{where}.{key} must be a fraction in [0, 1], got {data[key]!r}")
    for key in ("rel_error", "error", "loss", "damp", "seconds"):
        if math.isnan(data[key]):
            raise ReportError(f"{where}.{key} is NaN; the record is damaged, re-run the layer")
    return LayerResult(**{**dict(data), "shape": (shape[0], shape[1])})
