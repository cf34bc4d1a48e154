"""Per-channel weight ranges (symmetric INT8, one scale per output channel)."""

from __future__ import annotations

import numpy as np

from quantkit.errors import NonFiniteError


def per_channel_amax(weight: np.ndarray, axis: int, *, name: str = "<weight>") -> np.ndarray:
    """Absolute max of ``weight`` over every axis but ``axis``; float32, shape (weight.shape[axis],)."""
    w = np.asarray(weight)
    if not np.all(np.isfinite(w)):
        raise NonFiniteError(f"weight {name!r} has NaN or Inf values", hint="check the model file")
    axis = axis % w.ndim
    other = tuple(a for a in range(w.ndim) if a != axis)
    return np.abs(w).max(axis=other).astype(np.float32) if other else np.abs(w).astype(np.float32)


#: the least INT8 scale quantkit writes: float32's least normal number (below it a scale is 0 or
#: subnormal, which ONNX forbids or GPUs flush to 0); an amax whose amax / 127 is below it gets
#: the placeholder scale 1, as a tensor that is 0 everywhere does
MIN_SCALE = np.float32(np.finfo(np.float32).tiny)


def scale_from_amax(amax: np.ndarray | np.floating | float) -> np.ndarray:
    """INT8 scale = amax / 127 (float32); an all-zero channel gets scale 1 (its values stay 0), and
    so does one whose amax / 127 is below float32's normal numbers (values about 1e-40: a scale of 0
    or a subnormal one, which ONNX forbids or GPUs flush to 0; such values are 0 to a GPU too)."""
    a = np.asarray(amax, dtype=np.float32)
    with np.errstate(under="ignore"):
        scale = a / np.float32(127.0)
    return np.where(scale >= MIN_SCALE, scale, np.float32(1.0)).astype(np.float32)
