"""Loading and inspecting ONNX models: clear errors, input specs, opset, hash."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from quantkit._io import file_sha256  # noqa: F401  (re-exported: the model hash of caches and ranges)
from quantkit.errors import ModelError

MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints; str or None for dynamic dims), numpy dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def static_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and check an ONNX model file; ModelError names the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelError(f"{str(p)!r} is a folder, not an ONNX model file")
    try:
        model = onnx.load(str(p))
    except Exception as err:  # protobuf raises DecodeError and others (ParseError's text spans lines)
        reason = " ".join(str(err).split())
        raise ModelError(f"{str(p)!r} is not a readable ONNX model ({type(err).__name__}: {reason})") from err
    if not model.graph.node:
        raise ModelError(f"{str(p)!r} is not an ONNX model with a graph (no nodes found)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "validation failed"
        raise ModelError(f"{str(p)!r} is not a valid ONNX model: {first}") from err
    return model


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
    return TensorSpec(vi.name, tuple(dims), np.dtype(dtype))


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in inits]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in model.graph.output]


def float_input_specs(model: onnx.ModelProto, *, source: str = "model") -> list[TensorSpec]:
    specs = input_specs(model)
    if not any(np.issubdtype(s.dtype, np.floating) for s in specs):
        found = ", ".join(f"{s.name}: {s.dtype}" for s in specs) or "none"
        raise ModelError(
            f"{source} has no floating-point inputs ({found}); INT8 calibration needs float activations"
        )
    return specs


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """Return the model at ``minimum`` opset or later (converted when lower)."""
    current = opset_version(model)
    if current >= minimum:
        return model
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, minimum)
        # the converter's shape inference names unknown dims ('unk__0') and records them for
        # every tensor (ONNX Runtime then reports them on the outputs): keep the model's own
        # input, output and intermediate types, so the Q/DQ model has the FP32 model's I/O
        original = {vi.name: vi.type for vi in (*model.graph.input, *model.graph.output)}
        for vi in (*converted.graph.input, *converted.graph.output):
            if vi.name in original:
                vi.type.CopyFrom(original[vi.name])
        del converted.graph.value_info[:]
        converted.graph.value_info.extend(model.graph.value_info)
        onnx.checker.check_model(converted)
    except Exception as err:
        raise ModelError(
            f"the model uses opset {current}; per-channel Q/DQ needs opset {minimum} or later, "
            f"and converting it failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            hint=f"re-export the model with opset_version>={minimum}",
        ) from err
    return converted


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors, by name (weights live in either)."""
    out = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return out
