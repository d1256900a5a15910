"""Sensitivity views: a metric against sparsity per layer or block, as curves and as a heatmap."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from .errors import METRIC_TITLES


def _key(table: list[Mapping[str, Any]], by: str | None) -> str:
    if by is not None:
        if not all(by in r for r in table):
            raise ValueError(f"by={by!r} but some rows have no {by!r} key")
        return by
    if all("layer" in r for r in table):
        return "layer"
    if all("block" in r for r in table):
        return "block"
    raise ValueError("every sensitivity row needs a 'layer' or a 'block' key (as layer_sweep and block_sweep return)")


def _column(row: Mapping[str, Any]) -> tuple[float, str]:
    pattern = str(row.get("pattern") or "unstructured")
    return float(row["sparsity"]), pattern


def _column_label(col: tuple[float, str]) -> str:
    frac, pattern = col
    if pattern != "unstructured":
        return pattern
    return f"{frac:.0%}" if abs(frac * 100 - round(frac * 100)) < 1e-9 else f"{frac:.3g}"


def pivot(
    table: Iterable[Mapping[str, Any]], metric: str, by: str | None = None
) -> tuple[str, list[Any], list[tuple[float, str]], np.ndarray]:
    """``(key, units, columns, values)``: ``values[i, j]`` is the mean ``metric`` of unit i at column j (NaN if absent).

    A column is ``(sparsity, pattern)``, sorted by sparsity with unstructured first; rows without
    a ``pattern`` count as unstructured. Units keep their order of first appearance (blocks sort
    numerically).
    """
    table = list(table)
    if not table:
        raise ValueError("the sensitivity table is empty; run layer_sweep or block_sweep first")
    key = _key(table, by)
    missing = [r.get(key) for r in table if metric not in r or "sparsity" not in r]
    if missing:
        raise ValueError(f"rows for {missing[:3]} lack 'sparsity' or the metric {metric!r}; keys look like {sorted(table[0])}")
    units: list[Any] = []
    for r in table:
        if r[key] not in units:
            units.append(r[key])
    if key == "block":
        units.sort()
    cols = sorted({_column(r) for r in table}, key=lambda c: (c[0], c[1] != "unstructured", c[1]))
    acc: dict[tuple[int, int], list[float]] = {}
    for r in table:
        acc.setdefault((units.index(r[key]), cols.index(_column(r))), []).append(float(r[metric]))
    values = np.full((len(units), len(cols)), np.nan)
    for (i, j), v in acc.items():
        values[i, j] = float(np.mean(v))
    return key, units, cols, values


def fragility(values: np.ndarray) -> np.ndarray:
    """Each unit's fragility: its mean log-metric over the measured sparsities (higher = more fragile; inf if broken)."""
    out = np.full(values.shape[0], -np.inf)
    for i, row in enumerate(values):
        vals = row[~np.isnan(row)]
        if np.isposinf(vals).any():
            out[i] = np.inf
        elif (vals > 0).any():
            out[i] = float(np.log(vals[vals > 0]).mean())
    return out


def _label(key: str, unit: Any) -> str:
    return f"block {unit}" if key == "block" else str(unit)


def sensitivity_curves(
    table: Iterable[Mapping[str, Any]], *, metric: str = "rel_error", log: bool = False, highlight: int = 3, by: str | None = None
) -> go.Figure:
    """``metric`` against sparsity, one trace per layer (or block); the ``highlight`` most fragile are drawn bold.

    Traces follow the table's unit order; ``fig.layout.meta["fragile"]`` lists the highlighted units.
    """
    key, units, cols, values = pivot(table, metric, by)
    score = fragility(values)
    ranked = np.argsort(-score, kind="stable")[: max(0, highlight)].tolist()
    top = set(ranked)
    xs = np.array([c[0] for c in cols])
    lines = np.array([c[1] == "unstructured" for c in cols])
    palette = qualitative.Plotly
    fig = go.Figure()
    for i, unit in enumerate(units):
        bold = i in top
        label = _label(key, unit)
        color = palette[i % len(palette)]
        ok = ~np.isnan(values[i]) & lines
        fig.add_trace(go.Scatter(
            x=xs[ok], y=values[i][ok], mode="lines+markers", name=label, legendgroup=label,
            opacity=1.0 if bold else 0.35, line=dict(width=3 if bold else 1, color=color),
            hovertemplate=f"<b>{label}</b><br>sparsity %{{x:.0%}}<br>{metric}: %{{y:.4g}}<extra></extra>",
        ))
        nm = ~np.isnan(values[i]) & ~lines
        if nm.any():  # N:M points sit at their fraction, as separate markers
            fig.add_trace(go.Scatter(
                x=xs[nm], y=values[i][nm], mode="markers", name=f"{label} N:M", legendgroup=label, showlegend=False,
                opacity=1.0 if bold else 0.35, marker=dict(symbol="diamond", size=9, color=color),
                text=[cols[j][1] for j in np.nonzero(nm)[0]],
                hovertemplate=f"<b>{label}</b><br>%{{text}}<br>{metric}: %{{y:.4g}}<extra></extra>",
            ))
    bold_names = ", ".join(_label(key, units[i]) for i in ranked)
    fig.update_layout(
        title=f"Sensitivity: {metric} against sparsity per {key}" + (f" (bold: most fragile {bold_names})" if ranked else ""),
        xaxis_title="sparsity of the pruned " + key, yaxis_title=METRIC_TITLES.get(metric, metric),
        meta=dict(fragile=[units[i] for i in ranked], key=key),
    )
    fig.update_xaxes(tickformat=".0%")
    if log:
        fig.update_yaxes(type="log")
    return fig


def sensitivity_heatmap(
    table: Iterable[Mapping[str, Any]], *, metric: str = "rel_error", log: bool = False, by: str | None = None
) -> go.Figure:
    """Units (blocks or layers, y) by sparsity (x), ``z = metric`` (``log10(metric)`` with ``log=True``)."""
    key, units, cols, values = pivot(table, metric, by)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(values > 0, np.log10(values), np.nan)
    else:
        z = values
    labels = [_label(key, u) for u in units]
    fig = go.Figure(go.Heatmap(
        z=z, x=[_column_label(c) for c in cols], y=labels,
        colorscale="YlOrRd", colorbar=dict(title=("log10 " if log else "") + metric),
        customdata=values, hovertemplate="%{y}, sparsity %{x}<br>" + metric + ": %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(title=f"Sensitivity: {metric} by {key} and sparsity", xaxis_title="sparsity",
                      yaxis_title=key, meta=dict(units=units, sparsities=[c[0] for c in cols],
                                                 patterns=[c[1] for c in cols], key=key))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig
