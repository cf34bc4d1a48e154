"""Calibrator core: streaming collectors, range methods, per-channel weights, cache I/O.

Numpy only; the TensorRT calibrator adapters live with the TensorRT backend.
"""

from quantkit.calibrators.cache import CalibrationCache, read_cache, write_cache
from quantkit.calibrators.collectors import Histogram, HistogramCollector
from quantkit.calibrators.methods import (
    AutoChoice,
    RangeContext,
    RangeMethod,
    TensorRanges,
    all_ranges,
    check_method,
    get_method,
    method_names,
    quantization_mse,
    range_method,
)
from quantkit.calibrators.weights import per_channel_amax, scale_from_amax

__all__ = [
    "AutoChoice", "CalibrationCache", "Histogram", "HistogramCollector", "RangeContext", "RangeMethod",
    "TensorRanges", "all_ranges", "check_method", "get_method", "method_names", "per_channel_amax",
    "quantization_mse", "range_method", "read_cache", "scale_from_amax", "write_cache",
]
