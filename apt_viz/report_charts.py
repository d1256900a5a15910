"""PNG charts for the report folder: per-layer relative error and sparsity, by block and sublayer kind.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display), and
returned so tests can read the plotted data back from the artists.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

ERROR_PNG = "error.png"
SPARSITY_PNG = "sparsity.png"


def layer_grid(layers: Iterable[Mapping[str, Any] | Any], field: str) -> tuple[list[int], dict[str, dict[int, float]]]:
    """``field`` of each layer arranged as ``{kind: {block: value}}``, kinds in first-seen order.

    ``layers`` are LayerResult objects or their ``to_dict()`` rows. Returns the sorted blocks too.
    """
    grid: dict[str, dict[int, float]] = {}
    blocks: set[int] = set()
    for row in layers:
        row = row.to_dict() if hasattr(row, "to_dict") else row
        kind, block = str(row["kind"]), int(row["block"])
        if block in grid.setdefault(kind, {}):
            raise ValueError(f"two layers of kind {kind!r} in block {block}; the charts need one per kind and block")
        grid[kind][block] = float(row[field])
        blocks.add(block)
    return sorted(blocks), grid


def error_figure(layers: Iterable[Mapping[str, Any] | Any]) -> Any:
    """Relative output error ``||WX - W'X||^2 / ||WX||^2`` per block, one line per sublayer kind."""
    fig, ax = _figure()
    blocks, grid = layer_grid(layers, "rel_error")
    for kind, values in grid.items():
        xs = sorted(values)
        ax.plot(xs, [values[b] for b in xs], marker="o", markersize=3, label=kind)
    if grid and all(v > 0 for values in grid.values() for v in values.values()):
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        # Plain labels: the default mathtext ones (10^-2) take about a second to typeset.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("block")
    ax.set_ylabel("relative error")
    ax.set_title("Per-layer relative output error")
    _finish(ax, blocks, bool(grid))
    return fig


def sparsity_figure(layers: Iterable[Mapping[str, Any] | Any]) -> Any:
    """Achieved sparsity per block, one bar per sublayer kind within each block."""
    fig, ax = _figure()
    blocks, grid = layer_grid(layers, "sparsity")
    width = 0.8 / max(len(grid), 1)
    for i, (kind, values) in enumerate(grid.items()):
        xs = sorted(values)
        ax.bar([b - 0.4 + width * (i + 0.5) for b in xs], [values[b] for b in xs], width=width, label=kind)
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_title("Per-layer sparsity")
    _finish(ax, blocks, bool(grid))
    return fig


def write_charts(layers: Iterable[Mapping[str, Any] | Any], folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``error.png`` and ``sparsity.png`` into ``folder``; returns their paths by file name."""
    from .pipeline import _atomic_write

    rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in layers]
    out = Path(folder)
    paths = {}
    for name, make in ((ERROR_PNG, error_figure), (SPARSITY_PNG, sparsity_figure)):
        fig = make(rows)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        _atomic_write(out / name, buf.getvalue())
        paths[name] = out / name
    return paths


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.07, right=0.86, bottom=0.12, top=0.9)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(ax: Any, blocks: list[int], any_data: bool) -> None:
    if blocks:
        step = max(1, len(blocks) // 16)
        ax.set_xticks(blocks[::step])
    ax.grid(True, alpha=0.3)
    if any_data:
        # Outside the axes: "best" placement costs seconds per chart on many points.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
