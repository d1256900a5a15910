"""One prune-and-evaluate job: load, calibrate, prune, measure, write a report folder."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PruningPlan
from .data import calibration_windows, eval_windows, generate, load_text, perplexity, tokenize_text
from .runner import Pruner

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein", "The best way to learn a language is"]


@dataclass
class JobResult:
    """Perplexities and generations before and after, per-layer results and timings."""

    plan: dict[str, Any]
    ppl_dense: float | None
    ppl_pruned: float | None
    prune_seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, str]] = field(default_factory=list)


def run_job(
    model: torch.nn.Module,
    tokenizer: Any,
    plan: PruningPlan,
    *,
    calib: str,
    evaluate: str | None,
    nsamples: int = 32,
    seqlen: int = 512,
    nwindows: int | None = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dense_ppl: float | None = None,
    progress: bool = True,
) -> tuple[JobResult, Pruner]:
    """Prune ``model`` in place by ``plan``; ``dense_ppl`` skips re-measuring the dense model."""
    calib_ids = calibration_windows(tokenizer, tokenize_text(tokenizer, load_text(calib, "validation")), nsamples, seqlen, seed)
    windows = eval_windows(tokenizer, tokenize_text(tokenizer, load_text(evaluate, "test")), seqlen, nwindows) if evaluate else None
    if windows is not None and dense_ppl is None:
        dense_ppl = perplexity(model, windows, progress=progress)
    before = generate(model, tokenizer, PROMPTS, max_new_tokens=24)
    pruner = Pruner(model, device=device)
    t0 = time.perf_counter()
    pruner.run(calib_ids, plan, progress=progress)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, windows, progress=progress) if windows is not None else None
    after = generate(model, tokenizer, PROMPTS, max_new_tokens=24)
    result = JobResult(
        plan=plan.to_dict(), ppl_dense=dense_ppl, ppl_pruned=ppl, prune_seconds=seconds,
        layers=[r.to_dict() for r in pruner.results.values()],
        generations=[{"prompt": p, "dense": b, "pruned": a} for p, b, a in zip(PROMPTS, before, after)],
    )
    return result, pruner


def write_report(result: JobResult, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write plan.json, layers.csv, summary.json and generations.md into ``folder`` (each atomically)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "ppl_dense": result.ppl_dense, "ppl_pruned": result.ppl_pruned, "prune_seconds": result.prune_seconds,
        "machine": platform.platform(), "torch": torch.__version__, **(meta or {}),
    }
    _atomic_write(out / "plan.json", json.dumps(result.plan, indent=2))
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    if result.layers:
        fields = list(result.layers[0])
        rows = [",".join(fields)] + [",".join(_csv_cell(r[f]) for f in fields) for r in result.layers]
        _atomic_write(out / "layers.csv", "\n".join(rows) + "\n")
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


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
