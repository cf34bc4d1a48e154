"""Executors behind one interface (``Runner``: infer, capture), and the table that picks one for
a model file.

    .onnx (and anything else)      ONNX Runtime (default; CPU)      quantkit.backends.onnxruntime
    .plan .engine .trt             TensorRT engine (GPU)            quantkit.backends.tensorrt.runner

A backend's module is imported only when a file of its kind is opened.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from quantkit.backends.base import Runner, TensorSink, check_feed, side_by_side
from quantkit.errors import ModelError

#: file suffix -> (module, runner class); other suffixes open with ONNX Runtime
BACKENDS: dict[str, tuple[str, str]] = {
    ".onnx": ("quantkit.backends.onnxruntime", "OrtRunner"),
    ".plan": ("quantkit.backends.tensorrt.runner", "TrtRunner"),
    ".engine": ("quantkit.backends.tensorrt.runner", "TrtRunner"),
    ".trt": ("quantkit.backends.tensorrt.runner", "TrtRunner"),
}
ENGINE_SUFFIXES = tuple(k for k, (_, cls) in BACKENDS.items() if cls == "TrtRunner")

#: options that only the ONNX Runtime runner takes (dropped for engines)
_ORT_ONLY = ("threads", "providers", "capture", "capture_budget_mb", "integer_kernels")


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """The path, when it names an existing file; checked before any backend is loaded, so that
    a missing engine is reported as missing, not as TensorRT being absent."""
    from quantkit._io import input_file

    return input_file(path, "model or engine file", ModelError)


def runner_from_path(path: str | os.PathLike[str], **kwargs: Any) -> Runner:
    """A runner for a model file, by its suffix (``BACKENDS``): an ``.onnx`` model runs on ONNX
    Runtime, a TensorRT engine (``.plan``/``.engine``/``.trt``) needs TensorRT and a GPU (ONNX
    Runtime options such as ``threads`` do not apply to it)."""
    p = check_model_file(path)
    module, cls = BACKENDS.get(p.suffix.lower(), BACKENDS[".onnx"])
    if cls != "OrtRunner":
        kwargs = {k: v for k, v in kwargs.items() if k not in _ORT_ONLY}
    runner: Runner = getattr(importlib.import_module(module), cls)(p, **kwargs)
    return runner


__all__ = ["BACKENDS", "ENGINE_SUFFIXES", "Runner", "TensorSink", "check_feed", "check_model_file",
           "runner_from_path", "side_by_side"]
