"""Loading TensorRT, and telling a real installation from the type stubs."""

from __future__ import annotations

import importlib
from types import ModuleType

from quantkit.errors import MissingDependencyError

_INSTALL = ("for TensorRT 10 (calibrators, calibration caches and Q/DQ models): "
            "`pip install 'quantkit[tensorrt10]'` (tensorrt 10.x, e.g. `pip install 'tensorrt-cu12==10.16.*'`); "
            "plain `pip install tensorrt-cu12` / `tensorrt-cu13` now installs TensorRT 11, which builds INT8 "
            "only from Q/DQ models (`quantkit calibrate`, then `quantkit build`); or use the ONNX Runtime backend")


def load_tensorrt() -> ModuleType:
    """The ``tensorrt`` module.

    The ``tensorrt-stubs`` package installs a ``tensorrt`` folder holding only ``.pyi`` files,
    which Python imports as an empty namespace package; that counts as missing here.

    Raises:
        MissingDependencyError: TensorRT is not installed (or only its stubs are), or it is
            older than 10.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as err:
        raise MissingDependencyError(f"TensorRT is required here but cannot be imported ({err})", hint=_INSTALL) from err
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise MissingDependencyError("TensorRT is required here but only its type stubs are installed", hint=_INSTALL)
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt.__version__} found, quantkit needs 10 or later", hint=_INSTALL)
    return trt


def tensorrt_available() -> bool:
    try:
        load_tensorrt()
    except MissingDependencyError:
        return False
    return True


def tensorrt_major() -> int:
    return int(str(load_tensorrt().__version__).split(".")[0])


def calibrator_base(kind: str) -> type:
    """TensorRT's calibrator base class for quantkit's calibrator ``kind`` (entropy, minmax)."""
    trt = load_tensorrt()
    return trt.IInt8EntropyCalibrator2 if kind == "entropy" else trt.IInt8MinMaxCalibrator
