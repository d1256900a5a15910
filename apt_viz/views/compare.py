"""Before/after views: perplexity bars per method, and generations side by side with changes highlighted."""

from __future__ import annotations

import difflib
import html
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go

DEL_STYLE = "background:#f8d7da;color:#842029;text-decoration:line-through"
INS_STYLE = "background:#d1e7dd;color:#0f5132;font-weight:600"
_WORDS = re.compile(r"\s+|\w+\s*|[^\w\s]\s*")


def _is_dense(row: Mapping[str, Any]) -> bool:
    return bool(row.get("dense")) or str(row.get("label", "")).strip().lower() == "dense"


def ppl_bars(rows: Iterable[Mapping[str, Any]], *, log: bool = False, title: str | None = None) -> go.Figure:
    """Perplexity per label (method/pattern) as bars, one colour per dataset; dense is a dashed reference line.

    ``rows``: dicts ``{label, ppl}`` with optional ``dataset``; a row labelled ``dense`` (or with
    ``dense=True``) becomes the reference line of its dataset (``fig.layout.shapes``).
    """
    rows = list(rows)
    bad = [r for r in rows if "label" not in r or "ppl" not in r]
    if bad:
        raise ValueError(f"each row needs 'label' and 'ppl' keys, got {bad[0]!r}")
    datasets: list[str] = []
    for r in rows:
        d = str(r.get("dataset", ""))
        if d not in datasets:
            datasets.append(d)
    fig = go.Figure()
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    for i, d in enumerate(datasets):
        bars = [r for r in rows if str(r.get("dataset", "")) == d and not _is_dense(r)]
        color = palette[i % len(palette)]
        if bars:
            ys = [float(r["ppl"]) for r in bars]
            fig.add_trace(go.Bar(
                x=[str(r["label"]) for r in bars], y=[y if math.isfinite(y) else None for y in ys],
                name=d or "perplexity", marker_color=color,
                text=[f"{y:.2f}" if math.isfinite(y) else str(y) for y in ys], textposition="outside",
                hovertemplate="%{x}" + (f" on {d}" if d else "") + "<br>ppl %{y:.3f}<extra></extra>",
            ))
        for r in rows:
            if str(r.get("dataset", "")) == d and _is_dense(r):
                fig.add_hline(y=float(r["ppl"]), line=dict(dash="dash", color=color),
                              annotation_text=f"dense{' ' + d if d else ''}: {float(r['ppl']):.2f}",
                              annotation_position="top left")
    fig.update_layout(title=title or "Perplexity after pruning (lower is better)", barmode="group",
                      xaxis_title="method / pattern", yaxis_title="perplexity", showlegend=len(datasets) > 1)
    if log:
        fig.update_yaxes(type="log")
    return fig


def _tokens(text: str, tokenizer: Any | None) -> tuple[list[str], list[Any]]:
    """Pieces that concatenate back to ``text`` (as far as the tokenizer allows), and the keys to diff on."""
    if tokenizer is None:
        pieces = _WORDS.findall(text)
        return pieces, [p.strip() for p in pieces]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids], list(ids)


def _span(text: str, style: str | None, cls: str | None) -> str:
    body = html.escape(text)
    if style is None:
        return body
    tag = "del" if cls == "apt-del" else "ins"
    return f'<{tag} class="{cls}" style="{style}">{body}</{tag}>'


def diff_tokens(before: str, after: str, *, tokenizer: Any | None = None) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]], float]:
    """Each side as ``(piece, changed)`` pairs, and the fraction of matching tokens (difflib ratio)."""
    pa, ka = _tokens(before, tokenizer)
    pb, kb = _tokens(after, tokenizer)
    sm = difflib.SequenceMatcher(None, ka, kb, autojunk=False)
    left: list[tuple[str, bool]] = []
    right: list[tuple[str, bool]] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        left += [(p, op != "equal") for p in pa[i1:i2]]
        right += [(p, op != "equal") for p in pb[j1:j2]]
    return left, right, sm.ratio() if (ka or kb) else 1.0


def generation_diff(
    before: str, after: str, *, tokenizer: Any | None = None, labels: tuple[str, str] = ("dense", "pruned")
) -> str:
    """HTML with the two texts side by side; removed tokens are ``<del>`` on the left, new ones ``<ins>`` on the right.

    Tokens are words and punctuation (difflib over them), or the ``tokenizer``'s tokens when given.
    All text is HTML-escaped.
    """
    if not isinstance(before, str) or not isinstance(after, str):
        raise TypeError(f"generation_diff compares two strings, got {type(before).__name__} and {type(after).__name__}")
    left, right, ratio = diff_tokens(before, after, tokenizer=tokenizer)
    cell = "flex:1;padding:6px;border:1px solid #ddd;border-radius:4px;white-space:pre-wrap;font-family:monospace"

    def side(pairs: list[tuple[str, bool]], style: str, cls: str, label: str) -> str:
        body = "".join(_span(p, style if ch else None, cls if ch else None) for p, ch in pairs)
        return f'<div style="{cell}"><div style="font-weight:600;margin-bottom:4px">{html.escape(label)}</div>{body}</div>'

    return (
        f'<div class="apt-gen-diff" data-same="{ratio:.4f}">'
        f'<div style="font-size:smaller;color:#555">{ratio:.0%} of tokens unchanged</div>'
        f'<div style="display:flex;gap:8px">{side(left, DEL_STYLE, "apt-del", labels[0])}{side(right, INS_STYLE, "apt-ins", labels[1])}</div>'
        "</div>"
    )


def generation_table(
    generations: Sequence[Mapping[str, str]], *, tokenizer: Any | None = None, labels: tuple[str, str] = ("dense", "pruned")
) -> str:
    """HTML table of ``[{prompt, dense, pruned}]``: the escaped prompt, then the two continuations diffed."""
    rows = []
    for i, g in enumerate(generations):
        missing = [k for k in ("prompt", "dense", "pruned") if k not in g]
        if missing:
            raise ValueError(f"generation {i} lacks {missing}; each needs 'prompt', 'dense' and 'pruned'")
        rows.append(
            f'<tr><td style="vertical-align:top;padding:6px;font-style:italic;white-space:pre-wrap;text-align:left">{html.escape(g["prompt"])}</td>'
            f'<td style="padding:6px;text-align:left">{generation_diff(g["dense"], g["pruned"], tokenizer=tokenizer, labels=labels)}</td></tr>'
        )
    return (
        '<table class="apt-gen-table" style="border-collapse:collapse;width:100%">'
        '<thead><tr><th style="text-align:left">prompt</th>'
        f'<th style="text-align:left">{html.escape(labels[0])} vs {html.escape(labels[1])}</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
