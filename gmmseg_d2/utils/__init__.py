from .io import UnreadableImageError, read_image_8bit, read_label_map
from .results_table import format_results_table

__all__ = ["UnreadableImageError", "format_results_table", "read_image_8bit", "read_label_map"]
