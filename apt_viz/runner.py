"""Prune a Hugging Face causal LM block by block, the way SparseGPT does. Knows no widget.

For each decoder block: accumulate the Hessian of every chosen linear from the block's inputs
with forward hooks, prune, then re-run the pruned block so the next block sees pruned inputs.
Only the current block and the calibration activations need to live on ``device``.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import (
    NumericalError, check_calibration, check_device, check_finite_weights, check_layer_fits, check_model, check_plan,
    layer_result_from_dict,
)
from . import cpu_matmul
from .arch import (
    ArchitectureError, block_index, find_blocks, find_linears, get_weight, input_source, set_weight, shared_parent, sublayer_kind,
)
from .capture import Stop, capture_block_inputs, first_output
from .config import LayerOverride, PlanError, PruningPlan, Sparsity, nearest
from .hessian import accumulate_hessian, layer_error, mirror_upper_
from .hessian_cache import HessianCache
from .solvers import sparsify_weight


@dataclass
class LayerResult:
    """What pruning one linear did."""

    name: str
    block: int
    kind: str
    shape: tuple[int, int]
    method: str
    pattern: str
    target: float
    sparsity: float
    rel_error: float
    error: float
    loss: float
    damp: float
    seconds: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerResult":
        """Inverse of :meth:`to_dict` for saved JSON; unknown, missing or mistyped keys raise ``ReportError``."""
        return layer_result_from_dict(data)


ProgressCallback = Callable[[int, int, str], None]


class Pruner:
    """Layer-by-layer pruning of ``model`` with a reversible record of what changed.

    ``device``: where each block is processed (default: the model's device). ``keep_masks``
    stores each layer's mask (True = kept) on the CPU for the views.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device | None = None,
        keep_masks: bool = True,
        hessians: HessianCache | None = None,
    ) -> None:
        check_model(model)
        self._setup(model, device, keep_masks, hessians)

    @classmethod
    def unchecked(cls, model: nn.Module, *, device: str | torch.device, keep_masks: bool = False) -> "Pruner":
        """A pruner for a model whose blocks live on ``meta`` until loaded (see :mod:`apt_viz.streaming`)."""
        self = cls.__new__(cls)
        self._setup(model, device, keep_masks, None)
        self.keep_dense = False  # the dense weights stay in the checkpoint on disk
        return self

    def _setup(self, model: nn.Module, device: str | torch.device | None, keep_masks: bool, hessians: HessianCache | None) -> None:
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.device = check_device(device) if device is not None else next(model.parameters()).device
        self.keep_masks = keep_masks
        self.keep_dense = True
        self.hessians = hessians or HessianCache()
        self.layers: dict[str, nn.Module] = {}
        for i, block in enumerate(self.blocks):
            self.layers.update(find_linears(block, f"{self.prefix}.{i}"))
        self.results: dict[str, LayerResult] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._dense: dict[str, torch.Tensor] = {}
        self.plan: PruningPlan | None = None

    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def run(
        self,
        calib: torch.Tensor,
        plan: PruningPlan | None = None,
        *,
        progress: bool = True,
        callback: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, LayerResult]:
        """Calibrate on token windows ``calib`` (n x seqlen) and prune by ``plan``.

        ``callback(done_blocks, total_blocks, message)`` is called as blocks finish;
        ``should_stop()`` is polled between layers and ends the run early (what was pruned stays
        pruned and restorable). The dense weights are saved before any change, so
        :meth:`restore` works after an exception or KeyboardInterrupt too.
        """
        # A copy: reprune() records overrides in self.plan, which must not reach the caller's object.
        plan = copy.deepcopy(plan or self.plan or PruningPlan()).validate()
        # Everything that can be checked before a weight changes is checked here.
        selected = check_plan(plan, self.layers)
        calib = check_calibration(calib, self.model)
        check_finite_weights(self.layers, selected)
        self.plan = plan
        chosen: dict[int, list[str]] = {b: [] for b in range(len(self.blocks))}
        for n in selected:
            chosen[block_index(n)].append(n)
        last = max((b for b, ns in chosen.items() if ns), default=-1)

        was_training = self.model.training
        before = set(self._dense)
        self.model.eval()
        try:
            with torch.no_grad(), cpu_matmul.fast_linears(self.model):
                inps, extra = self._capture(calib)
                bar = tqdm(total=last + 1, desc="pruning blocks", unit="block", disable=not progress)
                for b in range(last + 1):
                    block = self.blocks[b]
                    home = _module_device(block)
                    block.to(self.device)
                    try:
                        if chosen[b]:
                            self._prune_block(b, block, chosen[b], inps, extra[b], plan, should_stop)
                        if b < last and not (should_stop and should_stop()):
                            inps = [first_output(block(x, *extra[b][0], **extra[b][1])) for x in inps]
                    finally:
                        block.to(home)
                    bar.update(1)
                    if callback:
                        callback(b + 1, last + 1, f"block {b}")
                    if should_stop and should_stop():
                        break
                bar.close()
        except NumericalError:
            # A model with NaN in it is of no use half pruned: put back what this run changed.
            self.restore([n for n in self._dense if n not in before])
            raise
        finally:
            self.model.train(was_training)
        return self.results

    def reprune(self, name: str, sparsity: float | str | None = None, pattern: str | None = None, method: str | None = None) -> LayerResult:
        """Re-prune one layer from its cached Hessian (no calibration pass), e.g. at a new sparsity.

        The override is recorded in the plan. The cached Hessian was taken when the layer was first
        pruned, so later layers are not re-calibrated against this change.
        """
        if name not in self.layers:
            raise PlanError(f"no prunable layer {name!r}; nearest names: {nearest(name, self.layer_names)}")
        plan = self.plan or PruningPlan()
        method0, spec0 = plan.layer_settings(name)
        base: Sparsity | float | str = spec0 if sparsity is None else sparsity
        if pattern == "unstructured" and isinstance(base, Sparsity):
            base = base.fraction
        spec = Sparsity.parse(base, pattern)
        check_layer_fits(name, self.layers[name], spec)
        plan.overrides[name] = LayerOverride(sparsity=spec.fraction, pattern=spec.pattern, method=method or method0)
        self.plan = plan.validate()
        H = self.hessians.get(name, self.device)
        self.restore([name])
        return self._prune_layer(name, self.layers[name], H, self.plan)

    def restore(self, names: Iterable[str] | None = None) -> None:
        """Put back the dense weights, bit for bit (all layers, or only ``names``)."""
        for name in list(self._dense) if names is None else list(names):
            if name in self._dense:
                self.layers[name].weight.data.copy_(self._dense.pop(name))
            self.results.pop(name, None)
            self.masks.pop(name, None)

    @property
    def pruned(self) -> bool:
        return bool(self._dense)

    # ------------------------------------------------------------------ internals
    def _capture(self, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
        """Inputs of block 0 for every sample, and each block's other forward arguments (no block runs)."""
        return capture_block_inputs(self.model, self.prefix, self.blocks, calib, self.device)

    def _prune_block(
        self, b: int, block: nn.Module, names: list[str], inps: list[torch.Tensor], extra: tuple[tuple, dict],
        plan: PruningPlan, should_stop: Callable[[], bool] | None,
    ) -> None:
        modules = {n: self.layers[n] for n in names}
        groups, once = self._groups(block, modules, inps[0], extra) if plan.sequential else ([names], set())
        start = None
        for k, group in enumerate(groups):
            # Sequential groups k and k+1 inside one submodule of the block that the block calls once
            # (Llama's mlp for gate/up and down): its inputs depend on neither group, so group k's
            # forwards record them, and group k+1 runs that submodule alone instead of the block up
            # to it. The same inputs, so the same Hessians.
            parent = self.model.get_submodule(shared_parent(group + groups[k + 1])) if k + 1 < len(groups) else None
            record = parent if parent in once else None
            start = self._accumulate(block, {n: modules[n] for n in group}, inps, extra, start=start, record=record)
            for name in group:
                if should_stop and should_stop():
                    return
                H = self.hessians.get(name, self.device)
                if not torch.isfinite(H).all():
                    raise NumericalError(f"block {b}, layer {name}: NaN or Inf in the calibration inputs; dense weights left untouched")
                self._prune_layer(name, modules[name], H, plan)

    def _prune_layer(self, name: str, module: nn.Module, H: torch.Tensor, plan: PruningPlan) -> LayerResult:
        method, spec = plan.layer_settings(name)
        W = get_weight(module)
        if not torch.isfinite(W).all():
            raise NumericalError(f"block {block_index(name)}, layer {name}: NaN or Inf in the weights; dense weights left untouched")
        t0 = time.perf_counter()
        # No copy when the weight is float32 on the device already: solvers never write to their input.
        Wd = W.to(self.device, torch.float32)
        try:
            res = sparsify_weight(Wd, H, spec, method, blocksize=plan.blocksize, percdamp=plan.percdamp, final_refit=plan.refit,
                                  refit_dtype=plan.refit_dtype)
        except torch.linalg.LinAlgError as e:
            raise NumericalError(f"block {block_index(name)}, layer {name}: {e}; dense weights left untouched") from e
        new = res.weight.to(W.dtype)
        if not torch.isfinite(new).all():
            raise NumericalError(f"block {block_index(name)}, layer {name}: the {method} solver produced NaN/Inf; dense weights left untouched")
        seconds = time.perf_counter() - t0
        if self.keep_dense and name not in self._dense:
            self._dense[name] = module.weight.data.detach().to("cpu", copy=True)
        err, rel = layer_error(Wd, res.weight, H)  # before set_weight, which may write into Wd's storage
        set_weight(module, new.to(W.device))
        result = LayerResult(
            name=name, block=block_index(name), kind=sublayer_kind(name), shape=tuple(W.shape), method=method,
            pattern=spec.pattern, target=spec.fraction, sparsity=float((new == 0).float().mean()),
            rel_error=rel, error=err, loss=res.loss, damp=res.damp, seconds=seconds,
            tokens=self.hessians.tokens.get(name, 0),
        )
        self.results[name] = result
        if self.keep_masks:
            self.masks[name] = (new != 0).to("cpu")
        return result

    def _accumulate(
        self, block: nn.Module, modules: dict[str, nn.Module], inps: list[torch.Tensor], extra: tuple[tuple, dict], *,
        start: list[Callable[[], Any]] | None = None, record: nn.Module | None = None,
    ) -> list[Callable[[], Any]] | None:
        """Run the block over all samples and store each module's Hessian (shared inputs are aliased).

        Each forward stops once every module has had its input, before the last one's product.
        ``start``: calls to run instead of the block, one per sample (a submodule on its recorded
        inputs). With ``record``, returns that module's call on each sample's inputs to it (None if
        a forward did not call it exactly once)."""
        forwards = start or [functools.partial(block, x, *extra[0], **extra[1]) for x in inps]
        H: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}
        alias: dict[str, str] = {}
        seen: dict[tuple, tuple[torch.Tensor, str]] = {}
        remaining: set[str] = set()

        def on_input(name: str, x: torch.Tensor) -> None:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:  # the tensor is held in `seen`, so its address cannot be reused
                alias[name] = seen[key][1]
            else:
                seen[key] = (x, name)
                H[name], count[name] = accumulate_hessian(H.get(name), count.get(name, 0), x.detach(), upper=True)
            remaining.discard(name)
            if not remaining:
                raise Stop

        calls: list[tuple[tuple, dict]] = []

        def on_call(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))

        handles = self._input_hooks(modules, on_input)
        if record is not None:
            handles.append(record.register_forward_pre_hook(on_call, with_kwargs=True))
        try:
            for run in forwards:
                seen.clear()
                remaining.update(modules)
                try:
                    run()
                except Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        for name in modules:
            if name in H:
                self.hessians.put(name, mirror_upper_(H[name]), count[name])
            elif name in alias:
                self.hessians.alias(name, alias[name])
            else:
                raise ArchitectureError(
                    f"layer {name} was never called during its block's forward, so its input cannot be captured; "
                    "exclude it from the plan (PruningPlan(exclude=[...]))"
                )
        if record is None or len(calls) != len(forwards):
            return None
        return [functools.partial(record, *args, **kwargs) for args, kwargs in calls]

    def _input_hooks(self, modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> list[Any]:
        """Call ``on_input(name, x)`` with each module's input during a forward; returns the handles."""
        handles = []
        for name in modules:
            source, read, before = input_source(self.model, name)

            def f(mod: nn.Module, inp: tuple, out: Any = None, name: str = name, read: Callable = read) -> None:
                on_input(name, read(mod, inp, out))

            handles.append(source.register_forward_pre_hook(f) if before else source.register_forward_hook(f))
        return handles

    def _groups(
        self, block: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, extra: tuple[tuple, dict]
    ) -> tuple[list[list[str]], set[nn.Module]]:
        """Linears grouped by shared input, in call order (q/k/v, o, gate/up, down for Llama), and the
        block's submodules that its forward calls exactly once."""
        order: list[tuple[str, tuple]] = []
        held: list[torch.Tensor] = []
        calls: dict[nn.Module, int] = {}

        def on_input(name: str, t: torch.Tensor) -> None:
            held.append(t)
            order.append((name, (t.data_ptr(), tuple(t.shape), tuple(t.stride()))))

        def count(mod: nn.Module, args: tuple) -> None:
            calls[mod] = calls.get(mod, 0) + 1

        handles = self._input_hooks(modules, on_input)
        handles += [m.register_forward_pre_hook(count) for m in block.modules() if m is not block]
        try:
            block(x, *extra[0], **extra[1])
        finally:
            for h in handles:
                h.remove()
        groups: dict[tuple, list[str]] = {}
        placed: set[str] = set()
        for name, key in order:
            if name not in placed:
                placed.add(name)
                groups.setdefault(key, []).append(name)
        missing = [n for n in modules if n not in placed]
        return list(groups.values()) + ([missing] if missing else []), {m for m, n in calls.items() if n == 1}


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


