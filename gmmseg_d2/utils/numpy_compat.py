"""NumPy compatibility for third-party code that still calls functions NumPy removed."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

__all__ = ["numpy_in1d_alias"]


@contextlib.contextmanager
def numpy_in1d_alias() -> Iterator[None]:
    """Provide ``numpy.in1d`` while the block runs, when numpy no longer has it.

    cityscapesscripts (2.3.0, its latest release) calls ``np.in1d``, which
    numpy 2.4 removed; ``np.isin`` on the flattened input is the same
    function. The alias is removed again afterwards, so it never outlives the
    block that needs it.
    """
    if hasattr(np, "in1d"):
        yield
        return

    def in1d(ar1, ar2, assume_unique=False, invert=False):
        return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)

    np.in1d = in1d
    try:
        yield
    finally:
        del np.in1d
