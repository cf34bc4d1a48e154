"""Depthwise equalization: exact in FP32, better INT8, the cache and `quantkit debug` still name the
user's tensors, --no-equalize gives the plain model."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

import quantkit
from quantkit.onnx.equalize import S_MAX, S_MAX_LOUD, depthwise_caps, equalization_scales, equalizations_of
from quantkit.ptq import QuantizeConfig, StatsConfig
from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model

VARIANTS = [("plain", 1), ("plain", 2), ("input", 1), ("fanout", 1), ("shared", 1), ("constant", 1)]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from quantkit.backends.onnxruntime import OrtRunner

    with OrtRunner(model) as r:
        return r.infer({"x": x})["y"]


def _calibrate(model: onnx.ModelProto, x: np.ndarray, **stats: object) -> quantkit.Calibration:
    """Depthwise equalization alone unless ``equalize_pointwise`` is given (test_equalize_pointwise)."""
    stats.setdefault("equalize_pointwise", False)
    return quantkit.quantize(model, ArraySource(x), QuantizeConfig(stats=StatsConfig(**stats)))  # type: ignore[arg-type]


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((test - ref).astype(np.float64) ** 2).sum()))


def test_scales_against_brute_force():
    a = np.array([0.0, 0.5, 10.0, 1000.0, 400.0], np.float32)
    expected = [1.0 if v == 0 else min(max(1000.0 / v, 1.0), S_MAX) for v in a]
    np.testing.assert_allclose(equalization_scales(a), expected, rtol=1e-6)
    assert equalization_scales(np.array([1.0, 0.6], np.float32)) is None  # largest factor 1.67 < 2
    assert equalization_scales(np.zeros(4, np.float32)) is None
    np.testing.assert_allclose(equalization_scales(np.array([1.0, 0.25]), s_max=3.0), [1.0, 3.0])


@pytest.mark.parametrize("variant,multiplier", VARIANTS)
def test_fp32_function_unchanged(variant, multiplier):
    model = make_depthwise_model(variant=variant, multiplier=multiplier)
    x = depthwise_inputs(model, 32)
    cal = _calibrate(model, x)
    assert cal.equalized, "the spread channels were not equalized"
    assert any(n.op_type == "Mul" and n.output[0].endswith("_equalized") for n in cal.model.graph.node)
    ref, got = _run(model, x), _run(cal.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # the equalized model is recorded in its metadata, and the Q/DQ model carries the record on
    assert [e.tensor for e in equalizations_of(cal.int8_model())] == [e.tensor for e in cal.equalized]


@pytest.mark.parametrize("multiplier", [1, 2])
def test_int8_output_clearly_better(multiplier):
    # measured: 7.4 -> 31.9 dB (multiplier 1), 3.8 -> 29.7 dB (multiplier 2), entropy and minmax alike
    model = make_depthwise_model(multiplier=multiplier)
    cal_x, val_x = depthwise_inputs(model, 64, seed=0), depthwise_inputs(model, 64, seed=1)
    ref = _run(model, val_x)
    for method in ("entropy", "minmax"):
        plain = _sqnr(ref, _run(_calibrate(model, cal_x, equalize=False).int8_model(method), val_x))
        equalized = _sqnr(ref, _run(_calibrate(model, cal_x).int8_model(method), val_x))
        assert equalized > plain + 15.0, (method, plain, equalized)


def test_other_consumers_keep_the_tensor():
    model = make_depthwise_model(variant="fanout")
    cal = _calibrate(model, depthwise_inputs(model, 32))
    (e,) = cal.equalized
    assert e.tensor == "h" and e.consumers == ("dw",)
    nodes = {n.name: n for n in cal.model.graph.node}
    assert nodes["dw"].input[0] == e.scaled and nodes["side_conv"].input[0] == "h"
    # h stays quantized for the 1x1 Conv that reads it, the scaled tensor for the depthwise Conv
    assert cal.plan.activations["h"] == ("side_conv",) and cal.plan.activations[e.scaled] == ("dw",)


def test_shared_and_constant_weights_get_their_own_copies():
    shared = _calibrate(make_depthwise_model(variant="shared"), depthwise_inputs(make_depthwise_model(), 32))
    assert sorted(e.tensor for e in shared.equalized) == ["h", "hb"]
    weights = {n.name: n.input[1] for n in shared.model.graph.node if n.name in ("dw", "dwb")}
    assert len(set(weights.values())) == 2 and "wd" not in weights.values()
    assert {o for e in shared.equalized for o in e.weights.values()} == {"wd"}
    assert "wd" not in {i.name for i in shared.model.graph.initializer}  # nothing reads it any more
    const = _calibrate(make_depthwise_model(variant="constant"), depthwise_inputs(make_depthwise_model(), 32))
    assert not any(n.op_type == "Constant" for n in const.model.graph.node)
    onnx.checker.check_model(const.int8_model())


def test_cache_names_only_the_users_tensors(tmp_path):
    model = make_depthwise_model(variant="fanout")
    cal = _calibrate(model, depthwise_inputs(model, 32))
    (e,) = cal.equalized
    original = {o for n in model.graph.node for o in n.output} | {"x"}
    cache = cal.cache()
    assert set(cache.scales) <= original and "h" in cache.scales and e.scaled not in cache.scales
    # h's own range (not the scaled tensor's) under its own name
    assert cache.scales["h"] == pytest.approx(cal.ranges["h"].amax[cal.config.method] / 127, rel=1e-6)
    only_dw = make_depthwise_model()  # h feeds the depthwise Conv alone: captured for the cache anyway
    cal2 = _calibrate(only_dw, depthwise_inputs(only_dw, 32))
    assert "h" not in cal2.plan.activations and "h" in cal2.cache().scales
    assert not any(t.endswith("_equalized") for t in cal2.cache().scales)
    doc = cal2.ranges_document()
    assert doc["config"]["equalize"] is True
    (summary,) = doc["equalized"]
    # the quietest channels are amplified by the depthwise weight as a BatchNorm would: loud after it
    assert summary["tensor"] == "h" and summary["consumers"] == ["dw"] and summary["scale_max"] == pytest.approx(S_MAX_LOUD)
    assert doc["tensors"][summary["scaled"]]["equalized_from"] == "h" and doc["tensors"]["h"]["quantized"] is False


def test_no_equalize_and_where_it_does_not_apply():
    model = make_depthwise_model()
    x = depthwise_inputs(model, 32)
    for kw in ({"equalize": False}, {"target": "onnxruntime"}, {"pow2_grid": True}):
        cal = _calibrate(model, x, **kw)
        assert not cal.equalized and not equalizations_of(cal.model), kw
        assert not any(n.op_type == "Mul" for n in cal.model.graph.node), kw
        assert "equalized" not in cal.ranges_document()
    # --no-equalize calibrates the prepared model itself, as before equalization existed
    from quantkit.ptq import prepare

    plain = _calibrate(model, x, equalize=False)
    assert plain.model.SerializeToString() == prepare(model).model.SerializeToString()
    assert plain.plan.activations["h"] == ("dw",)


def test_debug_matches_the_original_model_to_the_equalized_int8():
    from quantkit.datasets.batching import Batcher
    from quantkit.debug import layerwise_error

    model = make_depthwise_model(multiplier=2)
    x = depthwise_inputs(model, 32)
    cal = _calibrate(model, x)
    (e,) = cal.equalized
    report = layerwise_error(model, cal.int8_model(), Batcher(ArraySource(x), ["x"], 8))
    points = {p.tensor: p for p in report.activations}
    assert e.scaled in points and points[e.scaled].local_sqnr_db > 25.0  # FP32 h x s, quantized with its scale
    (w,) = [w for w in report.weights if w.tensor in e.weights]
    assert w.sqnr_db > 30.0  # the original weight / s, as the INT8 model computes with it
    plain = layerwise_error(model, _calibrate(model, x, equalize=False).int8_model(),
                            Batcher(ArraySource(x), ["x"], 8))
    assert report.outputs[0].sqnr_db > plain.outputs[0].sqnr_db + 15.0


def test_cli_calibrate_then_debug_on_the_original(tmp_path, capsys):
    from quantkit.cli import main
    from quantkit.calibrators.cache import read_cache

    model = make_depthwise_model()
    onnx.save(model, tmp_path / "dw.onnx")
    np.savez(tmp_path / "x.npz", x=depthwise_inputs(model, 48))
    common = ["--npz", str(tmp_path / "x.npz"), "--eval-images", "0", "--no-progress"]
    assert main(["calibrate", str(tmp_path / "dw.onnx"), *common, "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"; equalized the inputs of \d+ Conv\(s\) \([1-9]\d* depthwise, \d+ group-1\)( and \d+ MatMul/Gemm)?; "
                     r"factors up to", out)
    assert main(["calibrate", str(tmp_path / "dw.onnx"), *common, "--no-equalize", "-o", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    eq_model, plain_model = onnx.load(tmp_path / "out" / "dw.int8.onnx"), onnx.load(tmp_path / "plain" / "dw.int8.onnx")
    assert any(n.op_type == "Mul" for n in eq_model.graph.node)
    assert not any(n.op_type == "Mul" for n in plain_model.graph.node)
    assert not json.loads((tmp_path / "plain" / "ranges.json").read_text())["config"]["equalize"]
    assert set(read_cache(tmp_path / "out" / "calibration.cache").scales) == \
        set(read_cache(tmp_path / "plain" / "calibration.cache").scales) | {"h"}
    rc = main(["debug", str(tmp_path / "dw.onnx"), str(tmp_path / "out" / "dw.int8.onnx"), *common[:2],
               "--no-progress", "-o", str(tmp_path / "dbg")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())["layerwise"]
    assert "h_equalized" in {p["tensor"] for p in doc["activations"]}


def test_ranking_a_qdq_model_with_equalization_keeps_its_depthwise_group():
    """`quantkit debug ORIGINAL INT8 --rank` plans on the user's model: the equalization recorded in
    the INT8 model is applied to it again, so the depthwise Conv's group is ranked with its scale."""
    from quantkit.debug.sensitivity import QdqScales
    from quantkit.ptq import RunConfig

    model = make_depthwise_model()
    cal = _calibrate(model, depthwise_inputs(model, 32))
    (e,) = cal.equalized
    scales = QdqScales.from_qdq_model(model, cal.int8_model(), RunConfig())
    assert e.scaled in scales.plan.activations
    assert set(scales.plan.activations) == set(cal.plan.activations)
    assert scales.ranges[e.scaled]["model"] == pytest.approx(cal.amax()[e.scaled], rel=1e-6)


def test_equalization_is_folded_into_the_calibration_pass_by_default(monkeypatch):
    """ptq.EQUALIZE_ONE_PASS is on: one capture pass measures the channels and calibrates."""
    from quantkit.backends.onnxruntime import OrtRunner

    calls: list[int] = []
    original = OrtRunner.capture
    monkeypatch.setattr(OrtRunner, "capture", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    model = make_depthwise_model(variant="plain")
    assert _calibrate(model, depthwise_inputs(model, 16)).equalized and len(calls) == 1


def test_a_quiet_channel_is_raised_past_s_max_only_where_the_conv_makes_it_loud():
    """Capped at S_MAX, a channel 1000x quieter than the loudest kept a few INT8 levels; where the
    depthwise weight and a BatchNormalization after it make its output as loud as the others', its
    rounding matters as much as theirs (PP-OCRv2's recogniser: 18.9 -> 24.8 dB)."""
    from onnx import TensorProto, helper, numpy_helper

    a = np.array([40.0, 0.035, 0.035, 10.0], np.float32)
    w = np.ones((4, 1, 3, 3), np.float32)
    bn = [np.array([1.0, 60.0, 1.0, 1.0], np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32),
          np.ones(4, np.float32)]
    nodes = [helper.make_node("Conv", ["h", "w"], ["d"], name="dw", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["d", "g", "b", "m", "v"], ["y"], name="bn")]
    inits = [numpy_helper.from_array(x, n) for x, n in zip([w, *bn], ["w", "g", "b", "m", "v"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    caps = depthwise_caps(model, [model.graph.node[0]], a, consts)
    # channel 1: 0.035 * 60 is within S_MAX of 40; channel 2 stays quiet after the Conv
    np.testing.assert_array_equal(caps, [S_MAX_LOUD, S_MAX_LOUD, S_MAX, S_MAX_LOUD])
    s = equalization_scales(a, s_max=caps)
    assert s[1] == pytest.approx(40.0 / 0.035, rel=1e-5) and s[2] == S_MAX
