"""Lazy imports of optional dependencies, with errors that name the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from packaging.version import InvalidVersion, Version

from quantkit.errors import MissingDependencyError

# module name -> (pip extra, minimum version)
_KNOWN: dict[str, tuple[str, str]] = {
    "onnxruntime": ("", "1.17"),
    "cv2": ("", "4.8"),
    "onnx_graphsurgeon": ("", "0.5"),
    "torch": ("torch", "2.2"),
    "tensorrt": ("tensorrt", "10.0"),
    "cuda": ("gpu", "12.0"),
    "matplotlib": ("notebooks", "3.7"),
    "netron": ("view", "7.0"),
}

#: module name -> its package's name on the package index, where they differ
_PIP_NAMES = {"cv2": "opencv-python-headless", "cuda": "cuda-python", "onnx_graphsurgeon": "onnx-graphsurgeon"}


def require(name: str, *, min_version: str | None = None, extra: str | None = None) -> ModuleType:
    """Import ``name`` or raise MissingDependencyError that tells missing from too old.

    Args:
        name: importable module name (``cv2``, ``torch``, ...).
        min_version: oldest acceptable ``__version__``; defaults to quantkit's known floor.
        extra: the ``quantkit[extra]`` that installs it; defaults to the known one.
    """
    known_extra, known_min = _KNOWN.get(name, ("", "0"))
    if name == "onnx_graphsurgeon" and not _onnx_has_float_converters():
        # onnx 1.20 dropped helper.float32_to_bfloat16, which onnx-graphsurgeon 0.5.x calls when it
        # exports a graph: every calibration failed on AttributeError (a GPU machine's 0.5.8 image)
        known_min = "0.6.1"
    extra = known_extra if extra is None else extra
    min_version = known_min if min_version is None else min_version
    install = (f"`pip install 'quantkit[{extra}]'` (from a source checkout: `pip install -e '.[{extra}]'`)" if extra
               else "`pip install quantkit`")
    if name == "torch":  # its default wheel may be the multi-GB CUDA build; the README installs the CPU one
        install = "`pip install torch` (the CPU build: add `--index-url https://download.pytorch.org/whl/cpu`)"
    try:
        mod = importlib.import_module(name)
    except ImportError as err:
        raise MissingDependencyError(
            f"{name} is required here but is not installed", hint=f"install it with {install}"
        ) from err
    found = getattr(mod, "__version__", None)
    if found is not None:
        try:
            too_old = Version(str(found).split("+")[0]) < Version(min_version)
        except InvalidVersion:
            too_old = False
        if too_old:
            raise MissingDependencyError(
                f"{name} {found} found, quantkit needs >= {min_version}",
                hint=f"upgrade it with `pip install --upgrade '{_PIP_NAMES.get(name, name)}>={min_version}'`",
            )
    return mod


def _onnx_has_float_converters() -> bool:
    """Whether the installed onnx still has ``helper.float32_to_bfloat16`` (before 1.20)."""
    import onnx

    return hasattr(onnx.helper, "float32_to_bfloat16")
