"""Report charts: the plotted lines and bars are the per-layer numbers, and the PNGs are real PNGs."""

from __future__ import annotations

import pytest

from apt_viz.report_charts import ERROR_PNG, SPARSITY_PNG, error_figure, layer_grid, sparsity_figure, write_charts

KINDS = ["q_proj", "k_proj", "o_proj", "down_proj"]


def _layers(blocks: int = 3) -> list[dict]:
    return [
        {"name": f"model.layers.{b}.{k}", "block": b, "kind": k, "rel_error": 0.01 * (b + 1) * (i + 1),
         "sparsity": 0.5 + 0.01 * b + 0.001 * i, "target": 0.5}
        for b in range(blocks) for i, k in enumerate(KINDS)
    ]


def test_error_lines_are_the_relative_errors():
    layers = _layers()
    fig = error_figure(layers)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == KINDS
    for i, ln in enumerate(lines):
        assert list(ln.get_xdata()) == [0, 1, 2]
        assert list(ln.get_ydata()) == [r["rel_error"] for r in layers if r["kind"] == KINDS[i]]
    assert ax.get_yscale() == "log"


def test_sparsity_bars_are_the_sparsities_by_block_and_kind():
    layers = _layers()
    fig = sparsity_figure(layers)
    ax = fig.axes[0]
    assert len(ax.containers) == len(KINDS)
    for i, bars in enumerate(ax.containers):
        assert bars.get_label() == KINDS[i]
        assert [p.get_height() for p in bars.patches] == [r["sparsity"] for r in layers if r["kind"] == KINDS[i]]
        centres = [p.get_x() + p.get_width() / 2 for p in bars.patches]
        assert all(abs(c - b) < 0.4 for c, b in zip(centres, range(3)))  # each bar sits over its block


def test_missing_kinds_and_zero_errors():
    layers = [r for r in _layers() if not (r["block"] == 1 and r["kind"] == "o_proj")]
    layers[0]["rel_error"] = 0.0
    fig = error_figure(layers)
    o_line = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "o_proj"][0]
    assert list(o_line.get_xdata()) == [0, 2]
    assert fig.axes[0].get_yscale() == "linear"  # a zero error cannot go on a log axis
    blocks, grid = layer_grid(layers, "sparsity")
    assert blocks == [0, 1, 2] and sorted(grid["o_proj"]) == [0, 2]


def test_duplicate_kind_in_a_block_is_an_error():
    layers = _layers(1) + _layers(1)[:1]
    with pytest.raises(ValueError, match="one per kind and block"):
        error_figure(layers)


def test_write_charts_writes_pngs_without_a_display(tmp_path):
    paths = write_charts(_layers(), tmp_path)
    assert set(paths) == {ERROR_PNG, SPARSITY_PNG}
    for path in paths.values():
        assert path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ERROR_PNG, SPARSITY_PNG]  # no temp files left
