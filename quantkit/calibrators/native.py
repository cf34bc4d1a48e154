"""The native statistics kernel (``_native.c``), loaded with ctypes, or None.

Calibration takes an abs-max and an |x| histogram of every activation of every sample. In
NumPy that is five passes over each tensor (min, max, abs, scale, bincount on a 64-bit index
copy) and, on a depthwise-heavy OCR model, more time than ONNX Runtime's own inference of it;
the C loops take two passes and count every value (benchmarks/results/calibration.md). The
library has no Python ABI (ctypes calls release the GIL, so the histogram threads run side by
side); ``pip install`` builds it where a C compiler is found (setup.py, an optional extension).
Without it, or with ``QUANTKIT_NATIVE=0``, the NumPy code runs: the same counts for the same
values (tests/unit/test_native.py).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

_P = ctypes.c_void_p  # arrays go as their addresses (data_as makes reference cycles per call)
_I64 = ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    if os.environ.get("QUANTKIT_NATIVE", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("_native*.so")) + sorted(here.glob("_native*.pyd")):
        try:
            lib = ctypes.CDLL(str(path))
            lib.qk_minmax.argtypes = [_P, _I64, _I64, _I64, _P, _P]
            lib.qk_minmax.restype = _I64
            lib.qk_histogram.argtypes = [_P, _I64, _I64, _I64, _P, ctypes.c_double, ctypes.c_float, _I64, _P, _P]
            lib.qk_histogram.restype = ctypes.c_int
            lib.qk_histogram_sampled.argtypes = [_P, _I64, _I64, _I64, _P, ctypes.c_double, ctypes.c_float, _I64,
                                                 _I64, _I64, ctypes.c_float, _P, _P, _P]
            lib.qk_histogram_sampled.restype = ctypes.c_int
            lib.qk_channel_absmax.argtypes = [_P, _I64, _I64, _I64, _P]
            lib.qk_channel_absmax.restype = None
            return lib
        except (OSError, AttributeError):  # built for another platform, or an old build
            continue
    return None


_LIB = _load()


def available() -> bool:
    """Whether the native kernel is loaded (built at install time, not turned off)."""
    return _LIB is not None


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else int(a.ctypes.data)


def _view(x: np.ndarray, axis: int | None, scale: np.ndarray | None = None) -> tuple[int, int, int]:
    """[outer, channels, inner] of C-ordered ``x`` around ``axis`` (None: one channel); a
    ``scale`` must have one factor per channel (the kernel reads that many)."""
    if axis is None or x.ndim == 0:
        if scale is not None:
            raise ValueError("a per-channel scale needs a tensor with a channel axis")
        return 1, 1, int(x.size)
    axis %= x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    if scale is not None and scale.size != x.shape[axis]:
        raise ValueError(f"{scale.size} scale factors for {x.shape[axis]} channels (axis {axis} of {x.shape})")
    return outer, int(x.shape[axis]), inner


#: the kernels' return codes
_STATUS = {1: "added", 0: "past", 2: "nan"}


def _operands(x: np.ndarray, scale: np.ndarray | None, axis: int | None
              ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int]]:
    """``x`` and ``scale`` as the kernels read them (C-contiguous float32), and ``x``'s
    [outer, channels, inner] around ``axis`` (one channel when there is no scale)."""
    x = _f32(x)
    s = None if scale is None else _f32(scale)
    return x, s, _view(x, axis if s is not None else None, s)


def minmax(x: np.ndarray, scale: np.ndarray | None = None, axis: int | None = None) -> tuple[float, float, bool]:
    """(min, max, whether a value is NaN) of float32 ``x`` (times ``scale`` along ``axis`` when given)."""
    assert _LIB is not None
    x, s, view = _operands(x, scale, axis)
    out = np.empty(2, dtype=np.float32)
    nans = _LIB.qk_minmax(_ptr(x), *view, _ptr(s), _ptr(out))
    return float(out[0]), float(out[1]), bool(nans)


def _per_unit(bins: int, range_: float) -> ctypes.c_float:
    """Bins per unit of value, the float32 NumPy's code scales by (at most float32's largest: a
    range of 1e-42 overflowed it)."""
    return ctypes.c_float(float(np.float32(min(bins / range_, float(np.finfo(np.float32).max)))))


def histogram_into(counts: np.ndarray, x: np.ndarray, range_: float, scale: np.ndarray | None = None,
                   axis: int | None = None) -> tuple[str, float, float]:
    """One pass over float32 ``x`` (times ``scale`` along ``axis`` when given): its min and max,
    and, when every |value| is within ``range_`` (> 0), ``counts`` (int64, C-contiguous,
    ``len(counts)`` bins over [0, range_), the top bin closed) += their counts. Returns
    ``(status, min, max)``: status "added", "past" (a value is past the range: nothing added) or
    "nan" (a value is NaN: nothing added)."""
    assert _LIB is not None
    if counts.dtype != np.int64 or not counts.flags.c_contiguous:
        raise ValueError("counts must be a C-contiguous int64 array")
    x, s, view = _operands(x, scale, axis)
    out = np.empty(2, dtype=np.float32)
    rc = _LIB.qk_histogram(_ptr(x), *view, _ptr(s), ctypes.c_double(range_), _per_unit(counts.size, range_),
                           counts.size, _ptr(counts), _ptr(out))
    if rc < 0:
        raise MemoryError("the native histogram could not allocate its scratch counts")
    return _STATUS[rc], float(out[0]), float(out[1])


def histogram_sampled(x: np.ndarray, range_: float, bins: int, stride: int, offset: int, bar: float,
                      scale: np.ndarray | None = None, axis: int | None = None
                      ) -> tuple[str, float, float, np.ndarray, np.ndarray]:
    """``HistogramCollector``'s sampled binning in one pass over float32 ``x`` (times ``scale``
    along ``axis``): the counts of the values at flat positions ``offset``, ``offset + stride``,
    ... (the sample) and of every value with float32 ``|v| >= bar`` (the tail), ``bins`` bins over
    [0, range_). Returns ``(status, min, max, sample, tail)``, status as ``histogram_into``'s
    (the counts mean nothing unless it is "added")."""
    assert _LIB is not None
    x, s, view = _operands(x, scale, axis)
    out = np.empty(2, dtype=np.float32)
    sample = np.zeros(bins, dtype=np.int64)
    tail = np.zeros(bins, dtype=np.int64)
    rc = _LIB.qk_histogram_sampled(_ptr(x), *view, _ptr(s), ctypes.c_double(range_), _per_unit(bins, range_),
                                   bins, stride, offset, ctypes.c_float(bar), _ptr(sample), _ptr(tail), _ptr(out))
    return _STATUS[rc], float(out[0]), float(out[1]), sample, tail


def channel_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """max|x| per channel along ``axis`` (float32 [C])."""
    assert _LIB is not None
    x = _f32(x)
    outer, channels, inner = _view(x, axis)
    out = np.empty(channels, dtype=np.float32)
    _LIB.qk_channel_absmax(_ptr(x), outer, channels, inner, _ptr(out))
    return out
