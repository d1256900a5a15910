"""Mask views: exact or density heatmaps, N:M groups, row/column sparsity, and where two masks agree."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

KEPT_SCALE = [[0.0, "#f4f1ea"], [1.0, "#1f4e79"]]  # pruned light, kept dark
AGREE_COLORS = ("#f4f1ea", "#d95f02", "#7570b3", "#1f4e79")  # both pruned, only a, only b, both kept


def as_mask(mask: Any) -> np.ndarray:
    """A 2-D numpy bool array (True = kept) from a bool tensor/array; other dtypes count nonzero as kept."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (out x in), got shape {arr.shape}")
    return arr if arr.dtype == bool else arr != 0


def _region(shape: tuple[int, int], region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    rows, cols = shape
    if region is None:
        return 0, rows, 0, cols
    if len(region) != 4:
        raise ValueError(f"region must be (r0, r1, c0, c1), got {region!r}")
    r0, r1, c0, c1 = (int(v) for v in region)
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise ValueError(f"region {region!r} is outside the {rows} x {cols} mask or empty; need 0 <= r0 < r1 <= {rows}, 0 <= c0 < c1 <= {cols}")
    return r0, r1, c0, c1


def tile_means(values: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Mean of ``values`` over ``tile = (th, tw)`` tiles; edge tiles average only what they hold."""
    th, tw = tile
    rows, cols = values.shape
    rs, cs = np.arange(0, rows, th), np.arange(0, cols, tw)
    # Reduce rows first, in the accumulator dtype, so a big bool mask is never copied to floats whole.
    acc = np.int64 if values.dtype == bool or np.issubdtype(values.dtype, np.integer) else np.float64
    sums = np.add.reduceat(np.add.reduceat(values, rs, axis=0, dtype=acc), cs, axis=1, dtype=acc)
    counts = np.outer(np.diff(np.append(rs, rows)), np.diff(np.append(cs, cols)))
    return sums / counts


def _tiling(shape: tuple[int, int], max_size: int) -> tuple[int, int]:
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
    return math.ceil(shape[0] / max_size), math.ceil(shape[1] / max_size)


def _axes(r0: int, r1: int, c0: int, c1: int, tile: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the tiles, in the full mask's row/column coordinates."""
    th, tw = tile
    ys = np.array([(a + min(a + th, r1) - 1) / 2 for a in range(r0, r1, th)])
    xs = np.array([(a + min(a + tw, c1) - 1) / 2 for a in range(c0, c1, tw)])
    return xs, ys


def _matrix_layout(fig: go.Figure, title: str) -> None:
    fig.update_layout(title=title, xaxis_title="input column", yaxis_title="output row")
    fig.update_yaxes(autorange="reversed")  # row 0 on top, as the matrix is written


def mask_heatmap(
    mask: Any, *, max_size: int = 256, title: str | None = None, region: tuple[int, int, int, int] | None = None
) -> go.Figure:
    """Heatmap of a mask (True = kept); exact if both dims fit ``max_size``, else the kept fraction per tile.

    ``region=(r0, r1, c0, c1)`` zooms into rows ``r0:r1`` and columns ``c0:c1`` (exact once it
    fits). ``fig.data[0].z`` is the 0/1 mask or the tile densities; ``fig.layout.meta`` says which
    (``exact``, ``tile``, ``region``, ``kept``).
    """
    full = as_mask(mask)
    r0, r1, c0, c1 = _region(full.shape, region)
    m = full[r0:r1, c0:c1]
    tile = _tiling(m.shape, max_size)
    exact = tile == (1, 1)
    kept = float(m.mean())
    xs, ys = _axes(r0, r1, c0, c1, tile)
    if exact:
        z = m.astype(np.int8)
        trace = go.Heatmap(z=z, x=xs, y=ys, zmin=0, zmax=1, colorscale=KEPT_SCALE,
                           colorbar=dict(title="kept", tickvals=[0, 1], ticktext=["pruned", "kept"]),
                           hovertemplate="row %{y}, col %{x}: %{z}<extra></extra>")
    else:
        z = tile_means(m, tile)
        trace = go.Heatmap(z=z, x=xs, y=ys, zmin=0, zmax=1, colorscale=KEPT_SCALE,
                           colorbar=dict(title="fraction kept"),
                           hovertemplate=f"rows ≈%{{y}} ± {tile[0] / 2:g}, cols ≈%{{x}} ± {tile[1] / 2:g}<br>"
                                         "kept: %{z:.1%}<extra></extra>")
    fig = go.Figure(trace)
    what = "exact" if exact else f"density per {tile[0]}×{tile[1]} tile"
    zoom = "" if region is None else f" rows {r0}:{r1}, cols {c0}:{c1}"
    _matrix_layout(fig, title or f"Mask {full.shape[0]}×{full.shape[1]}{zoom} ({what}), kept {kept:.1%}")
    fig.update_layout(meta=dict(exact=exact, tile=list(tile), region=[r0, r1, c0, c1], kept=kept))
    return fig


def nm_group_counts(mask: Any, m: int) -> np.ndarray:
    """Kept weights in each group of ``m`` consecutive input columns: shape (rows, cols // m)."""
    arr = as_mask(mask)
    if not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    if arr.shape[1] % m:
        raise ValueError(f"mask width {arr.shape[1]} is not a multiple of m={m}; pick the M the layer was pruned with")
    m = int(m)
    return arr.reshape(arr.shape[0], -1, m).sum(-1)


def nm_group_view(mask: Any, m: int, *, rows: int = 32, groups: int = 16) -> go.Figure:
    """The first ``rows`` x ``groups`` N:M groups: kept weights with group separators, and kept count per group.

    ``fig.data[0].z`` is the exact 0/1 mask of the shown weights; ``fig.data[1].z`` the kept count of
    each shown group. ``fig.layout.meta["counts"]`` tallies the kept counts over the whole mask.
    """
    counts = nm_group_counts(mask, m)
    arr, m = as_mask(mask), int(m)
    nr, ng = min(rows, arr.shape[0]), min(groups, counts.shape[1])
    sub = arr[:nr, : ng * m].astype(np.int8)
    shown = counts[:nr, :ng]
    values, freq = np.unique(counts, return_counts=True)
    tally = {int(v): int(f) for v, f in zip(values, freq)}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.08,
                        subplot_titles=(f"kept weights (groups of {m})", "kept per group"))
    fig.add_trace(go.Heatmap(
        z=sub, x=np.arange(ng * m), y=np.arange(nr), zmin=0, zmax=1, colorscale=KEPT_SCALE, showscale=False,
        xgap=1, ygap=1, customdata=np.repeat(shown, m, axis=1),
        hovertemplate="row %{y}, col %{x}: %{z}<br>group keeps %{customdata} of " + str(m) + "<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=shown, x=np.arange(ng), y=np.arange(nr), zmin=0, zmax=m, colorscale="Viridis", text=shown,
        texttemplate="%{text}", colorbar=dict(title="kept", x=1.02),
        hovertemplate="row %{y}, group %{x}: keeps %{z} of " + str(m) + "<extra></extra>",
    ), row=1, col=2)
    for g in range(1, ng):
        fig.add_vline(x=g * m - 0.5, line=dict(color="#c0392b", width=1), row=1, col=1)
    if len(tally) == 1:
        summary = f"every group keeps {values[0]} of {m} ({counts.size} groups)"
    else:
        summary = "kept per group: " + ", ".join(f"{v}: {f} groups" for v, f in tally.items())
    fig.update_layout(title=f"N:M groups of {m}: {summary}", meta=dict(m=m, counts=tally))
    fig.update_xaxes(title_text="input column", row=1, col=1)
    fig.update_xaxes(title_text="group", row=1, col=2)
    fig.update_yaxes(title_text="output row", autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    return fig


def sparsity_histograms(mask: Any, *, bins: int = 40) -> go.Figure:
    """Histograms of the sparsity (fraction pruned) of each row and of each column.

    ``fig.data[0].x`` holds the per-row sparsities, ``fig.data[1].x`` the per-column ones.
    """
    arr = as_mask(mask)
    row_sp = 1.0 - arr.mean(axis=1)
    col_sp = 1.0 - arr.mean(axis=0)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"per row ({arr.shape[0]} rows)", f"per column ({arr.shape[1]} columns)"))
    size = 1.0 / bins
    for i, (vals, name) in enumerate(((row_sp, "rows"), (col_sp, "columns")), start=1):
        fig.add_trace(go.Histogram(x=vals, name=name, xbins=dict(start=0.0, end=1.0 + size, size=size),
                                   hovertemplate="sparsity %{x}<br>%{y} " + name + "<extra></extra>"), row=1, col=i)
        fig.update_xaxes(title_text="sparsity (fraction pruned)", range=[0, 1], row=1, col=i)
        fig.update_yaxes(title_text=f"number of {name}", row=1, col=i)
    fig.update_layout(title=f"Row and column sparsity (overall {1 - arr.mean():.1%})", showlegend=False, bargap=0.05)
    return fig


def mask_agreement(
    mask_a: Any, mask_b: Any, *, labels: tuple[str, str] = ("a", "b"), max_size: int = 256,
    region: tuple[int, int, int, int] | None = None,
) -> go.Figure:
    """Where two masks agree (both kept, both pruned) and disagree; the title gives the agreement fraction.

    Exact view: ``fig.data[0].z`` is 0 both pruned, 1 kept only by a, 2 kept only by b, 3 both kept.
    Larger than ``max_size``: the fraction of agreeing weights per tile. ``fig.layout.meta`` holds
    ``agreement`` and the four fractions (over the whole masks).
    """
    a, b = as_mask(mask_a), as_mask(mask_b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}; compare masks of the same layer")
    la, lb = labels
    agree = float((a == b).mean())
    parts = {
        "both_pruned": float((~a & ~b).mean()), f"only_{la}": float((a & ~b).mean()),
        f"only_{lb}": float((~a & b).mean()), "both_kept": float((a & b).mean()),
    }
    r0, r1, c0, c1 = _region(a.shape, region)
    sa, sb = a[r0:r1, c0:c1], b[r0:r1, c0:c1]
    tile = _tiling(sa.shape, max_size)
    exact = tile == (1, 1)
    xs, ys = _axes(r0, r1, c0, c1, tile)
    if exact:
        z = sa.astype(np.int8) + 2 * sb.astype(np.int8)
        names = ["both pruned", f"only {la} keeps", f"only {lb} keeps", "both kept"]
        scale = []
        for i, c in enumerate(AGREE_COLORS):
            scale += [[i / 4, c], [(i + 1) / 4, c]]
        trace = go.Heatmap(z=z, x=xs, y=ys, zmin=-0.5, zmax=3.5, colorscale=scale,
                           customdata=np.array(names, dtype=object)[z],
                           colorbar=dict(tickvals=[0, 1, 2, 3], ticktext=names),
                           hovertemplate="row %{y}, col %{x}: %{customdata}<extra></extra>")
    else:
        z = tile_means(sa == sb, tile)
        trace = go.Heatmap(z=z, x=xs, y=ys, zmin=0, zmax=1, colorscale="RdBu", colorbar=dict(title="agree"),
                           hovertemplate="rows ≈%{y}, cols ≈%{x}<br>agree: %{z:.1%}<extra></extra>")
    fig = go.Figure(trace)
    what = "" if exact else f", agreement per {tile[0]}×{tile[1]} tile"
    _matrix_layout(fig, f"{la} vs {lb}: masks agree on {agree:.1%} of weights "
                        f"(both kept {parts['both_kept']:.1%}, both pruned {parts['both_pruned']:.1%}){what}")
    fig.update_layout(meta=dict(agreement=agree, exact=exact, tile=list(tile), region=[r0, r1, c0, c1], **parts))
    return fig
