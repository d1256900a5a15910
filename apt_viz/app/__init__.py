"""The interactive explorer: an ipywidgets panel (:class:`Explorer`) over a widget-free controller (:class:`ExplorerState`)."""

from .explorer import TABS, Explorer
from .state import EXPORT_FORMAT, ExplorerState, RunRecord, results_from_dicts

__all__ = ["EXPORT_FORMAT", "Explorer", "ExplorerState", "RunRecord", "TABS", "results_from_dicts"]
