"""The TensorRT route: calibrators fed from GPU buffers, engine builder, engine runner.

Importing this package never imports TensorRT; each function loads it on first use and says
what to install when it is missing. Written against the TensorRT 10 Python API (checked with
mypy against ``tensorrt-stubs``) and aware of TensorRT 11, which removed implicit INT8.
"""

from quantkit.backends.tensorrt.load import load_tensorrt, tensorrt_available, tensorrt_major

__all__ = ["load_tensorrt", "tensorrt_available", "tensorrt_major"]
