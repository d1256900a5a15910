"""The explorer panel: ipywidgets controls and result tabs wired to :class:`ExplorerState`.

Widgets and wiring only: every action calls the same public API a script would (the state's
``run``, ``restore``, ``set_override``, ``export_json``; the views in :mod:`apt_viz.views`).
The widgets are attributes (``app.method``, ``app.sparsity``, ``app.run_button`` ...), so tests
and notebooks can set values and click buttons without a browser.
"""

from __future__ import annotations

import math
import os
import threading
import traceback
from typing import Any, Callable, Sequence

import ipywidgets as widgets
import torch

from ..arch import block_index, sublayer_kind
from ..config import METHODS, PruningPlan, Sparsity
from .state import DEFAULT_PROMPTS, ExplorerState, RunRecord

__all__ = ["Explorer", "TABS"]

#: Result tabs, in display order: key -> title.
TABS: dict[str, str] = {
    "errors": "Layer errors",
    "masks": "Mask",
    "nm": "N:M groups",
    "histograms": "Sparsity histograms",
    "agreement": "Agreement",
    "sensitivity": "Sensitivity",
    "before_after": "Before / after",
}

_NO_LAYER = "(no pruned layer)"


class Explorer:
    """An interactive pruning panel for ``model``: plan, run, inspect, re-prune one layer, export.

    ``calib``: a text file or corpus name, a 1-D tensor of token ids, or calibration windows
    (``nsamples x seqlen``). ``eval_text`` (same kinds) enables perplexity and generations.
    ``background``: run pruning in a thread so Cancel can be clicked while it runs (default:
    only inside a Jupyter kernel). Display the object (last line of a cell) to show the panel.
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
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        background: bool | None = None,
    ) -> None:
        self.state = ExplorerState(model, tokenizer, calib, eval_text=eval_text, device=device,
                                   nsamples=nsamples, seqlen=seqlen, prompts=prompts)
        self._options = {"calib": calib, "eval_text": eval_text, "device": device, "nsamples": nsamples,
                         "seqlen": seqlen, "prompts": prompts}
        self.root = getattr(self, "root", None) or widgets.VBox()  # kept across switch_model
        self.background = _in_kernel() if background is None else background
        self.last_error: BaseException | None = None
        self.plan_error: ValueError | None = None  # what is wrong with the controls' plan, if anything
        self._hold = False
        self.figures: dict[str, Any] = {}
        self.html: dict[str, widgets.HTML] = {}
        self._thread: threading.Thread | None = None
        self._syncing = False
        self._stale: set[str] = set(TABS)
        self._build()
        self._wire()
        self._set_running(False)
        self._plan_changed()

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", calib: str | os.PathLike = "wikitext2", *,
                        trust_remote_code: bool = False, **kwargs: Any) -> "Explorer":
        """Load a model by built-in name, Hugging Face id or folder (``apt_viz.models.load_model``) and open the panel."""
        from ..models import load_model

        model, tok = load_model(name_or_path, device=kwargs.get("device") or "cpu", trust_remote_code=trust_remote_code)
        return cls(model, tok, calib, **kwargs)

    def switch_model(self, name_or_path: str, *, trust_remote_code: bool = False) -> None:
        """Put the current model back to dense, load another one and rebuild the panel for it.

        Calibration and evaluation must be text (a path or corpus name): token ids belong to one tokenizer.
        """
        from ..models import load_model

        if any(isinstance(self._options[k], torch.Tensor) for k in ("calib", "eval_text")):
            raise ValueError("switching models needs calibration/evaluation text (a file path or corpus name), "
                             "not token ids, since the new model has its own tokenizer; build a new Explorer instead")
        if self.state.busy:
            raise RuntimeError("a run is in progress: Cancel it before switching models")
        model, tok = load_model(name_or_path, device=self._options["device"] or "cpu", trust_remote_code=trust_remote_code)
        self.state.restore()
        self.__init__(model, tok, background=self.background, **self._options)  # type: ignore[misc]

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        st = self.state
        W = widgets
        wide = W.Layout(width="auto")
        self.model_label = W.HTML(f"<b>Model</b>: {_esc(st.model_label)}")
        from ..models import BUILTIN_MODELS

        self.model_name = W.Combobox(options=list(BUILTIN_MODELS), placeholder="built-in name, hub id or folder",
                                     description="load", ensure_option=False)
        self.load_model_button = W.Button(description="Load model", tooltip="restores this model to dense, then loads the other")
        self.method = W.Dropdown(options=list(METHODS), value="apt", description="method")
        self.refit = W.Checkbox(value=st.plan.refit, description="APT: exact re-fit",
                                tooltip="re-fit every row exactly on its chosen mask (off: the paper's algorithm alone, about SparseGPT's speed)")
        self.pattern = W.ToggleButtons(options=["unstructured", "N:M"], value="unstructured", description="pattern")
        self.n = W.BoundedIntText(value=2, min=1, max=64, description="N", layout=W.Layout(width="130px"))
        self.m = W.BoundedIntText(value=4, min=2, max=128, description="M", layout=W.Layout(width="130px"))
        self.sparsity = W.FloatSlider(value=0.5, min=0.0, max=0.99, step=0.01, description="sparsity", readout_format=".0%")

        self.blocks = W.SelectMultiple(options=st.blocks, value=tuple(st.blocks), description="blocks", rows=min(8, len(st.blocks)))
        self.kinds = W.SelectMultiple(options=st.kinds, value=tuple(st.kinds), description="sublayers", rows=min(8, len(st.kinds)))
        self.select_all = W.Button(description="Select all")
        self.select_none = W.Button(description="Select none")
        self.layer_select = W.SelectMultiple(options=st.layer_names, value=tuple(st.layer_names), description="layers",
                                             rows=8, layout=W.Layout(width="460px"))
        self.override_layer = W.Dropdown(options=st.layer_names, description="layer", layout=W.Layout(width="460px"))
        self.override_sparsity = W.Text(value="", placeholder="0.7 or 2:4", description="sparsity")
        self.override_method = W.Dropdown(options=["(plan)", *METHODS], value="(plan)", description="method")
        self.override_apply = W.Button(description="Apply override", tooltip="re-prunes only this layer from its cached Hessian")
        self.override_clear = W.Button(description="Clear override")
        self.overrides_html = W.HTML()

        self.nsamples = W.BoundedIntText(value=st.nsamples, min=1, max=100_000, description="nsamples")
        self.seqlen = W.BoundedIntText(value=st.seqlen, min=2, max=1_000_000, description="seqlen")
        has_eval = st.eval_text is not None or bool(st.prompts)
        self.evaluate = W.Checkbox(value=st.eval_text is not None, description="evaluate before/after", disabled=not has_eval)

        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop")
        self.restore_button = W.Button(description="Restore dense", icon="undo")
        self.progress = W.IntProgress(value=0, min=0, max=len(st.blocks), description="blocks", bar_style="info")
        self.status = W.HTML("Ready.")

        self.export_path = W.Text(value="explorer.json", description="file")
        self.export_button = W.Button(description="Export JSON", icon="download")
        self.load_button = W.Button(description="Load JSON", icon="upload")

        # Result tabs: one box per view, filled when the tab is shown.
        self.view_layer = W.Dropdown(options=[_NO_LAYER], description="layer", layout=W.Layout(width="460px"))
        self.mask_max_size = W.BoundedIntText(value=256, min=8, max=2048, description="max pixels")
        self.error_metric = W.Dropdown(options=["rel_error", "error", "loss", "sparsity", "seconds"], value="rel_error", description="metric")
        self.error_log = W.Checkbox(value=True, description="log scale")
        self.error_overlay = W.Checkbox(value=False, description="overlay all runs")
        self.agree_a = W.Dropdown(options=[], description="run A")
        self.agree_b = W.Dropdown(options=[], description="run B")
        self.sweep_sparsities = W.Text(value="0.3, 0.5, 0.7, 0.9", description="sparsities")
        self.sweep_by = W.ToggleButtons(options=["layer", "block"], value="layer", description="per")
        self.sweep_button = W.Button(description="Sweep", tooltip="re-prunes each layer alone at each sparsity, from cached Hessians")
        self.eval_button = W.Button(description="Evaluate now")
        self.tab_controls: dict[str, list[widgets.Widget]] = {
            "errors": [W.HBox([self.error_metric, self.error_log, self.error_overlay])],
            "masks": [W.HBox([self.mask_max_size, W.HTML("<i>zoom in for exact pixels</i>")])], "nm": [], "histograms": [],
            "agreement": [W.HBox([self.agree_a, self.agree_b])],
            "sensitivity": [W.HBox([self.sweep_sparsities, self.sweep_by, self.sweep_button])],
            "before_after": [self.eval_button],
        }
        self.tab_boxes = {k: W.VBox(self.tab_controls[k] + [W.HTML("<i>Run to see results.</i>")]) for k in TABS}
        self.tabs = W.Tab(children=[self.tab_boxes[k] for k in TABS], titles=list(TABS.values()))

        section = lambda title: W.HTML(f"<h4 style='margin:6px 0 2px 0'>{title}</h4>")  # noqa: E731
        self.panel = W.VBox([
            W.HBox([self.model_label, self.model_name, self.load_model_button]),
            section("Plan"),
            W.HBox([self.method, self.refit, self.pattern]),
            W.HBox([self.sparsity, self.n, self.m]),
            section("Layers"),
            W.HBox([self.blocks, self.kinds, W.VBox([self.select_all, self.select_none]), self.layer_select]),
            W.HBox([self.override_layer, self.override_sparsity, self.override_method]),
            W.HBox([self.override_apply, self.override_clear]),
            self.overrides_html,
            section("Calibration"),
            W.HBox([self.nsamples, self.seqlen, self.evaluate]),
            W.HBox([self.run_button, self.cancel_button, self.restore_button, self.progress]),
            self.status,
            W.HBox([self.export_path, self.export_button, self.load_button]),
            section("Results"),
            self.view_layer,
            self.tabs,
        ], layout=wide)
        self.root.children = [self.panel]  # the displayed container, so a model switch redraws in place

    def _wire(self) -> None:
        for w in (self.method, self.refit, self.pattern, self.n, self.m, self.sparsity, self.layer_select):
            w.observe(lambda _: self._plan_changed(), names="value")
        self.blocks.observe(lambda _: self._blocks_kinds_changed(), names="value")
        self.kinds.observe(lambda _: self._blocks_kinds_changed(), names="value")
        self.select_all.on_click(self._guard(lambda: self._select(self.state.layer_names)))
        self.select_none.on_click(self._guard(lambda: self._select([])))
        self.override_apply.on_click(self._guard(self.apply_override))
        self.override_clear.on_click(self._guard(self.clear_override))
        self.run_button.on_click(self._on_run)
        self.cancel_button.on_click(lambda _: self.cancel())
        self.restore_button.on_click(self._guard(self.restore))
        self.export_button.on_click(self._guard(lambda: self.export_json(self.export_path.value)))
        self.load_button.on_click(self._guard(lambda: self.load_json(self.export_path.value)))
        self.tabs.observe(lambda _: self._render_current(), names="selected_index")
        self.view_layer.observe(lambda _: self._invalidate("masks", "nm", "histograms", "agreement"), names="value")
        self.mask_max_size.observe(lambda _: self._invalidate("masks"), names="value")
        self.sweep_by.observe(lambda _: self._invalidate("sensitivity"), names="value")
        for w in (self.error_metric, self.error_log, self.error_overlay):
            w.observe(lambda _: self._invalidate("errors"), names="value")
        for w in (self.agree_a, self.agree_b):
            w.observe(lambda _: self._invalidate("agreement"), names="value")
        self.sweep_button.on_click(self._guard(self.sweep))
        self.eval_button.on_click(self._guard(self.evaluate_now))
        self.load_model_button.on_click(self._guard(lambda: self.switch_model(self.model_name.value)))

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.root._repr_mimebundle_(**kwargs)

    def display(self) -> None:
        """Show the panel in the current notebook output."""
        from IPython.display import display

        display(self.root)

    # ------------------------------------------------------------------ plan <-> widgets
    def plan_from_widgets(self) -> PruningPlan:
        """The plan the controls describe (validated; overrides come from the current plan)."""
        spec: float | str = f"{self.n.value}:{self.m.value}" if self.pattern.value == "N:M" else self.sparsity.value
        return self.state.make_plan(self.method.value, spec, "unstructured", list(self.layer_select.value), refit=self.refit.value)

    def _plan_changed(self) -> None:
        nm = self.pattern.value == "N:M"
        self.n.disabled = self.m.disabled = not nm
        self.sparsity.disabled = nm
        if self._syncing:
            return
        try:
            self.state.plan = self.plan_from_widgets()
        except ValueError as e:  # PlanError included: keep the last valid plan, say what is wrong
            self.plan_error = e
            self.status.value = f"<span style='color:#b00020'>⚠ {_esc(str(e))}</span>"
            return
        if self.plan_error is not None:
            self.plan_error = None
            self._say("Ready.")
        self._show_overrides()

    def _blocks_kinds_changed(self) -> None:
        if not self._syncing:
            self.layer_select.value = tuple(self.state.layers_for(self.blocks.value, self.kinds.value))

    def _select(self, names: Sequence[str]) -> None:
        self._syncing = True
        try:
            self.blocks.value = tuple(sorted({block_index(n) for n in names}))
            self.kinds.value = tuple(k for k in self.state.kinds if any(sublayer_kind(n) == k for n in names))
        finally:
            self._syncing = False
        self.layer_select.value = tuple(names)

    def show_plan(self, plan: PruningPlan) -> None:
        """Set every control from ``plan`` (after loading a file)."""
        spec = Sparsity.parse(plan.sparsity, plan.pattern)
        self._syncing = True
        try:
            self.method.value = plan.method
            self.refit.value = plan.refit
            self.pattern.value = "N:M" if spec.structured else "unstructured"
            if spec.structured:
                self.m.value, self.n.value = spec.m, spec.n
            else:
                self.sparsity.value = spec.fraction
        finally:
            self._syncing = False
        self._select(self.state.selected_layers(plan))
        # Selecting rebuilt the plan from the controls (explicit names); the file's own plan wins.
        self.state.plan = plan
        self._show_overrides()

    def _show_overrides(self) -> None:
        ovs = self.state.plan.overrides
        if not ovs:
            self.overrides_html.value = "<i>No per-layer overrides.</i>"
            return
        rows = "".join(
            f"<tr><td><code>{_esc(k)}</code></td><td>{'' if o.sparsity is None else f'{o.sparsity:.0%}'}</td>"
            f"<td>{o.pattern or ''}</td><td>{o.method or ''}</td></tr>" for k, o in ovs.items()
        )
        self.overrides_html.value = f"<table><tr><th>override</th><th>sparsity</th><th>pattern</th><th>method</th></tr>{rows}</table>"

    # ------------------------------------------------------------------ actions
    def run(self) -> RunRecord:
        """Prune by the plan the controls describe, updating the progress bar block by block."""
        plan = self.plan_from_widgets()
        self._set_running(True)
        self.progress.value, self.progress.bar_style = 0, "info"
        self._say("Calibrating…")
        try:
            record = self.state.run(plan, nsamples=self.nsamples.value, seqlen=self.seqlen.value,
                                    callback=self._on_progress, evaluate=self.evaluate.value)
        except BaseException:
            self.progress.bar_style = "danger"
            raise
        finally:
            self._set_running(False)
        self.progress.bar_style = "warning" if record.cancelled else "success"
        n = len(record.results)
        what = "Cancelled" if record.cancelled else "Done"
        self._say(f"{what}: {record.label}, {n} layer{'s' * (n != 1)} pruned. Restore dense puts the weights back.")
        self._results_changed()
        return record

    def cancel(self) -> None:
        """Stop the run in progress after its current layer."""
        self.state.cancel()
        self._say("Cancelling after the current layer…")

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background run to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    def restore(self) -> None:
        """Put the dense weights back."""
        self.state.restore()
        self.progress.value = 0
        self.progress.bar_style = "info"
        self._say("Dense weights restored.")
        self._results_changed()

    def apply_override(self) -> None:
        """Apply the override controls to one layer; re-prunes only that layer when it is pruned now."""
        name = self.override_layer.value
        method = None if self.override_method.value == "(plan)" else self.override_method.value
        text = self.override_sparsity.value.strip() or None
        result = self.state.set_override(name, text, method)
        self._show_overrides()
        if result is None:
            self._say(f"Override for <code>{_esc(name)}</code> recorded; it applies at the next Run.")
        else:
            self._say(f"Re-pruned <code>{_esc(name)}</code> only: sparsity {result.sparsity:.1%}, rel. error {result.rel_error:.4g}.")
            self._results_changed(keep_layer=name)

    def clear_override(self) -> None:
        """Remove the override of the chosen layer (applies at the next run)."""
        self.state.clear_override(self.override_layer.value)
        self._show_overrides()
        self._say("Override removed; it applies at the next Run.")

    def export_json(self, path: str | os.PathLike | None = None) -> str:
        """Write the plan and results to ``path`` (and return the JSON text)."""
        text = self.state.export_json(path)
        if path:
            self._say(f"Exported plan and {len(self.state.shown.results) if self.state.shown else 0} results to <code>{_esc(str(path))}</code>.")
        return text

    def load_json(self, source: str | os.PathLike) -> RunRecord:
        """Load an exported file (path or JSON text): the model goes back to dense, controls show its plan."""
        record = self.state.load_json(source)
        self.show_plan(self.state.plan)
        self.progress.value = 0
        self._say(f"Loaded {record.label!r}: {len(record.results)} layer results; the model is dense, Run applies the plan.")
        self._results_changed()
        return record

    def sweep(self) -> list[dict[str, Any]]:
        """Sensitivity: re-prune each layer of the live run alone at each sparsity (cached Hessians)."""
        sparsities = [s.strip() for s in self.sweep_sparsities.value.split(",") if s.strip()]
        for s in sparsities:
            Sparsity.parse(s)  # a clear error before any layer is touched
        table = self.state.sweep(sparsities)
        self._say(f"Sweep done: {len(table)} re-prunes; each layer is back as it was.")
        self._invalidate("sensitivity")
        return table

    def evaluate_now(self) -> dict[str, Any]:
        """Measure perplexity and generations of the model as it is now."""
        row = self.state.evaluate()
        self._invalidate("before_after")
        return row

    # ------------------------------------------------------------------ helpers
    def _on_run(self, _button: Any = None) -> None:
        if self.state.busy:
            self._say("A run is already in progress.")
            return
        if self.background:
            self._thread = threading.Thread(target=self._guard(self.run), daemon=True, name="apt_viz-explorer-run")
            self._thread.start()
        else:
            self._guard(self.run)()

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.description = f"{done}/{total}"
        self._say(f"Pruned {message} ({done}/{total} blocks).")

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.cancel_button.disabled = not running
        for w in (self.restore_button, self.load_button, self.override_apply, self.sweep_button, self.eval_button):
            w.disabled = running

    def _guard(self, fn: Callable[[], Any]) -> Callable[..., None]:
        """A click handler that shows errors in the status line instead of losing them in the log."""

        def handler(*_: Any) -> None:
            try:
                self.last_error = None
                fn()
            except Exception as e:  # noqa: BLE001 - shown to the user, kept for tests
                self._say(f"⚠ {type(e).__name__}: {e}", error=e)

        return handler

    def _say(self, html: str, error: BaseException | None = None) -> None:
        if error is not None:
            self.last_error = error
            self.status.value = f"<span style='color:#b00020'>{_esc(str(html))}</span>"
        else:
            self.status.value = html

    def _results_changed(self, keep_layer: str | None = None) -> None:
        runs_with_masks = [r.label for r in self.state.runs if r.masks]
        shown = self.state.shown
        names = list(shown.results) if shown else []
        current = keep_layer or self.view_layer.value
        self._hold = True  # one redraw at the end, not one per changed dropdown
        try:
            self.view_layer.options = names or [_NO_LAYER]
            self.view_layer.value = current if current in names else (names[0] if names else _NO_LAYER)
            if list(self.agree_b.options) != runs_with_masks:  # a new run: compare the last two
                for dd, pick in ((self.agree_a, -2), (self.agree_b, -1)):
                    dd.options = runs_with_masks
                    if runs_with_masks:
                        dd.value = runs_with_masks[max(pick, -len(runs_with_masks))]
        finally:
            self._hold = False
        self._invalidate(*TABS)

    def _invalidate(self, *keys: str) -> None:
        self._stale.update(keys)
        self._render_current()

    def _render_current(self) -> None:
        if self._hold:
            return
        idx = self.tabs.selected_index
        key = list(TABS)[idx if idx is not None else 0]
        if key in self._stale:
            self.render(key)

    def render(self, key: str) -> None:
        """(Re)draw one result tab now; tabs are otherwise drawn when first shown."""
        self._stale.discard(key)
        try:
            content = getattr(self, f"_view_{key}")()
        except Exception as e:  # noqa: BLE001 - a broken view must not break the panel
            self.last_error = e
            content = [widgets.HTML(f"<pre style='color:#b00020'>{_esc(traceback.format_exc(limit=3))}</pre>")]
        self.tab_boxes[key].children = tuple(self.tab_controls[key]) + tuple(content)

    def _figure(self, key: str, fig: Any, on_zoom: Callable[[Any, Any, Any], None] | None = None) -> widgets.Widget:
        """Show ``fig`` in the tab's FigureWidget, reused across redraws: each new FigureWidget ships
        plotly.js (~5 MB) to the browser again."""
        import plotly.graph_objects as go

        fw = self.figures.get(key)
        if fw is None:
            fw = self.figures[key] = go.FigureWidget(fig)
        else:
            with fw.batch_update():
                fw.data = ()
            fw.add_traces(list(fig.data))
            fw.layout = fig.layout  # a new layout object: it drops the old change callbacks
        if on_zoom is not None:
            fw.layout.on_change(on_zoom, "xaxis.range", "yaxis.range")
        return fw

    def _html(self, key: str, html: str) -> widgets.HTML:
        self.html[key] = widgets.HTML(html)
        return self.html[key]

    def _layer_record(self) -> tuple[RunRecord | None, str | None]:
        shown = self.state.shown
        layer = self.view_layer.value
        if shown is None or layer == _NO_LAYER or layer not in shown.results:
            return shown, None
        return shown, layer

    def _mask(self) -> tuple[torch.Tensor | None, str, list[widgets.Widget]]:
        shown, layer = self._layer_record()
        if layer is None:
            return None, "", [widgets.HTML("<i>Run, then pick a pruned layer.</i>")]
        if layer not in shown.masks:
            return None, layer, [widgets.HTML("<i>Masks are not stored in exported files; Run to see them.</i>")]
        return shown.masks[layer], layer, []

    # ------------------------------------------------------------------ views (imported lazily: plotly is optional)
    def _view_errors(self) -> list[widgets.Widget]:
        from ..views import error_chart

        if self.error_overlay.value:
            data: Any = {r.label: r.results for r in self.state.runs if r.results}
        else:
            data = self.state.shown.results if self.state.shown else {}
        if not data:
            return [widgets.HTML("<i>Run to see each layer's reconstruction error.</i>")]
        return [self._figure("errors", error_chart(data, log=self.error_log.value, metric=self.error_metric.value))]

    def _view_masks(self) -> list[widgets.Widget]:
        from ..views import mask_heatmap

        mask, layer, note = self._mask()
        if note:
            return note

        def zoom(layout: Any, xrange: Any, yrange: Any) -> None:
            # A big mask is drawn as tile densities; zooming in redraws the visible region, exact once it fits.
            region = None
            if xrange is not None and yrange is not None:
                rows, cols = mask.shape
                c0, c1 = max(0, math.floor(min(xrange))), min(cols, math.ceil(max(xrange)) + 1)
                r0, r1 = max(0, math.floor(min(yrange))), min(rows, math.ceil(max(yrange)) + 1)
                if r0 < r1 and c0 < c1 and (r0, r1, c0, c1) != (0, rows, 0, cols):
                    region = (r0, r1, c0, c1)
            try:
                new = mask_heatmap(mask, max_size=self.mask_max_size.value, region=region)
            except ValueError as e:
                self._say(f"⚠ {e}", error=e)
                return
            fig = self.figures["masks"]
            with fig.batch_update():
                fig.data[0].update(z=new.data[0].z, x=new.data[0].x, y=new.data[0].y,
                                   hovertemplate=new.data[0].hovertemplate, colorbar=new.data[0].colorbar)
                fig.layout.title = new.layout.title
                fig.layout.meta = new.layout.meta

        return [self._figure("masks", mask_heatmap(mask, max_size=self.mask_max_size.value), on_zoom=zoom)]

    def _view_nm(self) -> list[widgets.Widget]:
        from ..views import nm_group_view

        mask, layer, note = self._mask()
        if note:
            return note
        spec = Sparsity.parse(self.state.shown.results[layer].pattern)
        m = spec.m if spec.structured else self.m.value
        return [self._figure("nm", nm_group_view(mask, m))]

    def _view_histograms(self) -> list[widgets.Widget]:
        from ..views import sparsity_histograms

        mask, layer, note = self._mask()
        return note or [self._figure("histograms", sparsity_histograms(mask))]

    def _view_agreement(self) -> list[widgets.Widget]:
        from ..views import mask_agreement

        layer = self.view_layer.value
        runs = {r.label: r for r in self.state.runs}
        a, b = runs.get(self.agree_a.value), runs.get(self.agree_b.value)
        if a is None or b is None or a is b:
            return [widgets.HTML("<i>Run twice (e.g. two methods), then pick two different runs.</i>")]
        if layer not in a.masks or layer not in b.masks:
            return [widgets.HTML(f"<i>Both runs must have pruned {_esc(layer)}.</i>")]
        return [self._figure("agreement", mask_agreement(a.masks[layer], b.masks[layer], labels=(a.label, b.label)))]

    def _view_sensitivity(self) -> list[widgets.Widget]:
        from ..views import sensitivity_curves, sensitivity_heatmap

        table = self.state.sweep_table
        if not table:
            return [widgets.HTML("<i>Click Sweep (after a Run) to see how each layer's error grows with sparsity.</i>")]
        by = self.sweep_by.value
        return [self._figure("sensitivity_curves", sensitivity_curves(table, by=by, log=True)),
                self._figure("sensitivity_heatmap", sensitivity_heatmap(table, by=by, log=True))]

    def _view_before_after(self) -> list[widgets.Widget]:
        from ..views import generation_table, ppl_bars

        evals = self.state.evaluations
        if not evals:
            return [widgets.HTML("<i>Tick “evaluate before/after” and Run, or click Evaluate now.</i>")]
        out: list[widgets.Widget] = []
        rows = [{"label": e["label"], "ppl": e["ppl"]} for e in evals if e["ppl"] is not None]
        if rows:
            out.append(self._figure("ppl", ppl_bars(rows)))
        dense = next((e for e in evals if e["label"] == "dense"), None)
        after = next((e for e in reversed(evals) if e["label"] != "dense"), None)
        if dense is not None and after is not None and dense["generations"]:
            gens = [{"prompt": p, "dense": b, "pruned": a}
                    for p, b, a in zip(self.state.prompts, dense["generations"], after["generations"])]
            out.append(self._html("generations", generation_table(gens, labels=("dense", after["label"]))))
        return out


def _esc(text: str) -> str:
    import html

    return html.escape(text, quote=False)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython

        ip = get_ipython()
        return ip is not None and hasattr(ip, "kernel")
    except ImportError:
        return False
