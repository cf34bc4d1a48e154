"""quantkit: an INT8 quantization workbench for NVIDIA TensorRT.

``import quantkit`` is light: it needs numpy and onnx only. ONNX Runtime, OpenCV, torch,
cuda-python and TensorRT are imported by the modules that use them. The PTQ verb and its
configuration are here too (loaded on first use)::

    cal = quantkit.quantize(model, source, quantkit.QuantizeConfig())
"""

import os
from typing import Any

from quantkit.errors import QuantkitError

__version__ = "0.1.0"

#: the most pixels OpenCV decodes in one image (its default is 2**30): a 400 KB PNG that declares
#: 20000x20000 took 2.8 GB and 28 s, and a folder of them exhausts the memory. 2**27 (134 M
#: pixels) passes a 108-megapixel photo. OpenCV reads the limit when it is loaded, so it is set
#: here, before any quantkit module imports it; a value the user set is kept.
MAX_IMAGE_PIXELS = 1 << 27

#: environment variables quantkit reads whose value it could not use: name -> value (the default
#: was taken; the command line refuses to run with them, exit 2, naming the variable)
BAD_ENVIRONMENT: dict[str, str] = {}


def env_int(name: str, default: int, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """An integer setting from the environment: ``default`` when unset or empty; a value that is
    not plain ASCII digits (no sign, ``_`` or other scripts' digits, which Python's ``int`` takes)
    of a number in ``minimum..maximum`` is recorded in ``BAD_ENVIRONMENT`` and ``default`` used."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() else minimum - 1
    if not minimum <= value <= maximum:
        BAD_ENVIRONMENT[name] = raw
        return default
    return value


# OpenCV aborts the process (C++ terminate, from std::stoull) on a value it cannot parse: before cv2
# loads, the value it reads is the one quantkit read, written as plain digits
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(env_int("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS, minimum=1,
                                                       maximum=2**62))

# ONNX Runtime 1.32 reports usage to Microsoft on Linux and macOS too (1DS telemetry: a device id
# and a database under ~/.cache/Microsoft, a '.ses' file in $TMPDIR, uploads): quantkit runs users'
# models, often where nothing may leave the machine, so it is off unless the user turns it on
# (ORT_DISABLE_TELEMETRY=0). ONNX Runtime reads it once, when loaded: here, before any module imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: names served from quantkit.ptq on first use (importing it loads the calibration code)
_PTQ = ("quantize", "prepare", "Calibration", "QuantizeConfig", "StatsConfig", "RunConfig", "ExportConfig")


def __getattr__(name: str) -> Any:
    if name in _PTQ:
        import quantkit.ptq

        return getattr(quantkit.ptq, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


__all__ = ["QuantkitError", "__version__", *_PTQ]
