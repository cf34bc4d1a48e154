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


def check_fields(obj: object, **fields: tuple[type, ...]) -> None:
    """Raise InputError naming the first of ``fields`` (attribute -> accepted types; ``type(None)``
    among them allows None) whose value has another type. A bool is not taken for an int, nor a
    str for a tuple of names (it would be split into letters)."""
    import numbers

    for name, kinds in fields.items():
        value = getattr(obj, name)
        accepted = (*kinds, numbers.Integral) if int in kinds else kinds  # NumPy's integers too
        ok = isinstance(value, accepted) and not (isinstance(value, (bool,)) and bool not in kinds)
        if not ok:
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise InputError(f"{type(obj).__name__}.{name} must be {names}, got {value!r} ({type(value).__name__})")


def check_names(obj: object, *fields: str) -> None:
    """Raise InputError when one of ``fields`` is not a tuple/list of strings (a bare string
    would be read letter by letter)."""
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{type(obj).__name__}.{name} must be a tuple of names, got {value!r}",
                             hint=f"e.g. {name}=({value!r},)" if isinstance(value, str) else None)
