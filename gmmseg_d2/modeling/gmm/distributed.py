"""All-gathering a variable number of rows from every rank.

The GMM memory must be identical on every rank without a broadcast, so every
rank gathers every rank's new features, concatenates them in rank order and
applies the same deterministic update. Ranks contribute different numbers of
samples, while ``all_gather`` needs equal shapes: rows are padded to the
largest count and the padding is dropped after the gather.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "world_size"]


def world_size() -> int:
    """Number of processes of the default group (1 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Concatenate every rank's rows, in rank order.

    Args:
        rows: ``(n_r, F)`` tensor on this rank (``n_r`` may differ per rank and
            may be 0). Must be on a device the default group's backend handles
            (CPU for gloo, CUDA for NCCL).

    Returns:
        ``(gathered, offset)``: the ``(sum_r n_r, F)`` concatenation and the
        index of this rank's first row in it. In a single process this is
        ``(rows, 0)`` with no copy.
    """
    size = world_size()
    if size == 1:
        return rows, 0
    rank = dist.get_rank()
    local_count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(local_count) for _ in range(size)]
    dist.all_gather(counts, local_count)
    counts_list = [int(c.item()) for c in counts]
    largest = max(counts_list)
    padded = rows.new_zeros((largest,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    buffers = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(buffers, padded.contiguous())
    gathered = torch.cat([b[:n] for b, n in zip(buffers, counts_list)], dim=0)
    return gathered, sum(counts_list[:rank])
