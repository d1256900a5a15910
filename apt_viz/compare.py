"""Several methods and sparsity patterns on one model and one calibration set, in one quality table.

Every run starts from the dense weights (``Pruner.restore`` after each run), so each row equals
what a separate ``apt-viz prune`` with the same settings gives, bit for bit. What the runs share:

- the calibration tokens, drawn once for the seed;
- the dense measurement: perplexity on every corpus, the greedy generations, the zero-shot tasks;
- the captured inputs of block 0 and every block's other forward arguments (attention mask,
  positions): they come from the embeddings, which no method changes;
- the Hessians of block 0's layers taken before any layer of block 0 changes: all of block 0 in
  the default protocol; with ``sequential=True`` only its first group (q/k/v for Llama), because
  the later groups see the already pruned sublayers.

Nothing else can be shared. In SparseGPT's sequential protocol, which the runner follows, block
``b`` is calibrated on the outputs of the *pruned* blocks ``0..b-1``; those differ by method and
pattern, so every Hessian of blocks 1 and later is recomputed per run. (Only a protocol that
propagated dense outputs could share them all; the runner always propagates pruned outputs, as
the SparseGPT and Wanda references do.) Magnitude pruning ignores the Hessians but still walks the
blocks, so that its per-layer errors are measured on the same footing as the other methods.
The first run's prune time includes the block-0 capture and Hessians that later runs reuse.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .arch import block_index
from .config import PlanError, PruningPlan, Sparsity
from .hessian_cache import HessianCache
from .pipeline import (
    PROMPTS, Corpora, JobResult, Measurement, _atomic_write, calibration_ids, corpus_sources, eval_sets, measure, prune_and_measure, write_report,
)
from .runner import Pruner
from .zeroshot import headline


@dataclass
class SharedCalibration:
    """Calibration state reused by every run of a comparison (see the module docstring for what and why).

    ``captures`` counts calibration passes that captured block-0 inputs; ``block0_passes`` counts
    forward passes over block 0 that accumulated Hessians in its dense state; ``block0_reused``
    counts layers whose block-0 Hessian came from an earlier run.
    """

    hessians: HessianCache = field(default_factory=HessianCache)
    captures: int = 0
    block0_passes: int = 0
    block0_reused: int = 0
    _calib: torch.Tensor | None = None
    _captured: tuple[list[torch.Tensor], list[Any]] | None = None
    _dense_block0: set[str] = field(default_factory=set)

    def pruner(self, model: nn.Module, *, device: str | torch.device | None = None) -> Pruner:
        """A :class:`Pruner` over ``model`` that draws on (and fills) this shared state."""
        return _SharingPruner(model, self, device=device)

    def stats(self) -> dict[str, int]:
        return {"captures": self.captures, "block0_passes": self.block0_passes, "block0_reused": self.block0_reused}


class _SharingPruner(Pruner):
    """A Pruner that takes block-0 inputs and dense block-0 Hessians from a :class:`SharedCalibration`.

    It relies on the model being dense when :meth:`run` starts, which :func:`compare` guarantees.
    """

    def __init__(self, model: nn.Module, shared: SharedCalibration, *, device: str | torch.device | None = None) -> None:
        super().__init__(model, device=device, hessians=shared.hessians)
        self._shared = shared
        self._block0 = [n for n in self.layers if block_index(n) == 0]
        self._inputs: list[torch.Tensor] | None = None

    def _capture(self, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
        s = self._shared
        if s._captured is None or s._calib is None or s._calib.shape != calib.shape or not torch.equal(s._calib, calib):
            s._captured = super()._capture(calib)
            s._calib = calib.clone()
            s._dense_block0.clear()  # Hessians of another calibration set are no use
            s.captures += 1
        inps, extra = s._captured
        # Copies, so an architecture that edits its input in place cannot spoil the next run.
        self._inputs = [x.clone() for x in inps]
        return self._inputs, extra

    def _accumulate(
        self, block: nn.Module, modules: dict[str, nn.Module], inps: list[torch.Tensor], extra: tuple[tuple, dict], *,
        start: list[Callable[[], Any]] | None = None, record: nn.Module | None = None,
    ) -> list[Callable[[], Any]] | None:
        s = self._shared
        dense_block0 = (
            block is self.blocks[0] and inps is self._inputs and start is None
            and not any(n in self._dense for n in self._block0)
        )
        if not dense_block0:
            s._dense_block0.difference_update(modules)  # their cached Hessians now reflect a pruned state
            return super()._accumulate(block, modules, inps, extra, start=start, record=record)
        todo = {n: m for n, m in modules.items() if n not in s._dense_block0 or n not in self.hessians}
        s.block0_reused += len(modules) - len(todo)
        if not todo:
            return None  # no forward ran, so nothing was recorded: the next group starts from the block
        recorded = super()._accumulate(block, todo, inps, extra, record=record)
        s._dense_block0.update(todo)
        s.block0_passes += 1
        return recorded


@dataclass
class CompareResult:
    """The dense measurement and one :class:`JobResult` per (pattern, method), in run order."""

    labels: list[str]
    dense: Measurement
    runs: list[JobResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per run (plus the dense row first): method, pattern, ppl per corpus, prune seconds."""
        zs = self.dense.zeroshot
        out = [{"method": "dense", "pattern": "-", "ppl": dict(self.dense.ppl), "prune_seconds": None,
                "zeroshot": dict(zs.scores) if zs is not None else {}}]
        for r in self.runs:
            spec = Sparsity.parse(r.plan["sparsity"], r.plan["pattern"])
            out.append({
                "method": r.method_label, "pattern": str(spec), "sparsity": spec.fraction,
                "ppl": {label: v["pruned"] for label, v in r.perplexity.items()},
                "prune_seconds": r.prune_seconds,
                "mean_rel_error": sum(layer["rel_error"] for layer in r.layers) / len(r.layers) if r.layers else None,
                "zeroshot": dict((r.zeroshot or {}).get("pruned", {})),
            })
        return out


def compare(
    model: nn.Module,
    tokenizer: Any,
    methods: Sequence[str],
    specs: Sequence[str | float],
    *,
    calib: str | os.PathLike,
    evaluate: Corpora,
    nsamples: int = 32,
    seqlen: int = 512,
    nwindows: int | None = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    sequential: bool = False,
    refit: bool = True,
    refit_dtype: str = "auto",
    tasks: Sequence[str] = (),
    prompts: Sequence[str] = PROMPTS,
    progress: bool = True,
    on_run: Callable[[CompareResult], None] | None = None,
    runs: Sequence[tuple[str, str | float]] = (),
) -> CompareResult:
    """Prune ``model`` with every pattern in ``specs`` x every method, restoring it to dense between runs.

    ``refit=False`` runs APT without its exact re-fit, and ``refit_dtype`` sets the re-fit's matmul
    dtype (:class:`PruningPlan`'s ``refit`` and ``refit_dtype``).
    ``runs`` lists further ``(method, spec)`` pairs, run after the cross product in the order given
    (pass empty ``methods``/``specs`` to run only these, e.g. the most wanted rows first).

    ``on_run(result)`` is called after the dense measurement and after each run (for writing a
    table as it grows). The model is dense again when this returns, or raises.
    """
    t0 = time.perf_counter()
    pairs = [*((m, s) for s in specs for m in methods), *runs]
    if not pairs:
        raise PlanError("nothing to compare: give methods and specs, or runs=[(method, spec), ...]")
    plans = [
        PruningPlan(method=m, sparsity=spec.fraction, pattern=spec.pattern, include=list(include), exclude=list(exclude),
                    sequential=sequential, refit=refit, refit_dtype=refit_dtype)
        for m, spec in ((m, Sparsity.parse(s)) for m, s in pairs)
    ]  # validated up front, so a typo fails before the slow part
    calib_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    evals = eval_sets(tokenizer, evaluate, seqlen, nwindows)
    dense = measure(model, tokenizer, evals, tasks=tasks, prompts=prompts, progress=progress)
    shared = SharedCalibration()
    result = CompareResult(
        labels=list(evals), dense=dense,
        settings={"methods": list(methods), "specs": [str(s) for s in specs], "runs": [[m, str(s)] for m, s in runs], "calib": os.fspath(calib),
                  "evaluate": corpus_sources(evaluate), "nsamples": nsamples, "seqlen": seqlen, "nwindows": nwindows,
                  "seed": seed, "device": str(device) if device is not None else None, "include": list(include),
                  "exclude": list(exclude), "sequential": sequential, "refit": refit,
                  "refit_dtype": refit_dtype, "tasks": list(tasks), "prompts": list(prompts)},
    )
    if on_run:
        on_run(result)
    for plan in plans:
        pruner = shared.pruner(model, device=device)
        try:
            result.runs.append(prune_and_measure(pruner, tokenizer, calib_ids, plan, evals, dense, tasks=tasks, prompts=prompts, progress=progress))
        finally:
            pruner.restore()
        result.shared = shared.stats()
        result.seconds = time.perf_counter() - t0
        if on_run:
            on_run(result)
    result.shared = shared.stats()
    result.seconds = time.perf_counter() - t0
    return result


def quality_table(result: CompareResult) -> str:
    """The markdown table: one row per method and pattern, perplexity per corpus, prune time."""
    tasks = _task_columns(result)
    head = ["method", "pattern", *(f"{label} ppl" for label in result.labels), *(f"{t} {m}" for t, m in tasks), "prune time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows():
        cells = [row["method"], row["pattern"], *(_num(row["ppl"].get(label)) for label in result.labels)]
        for task, metric in tasks:
            score = headline(row["zeroshot"].get(task, {}))
            cells.append(f"{score[1]:.4f}" if score and score[0] == metric else "-")
        cells.append("-" if row["prune_seconds"] is None else f"{row['prune_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_markdown(result: CompareResult, *, title: str = "Quality comparison", meta: dict[str, Any] | None = None) -> str:
    """The table with what produced it: ``meta`` lines (model, command...), machine, calibration, evaluation."""
    s = result.settings
    lines = [
        f"# {title}", "",
        *(f"{k.capitalize()}: {v}" for k, v in (meta or {}).items()),
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {_device_name(s.get('device'))}.",
        f"Calibration: {s.get('nsamples')} x {s.get('seqlen')} tokens of {s.get('calib')}, seed {s.get('seed')}.",
        "Evaluation: " + "; ".join(f"{label} = first {s.get('nwindows') or 'all'} x {s.get('seqlen')}-token windows of {src}"
                                   for label, src in s.get("evaluate", {}).items()) + ".",
        _shared_line(result.shared),
        "", quality_table(result).rstrip("\n"), "",
        f"Total time: {result.seconds:.0f} s (dense evaluation {result.dense.seconds:.0f} s).",
    ]
    zs = result.dense.zeroshot
    if zs is not None and zs.message:
        lines.append(f"Zero-shot: {zs.message}")
    return "\n".join(lines) + "\n"


def write_quality(result: CompareResult, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``quality.md`` and ``quality.json`` into ``folder`` (atomically, so it can run after every run)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    zs = result.dense.zeroshot
    payload = {
        **(meta or {}), "machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "settings": result.settings, "shared": result.shared, "seconds": result.seconds,
        "dense": {"ppl": result.dense.ppl, "seconds": result.dense.seconds,
                  "generations": [{"prompt": p, "text": g} for p, g in zip(result.settings.get("prompts", PROMPTS), result.dense.generations)],
                  "zeroshot": zs.to_dict() if zs is not None else None},
        "rows": result.rows(),
    }
    _atomic_write(out / "quality.json", json.dumps(payload, indent=2))
    _atomic_write(out / "quality.md", quality_markdown(result, meta=meta))
    return out


def write_run_report(result: CompareResult, run: JobResult, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """The full ``apt-viz prune`` report of one run, in ``folder/runs/<method>-<pattern>/``."""
    spec = Sparsity.parse(run.plan["sparsity"], run.plan["pattern"])
    extra = {k: result.settings.get(k) for k in ("seed", "nsamples", "seqlen")}
    return write_report(run, Path(folder) / "runs" / run_folder_name(run.method_label, spec), {**(meta or {}), **extra})


def write_compare_report(result: CompareResult, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``quality.md``, ``quality.json`` and every run's report under ``runs/``."""
    for run in result.runs:
        write_run_report(result, run, folder, meta)
    return write_quality(result, folder, meta)


def run_folder_name(method: str, spec: Sparsity) -> str:
    """``apt-50pct``, ``sparsegpt-2of4``, ``apt-no-re-fit-50pct``: a file-system-safe folder name for one run."""
    tag = f"{spec.n}of{spec.m}" if spec.structured else f"{round(spec.fraction * 100, 2):g}pct"
    return f"{re.sub(r'[^A-Za-z0-9_.]+', '-', method).strip('-')}-{tag}"


def _task_columns(result: CompareResult) -> list[tuple[str, str]]:
    zs = result.dense.zeroshot
    if zs is None or not zs.scores:
        return []
    cols = []
    for task, scores in zs.scores.items():
        h = headline(scores)
        if h:
            cols.append((task, h[0]))
    return cols


def _shared_line(stats: dict[str, int]) -> str:
    if not stats:
        return "Shared between runs: the calibration tokens and the dense measurement."
    return (f"Shared between runs: the calibration tokens, the dense measurement, the block-0 inputs (captured "
            f"{stats['captures']} time(s)) and the dense block-0 Hessians ({stats['block0_passes']} pass(es), "
            f"reused for {stats['block0_reused']} layer runs); blocks 1+ are recalibrated per run.")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _device_name(device: str | None) -> str:
    if device and device.startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return "CPU"
