"""Pure views: they take results (or masks, tables, texts) and return plotly figures or HTML; they run no model."""

from .compare import diff_tokens, generation_diff, generation_table, ppl_bars
from .errors import as_records, error_chart
from .masks import as_mask, mask_agreement, mask_heatmap, nm_group_counts, nm_group_view, sparsity_histograms, tile_means
from .sensitivity import sensitivity_curves, sensitivity_heatmap
from .teaching import teaching_figure

__all__ = [
    "as_mask", "as_records", "diff_tokens", "error_chart", "generation_diff", "generation_table", "mask_agreement",
    "mask_heatmap", "nm_group_counts", "nm_group_view", "ppl_bars", "sensitivity_curves", "sensitivity_heatmap",
    "sparsity_histograms", "teaching_figure", "tile_means",
]
