"""Timing and peak-memory helpers shared by the micro-benchmarks (gmm_classifier.py, ms_deform_attn.py).

The benchmark scripts run as ``python benchmarks/<name>.py``, so this folder is
on ``sys.path`` and they import it as ``measure``.
"""
from __future__ import annotations

import ctypes
import re
import time
from typing import Callable, Dict, Mapping, Optional, Union

import torch

__all__ = ["available_bytes", "interleaved_min_times", "peak_bytes"]


def _rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024


def _release_free_heap() -> None:
    # Freed blocks that glibc keeps count in RSS, so a later call reusing them
    # would show no growth; hand them back first.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Extra memory at the peak of one call of ``fn`` (None where it cannot be read).

    CUDA: the allocator's peak over the allocation before the call. CPU: the
    growth of the RSS high-water mark, reset through /proc/self/clear_refs.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def interleaved_min_times(fns: Dict[str, Callable[[], None]], rounds: Union[int, Mapping[str, int]],
                          device: torch.device) -> Dict[str, float]:
    """Minimum seconds per call of each function, the functions alternating within each round.

    ``rounds``: one count for all, or a count per function name (a slow
    baseline can run fewer rounds).
    """
    per_function = {name: rounds for name in fns} if isinstance(rounds, int) else dict(rounds)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # warm-up: kernels, allocator, page tables
        fn()
    best = {name: float("inf") for name in fns}
    for r in range(max(per_function[name] for name in fns)):
        for name, fn in fns.items():
            if r < per_function[name]:
                best[name] = min(best[name], timed(fn))
    return best
