"""quantkit: an INT8 quantization workbench for NVIDIA TensorRT.

``import quantkit`` is light: it needs numpy and onnx only. ONNX Runtime, OpenCV, torch,
cuda-python and TensorRT are imported by the modules that use them. The PTQ verb and its
configuration are here too (loaded on first use)::

    cal = quantkit.quantize(model, source, quantkit.QuantizeConfig())
"""

from typing import Any

from quantkit.errors import QuantkitError

__version__ = "0.1.0"

#: names served from quantkit.ptq on first use (importing it loads the calibration code)
_PTQ = ("quantize", "prepare", "Calibration", "QuantizeConfig", "StatsConfig", "RunConfig", "ExportConfig")


def __getattr__(name: str) -> Any:
    if name in _PTQ:
        import quantkit.ptq

        return getattr(quantkit.ptq, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


__all__ = ["QuantkitError", "__version__", *_PTQ]
