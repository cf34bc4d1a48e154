"""Comparing a model's output values with a reference's."""

from __future__ import annotations

from typing import Any

import numpy as np


def comparable(ref: Any, test: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of ``ref`` and ``test`` (the same shape) to measure an error on: where both
    are non-finite (an output NaN by design, as a masked graph network writes ``Where(mask, y,
    NaN)``) both read 0, so those positions agree; where ``test`` is NaN and ``ref`` is finite,
    ``test`` reads infinity, so the error is infinite rather than NaN (which every sum would
    carry into a NaN figure, or leave out)."""
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    fr, ft = np.isfinite(r), np.isfinite(t)
    if fr.all() and ft.all():
        return r, t
    both = ~fr & ~ft
    r = np.where(both, 0.0, r)
    t = np.where(both, 0.0, np.where(np.isnan(t) & fr, np.inf, t))
    return r, t
