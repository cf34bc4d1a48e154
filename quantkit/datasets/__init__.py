"""Dataset adapters, the preprocessing spec and batching."""

from quantkit.datasets.batching import Batch, Batcher, ordered_indices
from quantkit.datasets.sampling import ORDERS, Grouping, Sample, draw_sample, sample_order, spread_order
from quantkit.datasets.preprocess import PRESETS, Preprocess, for_model, preset
from quantkit.datasets.sources import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    InputsSource,
    NumpySource,
    SampleError,
    Source,
    SyntheticSource,
    TorchDatasetSource,
    decode_image,
    scan_images,
    synthetic_for_model,
)

__all__ = [
    "IMAGE_EXTENSIONS", "PRESETS", "Batch", "Batcher", "ImageFolder", "NumpySource", "Preprocess",
    "SampleError", "Source", "SyntheticSource", "TorchDatasetSource", "decode_image", "for_model",
    "ordered_indices", "preset", "scan_images", "ORDERS", "Grouping", "Sample", "draw_sample", "sample_order",
    "spread_order", "InputsSource", "synthetic_for_model",
]
