"""A compact, human-readable table of evaluation results."""
import math
from typing import Dict, List, Mapping

from tabulate import tabulate

__all__ = ["format_results_table", "SUMMARY_METRICS"]

#: (task, metric, column title) shown by :func:`format_results_table`.
SUMMARY_METRICS = (
    ("sem_seg", "mIoU", "mIoU"),
    ("sem_seg", "pACC", "pixel acc"),
    ("anomaly", "AP", "anomaly AP"),
    ("anomaly", "FPR95", "FPR95"),
    ("anomaly", "AUROC", "AUROC"),
)


def format_results_table(results: Mapping[str, Mapping], labels: Mapping[str, str] = None) -> str:
    """One row per run, one column per summary metric (percent, 2 decimals).

    Args:
        results: ``{row: {dataset: {task: {metric: value}}}}`` — each row is
            the ``eval_results.json`` content of one model.
        labels: optional ``{row: display name}``.
    """
    headers = ["model"] + [title for _, _, title in SUMMARY_METRICS]
    rows: List[List[str]] = []
    for row_name, per_dataset in results.items():
        merged: Dict[str, Dict[str, float]] = {}
        for dataset_results in per_dataset.values():
            for task, metrics in dataset_results.items():
                merged.setdefault(task, {}).update(metrics)
        row = [(labels or {}).get(row_name, row_name)]
        for task, metric, _ in SUMMARY_METRICS:
            value = merged.get(task, {}).get(metric)
            row.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                       else f"{value:.2f}")
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")
