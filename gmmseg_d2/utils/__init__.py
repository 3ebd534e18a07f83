from .io import read_label_map
from .results_table import format_results_table

__all__ = ["format_results_table", "read_label_map"]
