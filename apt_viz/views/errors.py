"""Per-layer reconstruction error by block and sublayer kind, optionally overlaying several runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import plotly.graph_objects as go

from ..arch import block_index, sublayer_kind

# The order a reader expects in a Llama block; other kinds follow in order of appearance.
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

METRIC_TITLES = {
    "rel_error": "relative error ||WX − W'X||² / ||WX||²",
    "error": "error ||WX − W'X||² (× 2/n)",
    "loss": "solver loss ½ ΔW H ΔWᵀ",
    "sparsity": "achieved sparsity",
    "seconds": "seconds",
}

_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon")


def as_record(result: Any) -> dict[str, Any]:
    """A LayerResult (or its dict) as a dict with at least ``name``, ``block`` and ``kind``."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        rec = dataclasses.asdict(result)
    elif isinstance(result, Mapping):
        rec = dict(result)
    else:
        raise TypeError(f"expected a LayerResult or its dict, got {type(result).__name__}")
    if "name" not in rec:
        raise ValueError(f"a layer result needs a 'name' key, got keys {sorted(rec)}")
    rec.setdefault("block", block_index(rec["name"]))
    rec.setdefault("kind", sublayer_kind(rec["name"]))
    return rec


def _is_record(value: Any) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or (
        isinstance(value, Mapping) and "name" in value and not any(isinstance(v, Mapping) for v in value.values())
    )


def as_records(results: Any) -> list[dict[str, Any]]:
    """Layer results as a list of dicts: from ``{name: LayerResult}``, a list of them, or their dicts."""
    if isinstance(results, Mapping):
        values: Iterable[Any] = results.values()
    elif isinstance(results, (list, tuple)):
        values = results
    else:
        raise TypeError(f"expected layer results as a dict {{name: LayerResult}} or a list, got {type(results).__name__}")
    return [as_record(v) for v in values]


def split_runs(results: Any) -> dict[str | None, list[dict[str, Any]]]:
    """``{label: records}`` for an overlay mapping ``{label: results}``; ``{None: records}`` for one run."""
    if isinstance(results, Mapping) and results and not all(_is_record(v) for v in results.values()):
        bad = [k for k, v in results.items() if _is_record(v)]
        if bad:
            raise ValueError(f"mixed input: {bad[:3]} look like single layer results while others are runs; "
                             "pass either {name: LayerResult} or {label: {name: LayerResult}}")
        return {str(label): as_records(v) for label, v in results.items()}
    return {None: as_records(results)}


def kind_order(kinds: Iterable[str]) -> list[str]:
    """Kinds sorted as q, k, v, o, gate, up, down, then the rest in order of first appearance."""
    seen: list[str] = []
    for k in kinds:
        if k not in seen:
            seen.append(k)
    return sorted(seen, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), seen.index(k)))


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def error_chart(results: Any, *, log: bool = False, metric: str = "rel_error", title: str | None = None) -> go.Figure:
    """Per-layer ``metric`` by block (x), one trace per sublayer kind (and per run label when overlaying).

    ``results``: ``{name: LayerResult}``, a list of LayerResults or their dicts, or a mapping
    ``{label: results}`` to overlay several methods. Hover shows name, rel_error, error, sparsity
    and seconds. ``log`` puts the y axis on a log scale.
    """
    runs = split_runs(results)
    for label, recs in runs.items():
        missing = [r["name"] for r in recs if metric not in r]
        if missing:
            where = f" in run {label!r}" if label is not None else ""
            raise ValueError(f"metric {metric!r} is missing{where} for {missing[:3]}; use one of rel_error, error, loss, sparsity, seconds")
    fig = go.Figure()
    for i, (label, recs) in enumerate(runs.items()):
        for kind in kind_order(r["kind"] for r in recs):
            rows = sorted((r for r in recs if r["kind"] == kind), key=lambda r: r["block"])
            name = kind if label is None else f"{label} · {kind}"
            fig.add_trace(go.Scatter(
                x=[r["block"] for r in rows],
                y=[_num(r[metric]) for r in rows],
                mode="lines+markers",
                name=name,
                legendgroup=label or kind,
                line=dict(dash=_DASHES[i % len(_DASHES)]),
                marker=dict(symbol=_SYMBOLS[i % len(_SYMBOLS)]),
                customdata=[[r["name"], _num(r.get("rel_error")), _num(r.get("error")), _num(r.get("sparsity")),
                             _num(r.get("seconds")), r.get("method", ""), r.get("pattern", "")] for r in rows],
                hovertemplate=(
                    "<b>%{customdata[0]}</b><br>"
                    + (f"run: {label}<br>" if label is not None else "")
                    + "method: %{customdata[5]} (%{customdata[6]})<br>"
                    "rel_error: %{customdata[1]:.4g}<br>error: %{customdata[2]:.4g}<br>"
                    "sparsity: %{customdata[3]:.2%}<br>seconds: %{customdata[4]:.2f}<extra></extra>"
                ),
            ))
    ytitle = METRIC_TITLES.get(metric, metric)
    fig.update_layout(
        title=title or f"Per-layer {metric} by block",
        xaxis_title="block",
        yaxis_title=ytitle,
        hovermode="closest",
        legend_title="run · sublayer" if None not in runs else "sublayer",
    )
    fig.update_xaxes(tickmode="linear", dtick=1)
    if log:
        fig.update_yaxes(type="log")
    return fig
