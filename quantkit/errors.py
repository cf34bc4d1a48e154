"""The exception hierarchy. Every error quantkit raises on purpose derives from QuantkitError.

``InputError`` subclasses mean "the user's input is wrong" (the CLI exits 2); anything else that
derives from QuantkitError means the run failed for another reason (exit 1).
"""

from __future__ import annotations


class QuantkitError(Exception):
    """Root of quantkit's errors. ``hint`` says what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InputError(QuantkitError, ValueError):
    """Bad user input: a file, a folder, a flag value."""


class ModelError(InputError):
    """The model file is missing, not ONNX, or not something quantkit can quantize."""


class DatasetError(InputError):
    """The data source is empty, missing or unreadable."""


class ShapeMismatchError(InputError):
    """A batch does not fit the model's input."""


class OutputExistsError(InputError):
    """An output exists and overwriting was not asked for."""


class UnknownMethodError(InputError):
    """A calibration method name that is not registered."""


class CacheError(InputError):
    """A TensorRT calibration cache that is malformed or made for something else."""


class NonFiniteError(InputError):
    """NaN or Inf values where finite values are needed (activations, weights): the data, its
    preprocessing or the model makes them."""


class NotCalibratedError(QuantkitError, RuntimeError):
    """Fitted state was read before it was computed."""


class MissingDependencyError(QuantkitError, ImportError):
    """An optional dependency is missing or too old."""
