"""One prune-and-evaluate job: load, calibrate, prune, measure, write a report folder.

The pieces (:func:`calibration_ids`, :func:`eval_sets`, :func:`measure`, :func:`prune_and_measure`)
are public so that :mod:`apt_viz.compare` can measure the dense model once and prune many times.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .atomic import atomic_write as _atomic_write
from .config import PruningPlan
from .data import CORPORA, calibration_windows, eval_windows, generate, load_text, perplexity, tokenize_text
from .report_charts import write_charts
from .runner import Pruner
from .zeroshot import ZeroShotResult, zero_shot

log = logging.getLogger(__name__)

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein", "The best way to learn a language is"]
MAX_NEW_TOKENS = 24

#: Corpora to evaluate: one name or path, several, or ``{label: name or path}``.
Corpora = str | Sequence[str] | Mapping[str, str] | None


@dataclass
class Measurement:
    """What one state of the model (dense or pruned) scores."""

    ppl: dict[str, float]
    generations: list[str]
    zeroshot: ZeroShotResult | None = None
    seconds: float = 0.0


@dataclass
class JobResult:
    """Perplexities and generations before and after, per-layer results and timings.

    ``ppl_dense``/``ppl_pruned`` are for the first evaluation corpus; ``perplexity`` holds every
    corpus as ``{label: {"dense": ppl, "pruned": ppl}}``.
    """

    plan: dict[str, Any]
    ppl_dense: float | None
    ppl_pruned: float | None
    prune_seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, str]] = field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    zeroshot: dict[str, Any] | None = None

    @property
    def method_label(self) -> str:
        """The plan's method as tables show it (:attr:`PruningPlan.method_label`)."""
        return PruningPlan.from_dict(self.plan).method_label


def corpus_label(spec: str | os.PathLike) -> str:
    """A short column name for a corpus: the corpus name, or the text file's name."""
    text = os.fspath(spec)
    return text if text.lower() in CORPORA else (Path(text).name or text)


def corpus_sources(corpora: Corpora) -> dict[str, str]:
    """``{label: name or path}`` for the corpora to evaluate, in the given order."""
    if corpora is None:
        return {}
    if isinstance(corpora, (str, os.PathLike)):
        corpora = [corpora]
    if isinstance(corpora, Mapping):
        return {str(k): os.fspath(v) for k, v in corpora.items()}
    specs = list(dict.fromkeys(os.fspath(c) for c in corpora))
    labels = [corpus_label(c) for c in specs]
    if len(set(labels)) != len(labels):  # two files with one name: the full paths tell them apart
        labels = specs
    return dict(zip(labels, specs))


def eval_sets(tokenizer: Any, corpora: Corpora, seqlen: int, nwindows: int | None) -> dict[str, torch.Tensor]:
    """Evaluation windows per corpus label (``test`` split of named corpora), in the given order."""
    return {
        label: eval_windows(tokenizer, tokenize_text(tokenizer, load_text(spec, "test")), seqlen, nwindows)
        for label, spec in corpus_sources(corpora).items()
    }


def calibration_ids(tokenizer: Any, calib: str | os.PathLike, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples x seqlen`` calibration tokens from the ``validation`` split of ``calib`` (or a file)."""
    return calibration_windows(tokenizer, tokenize_text(tokenizer, load_text(calib, "validation")), nsamples, seqlen, seed)


def measure(
    model: torch.nn.Module,
    tokenizer: Any,
    evals: Mapping[str, torch.Tensor],
    *,
    tasks: Sequence[str] = (),
    prompts: Sequence[str] = PROMPTS,
    progress: bool = True,
) -> Measurement:
    """Perplexity on every corpus, greedy generations of ``prompts`` and optional zero-shot ``tasks``."""
    t0 = time.perf_counter()
    ppl = {label: perplexity(model, windows, progress=progress) for label, windows in evals.items()}
    gens = generate(model, tokenizer, list(prompts), max_new_tokens=MAX_NEW_TOKENS) if prompts else []
    zs = None
    if tasks:
        zs = zero_shot(model, tokenizer, tasks)
        if zs.message:
            log.warning(zs.message)
    return Measurement(ppl, gens, zs, time.perf_counter() - t0)


def prune_and_measure(
    pruner: Pruner,
    tokenizer: Any,
    calib: torch.Tensor,
    plan: PruningPlan,
    evals: Mapping[str, torch.Tensor],
    dense: Measurement,
    *,
    tasks: Sequence[str] = (),
    prompts: Sequence[str] = PROMPTS,
    progress: bool = True,
) -> JobResult:
    """Prune ``pruner.model`` in place by ``plan`` and measure it against the ``dense`` measurement."""
    t0 = time.perf_counter()
    pruner.run(calib, plan, progress=progress)
    seconds = time.perf_counter() - t0
    # Zero-shot tasks that could not run on the dense model (no lm-eval, no hub) are not retried.
    tasks_after = tasks if dense.zeroshot is not None and dense.zeroshot.ran else ()
    after = measure(pruner.model, tokenizer, evals, tasks=tasks_after, prompts=prompts, progress=progress)
    first = next(iter(evals), None)
    zs = None
    if dense.zeroshot is not None:
        zs = {"tasks": dense.zeroshot.tasks, "message": dense.zeroshot.message, "dense": dense.zeroshot.scores,
              "pruned": after.zeroshot.scores if after.zeroshot else {}}
        if after.zeroshot is not None and after.zeroshot.message:
            zs["message"] = after.zeroshot.message
    return JobResult(
        plan=plan.to_dict(), ppl_dense=dense.ppl.get(first) if first else None,
        ppl_pruned=after.ppl.get(first) if first else None, prune_seconds=seconds,
        layers=[r.to_dict() for r in pruner.results.values()],
        generations=[{"prompt": p, "dense": b, "pruned": a} for p, b, a in zip(prompts, dense.generations, after.generations)],
        perplexity={label: {"dense": dense.ppl[label], "pruned": after.ppl[label]} for label in evals},
        zeroshot=zs,
    )


def run_job(
    model: torch.nn.Module,
    tokenizer: Any,
    plan: PruningPlan,
    *,
    calib: str,
    evaluate: Corpora,
    nsamples: int = 32,
    seqlen: int = 512,
    nwindows: int | None = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dense: Measurement | None = None,
    tasks: Sequence[str] = (),
    progress: bool = True,
) -> tuple[JobResult, Pruner]:
    """Prune ``model`` in place by ``plan``, measuring before and after; ``dense`` skips re-measuring the dense model."""
    calib_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    evals = eval_sets(tokenizer, evaluate, seqlen, nwindows)
    if dense is None:
        dense = measure(model, tokenizer, evals, tasks=tasks, progress=progress)
    pruner = Pruner(model, device=device)
    return prune_and_measure(pruner, tokenizer, calib_ids, plan, evals, dense, tasks=tasks, progress=progress), pruner


def write_report(result: JobResult, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write plan.json, summary.json, layers.csv, generations.md, error.png and sparsity.png into ``folder``.

    Each file is written atomically. The charts need matplotlib; without it they are skipped with a warning.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "ppl_dense": result.ppl_dense, "ppl_pruned": result.ppl_pruned, "perplexity": result.perplexity,
        "prune_seconds": result.prune_seconds, "machine": platform.platform(), "torch": torch.__version__, **(meta or {}),
    }
    if result.zeroshot is not None:
        summary["zeroshot"] = result.zeroshot
    _atomic_write(out / "plan.json", json.dumps(result.plan, indent=2))
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    if result.layers:
        fields = list(result.layers[0])
        rows = [",".join(fields)] + [",".join(_csv_cell(r[f]) for f in fields) for r in result.layers]
        _atomic_write(out / "layers.csv", "\n".join(rows) + "\n")
        try:
            write_charts(result.layers, out)
        except ImportError as exc:  # matplotlib is optional; the numbers are in layers.csv either way
            log.warning("charts skipped: %s; `pip install matplotlib` adds error.png and sparsity.png", exc)
    gens = ["| prompt | dense | pruned |", "|---|---|---|"] + [
        f"| {g['prompt']} | {_md(g['dense'])} | {_md(g['pruned'])} |" for g in result.generations
    ]
    _atomic_write(out / "generations.md", "\n".join(gens) + "\n")
    return out


def _csv_cell(value: Any) -> str:
    text = "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return f'"{text}"' if "," in text else text


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
