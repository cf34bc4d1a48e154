"""The ranking's and the fallback's output error on an output that a Concat writes along axis 1
(a YOLO head's box pixels beside its sigmoid class scores): each part one signal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.ptq import QuantizeConfig, StatsConfig
from tests.helpers import ArraySource


def _head_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv + Relu -> boxes (Conv x 100) and scores (Sigmoid of a Conv),
    concatenated along the channels: [N, 4 + 3, 8, 8]."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 8, 1, 1)).astype(np.float32), "ws"),
             numpy_helper.from_array(np.array(100.0, np.float32), "k")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["b"], name="box"),
             helper.make_node("Mul", ["b", "k"], ["boxes"]),
             helper.make_node("Conv", ["r", "ws"], ["s"], name="cls"),
             helper.make_node("Sigmoid", ["s"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["out"], axis=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 7, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _part_nsrs(fp32: onnx.ModelProto, int8: onnx.ModelProto, x: np.ndarray) -> list[float]:
    """Each part's noise/signal over ``x``, then the whole output's."""
    from quantkit.backends.onnxruntime import OrtRunner

    with OrtRunner(fp32) as a, OrtRunner(int8) as b:
        r, t = (m.infer({"x": x})["out"].astype(np.float64) for m in (a, b))
    parts = [(slice(0, 4)), slice(4, 7), slice(0, 7)]
    return [float(np.square(t[:, p] - r[:, p]).sum() / np.square(r[:, p]).sum()) for p in parts]


def _mean_part_nsr(fp32: onnx.ModelProto, int8: onnx.ModelProto, x: np.ndarray) -> float:
    return float(np.mean(_part_nsrs(fp32, int8, x)[:2]))


@pytest.fixture(scope="module")
def head():
    rng = np.random.default_rng(5)
    model = _head_model(rng)
    x = rng.normal(0, 1, (24, 3, 8, 8)).astype(np.float32)
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))
    return cal, x


def test_noise_signal_of_parts_is_the_mean_of_each_parts_ratio():
    from quantkit.debug.sensitivity import _noise_signal, _ratio, part_energy

    rng = np.random.default_rng(2)
    refs = [np.concatenate([rng.uniform(0, 640, (4, 4, 9)), rng.uniform(0, 1, (4, 2, 9))], axis=1) for _ in range(3)]
    tests = [r + np.concatenate([np.full((4, 4, 9), 0.5), np.full((4, 2, 9), 0.05)], axis=1) for r in refs]
    energy = part_energy(refs, [4, 2])
    noise = signal = 0.0
    for r, t in zip(refs, tests):
        n, s = _noise_signal(r, t, [4, 2], energy)
        noise, signal = noise + n.sum(), signal + s.sum()
    r, t = np.concatenate(refs), np.concatenate(tests)
    want = np.mean([np.square(t[:, p] - r[:, p]).sum() / np.square(r[:, p]).sum() for p in (slice(0, 4), slice(4, 6))])
    assert _ratio(noise, signal) == pytest.approx(want, rel=1e-9)
    whole = _ratio(*(float(v.sum()) for v in _noise_signal(r, t)))
    assert want > 100 * whole  # the box pixels alone would hide the scores' error
    assert part_energy(refs, [4, 3]) is None and part_energy(refs, [6]) is None


def test_per_sample_errors_and_the_ranking_weigh_each_part(head):
    from quantkit.debug.sensitivity import QdqScales, _metric_text, per_sample_errors

    cal, x = head
    scales = QdqScales.from_calibration(cal)
    assert scales.measured_parts == [4, 3] and "mean over its 2 Concat parts" in _metric_text(scales)
    errors, total, _ = per_sample_errors(scales, ArraySource(x), range(len(x)))
    assert total == pytest.approx(_mean_part_nsr(cal.model, cal.int8_model(), x), rel=1e-6)
    assert len(errors) == len(x) and all(e >= 0 for e in errors.values())


def test_the_fallbacks_sqnr_metric_holds_every_part_to_the_budget(head):
    """The budget's figure is the worst part's (an anchor-split detector's heads at 30.3 and 17.9 dB
    read 20.8 dB as their mean, inside a budget that the whole output, as `compare` measures it,
    missed); the per-sample errors the ranking reads stay the mean of the parts'."""
    from quantkit.debug.fallback import _Evaluator
    from quantkit.debug.sensitivity import QdqScales

    cal, x = head
    scales = QdqScales.from_calibration(cal)
    ev = _Evaluator(scales, ArraySource(x), range(len(x)), "sqnr")
    m = ev.measure(cal.int8_model())
    boxes, scores, whole = _part_nsrs(cal.model, cal.int8_model(), x)
    assert m.drop == pytest.approx(100 * max(boxes, scores), rel=1e-6)
    assert m.drop >= 100 * whole and m.metric == pytest.approx(-10 * np.log10(max(boxes, scores)), rel=1e-6)
    assert m.noise / m.signal == pytest.approx(_mean_part_nsr(cal.model, cal.int8_model(), x), rel=1e-6)
    assert m.drop > 100 * m.noise / m.signal  # the parts differ: the mean would read lower


def test_the_gradient_estimate_weighs_each_part(head):
    pytest.importorskip("torch")
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.debug.gradient import gradient_estimate
    from quantkit.debug.sensitivity import QdqScales
    from quantkit.ptq import evaluation_batches

    cal, x = head
    scales = QdqScales.from_calibration(cal)
    batches = list(evaluation_batches(ArraySource(x), scales.specs, list(range(len(x))), scales.run))
    with OrtRunner(cal.model) as r:
        refs = [r.infer(b.feed)["out"][: b.size] for b in batches]
    est = gradient_estimate(scales, batches, refs, precision="float32")
    assert est.noise / est.signal == pytest.approx(_mean_part_nsr(cal.model, cal.int8_model(), x), rel=0.05)


def test_the_fallbacks_result_says_the_parts_are_held_to_the_budget(head):
    from quantkit.debug.fallback import FallbackConfig, fallback

    cal, x = head
    res = fallback(cal, ArraySource(x), range(len(x)), FallbackConfig(max_drop=100.0, drop_metric="sqnr"))
    assert res.met and res.output_parts == 2 and res.to_dict()["output_parts"] == 2
    res = fallback(cal, ArraySource(x), range(len(x)), FallbackConfig(max_drop=100.0, drop_metric="cosine"))
    assert res.output_parts == 0 and "output_parts" not in res.to_dict()
