"""ONNX side: model loading, activation capture through ONNX Runtime, Q/DQ insertion."""

from quantkit.onnx.model import TensorSpec, ensure_opset, input_specs, load_model, output_specs

__all__ = ["TensorSpec", "ensure_opset", "input_specs", "load_model", "output_specs"]
