"""ONNX Runtime backend (the default; CPU unless other providers are asked for)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantkit._deps import require
from quantkit.backends.base import Runner
from quantkit.errors import ModelError
from quantkit.onnx.model import TensorSpec, input_specs, load_model, output_specs


def session_options(threads: int | None = None, *, optimization: str = "all") -> Any:
    """The one place ONNX Runtime session options are made, so every pass uses the same."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def create_session(model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None,
                   providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    ort = require("onnxruntime")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=session_options(threads), providers=list(providers))
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"ONNX Runtime cannot load the model: {msg}") from err


class OrtRunner(Runner):
    """Run an ONNX model with ONNX Runtime.

    Args:
        model: a path or a ModelProto.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).
        providers: execution providers, CPU by default.
    """

    backend = "onnxruntime"

    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.name = Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name
        self._inputs = input_specs(proto)
        self._output_specs = output_specs(proto)
        self._outputs = [s.name for s in self._output_specs]
        self.session = create_session(proto if isinstance(model, onnx.ModelProto) else model,
                                      threads=threads, providers=providers)
        self.device = ",".join(p.replace("ExecutionProvider", "") for p in self.session.get_providers())

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self._output_specs

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._outputs, feed)
        return dict(zip(self._outputs, outs))

    def close(self) -> None:
        self.session = None


ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """The path, when it names an existing file; checked before any backend is loaded, so that
    a missing engine is reported as missing, not as TensorRT being absent."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"no such file: {str(p)!r}", hint="check the path of the model or engine")
    if not p.is_file():
        raise ModelError(f"{str(p)!r} is a folder, not a model or engine file")
    return p


def runner_from_path(path: str | os.PathLike[str], **kwargs: Any) -> Runner:
    """A runner for an ``.onnx`` model (ONNX Runtime) or a TensorRT engine (``.plan``/``.engine``,
    which needs TensorRT and a GPU; ONNX Runtime options such as ``threads`` do not apply)."""
    p = check_model_file(path)
    if p.suffix.lower() in ENGINE_SUFFIXES:
        from quantkit.backends.tensorrt.runner import TrtRunner

        return TrtRunner(p)
    return OrtRunner(p, **kwargs)
