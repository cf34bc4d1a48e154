"""Calibrator core: streaming collectors, range methods, per-channel weights, cache I/O.

Numpy only; the TensorRT calibrator adapters live with the TensorRT backend.
"""

from quantkit.calibrators.cache import CalibrationCache, read_cache, write_cache
from quantkit.calibrators.collectors import Histogram, HistogramCollector
from quantkit.calibrators.methods import (
    ALL_METHODS,
    BASE_METHODS,
    AutoChoice,
    TensorRanges,
    all_ranges,
    available_methods,
    get_range_method,
    quantization_mse,
    range_method,
)
from quantkit.calibrators.weights import per_channel_amax, scale_from_amax

__all__ = [
    "ALL_METHODS", "BASE_METHODS", "AutoChoice", "CalibrationCache", "Histogram", "HistogramCollector",
    "TensorRanges", "all_ranges", "available_methods", "get_range_method", "per_channel_amax",
    "quantization_mse", "range_method", "read_cache", "scale_from_amax", "write_cache",
]
