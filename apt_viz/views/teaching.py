"""The teaching figure: what OBS, SparseGPT and APT do to the remaining weights of a toy layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def teaching_figure(demo: Any) -> go.Figure:
    """Dense ``W`` and the layer error per method on top; below, for each method, ``W'`` (pruned cells
    crossed) and the update ``ΔW = W' − W`` it made to the weights that remain.

    ``demo`` is a :class:`apt_viz.teaching.TeachingDemo`. Traces are named ``"W"``, ``"<method>: W'"``,
    ``"<method>: pruned"``, ``"<method>: ΔW"`` and ``"error"`` (the bar chart of ``||(W − W')X||²``).
    """
    steps = getattr(demo, "steps", None)
    if not steps:
        raise ValueError("teaching_figure needs a TeachingDemo with at least one method step; use apt_viz.teaching.teaching_demo()")
    W = _np(demo.W)
    methods = list(steps)
    n = len(methods)
    titles = ["dense W", "layer error ||(W − W')X||²"]
    for m in methods:
        titles += [f"{m}: W' (× = pruned)", f"{m}: update ΔW on the kept weights"]
    fig = make_subplots(rows=n + 1, cols=2, subplot_titles=titles, vertical_spacing=0.06, horizontal_spacing=0.08)
    wmax = float(max(np.abs(W).max(), *(np.abs(_np(s.weight)).max() for s in steps.values())))
    dmax = float(max(np.abs(_np(s.dw)).max() for s in steps.values())) or 1.0
    fig.update_layout(
        coloraxis=dict(colorscale="RdBu", cmid=0, cmin=-wmax, cmax=wmax, colorbar=dict(title="w", x=1.0, len=0.45, y=0.75)),
        coloraxis2=dict(colorscale="PuOr", cmid=0, cmin=-dmax, cmax=dmax, colorbar=dict(title="Δw", x=1.08, len=0.45, y=0.25)),
    )
    hover = "row %{y}, col %{x}: %{z:.3f}<extra>%{fullData.name}</extra>"
    fig.add_trace(go.Heatmap(z=W, name="W", coloraxis="coloraxis", hovertemplate=hover), row=1, col=1)
    for i, m in enumerate(methods, start=2):
        s = steps[m]
        mask = _np(s.mask).astype(bool)
        fig.add_trace(go.Heatmap(z=_np(s.weight), name=f"{m}: W'", coloraxis="coloraxis", hovertemplate=hover), row=i, col=1)
        r, c = np.nonzero(~mask)
        fig.add_trace(go.Scatter(x=c, y=r, mode="markers", name=f"{m}: pruned", showlegend=False,
                                 marker=dict(symbol="x-thin", size=7, line=dict(width=1.5, color="#333")),
                                 hovertemplate="pruned: row %{y}, col %{x}<extra></extra>"), row=i, col=1)
        fig.add_trace(go.Heatmap(z=np.where(mask, _np(s.dw), np.nan), name=f"{m}: ΔW", coloraxis="coloraxis2",
                                 hovertemplate=hover), row=i, col=2)
    errors = [float(steps[m].error) for m in methods]
    fig.add_trace(go.Bar(x=methods, y=errors, name="error", text=[f"{e:.4g}" for e in errors], textposition="outside",
                         customdata=[float(steps[m].rel_error) for m in methods],
                         hovertemplate="%{x}: %{y:.4g}<br>relative %{customdata:.2%}<extra></extra>",
                         marker_color=["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c"][: n] + ["#9467bd"] * max(0, n - 4)),
                  row=1, col=2)
    for i in range(1, n + 2):
        fig.update_yaxes(autorange="reversed", row=i, col=1)
        if i > 1:
            fig.update_yaxes(autorange="reversed", row=i, col=2)
    fig.update_xaxes(title_text="input column", row=n + 1, col=1)
    fig.update_xaxes(title_text="input column", row=n + 1, col=2)
    fig.update_yaxes(title_text="output row", row=1, col=1)
    fig.update_yaxes(title_text="error", row=1, col=2)
    sp = getattr(demo, "sparsity", None)
    fig.update_layout(title=f"One toy layer pruned{f' at {sp}' if sp is not None else ''}: OBS, SparseGPT and APT",
                      height=260 * (n + 1), showlegend=False, meta=dict(methods=methods, errors=errors))
    return fig
