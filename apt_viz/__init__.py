"""apt_viz: interactive one-shot post-training pruning of LLMs (APT, SparseGPT, Wanda, magnitude)."""

from .arch import ArchitectureError, find_blocks, prunable_layers
from .checks import DataError, DeviceError, ModelError, ReportError, check_calibration, check_device, check_model, check_plan
from .config import METHODS, LayerOverride, PlanError, PruningPlan, Sparsity
from .hessian import accumulate_hessian, layer_error
from .hessian_cache import HessianCache
from .runner import LayerResult, NumericalError, Pruner
from .save import load_masks, save_pruned
from .sensitivity import block_sweep, layer_sweep, plan_from_sensitivity, weighted_sparsity
from .solvers import SolverResult, refit, sparsify_weight

__version__ = "0.1.0"


def __getattr__(name: str):
    # The explorer needs the notebook extra (ipywidgets, plotly): import it only when asked for.
    if name == "views":
        # Plotly comes with the notebook extra, so the views load on first use.
        import importlib

        return importlib.import_module(".views", __name__)
    if name == "prune_streaming":
        from .streaming import prune_streaming

        return prune_streaming
    if name == "compare":
        from .compare import compare

        return compare
    if name in ("Explorer", "ExplorerState"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'apt_viz' has no attribute {name!r}")


__all__ = [
    "ArchitectureError", "DataError", "DeviceError", "Explorer", "ExplorerState", "HessianCache", "LayerOverride", "LayerResult", "METHODS", "ModelError", "NumericalError", "PlanError",
    "Pruner", "PruningPlan", "ReportError", "SolverResult", "Sparsity", "accumulate_hessian", "check_calibration", "check_device", "check_model", "check_plan", "compare", "find_blocks", "block_sweep", "layer_sweep", "plan_from_sensitivity", "weighted_sparsity", "views", "load_masks", "save_pruned", "prune_streaming", "layer_error",
    "prunable_layers", "refit", "sparsify_weight",
]
