"""The pure views on recorded results: assertions on figure data, never on pixels."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from apt_viz import LayerResult
from apt_viz.views import (
    error_chart, generation_diff, generation_table, mask_agreement, mask_heatmap, nm_group_view, ppl_bars,
    sensitivity_curves, sensitivity_heatmap, sparsity_histograms, teaching_figure,
)
from apt_viz.teaching import teaching_demo

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recorded(method: str = "apt", scale: float = 1.0) -> dict[str, LayerResult]:
    """Results as a 3-block Llama run records them; rel_error = scale * (block + 1) * (kind index + 1) / 100."""
    out = {}
    for b in range(3):
        for i, kind in enumerate(KINDS):
            part = "self_attn" if i < 4 else "mlp"
            name = f"model.layers.{b}.{part}.{kind}"
            rel = scale * (b + 1) * (i + 1) / 100
            out[name] = LayerResult(name=name, block=b, kind=kind, shape=(64, 64), method=method, pattern="unstructured",
                                    target=0.5, sparsity=0.5, rel_error=rel, error=10 * rel, loss=5 * rel, damp=0.01,
                                    seconds=0.1 * b, tokens=256)
    return out


# ----------------------------------------------------------------------------- errors


def test_error_chart_one_trace_per_kind_with_numbers():
    res = recorded()
    shuffled = dict(reversed(list(res.items())))  # the order of the input must not matter
    fig = error_chart(shuffled)
    assert [t.name for t in fig.data] == KINDS
    for i, t in enumerate(fig.data):
        assert list(t.x) == [0, 1, 2]
        assert np.allclose(t.y, [(b + 1) * (i + 1) / 100 for b in range(3)])
        assert t.customdata[2][0] == f"model.layers.2.{'self_attn' if i < 4 else 'mlp'}.{KINDS[i]}"
        assert t.customdata[2][2] == pytest.approx(10 * t.y[2])  # error
        assert t.customdata[2][3] == 0.5 and t.customdata[2][4] == pytest.approx(0.2)  # sparsity, seconds
        assert "rel_error" in t.hovertemplate and "seconds" in t.hovertemplate
    assert fig.layout.xaxis.title.text == "block"
    assert "relative error" in fig.layout.yaxis.title.text
    assert fig.layout.yaxis.type != "log"
    assert error_chart(res, log=True).layout.yaxis.type == "log"


def test_error_chart_overlays_methods_from_dicts_and_other_metrics():
    runs = {"apt": recorded("apt"), "sparsegpt": {n: r.to_dict() for n, r in recorded("sparsegpt", 2.0).items()}}
    fig = error_chart(runs)
    assert [t.name for t in fig.data] == [f"{m} · {k}" for m in runs for k in KINDS]
    by_name = {t.name: t for t in fig.data}
    assert np.allclose(np.array(by_name["sparsegpt · up_proj"].y), 2 * np.array(by_name["apt · up_proj"].y))
    assert by_name["apt · q_proj"].line.dash != by_name["sparsegpt · q_proj"].line.dash
    fig = error_chart(list(recorded().values()), metric="seconds")
    assert list(fig.data[0].y) == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="metric 'ppl'"):
        error_chart(recorded(), metric="ppl")


def test_error_chart_derives_block_and_kind_from_names():
    fig = error_chart([{"name": "model.layers.4.mlp.down_proj", "rel_error": 0.3}, {"name": "model.layers.1.mlp.down_proj", "rel_error": 0.1}])
    assert [t.name for t in fig.data] == ["down_proj"]
    assert list(fig.data[0].x) == [1, 4] and list(fig.data[0].y) == [0.1, 0.3]


# ----------------------------------------------------------------------------- masks


def random_mask(rows: int, cols: int, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > p


def test_mask_heatmap_exact_when_small():
    mask = random_mask(40, 64)
    fig = mask_heatmap(mask, max_size=64, title="q")
    assert np.array_equal(np.asarray(fig.data[0].z), mask.numpy().astype(int))
    assert fig.layout.meta["exact"] is True and fig.layout.title.text == "q"
    assert list(fig.data[0].x) == list(range(64)) and list(fig.data[0].y) == list(range(40))
    assert fig.layout.xaxis.title.text == "input column" and fig.layout.yaxis.title.text == "output row"


def test_mask_heatmap_downsamples_to_tile_means_and_zooms_to_exact():
    mask = random_mask(300, 520, p=0.3)
    fig = mask_heatmap(mask, max_size=100)
    z = np.asarray(fig.data[0].z, dtype=float)
    th, tw = fig.layout.meta["tile"]
    assert (th, tw) == (3, 6) and z.shape == (100, 87)
    m = mask.numpy()
    for i, j in [(0, 0), (17, 40), (99, 86)]:  # the last column of tiles is ragged (520 = 86 * 6 + 4)
        assert z[i, j] == pytest.approx(m[i * th : (i + 1) * th, j * tw : (j + 1) * tw].mean())
    assert np.average(z[:, :86]) == pytest.approx(m[:, :516].mean())
    assert fig.data[0].x[-1] == pytest.approx((516 + 519) / 2)  # tile centres in mask coordinates
    zoom = mask_heatmap(mask, max_size=100, region=(10, 60, 200, 280))
    assert zoom.layout.meta["exact"] is True
    assert np.array_equal(np.asarray(zoom.data[0].z), m[10:60, 200:280].astype(int))
    assert zoom.data[0].x[0] == 200 and zoom.data[0].y[0] == 10
    with pytest.raises(ValueError, match="region"):
        mask_heatmap(mask, region=(0, 400, 0, 10))


def test_nm_group_view_shows_groups_and_counts():
    torch.manual_seed(0)
    keep = torch.ones(16, 32, dtype=torch.bool)
    for r in range(16):
        for g in range(8):
            keep[r, g * 4 + torch.randperm(4)[:2]] = False
    keep[3, 4:8] = True  # one group keeps all 4
    fig = nm_group_view(keep, 4, rows=8, groups=5)
    assert np.array_equal(np.asarray(fig.data[0].z), keep[:8, :20].numpy().astype(int))
    counts = np.asarray(fig.data[1].z)
    assert counts.shape == (8, 5) and counts[3, 1] == 4 and (np.delete(counts.ravel(), 3 * 5 + 1) == 2).all()
    assert fig.layout.meta["counts"] == {2: 16 * 8 - 1, 4: 1}
    separators = [s.x0 for s in fig.layout.shapes]
    assert separators == [3.5, 7.5, 11.5, 15.5]
    exact = keep.clone()
    exact[3, 4:8] = torch.tensor([True, False, True, False])
    assert "every group keeps 2 of 4" in nm_group_view(exact, 4).layout.title.text
    with pytest.raises(ValueError, match="multiple of m=3"):
        nm_group_view(keep, 3)


def test_sparsity_histograms_hold_row_and_column_sparsity():
    mask = np.ones((4, 8), dtype=bool)
    mask[0, :6] = False  # row 0 keeps only column 6
    mask[:, 7] = False  # column 7 is all pruned
    fig = sparsity_histograms(mask)
    assert np.allclose(fig.data[0].x, [0.875, 0.125, 0.125, 0.125])
    assert np.allclose(fig.data[1].x, [0.25] * 6 + [0.0, 1.0])
    assert fig.layout.xaxis.title.text.startswith("sparsity") and fig.layout.yaxis2.title.text == "number of columns"


def test_mask_agreement_categories_and_fraction():
    a = random_mask(30, 40, seed=1)
    b = random_mask(30, 40, seed=2)
    fig = mask_agreement(a, b, labels=("apt", "wanda"))
    z = np.asarray(fig.data[0].z)
    an, bn = a.numpy(), b.numpy()
    assert np.array_equal(z == 3, an & bn) and np.array_equal(z == 0, ~an & ~bn)
    assert np.array_equal(z == 1, an & ~bn) and np.array_equal(z == 2, ~an & bn)
    agree = float((an == bn).mean())
    assert fig.layout.meta["agreement"] == pytest.approx(agree)
    assert f"{agree:.1%}" in fig.layout.title.text and "apt vs wanda" in fig.layout.title.text
    big = mask_agreement(random_mask(200, 200, seed=3), random_mask(200, 200, seed=4), max_size=50)
    assert big.layout.meta["exact"] is False
    assert np.mean(big.data[0].z) == pytest.approx(big.layout.meta["agreement"])
    with pytest.raises(ValueError, match="shape"):
        mask_agreement(a, b[:, :20])


# ----------------------------------------------------------------------------- sensitivity


def sweep_table() -> list[dict]:
    rows = []
    for b in range(4):
        for s in (0.3, 0.5, 0.7):
            fragile = 10.0 if b == 2 else 1.0
            rows.append({"block": b, "sparsity": s, "ppl": 20 + fragile * 100 * s**2, "pattern": "unstructured"})
    rows.append({"block": 1, "sparsity": 0.5, "ppl": 99.0, "pattern": "2:4"})
    return rows


def test_sensitivity_heatmap_is_blocks_by_sparsity():
    table = sweep_table()
    fig = sensitivity_heatmap(table, metric="ppl")
    hm = fig.data[0]
    assert list(hm.y) == ["block 0", "block 1", "block 2", "block 3"]
    assert list(hm.x) == ["30%", "50%", "2:4", "70%"]
    z = np.asarray(hm.z, dtype=float)
    assert z[2, 3] == pytest.approx(20 + 1000 * 0.49) and z[0, 1] == pytest.approx(45.0)
    assert z[1, 2] == 99.0 and np.isnan(z[0, 2])
    assert z[2, [0, 1, 3]].tolist() == np.max(z[:, [0, 1, 3]], axis=0).tolist()  # the fragile block stands out
    assert fig.layout.xaxis.title.text == "sparsity" and fig.layout.yaxis.title.text == "block"
    assert np.allclose(np.asarray(sensitivity_heatmap(table, metric="ppl", log=True).data[0].z, dtype=float)[2, 3],
                       np.log10(510.0))


def test_sensitivity_curves_highlight_the_fragile():
    fig = sensitivity_curves(sweep_table(), metric="ppl", highlight=1)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["block 0", "block 1", "block 2", "block 3"]
    assert list(lines[2].x) == [0.3, 0.5, 0.7] and lines[2].y[-1] == pytest.approx(510.0)
    assert fig.layout.meta["fragile"] == [2]
    assert lines[2].line.width > lines[0].line.width and lines[2].opacity > lines[0].opacity
    nm = [t for t in fig.data if t.mode == "markers"]
    assert len(nm) == 1 and list(nm[0].y) == [99.0] and list(nm[0].text) == ["2:4"]
    layer_rows = [{"layer": "model.layers.0.mlp.up_proj", "sparsity": 0.5, "rel_error": 0.1}]
    assert sensitivity_curves(layer_rows).data[0].name == "model.layers.0.mlp.up_proj"
    with pytest.raises(ValueError, match="'layer' or a 'block'"):
        sensitivity_curves([{"sparsity": 0.5, "rel_error": 0.1}])


# ----------------------------------------------------------------------------- before / after


def test_ppl_bars_with_dense_reference():
    rows = [{"label": "dense", "ppl": 29.5, "dataset": "wikitext2"}, {"label": "apt 50%", "ppl": 46.7, "dataset": "wikitext2"},
            {"label": "sparsegpt 50%", "ppl": 51.6, "dataset": "wikitext2"}, {"label": "dense", "ppl": 40.0, "dataset": "ptb"},
            {"label": "apt 50%", "ppl": 70.0, "dataset": "ptb"}]
    fig = ppl_bars(rows)
    assert [t.name for t in fig.data] == ["wikitext2", "ptb"]
    assert list(fig.data[0].x) == ["apt 50%", "sparsegpt 50%"] and list(fig.data[0].y) == [46.7, 51.6]
    assert [s.y0 for s in fig.layout.shapes] == [29.5, 40.0]
    assert fig.layout.yaxis.title.text == "perplexity"
    assert ppl_bars(rows[:3], log=True).layout.yaxis.type == "log"


def _marked(html: str, cls: str) -> list[str]:
    tag = "del" if cls == "apt-del" else "ins"
    return [m.strip() for m in re.findall(rf'<{tag} class="{cls}"[^>]*>(.*?)</{tag}>', html, flags=re.S)]


def test_generation_diff_highlights_changed_words_and_escapes():
    out = generation_diff("The cat sat on <the> mat.", "The dog sat on <the> rug!")
    assert _marked(out, "apt-del") == ["cat", "mat", "."]
    assert _marked(out, "apt-ins") == ["dog", "rug", "!"]
    assert "<the>" not in out and out.count("&lt;the&gt;") == 2
    same = generation_diff("same text", "same text")
    assert "<del" not in same and "<ins" not in same and 'data-same="1.0000"' in same


def test_generation_diff_by_tokenizer_and_table():
    from conftest import word_tokenizer

    tok = word_tokenizer(10)
    out = generation_diff("w1 w2 w3", "w1 w4 w3", tokenizer=tok)
    assert _marked(out, "apt-del") == ["w2"] and _marked(out, "apt-ins") == ["w4"]
    table = generation_table([{"prompt": "Q<1>", "dense": "a b", "pruned": "a c"}, {"prompt": "x", "dense": "y", "pruned": "y"}])
    assert table.count("<tr>") == 3 and "Q&lt;1&gt;" in table
    assert _marked(table, "apt-del") == ["b"] and _marked(table, "apt-ins") == ["c"]
    with pytest.raises(ValueError, match="pruned"):
        generation_table([{"prompt": "p", "dense": "d"}])


# ----------------------------------------------------------------------------- teaching


def test_teaching_figure_shows_each_method():
    demo = teaching_demo(rows=4, cols=8, sparsity=0.5)
    fig = teaching_figure(demo)
    by_name = {t.name: t for t in fig.data}
    assert np.allclose(by_name["W"].z, demo.W.numpy())
    for m, step in demo.steps.items():
        assert np.allclose(by_name[f"{m}: W'"].z, step.weight.numpy())
        r, c = np.nonzero(~step.mask.numpy())
        assert list(by_name[f"{m}: pruned"].x) == list(c) and list(by_name[f"{m}: pruned"].y) == list(r)
        dz = np.asarray(by_name[f"{m}: ΔW"].z, dtype=float)
        assert np.isnan(dz[~step.mask.numpy()]).all()
        assert np.allclose(dz[step.mask.numpy()], step.dw.numpy()[step.mask.numpy()])
    assert list(by_name["error"].x) == ["OBS", "SparseGPT", "APT"]
    assert list(by_name["error"].y) == pytest.approx([s.error for s in demo.steps.values()])
