"""Bias correction: the mean error INT8 adds to a Conv's output goes into its bias (issue 13, the
PP-OCR recogniser's zero-sum edge kernels on a text line's flat background)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.ptq import QuantizeConfig, StatsConfig
from tests.helpers import ArraySource


def _conv_model(w: np.ndarray, *, group: int, bias: np.ndarray | None, pads: int = 0) -> onnx.ModelProto:
    c_out, _, k, _ = w.shape
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=[k, k], pads=[pads] * 4)
    c_in = w.shape[1] * group
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from quantkit.backends.onnxruntime import OrtRunner

    with OrtRunner(model) as r:
        return r.infer({"x": x})["y"].astype(np.float64)


def _zero_sum_edges(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Depthwise 3x3 edge detectors whose taps sum to ~0 (as the recogniser's first depthwise Conv)."""
    w = rng.normal(0, 0.02, (channels, 1, 3, 3))
    w[:, 0, 1, 0], w[:, 0, 1, 2] = 0.37, -0.37
    w -= w.mean(axis=(2, 3), keepdims=True)
    return w


def _flat_background(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """A large per-channel offset (the background) with a little texture on it."""
    offset = np.linspace(8.0, 24.0, channels)[None, :, None, None]
    return (offset + rng.normal(0, 0.3, (n, channels, 12, 12))).astype(np.float32)


def test_zero_sum_kernel_on_an_offset_keeps_its_mean():
    # without correction each channel's output is off by offset x (change of the tap sum): the mean
    # error is 3-10x the output's own spread; with it, the mean error is gone on held-out data
    rng = np.random.default_rng(0)
    model = _conv_model(_zero_sum_edges(rng, 8), group=8, bias=np.zeros(8), pads=1)
    cal_x, val_x = _flat_background(rng, 32, 8), _flat_background(rng, 32, 8)
    ref = _run(model, val_x)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the zero padding is not background

    def mean_error(cal: quantkit.Calibration) -> float:
        err = (_run(cal.int8_model(), val_x) - ref)[interior]
        return float(np.abs(err.mean(axis=(0, 2, 3))).max())

    plain = mean_error(quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=False))))
    on = QuantizeConfig(StatsConfig(bias_correction=True))
    corrected = mean_error(quantkit.quantize(model, ArraySource(cal_x), on))
    assert plain > 0.05, plain  # the effect is there to correct
    assert corrected < 0.2 * plain, (plain, corrected)


@pytest.mark.parametrize("bias", [True, False])
def test_shift_is_the_measured_mean_error(bias):
    # a grouped 1x1 Conv without padding is linear in the per-channel means: the shift equals the
    # mean of (uncorrected INT8 - FP32) measured by ONNX Runtime on the calibration data itself
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.0, (6, 2, 1, 1))
    model = _conv_model(w, group=3, bias=rng.normal(0, 1, 6) if bias else None)
    x = (rng.normal(0, 1, (16, 6, 12, 12)) + rng.normal(0, 3, (1, 6, 1, 1))).astype(np.float32)
    plain = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))
    measured = (_run(plain.int8_model(), x) - _run(model, x)).mean(axis=(0, 2, 3))
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    for method in ("entropy", "minmax"):
        shift = cal.bias_shifts[method]["conv"]
        if method == "entropy":
            np.testing.assert_allclose(shift, measured, atol=1e-5 * float(np.abs(measured).max()) + 1e-6)
        corrected = (_run(cal.int8_model(method), x) - _run(model, x)).mean(axis=(0, 2, 3))
        assert np.abs(corrected).max() < 1e-4 + 1e-3 * np.abs(shift).max(), (method, corrected, shift)


def test_off_switch_and_fp32_model_unchanged():
    rng = np.random.default_rng(2)
    model = _conv_model(_zero_sum_edges(rng, 4), group=4, bias=None)
    x = _flat_background(rng, 8, 4)
    off = quantkit.quantize(model, ArraySource(x))  # the default: off
    assert off.bias_shifts == {}
    assert [len(n.input) for n in off.int8_model().graph.node if n.op_type == "Conv"] == [2]
    on = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    (conv,) = [n for n in on.int8_model().graph.node if n.op_type == "Conv"]
    assert conv.input[2] == "conv_bias_corrected"  # a Conv without a bias gets one
    assert len(on.model.graph.node[0].input) == 2  # the FP32 reference keeps its own
