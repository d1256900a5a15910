"""The explorer's controller: the pruning plan being edited, runs, evaluations and JSON export.

Knows no widget. The ipywidgets panel (:mod:`apt_viz.app.explorer`) only reads and writes this
object, so everything the panel does can be scripted or tested without a front end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..arch import block_index, sublayer_kind
from ..config import METHODS, LayerOverride, PlanError, PruningPlan, Sparsity, nearest
from ..checks import ReportError, layer_result_from_dict
from ..runner import LayerResult, Pruner

__all__ = ["DEFAULT_PROMPTS", "EXPORT_FORMAT", "ExplorerState", "RunRecord", "results_from_dicts"]

#: Marks a file written by :meth:`ExplorerState.export_json`.
EXPORT_FORMAT = "apt_viz.explorer"
EXPORT_VERSION = 1
DEFAULT_PROMPTS = ("The capital of France is", "In 1905, Albert Einstein")

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class RunRecord:
    """One pruning run (or a loaded file): its plan, per-layer results and masks, as they are now."""

    label: str
    plan: PruningPlan
    results: dict[str, LayerResult] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    cancelled: bool = False
    loaded: bool = False


class ExplorerState:
    """Plan, runs and evaluations of one model, behind the explorer panel.

    ``calib`` is a local text file or corpus name (``"wikitext2"``), a 1-D tensor of token ids,
    or ready calibration windows (an ``nsamples x seqlen`` LongTensor). ``eval_text`` (same kinds;
    2-D means evaluation windows) turns on perplexity and generations before and after pruning.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        calib: str | os.PathLike | torch.Tensor,
        *,
        eval_text: str | os.PathLike | torch.Tensor | None = None,
        device: str | torch.device | None = None,
        nsamples: int | None = None,
        seqlen: int | None = None,
        nwindows: int = 8,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        max_new_tokens: int = 16,
        seed: int = 0,
    ) -> None:
        from ..data import max_seqlen

        self.model = model
        self.tokenizer = tokenizer
        self.pruner = Pruner(model, device=device)
        self.layer_names: list[str] = self.pruner.layer_names
        self.blocks: list[int] = sorted({block_index(n) for n in self.layer_names})
        self.kinds: list[str] = list(dict.fromkeys(sublayer_kind(n) for n in self.layer_names))
        self.seed = seed
        self.prompts = list(prompts) if tokenizer is not None else []  # generating needs a tokenizer
        self.max_new_tokens = max_new_tokens
        self.nwindows = nwindows

        self._calib = calib
        self._calib_ids: torch.Tensor | None = None
        if isinstance(calib, torch.Tensor):
            if calib.dim() not in (1, 2) or calib.numel() == 0 or calib.is_floating_point():
                raise ValueError(
                    f"calib must be token ids: a 1-D tensor or an (nsamples x seqlen) LongTensor, got {calib.dtype} "
                    f"of shape {tuple(calib.shape)}; or pass a text file path / corpus name"
                )
        elif not isinstance(calib, (str, os.PathLike)):
            raise TypeError(f"calib must be a text file path, a corpus name or a tensor of token ids, got {type(calib).__name__}")
        windows = calib if isinstance(calib, torch.Tensor) and calib.dim() == 2 else None
        self.nsamples = nsamples or (windows.shape[0] if windows is not None else 32)
        self.seqlen = seqlen or (windows.shape[1] if windows is not None else max_seqlen(model, 512))
        self.eval_text = eval_text
        self._eval_windows: torch.Tensor | None = None

        self.plan = PruningPlan()
        self.runs: list[RunRecord] = []
        self.live: RunRecord | None = None  # the run whose weights are in the model now
        self.shown: RunRecord | None = None  # what the views show: the live run or a loaded file
        self.evaluations: list[dict[str, Any]] = []
        self.sweep_table: list[dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ layers and plans
    @property
    def model_label(self) -> str:
        """A short name for the model: its config name or class, and its size."""
        cfg = getattr(self.model, "config", None)
        name = getattr(cfg, "_name_or_path", "") or type(self.model).__name__
        params = sum(p.numel() for p in self.model.parameters())
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"
        return f"{Path(str(name)).name or name} ({size} parameters, {len(self.blocks)} blocks, {len(self.layer_names)} linears)"

    def layers_for(self, blocks: Sequence[int], kinds: Sequence[str]) -> list[str]:
        """The layer names in ``blocks`` whose sublayer kind is in ``kinds``, in model order."""
        b, k = set(blocks), set(kinds)
        return [n for n in self.layer_names if block_index(n) in b and sublayer_kind(n) in k]

    def selected_layers(self, plan: PruningPlan | None = None) -> list[str]:
        """The layers ``plan`` (default: the current one) prunes, in model order."""
        plan = plan or self.plan
        return [n for n in self.layer_names if plan.selects(n)]

    def make_plan(
        self,
        method: str,
        sparsity: float | str,
        pattern: str = "unstructured",
        layers: Sequence[str] | None = None,
        overrides: dict[str, LayerOverride] | None = None,
        refit: bool | None = None,
    ) -> PruningPlan:
        """A validated plan for this model; blocksize, damping, ordering and (``None``) ``refit`` come from the current plan.

        ``layers`` are exact layer names (``None``: all); all of them become ``include=["*"]``.
        """
        spec = Sparsity.parse(sparsity, pattern)
        if layers is None or set(layers) >= set(self.layer_names):
            include = ["*"]
        else:
            unknown = [n for n in layers if n not in self.layer_names]
            if unknown:
                raise PlanError(f"unknown layer {unknown[0]!r}; nearest names: {nearest(unknown[0], self.layer_names)}")
            chosen = set(layers)
            include = [n for n in self.layer_names if n in chosen]
        plan = dataclasses.replace(
            self.plan, method=method, sparsity=spec.fraction, pattern=spec.pattern, include=include, exclude=[],
            overrides=dict(self.plan.overrides if overrides is None else overrides),
            refit=self.plan.refit if refit is None else refit,
        )
        plan.check_names(self.layer_names)
        return plan

    # ------------------------------------------------------------------ data
    def calibration(self, nsamples: int | None = None, seqlen: int | None = None) -> torch.Tensor:
        """Calibration windows ``(nsamples x seqlen)`` drawn from ``calib`` with this state's seed."""
        from ..data import calibration_windows, load_text, tokenize_text

        nsamples = nsamples or self.nsamples
        seqlen = seqlen or self.seqlen
        calib = self._calib
        if isinstance(calib, torch.Tensor) and calib.dim() == 2:
            n, length = calib.shape
            if nsamples > n or seqlen > length:
                raise ValueError(
                    f"the calibration windows given are {n} x {length}; asked for {nsamples} x {seqlen}: "
                    f"lower nsamples/seqlen or pass a longer 1-D token tensor or a text file"
                )
            return calib[:nsamples, :seqlen].long()
        if self._calib_ids is None:
            self._calib_ids = calib.long() if isinstance(calib, torch.Tensor) else tokenize_text(self.tokenizer, load_text(calib, "validation"))
        return calibration_windows(self.tokenizer, self._calib_ids, nsamples, seqlen, self.seed)

    def eval_windows(self) -> torch.Tensor | None:
        """Evaluation windows from ``eval_text`` (``None`` when no evaluation text was given)."""
        from ..data import eval_windows, load_text, tokenize_text

        if self.eval_text is None:
            return None
        if self._eval_windows is None:
            text = self.eval_text
            if isinstance(text, torch.Tensor) and text.dim() == 2:
                self._eval_windows = text.long()
            else:
                ids = text.long() if isinstance(text, torch.Tensor) else tokenize_text(self.tokenizer, load_text(text, "test"))
                self._eval_windows = eval_windows(self.tokenizer, ids, self.seqlen, self.nwindows)
        return self._eval_windows

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def cancel(self) -> None:
        """Ask a run in progress to stop after the current layer (safe from any thread)."""
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def run(
        self,
        plan: PruningPlan | None = None,
        *,
        nsamples: int | None = None,
        seqlen: int | None = None,
        callback: ProgressCallback | None = None,
        evaluate: bool = False,
    ) -> RunRecord:
        """Put the model back to dense, then prune it by ``plan`` (default: the current plan).

        ``callback(done_blocks, total_blocks, message)`` reports progress; :meth:`cancel` ends the
        run early, leaving what was pruned pruned and restorable. With ``evaluate``, perplexity
        and generations are measured before (once) and after.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a run is already in progress; cancel it or wait for it to finish")
        try:
            self._stop.clear()
            plan = (plan or self.plan).validate()
            plan.check_names(self.layer_names)
            if nsamples is not None:
                self.nsamples = nsamples
            if seqlen is not None:
                self.seqlen = seqlen
            calib = self.calibration()
            self._restore()
            if evaluate and not any(e["label"] == "dense" for e in self.evaluations):
                self._evaluate("dense")
            self.pruner.hessians.clear()  # a later re-prune must only use this run's Hessians
            self.plan = plan
            self.pruner.run(calib, plan, progress=False, callback=callback, should_stop=self.should_stop)
            record = RunRecord(label=self._new_label(plan), plan=plan, cancelled=self._stop.is_set())
            self._sync(record)
            self.runs.append(record)
            self.live = self.shown = record
            if evaluate and not record.cancelled:
                self._evaluate(record.label)
            return record
        finally:
            self._lock.release()

    def restore(self) -> None:
        """Put back the dense weights, bit for bit."""
        with self._exclusive():
            self._restore()

    def _restore(self) -> None:
        self.pruner.restore()
        self.live = None
        if self.shown is not None and not self.shown.loaded:
            self.shown = None

    def set_override(self, name: str, sparsity: float | str | None, method: str | None = None) -> LayerResult | None:
        """Give layer ``name`` its own sparsity (``"0.7"``, ``"2:4"``) and/or method.

        When the model holds a run that pruned this layer, only this layer is re-pruned, from its
        cached Hessian, and its new result is returned; otherwise the override is kept for the
        next run and ``None`` is returned. ``sparsity=None`` and ``method=None`` remove the override.
        """
        if name not in self.layer_names:
            raise PlanError(f"no prunable layer {name!r}; nearest names: {nearest(name, self.layer_names)}")
        if method is not None and method not in METHODS:
            raise PlanError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if sparsity is None and method is None:
            self.clear_override(name)
            return None
        if isinstance(sparsity, str) and not sparsity.strip():
            sparsity = None
        spec = Sparsity.parse(sparsity) if sparsity is not None else None
        if self.live is not None and name in self.live.results and name in self.pruner.hessians:
            # The live run's own plan decides the rest of this layer's settings, not later edits.
            with self._exclusive():
                result = self.pruner.reprune(name, spec, method=method)
                ov = dataclasses.replace(self.pruner.plan.overrides[name])
                self._sync(self.live)
        else:
            result = None
            ov = LayerOverride(sparsity=spec.fraction if spec else None, pattern=spec.pattern if spec else None, method=method)
        overrides = dict(self.plan.overrides)
        overrides[name] = ov
        self.plan = dataclasses.replace(self.plan, overrides=overrides).validate()
        return result

    def clear_override(self, name: str) -> None:
        """Drop the override of ``name`` from the plan (applies at the next run)."""
        overrides = {k: v for k, v in self.plan.overrides.items() if k != name}
        self.plan = dataclasses.replace(self.plan, overrides=overrides).validate()

    def _sync(self, record: RunRecord) -> None:
        """Copy the pruner's current results and masks into ``record`` (later restores pop them)."""
        record.results = dict(self.pruner.results)
        record.masks = dict(self.pruner.masks)
        record.plan = PruningPlan.from_dict(self.pruner.plan.to_dict()) if self.pruner.plan else record.plan

    def _new_label(self, plan: PruningPlan) -> str:
        base = f"{plan.method_label} {Sparsity.parse(plan.sparsity, plan.pattern)}"
        if plan.include != ["*"] or plan.exclude or plan.overrides:
            base += " (custom)"
        labels = {r.label for r in self.runs}
        label, k = base, 2
        while label in labels:
            label, k = f"{base} #{k}", k + 1
        return label

    def sweep(self, sparsities: Sequence[float | str], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Sensitivity: re-prune each layer of the live run alone at each sparsity, from cached Hessians.

        Each layer is put back as it was afterwards (see :func:`apt_viz.sensitivity.layer_sweep`).
        Returns and keeps (``self.sweep_table``) the rows ``{layer, block, kind, sparsity, rel_error, ...}``.
        """
        from ..sensitivity import layer_sweep

        if self.live is None:
            raise RuntimeError("the sensitivity sweep re-prunes from the Hessians of a run: Run first")
        names = list(self.live.results) if names is None else list(names)
        with self._exclusive():
            self.sweep_table = layer_sweep(self.pruner, names, list(sparsities), progress=False)
            self._sync(self.live)
        return self.sweep_table

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a run is in progress; cancel it or wait for it to finish")
        try:
            yield
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, label: str | None = None) -> dict[str, Any]:
        """Perplexity on the evaluation windows and greedy generations of the model as it is now."""
        label = label or (self.live.label if self.live is not None else "dense")
        return self._evaluate(label)

    def _evaluate(self, label: str) -> dict[str, Any]:
        from ..data import generate, perplexity

        windows = self.eval_windows()
        ppl = perplexity(self.model, windows, progress=False) if windows is not None else None
        gens = generate(self.model, self.tokenizer, self.prompts, self.max_new_tokens) if self.prompts else []
        row = {"label": label, "ppl": ppl, "generations": gens}
        self.evaluations = [e for e in self.evaluations if e["label"] != label] + [row]
        return row

    # ------------------------------------------------------------------ export / load
    def export_dict(self) -> dict[str, Any]:
        """The plan and the shown results as plain JSON data."""
        record = self.shown
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "model": self.model_label,
            "label": record.label if record else None,
            "plan": (record.plan if record else self.plan).to_dict(),
            "results": [r.to_dict() for r in (record.results.values() if record else [])],
            "prompts": list(self.prompts),
            "evaluations": [{"label": e["label"], "ppl": e["ppl"], "generations": list(e["generations"])} for e in self.evaluations],
        }

    def export_json(self, path: str | os.PathLike | None = None) -> str:
        """Export plan and results as JSON text; also written to ``path`` (atomically) if given."""
        from ..pipeline import _atomic_write

        text = json.dumps(self.export_dict(), indent=2)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    def load_json(self, source: str | os.PathLike) -> RunRecord:
        """Load a file written by :meth:`export_json` (a path or the JSON text itself).

        The model goes back to dense (its weights no longer match what is shown); the loaded plan
        becomes the current plan, so Run applies it again.
        """
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{text!r} is not an exported JSON file (nor JSON text)")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"the explorer file is not valid JSON: {e}") from None
        return self.load_dict(data)

    def load_dict(self, data: Any) -> RunRecord:
        """Validate exported data (see :meth:`load_json`) and show it."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise PlanError(f"not an explorer export: expected a JSON object with \"format\": \"{EXPORT_FORMAT}\"")
        if data.get("version") != EXPORT_VERSION:
            raise PlanError(f"explorer export version {data.get('version')!r} is not supported; this apt_viz reads version {EXPORT_VERSION}")
        unknown = sorted(set(data) - {"format", "version", "model", "label", "plan", "results", "prompts", "evaluations"})
        if unknown:
            raise PlanError(f"explorer export has unknown keys {unknown}")
        plan = PruningPlan.from_dict(data.get("plan"))
        plan.check_names(self.layer_names)
        results = results_from_dicts(data.get("results", []), self.layer_names)
        evaluations = _evaluations_from(data.get("evaluations", []))
        prompts = data.get("prompts", self.prompts)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise PlanError("prompts must be a list of strings")
        label = data.get("label") or "loaded"
        if not isinstance(label, str):
            raise PlanError(f"label must be a string, got {type(label).__name__}")
        with self._exclusive():
            self._restore()
        self.plan = plan
        record = RunRecord(label=label, plan=PruningPlan.from_dict(plan.to_dict()), results=results, loaded=True)
        self.runs.append(record)
        self.shown = record
        self.evaluations = evaluations
        self.prompts = list(prompts)
        return record


def results_from_dicts(items: Any, layer_names: Sequence[str] | None = None) -> dict[str, LayerResult]:
    """Rebuild :class:`LayerResult` objects from their ``to_dict()`` form, checking every field."""
    if not isinstance(items, list):
        raise PlanError(f"results must be a JSON list of layer results, got {type(items).__name__}")
    out: dict[str, LayerResult] = {}
    for i, item in enumerate(items):
        where = f"results[{i}]"
        try:
            result = layer_result_from_dict(item, where)
        except ReportError as e:
            raise PlanError(str(e)) from None
        if layer_names is not None and result.name not in layer_names:
            raise PlanError(f"{where}: this model has no layer {result.name!r}; nearest names: {nearest(result.name, list(layer_names))}")
        if result.name in out:
            raise PlanError(f"{where}: layer {result.name!r} appears twice")
        out[result.name] = result
    return out


def _evaluations_from(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise PlanError(f"evaluations must be a JSON list, got {type(items).__name__}")
    out = []
    for i, e in enumerate(items):
        ok = (
            isinstance(e, dict) and set(e) == {"label", "ppl", "generations"} and isinstance(e["label"], str)
            and (e["ppl"] is None or (isinstance(e["ppl"], (int, float)) and not isinstance(e["ppl"], bool)))
            and isinstance(e["generations"], list) and all(isinstance(g, str) for g in e["generations"])
        )
        if not ok:
            raise PlanError(f"evaluations[{i}] must be {{\"label\": str, \"ppl\": number or null, \"generations\": [str]}}")
        out.append(dict(e))
    return out
