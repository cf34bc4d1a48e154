"""Bias correction: move the mean error that INT8 adds to a Conv's output into its bias.

Quantization changes the mean of a Conv's output, not only its noise. Two cases are common in
real exporters' graphs (PP-OCR's recogniser, measured in benchmarks/results/design_notes.md):

- a weight whose taps sum to ~0 (an edge detector: ``[-0.37, ..., 0.37]``, sum 6e-5) reads a
  tensor with a large per-channel offset (the background of a text line). Per-channel INT8
  rounding changes the sum of the taps by up to a step per tap, and the offset times that change
  is a constant error over the whole image, which the layers after it amplify;
- a tensor that is constant over most of the image (a flat background after hard-swish) is
  rounded to the same grid point everywhere: the rounding error is a per-channel constant, not
  noise, and the next Conv's weights turn it into a constant error of each output channel.

Both are the same term: the expected output of the quantized layer minus the FP32 layer's,

    shift[o] = sum_k sum_taps(Wq[o, k]) * E[Q(x)[k]] - sum_taps(W[o, k]) * E[x[k]]

with E over the batch and spatial positions of the FP32 input x, Q the activation's INT8
quantizer (per tensor, the method's amax) and Wq the per-channel INT8 weight. ``bias -= shift``
removes it (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", 2019; NNCF's FastBiasCorrection, AIMET's bias correction do the same). The shift is
measured on the FP32 input of each layer (each layer's own error; the errors of the layers
before it are corrected in their own biases). The bias is a float input of the Conv that
TensorRT fuses as it is: a corrected model builds exactly like the uncorrected one.

Only Conv (grouped and depthwise included) with a 4-D input is corrected; MatMul/Gemm biases are
separate Add nodes in most exporters' graphs and are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.calibrators.weights import per_channel_amax, scale_from_amax
from quantkit.onnx.model import constant_arrays
from quantkit.onnx.qdq import QdqPlan


@dataclass(frozen=True)
class CorrectedConv:
    """A Conv whose bias is corrected: its node, its activation input, its weight Q/DQ name."""

    node: str
    activation: str
    weight: str


def correctable_convs(model: onnx.ModelProto, plan: QdqPlan) -> list[CorrectedConv]:
    """The Convs of ``plan`` whose weight is quantized (per output channel, axis 0) and whose
    activation input is a tensor of the graph: the layers ``bias_shifts`` corrects."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    out = []
    for wname, (axis, consumers) in plan.weights.items():
        for c in consumers:
            node = nodes.get(c)
            if node is not None and node.op_type == "Conv" and axis == 0 and \
                    plan.weight_tensor(wname) == node.input[1]:
                out.append(CorrectedConv(c, node.input[0], wname))
    return out


def fake_quantize(x: np.ndarray, amax: float) -> np.ndarray:
    """Q/DQ of ``x`` with scale amax / 127, as ONNX QuantizeLinear (round half to even, int8
    saturation at -128..127) and DequantizeLinear compute it."""
    scale = float(scale_from_amax(np.float32(amax)))
    return np.clip(np.rint(x / scale), -128, 127) * scale


def _fake_quantized_weight(w: np.ndarray) -> np.ndarray:
    s = scale_from_amax(per_channel_amax(w, 0)).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.rint(w / s), -128, 127) * s


def bias_shifts(model: onnx.ModelProto, plan: QdqPlan, convs: list[CorrectedConv],
                x_means: Mapping[str, np.ndarray], q_means: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per corrected Conv, the shift of its output's mean that INT8 adds (float64 [C_out]).

    Args:
        x_means: activation tensor -> per-channel mean of the FP32 tensor [C_in].
        q_means: activation tensor -> per-channel mean of the same values fake-quantized with
            the method's amax [C_in]; a tensor that is not quantized may be missing (its
            ``x_means`` is used).
    """
    consts = constant_arrays(model)
    nodes = {n.name: n for n in model.graph.node if n.name}
    out: dict[str, np.ndarray] = {}
    for conv in convs:
        if conv.activation not in x_means:
            continue
        node = nodes[conv.node]
        w = consts[node.input[1]].astype(np.float64)
        groups = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
        c_out, c_in_g = w.shape[:2]
        taps = w.reshape(c_out, c_in_g, -1).sum(-1)
        taps_q = _fake_quantized_weight(w).reshape(c_out, c_in_g, -1).sum(-1)
        mx = np.asarray(x_means[conv.activation], np.float64).reshape(groups, c_in_g)
        mq = np.asarray(q_means.get(conv.activation, x_means[conv.activation]), np.float64).reshape(groups, c_in_g)
        per_group = c_out // groups
        shift = (np.einsum("gok,gk->go", taps_q.reshape(groups, per_group, c_in_g), mq)
                 - np.einsum("gok,gk->go", taps.reshape(groups, per_group, c_in_g), mx))
        out[conv.node] = shift.reshape(c_out)
    return out


def with_corrected_biases(model: onnx.ModelProto, shifts: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where each Conv in ``shifts`` has the bias ``bias - shift`` (a new
    initializer ``<node>_bias_corrected``; a Conv without a bias gets one). ``model`` itself is
    returned when ``shifts`` is empty."""
    if not shifts:
        return model
    consts = constant_arrays(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        shift = shifts.get(node.name)
        if shift is None:
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = consts[node.input[2]].astype(np.float64) if has_bias else np.zeros(shift.shape)
        dtype = consts[node.input[1]].dtype
        name = f"{node.name}_bias_corrected"
        out.graph.initializer.append(numpy_helper.from_array((bias - shift).astype(dtype), name))
        if has_bias:
            node.input[2] = name
        else:
            node.input.append(name)
    return out
