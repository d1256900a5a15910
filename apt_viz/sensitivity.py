"""Layer and block sensitivity sweeps, and a non-uniform plan built from them. Knows no widget.

``layer_sweep`` re-prunes single layers from the Hessians a finished :meth:`Pruner.run` cached
(seconds, no calibration); ``block_sweep`` prunes one decoder block at a time and measures
perplexity (one calibration pass per point). ``plan_from_sensitivity`` turns either table into a
per-layer plan at the same parameter-weighted sparsity.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import block_index, find_blocks, prunable_layers
from .config import LayerOverride, PlanError, PruningPlan, Sparsity
from .data import perplexity
from .runner import Pruner


def layer_sweep(
    pruner: Pruner,
    names: Iterable[str],
    sparsities: Sequence[float | str],
    *,
    method: str | None = None,
    pattern: str | None = None,
    progress: bool = True,
    callback: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Re-prune each layer of ``names`` at each sparsity from the cached Hessians and record its error.

    Needs a completed ``pruner.run`` that calibrated these layers. ``method`` defaults to the
    layer's method in the plan; a sparsity may be ``"2:4"``. Each layer is put back afterwards (also
    on error): re-pruned with its own setting if it was pruned, restored dense if it was dense, and
    the plan's override for it reset. Returns rows ``{layer, block, kind, method, pattern, sparsity,
    achieved, rel_error, error, seconds}``.
    """
    names = list(names)
    if pruner.plan is None:
        raise PlanError("layer_sweep re-prunes from cached Hessians: run pruner.run(calib, plan) first")
    missing = [n for n in names if n not in pruner.hessians]
    if missing:
        raise PlanError(f"no cached Hessian for {missing[:3]}: include these layers in the plan of pruner.run first")
    specs = [Sparsity.parse(s, pattern) for s in sparsities]
    rows: list[dict[str, Any]] = []
    total = len(names) * len(specs)
    bar = tqdm(total=total, desc="layer sweep", unit="prune", disable=not progress)
    try:
        for name in names:
            plan = pruner.plan
            was_pruned = name in pruner.results
            method0, spec0 = plan.layer_settings(name)
            had = name in plan.overrides
            override0 = copy.deepcopy(plan.overrides.get(name))
            try:
                for spec in specs:
                    r = pruner.reprune(name, spec.fraction, spec.pattern, method or method0)
                    rows.append(dict(layer=name, block=r.block, kind=r.kind, method=r.method, pattern=r.pattern,
                                     sparsity=spec.fraction, achieved=r.sparsity, rel_error=r.rel_error,
                                     error=r.error, seconds=r.seconds))
                    bar.update(1)
                    if callback:
                        callback(len(rows), total, f"{name} at {spec}")
            finally:
                if was_pruned:
                    pruner.reprune(name, spec0.fraction, spec0.pattern, method0)
                else:
                    pruner.restore([name])
                if had:
                    plan.overrides[name] = override0
                else:
                    plan.overrides.pop(name, None)
    finally:
        bar.close()
    return rows


def block_sweep(
    model: torch.nn.Module,
    calib: torch.Tensor,
    windows: torch.Tensor,
    sparsities: Sequence[float | str],
    *,
    blocks: Iterable[int] | None = None,
    method: str = "sparsegpt",
    pattern: str | None = None,
    base: PruningPlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Prune one block at a time at each sparsity and measure perplexity on ``windows``; restores dense after each.

    ``calib``: calibration token windows (n x seqlen); ``windows``: evaluation windows. ``base``
    supplies the other plan settings (exclude, blocksize, percdamp). Sparsity 0 is the dense
    perplexity (measured once). Returns rows ``{block, sparsity, pattern, ppl}``.
    """
    prefix, all_blocks = find_blocks(model)
    blocks = list(range(len(all_blocks))) if blocks is None else list(blocks)
    bad = [b for b in blocks if not 0 <= b < len(all_blocks)]
    if bad:
        raise ValueError(f"blocks {bad} do not exist; the model has blocks 0..{len(all_blocks) - 1}")
    specs = [Sparsity.parse(s, pattern) for s in sparsities]
    base = base or PruningPlan(method=method)
    dense: float | None = None
    rows: list[dict[str, Any]] = []
    total = len(blocks) * len(specs)
    bar = tqdm(total=total, desc="block sweep", unit="run", disable=not progress)
    try:
        for b in blocks:
            for spec in specs:
                if spec.fraction == 0:
                    if dense is None:
                        dense = perplexity(model, windows, progress=False)
                    ppl = dense
                else:
                    plan = dataclasses.replace(base, method=method, sparsity=spec.fraction, pattern=spec.pattern,
                                               include=[f"{prefix}.{b}.*"], exclude=list(base.exclude), overrides={})
                    pruner = Pruner(model, device=device, keep_masks=False)
                    try:
                        pruner.run(calib, plan, progress=False)
                        # On the model's own device: the Pruner ran each block on ``device`` and put it back.
                        ppl = perplexity(model, windows, progress=False)
                    finally:
                        pruner.restore()
                        pruner.hessians.clear()
                rows.append(dict(block=b, sparsity=spec.fraction, pattern=spec.pattern, ppl=ppl))
                bar.update(1)
                if callback:
                    callback(len(rows), total, f"block {b} at {spec}")
    finally:
        bar.close()
    return rows


def layer_sizes(source: Any) -> dict[str, int]:
    """``{layer name: number of weights}`` from a Pruner, a model, or a mapping name -> module/size."""
    if isinstance(source, Pruner):
        modules: Mapping[str, Any] = source.layers
    elif isinstance(source, torch.nn.Module):
        modules = prunable_layers(source)
    elif isinstance(source, Mapping):
        modules = source
    else:
        raise TypeError(f"sizes must be a Pruner, a model or a mapping name -> size, got {type(source).__name__}")
    out = {}
    for name, m in modules.items():
        out[name] = int(m) if isinstance(m, (int, np.integer)) else int(m.weight.numel())
    return out


def _scores(table: list[Mapping[str, Any]], metric: str, target: float) -> tuple[str, dict[Any, float]]:
    """Per unit (layer or block), log of the metric interpolated at ``target`` sparsity."""
    key = "layer" if all("layer" in r for r in table) else "block" if all("block" in r for r in table) else None
    if key is None:
        raise ValueError("every sensitivity row needs a 'layer' or a 'block' key (as layer_sweep and block_sweep return)")
    curves: dict[Any, dict[float, list[float]]] = {}
    for r in table:
        if metric not in r or "sparsity" not in r:
            raise ValueError(f"row {r!r} lacks 'sparsity' or the metric {metric!r}")
        if (r.get("pattern") or "unstructured") != "unstructured":
            continue  # an N:M point is not on the unstructured curve the plan interpolates
        curves.setdefault(r[key], {}).setdefault(float(r["sparsity"]), []).append(float(r[metric]))
    scores = {}
    for unit, pts in curves.items():
        xs = sorted(pts)
        v = float(np.interp(target, xs, [float(np.mean(pts[x])) for x in xs]))
        # A non-finite value (a broken model) is the most fragile there is.
        scores[unit] = math.log(max(v, 1e-30)) if math.isfinite(v) else math.inf
    return key, scores


def _weighted_ranks(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each value's size-weighted rank mapped to [-1, 1] (ties share a rank): the mid-point of its
    weight interval in the sorted order, so the extremes are not squeezed by one outlier."""
    order = np.argsort(f, kind="stable")
    cum = np.cumsum(w[order])
    mid = np.empty_like(f)
    mid[order] = (cum - w[order] / 2) / cum[-1]
    for v in np.unique(f):  # ties share the mean rank
        same = f == v
        mid[same] = np.average(mid[same], weights=w[same])
    return 2 * mid - 1


def plan_from_sensitivity(
    table: Iterable[Mapping[str, Any]],
    target_sparsity: float,
    *,
    sizes: Any = None,
    metric: str = "rel_error",
    base: PruningPlan | None = None,
    spread: float = 0.1,
    scale: str = "rank",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.95,
) -> PruningPlan:
    """A plan with a sparsity override per layer: fragile layers get less, robust ones more.

    Each unit's fragility is the log of ``metric`` at ``target_sparsity`` (interpolated along its
    sweep, unstructured rows only). ``scale="rank"`` maps fragilities to their size-weighted rank
    in [-1, 1] (robust to outliers); ``"log"`` centres them and divides by the largest deviation.
    A layer gets ``target - spread * z``, clipped to ``[min_sparsity, max_sparsity]``, then all are
    shifted so the parameter-weighted mean over the table's layers is exactly ``target_sparsity``. A table by
    block gives all layers of a block the same sparsity. ``sizes``: a Pruner, a model or
    ``{name: numel}`` (required for a block table; equal sizes if omitted for a layer table).
    ``base`` supplies the method and the other settings; its own sparsity is replaced by ``target_sparsity``.
    """
    table = list(table)
    if not table:
        raise ValueError("the sensitivity table is empty; run layer_sweep or block_sweep first")
    if not 0 < target_sparsity < 1:
        raise PlanError(f"target_sparsity must be in (0, 1), got {target_sparsity!r}")
    if not 0 <= min_sparsity <= target_sparsity <= max_sparsity < 1:
        raise PlanError(f"need 0 <= min_sparsity <= target <= max_sparsity < 1, got {min_sparsity}, {target_sparsity}, {max_sparsity}")
    base = base or PruningPlan()
    if base.pattern != "unstructured":
        raise PlanError(f"a non-uniform plan needs an unstructured pattern; the base plan has {base.pattern!r}")
    key, scores = _scores(table, metric, target_sparsity)
    if not scores:
        raise ValueError("the sensitivity table has no unstructured rows to build a non-uniform plan from")
    if key == "layer":
        all_sizes = layer_sizes(sizes) if sizes is not None else {n: 1 for n in scores}
        unknown = [n for n in scores if n not in all_sizes]
        if unknown:
            raise ValueError(f"no size for layers {unknown[:3]}; pass sizes= the Pruner or model they came from")
        layers = {n: all_sizes[n] for n in scores if base.selects(n)}
        unit_of = {n: n for n in layers}
    else:
        if sizes is None:
            raise ValueError("a table by block needs sizes= (the Pruner or model) to find each block's layers")
        layers = {n: s for n, s in layer_sizes(sizes).items() if block_index(n) in scores and base.selects(n)}
        unit_of = {n: block_index(n) for n in layers}
    if not layers:
        raise ValueError(f"the base plan selects none of the table's {key}s {sorted(scores)[:3]}")

    names = list(layers)
    w = np.array([layers[n] for n in names], dtype=np.float64)
    f = np.array([scores[unit_of[n]] for n in names], dtype=np.float64)
    finite = np.isfinite(f)
    top = f[finite].max() if finite.any() else 0.0
    f = np.where(finite, f, top + 1.0)
    if scale == "rank":
        z = _weighted_ranks(f, w)
    elif scale == "log":
        f = f - np.average(f, weights=w)
        top = np.abs(f).max()
        z = f / top if top > 0 else np.zeros_like(f)
    else:
        raise ValueError(f"scale must be 'rank' or 'log', got {scale!r}")
    raw = target_sparsity - spread * z

    def mean_at(shift: float) -> float:
        return float(np.average(np.clip(raw + shift, min_sparsity, max_sparsity), weights=w))

    # mean_at is monotone in the shift, from min_sparsity at lo to max_sparsity at hi: bisect to the target.
    lo, hi = -1.0 - abs(spread), 1.0 + abs(spread)
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean_at(mid) < target_sparsity:
            lo = mid
        else:
            hi = mid
    s = np.clip(raw + (lo + hi) / 2, min_sparsity, max_sparsity)
    overrides = dict(base.overrides)
    for n, v in zip(names, s):
        overrides[n] = LayerOverride(sparsity=float(v))
    return dataclasses.replace(base, sparsity=target_sparsity, pattern="unstructured", include=list(base.include),
                               exclude=list(base.exclude), overrides=overrides)


def weighted_sparsity(plan: PruningPlan, sizes: Any) -> float:
    """The parameter-weighted mean target sparsity of the layers ``plan`` selects."""
    all_sizes = layer_sizes(sizes)
    chosen = [n for n in all_sizes if plan.selects(n)]
    if not chosen:
        raise PlanError("the plan selects none of the given layers")
    fr = np.array([plan.layer_settings(n)[1].fraction for n in chosen])
    return float(np.average(fr, weights=[all_sizes[n] for n in chosen]))


__all__ = ["block_sweep", "layer_sizes", "layer_sweep", "plan_from_sensitivity", "weighted_sparsity"]
