"""quantkit: an INT8 quantization workbench for NVIDIA TensorRT.

``import quantkit`` is light: it needs numpy and onnx only. ONNX Runtime, OpenCV, torch,
cuda-python and TensorRT are imported by the modules that use them.
"""

from quantkit.errors import QuantkitError

__version__ = "0.1.0"
__all__ = ["QuantkitError", "__version__"]
