"""Pointwise equalization (issue 13): a tensor read by group-1 Convs scaled per channel, the Convs'
weights divided per input channel; exact in FP32, better INT8 on a squeeze-and-excite -> 1x1 Conv
block, the cache and `quantkit debug` still name the user's tensors, the one pass = the two."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import quantkit
import quantkit.onnx.equalize_capture as equalize_capture
from quantkit.onnx.equalize import ALPHA_POINTWISE, S_MAX, equalization_scales, equalizations_of
from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model, make_se_pointwise_model
from tests.unit.test_equalize import _calibrate, _run, _sqnr


def test_pointwise_scales_against_brute_force():
    a = np.array([0.0, 0.5, 10.0, 1000.0, 400.0], np.float32)
    expected = [1.0 if v == 0 else min(max((1000.0 / v) ** 0.5, 1.0), S_MAX) for v in a]
    np.testing.assert_allclose(equalization_scales(a, alpha=ALPHA_POINTWISE), expected, rtol=1e-6)
    assert equalization_scales(np.array([1.0, 0.3], np.float32), alpha=0.5) is None  # sqrt(3.3) = 1.8 < 2


@pytest.mark.parametrize("kernel", [1, 3])
def test_fp32_function_unchanged_and_recorded(kernel):
    model = make_se_pointwise_model(kernel=kernel)
    x = depthwise_inputs(model, 32)
    cal = _calibrate(model, x, equalize_pointwise=True)
    by_tensor = {e.tensor: e for e in cal.equalized}
    e = by_tensor["t"]  # the SE output
    assert e.consumers == ("pw",) and list(e.input_axis) == list(e.weights)
    nodes = {n.name: n for n in cal.model.graph.node}
    assert nodes["pw"].input[0] == e.scaled and nodes["pw"].input[1] in e.weights
    ref, got = _run(model, x), _run(cal.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    recorded = {r.tensor: r for r in equalizations_of(cal.int8_model())}
    assert recorded["t"].input_axis == e.input_axis
    np.testing.assert_array_equal(recorded["t"].scales, e.scales)


@pytest.mark.parametrize("kernel", [1, 3])
def test_int8_output_clearly_better(kernel):
    # measured: entropy 5.9 -> 27.6 dB, minmax 5.7 -> 25.8 dB (1x1); 7.8 -> 27.1, 7.4 -> 25.8 (3x3)
    model = make_se_pointwise_model(kernel=kernel)
    cal_x, val_x = depthwise_inputs(model, 64, seed=0), depthwise_inputs(model, 64, seed=1)
    ref = _run(model, val_x)
    plain_cal = _calibrate(model, cal_x, equalize_pointwise=False)
    eq_cal = quantkit.quantize(model, ArraySource(cal_x))  # on by default
    assert not plain_cal.equalized and eq_cal.equalized
    # only with bias correction (without it, PP-OCR's recogniser lost 14 points)
    assert not _calibrate(model, cal_x, equalize_pointwise=True, bias_correction=False).equalized
    for method in ("entropy", "minmax"):
        plain = _sqnr(ref, _run(plain_cal.int8_model(method), val_x))
        equalized = _sqnr(ref, _run(eq_cal.int8_model(method), val_x))
        assert equalized > plain + 15.0, (method, plain, equalized)


def test_cache_names_only_the_users_tensors():
    model = make_se_pointwise_model()
    cal = _calibrate(model, depthwise_inputs(model, 32), equalize_pointwise=True)
    original = {o for n in model.graph.node for o in n.output} | {"x"}
    scales = cal.cache().scales
    assert set(scales) <= original and "t" in scales
    assert not any(e.scaled in scales for e in cal.equalized)
    assert scales["t"] == pytest.approx(cal.ranges["t"].amax["entropy"] / 127, rel=1e-6)
    assert cal.ranges_document()["config"]["equalize_pointwise"] is True


def test_debug_matches_the_original_model_to_the_equalized_int8():
    from quantkit.datasets.batching import Batcher
    from quantkit.debug import layerwise_error

    model = make_se_pointwise_model()
    x = depthwise_inputs(model, 32)
    cal = _calibrate(model, x, equalize_pointwise=True)
    e = next(e for e in cal.equalized if e.tensor == "t")
    report = layerwise_error(model, cal.int8_model(), Batcher(ArraySource(x), ["x"], 8))
    points = {p.tensor: p for p in report.activations}
    assert e.scaled in points and points[e.scaled].local_sqnr_db > 25.0
    (w,) = [w for w in report.weights if w.tensor in e.weights]
    assert w.sqnr_db > 30.0  # compared with the original weight / s per input channel
    plain = layerwise_error(model, _calibrate(model, x, equalize_pointwise=False).int8_model(),
                            Batcher(ArraySource(x), ["x"], 8))
    assert "t" in {p.tensor for p in plain.activations}
    assert report.outputs[0].sqnr_db > plain.outputs[0].sqnr_db + 15.0


def assert_one_pass_equals_two(model: onnx.ModelProto, x: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass fold (equalization decided inside the calibration pass) gives the two passes'
    equalizations and every method's ranges."""
    one = _calibrate(model, x, equalize_pointwise=True)
    monkeypatch.setattr(equalize_capture, "HELD_BYTES", 0)  # too large to hold: the two passes
    two = _calibrate(model, x, equalize_pointwise=True)
    assert one.equalized and [e.to_dict() for e in one.equalized] == [e.to_dict() for e in two.equalized]
    for t, r in one.ranges.items():
        for m, a in r.amax.items():
            assert a == pytest.approx(two.ranges[t].amax[m], rel=1e-5), (t, m)


def test_one_pass_with_the_two_pass_statistics(monkeypatch):
    model = make_se_pointwise_model()
    assert_one_pass_equals_two(model, depthwise_inputs(model, 40), monkeypatch)


def test_a_tensor_read_by_depthwise_and_pointwise_convs_keeps_the_depthwise_factors():
    """A tensor read by a depthwise Conv and a group-1 Conv gets the depthwise factors (the whole
    range ratio) on the depthwise Conv's way only; the group-1 Conv reads it as it is. One Mul
    with the square-root factors for both (the rule before) cost trueocr's HardSwish text
    detector 10 dB of output SQNR (22.7 -> 12.4): its depthwise Convs' inputs lost most of their
    equalization."""
    model = make_depthwise_model(variant="fanout")  # h feeds the depthwise Conv and a 1x1 Conv
    x = depthwise_inputs(model, 32)
    cal = _calibrate(model, x, equalize_pointwise=True)
    e = next(e for e in cal.equalized if e.tensor == "h")
    assert set(e.consumers) == {"dw"} and not e.input_axis
    full = next(e for e in _calibrate(model, x, equalize_pointwise=False).equalized if e.tensor == "h").scales
    np.testing.assert_array_equal(e.scales, full)
    assert float(full.max()) > 8.0  # more than the square root would have moved
    assert sum(n.op_type == "Mul" and n.input[0] == "h" for n in cal.model.graph.node) == 1
    side = next(n for n in cal.model.graph.node if n.name == "side_conv")
    assert side.input[0] == "h"
    ref = _run(model, x)
    np.testing.assert_allclose(_run(cal.model, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_shared_scale_group_members_are_not_equalized():
    """Concat's inputs and output share one scale (TensorRT moves the output's quantizer onto the
    inputs): a Mul on a member would leave the Concat in float, so the members, both read by 1x1
    Convs here, stay as they are and keep their one scale."""
    from quantkit.onnx.equalize import equalized_consumers
    from tests.unit.test_placement import concat_model

    m = concat_model()
    cal = quantkit.quantize(m, ArraySource(np.random.default_rng(0).standard_normal((16, 3, 8, 8))
                                           .astype(np.float32) * np.array([0.01, 1.0, 30.0], np.float32)[:, None, None]))
    readers = {"x": ("conv_a", "conv_b"), "a": ("conv_c",), "cat": ("conv_d",)}
    assert {"a", "cat"} <= set(equalized_consumers(cal.model, readers, pointwise=True))  # candidates alone
    assert not {"a", "cat"} & set(equalized_consumers(cal.model, readers, pointwise=True, groups=(("a", "cat"),)))
    assert not {"a", "cat"} & {e.tensor for e in cal.equalized}
    q = cal.int8_model()
    inits = {i.name for i in q.graph.initializer}
    assert "a_scale" in inits and "cat_scale" in inits  # both still quantized, one scale
    assert cal.ranges["a"].amax == cal.ranges["cat"].amax


def test_float16_model_is_equalized_and_bias_corrected_in_float16(monkeypatch):
    """A float16 model (kept float16: test_graph_import): the equalization's Mul factors and the
    bias correction's new biases are float16 too (a float32 factor or bias made ONNX Runtime
    refuse the model: the Mul, then the correction, then the ranking failed), and the INT8
    model runs."""
    import onnxruntime as ort
    from onnx import TensorProto

    from quantkit.debug.sensitivity import rank_sensitivity
    from tests.helpers import as_float16

    # the guard leaves this model's correction out (28.6 dB either way): the float16 mechanics
    # are tested without it
    monkeypatch.setattr(quantkit.ptq, "BIAS_CORRECTION_GUARD", False)
    model = as_float16(make_se_pointwise_model())
    x = depthwise_inputs(model, 32).astype(np.float16)
    cal = quantkit.quantize(model, ArraySource(x))
    assert {e.tensor for e in cal.equalized} >= {"t"}
    q = cal.int8_model()
    assert cal.bias_shifts["entropy"]  # corrected, not skipped with a warning
    factors = [i for i in q.graph.initializer if i.name.endswith("_equalization_scale")]
    assert factors and all(i.data_type == TensorProto.FLOAT16 for i in factors)
    ref = _run(model, x)
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float16 and _sqnr(ref.astype(np.float64), got.astype(np.float64)) > 20.0
    # the ranking's switchable model gives its quantized Convs the corrected biases, float16 too
    assert len(rank_sensitivity(cal, ArraySource(x), range(len(x))).rows) >= 2
