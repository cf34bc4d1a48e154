"""Equalization of MatMul/Gemm inputs (SmoothQuant's balance, issue 13: a ViT's LayerNorm and GELU
outputs, whose few outlier channels set the per-tensor step): the tensor's last axis scaled, the
weight's rows divided; exact in FP32, better INT8, recorded for `quantkit debug`, the one pass =
the two passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.onnx.equalize import ALPHA_POINTWISE, equalizations_of, equalization_scales
from tests.helpers import ArraySource
from tests.unit.test_equalize import _calibrate, _run, _sqnr
from tests.unit.test_equalize_pointwise import assert_one_pass_equals_two

K = 16
OUTLIERS = (3, 11)  # channels with a 40x larger gain, as a transformer's LayerNorm output has


def linear_model(*, gemm: bool = False) -> onnx.ModelProto:
    """x [N, T, K] (or [N, K] with ``gemm``) -> h = x * g + b (a LayerNorm's affine part, two
    outlier channels, whose weight rows are small) -> two Linear layers read h (MatMul [K, 32] twice, or Gemm with transB=1
    and a MatMul) -> their sum -> Relu -> MatMul [32, 4] -> y."""
    rng = np.random.default_rng(0)
    g = np.full(K, 0.5, np.float32)
    g[list(OUTLIERS)] = 20.0
    inits = [numpy_helper.from_array(g, "g"), numpy_helper.from_array(rng.normal(0, 0.1, K).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 4)).astype(np.float32), "w3")]
    nodes = [helper.make_node("Mul", ["x", "g"], ["xg"], name="gamma"), helper.make_node("Add", ["xg", "b"], ["h"], name="beta")]
    w1 = rng.normal(0, 0.3, (K, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (K, 32)).astype(np.float32)
    w1[list(OUTLIERS)] /= 40.0  # the loud channels' weights are small: every channel counts at the output
    w2[list(OUTLIERS)] /= 40.0
    if gemm:
        inits += [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1"), numpy_helper.from_array(w2, "w2")]
        nodes.append(helper.make_node("Gemm", ["h", "w1"], ["l1"], name="fc1", transB=1))
    else:
        inits += [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
        nodes.append(helper.make_node("MatMul", ["h", "w1"], ["l1"], name="fc1"))
    nodes += [helper.make_node("MatMul", ["h", "w2"], ["l2"], name="fc2"),
              helper.make_node("Add", ["l1", "l2"], ["s"], name="sum"),
              helper.make_node("Relu", ["s"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w3"], ["y"], name="head")]
    shape = ["N", K] if gemm else ["N", 8, K]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4] if not gemm else ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def inputs(n: int, *, gemm: bool = False, seed: int = 0) -> np.ndarray:
    shape = (n, K) if gemm else (n, 8, K)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_fp32_function_unchanged_and_recorded(gemm):
    model = linear_model(gemm=gemm)
    x = inputs(32, gemm=gemm)
    cal = _calibrate(model, x, equalize_pointwise=True)
    e = next(e for e in cal.equalized if e.tensor == "h")
    assert set(e.consumers) == {"fc1", "fc2"} and e.axis == -1 and set(e.weight_axis) == set(e.weights)
    assert sorted(e.weight_axis.values()) == ([0, 1] if gemm else [0, 0])  # Gemm transB: W [N, K]
    assert e.scales.size == K and set(np.argsort(e.scales)[:2]) == set(OUTLIERS)  # the loud channels least raised
    assert sum(n.op_type == "Mul" and n.input[0] == "h" for n in cal.model.graph.node) == 1
    ref = _run(model, x)
    np.testing.assert_allclose(_run(cal.model, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    recorded = next(r for r in equalizations_of(cal.int8_model()) if r.tensor == "h")
    assert recorded.to_dict() == e.to_dict()
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in cal.model.graph.initializer}
    for name, orig in e.weights.items():  # what `quantkit debug` compares the new weight with
        np.testing.assert_allclose(e.original_weight(name, consts[orig].astype(np.float64)), new[name], rtol=1e-6)


def test_factors_balance_activation_and_weight():
    # SmoothQuant's divisor a^0.5 / w^0.5 per channel, as multipliers >= 1 (largest divisor -> 1)
    model = linear_model()
    x = inputs(32)
    cal = _calibrate(model, x, equalize_pointwise=True)
    e = next(e for e in cal.equalized if e.tensor == "h")
    h = x * np.array([20.0 if k in OUTLIERS else 0.5 for k in range(K)], np.float32)
    h = h + numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b"))
    a = np.abs(h).reshape(-1, K).max(axis=0).astype(np.float64)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = np.maximum(np.abs(consts["w1"]).max(axis=1), np.abs(consts["w2"]).max(axis=1))
    expected = equalization_scales(a ** ALPHA_POINTWISE / w ** (1 - ALPHA_POINTWISE), alpha=1.0)
    np.testing.assert_allclose(e.scales, expected, rtol=1e-4)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_int8_output_better(gemm):
    # the small channels round to a few levels of the loud ones' step without equalization
    model = linear_model(gemm=gemm)
    cal_x, val_x = inputs(64, gemm=gemm, seed=0), inputs(64, gemm=gemm, seed=1)
    ref = _run(model, val_x)
    plain = quantkit.quantize(model, ArraySource(cal_x), quantkit.QuantizeConfig(
        quantkit.StatsConfig(equalize_pointwise=False)))
    eq = quantkit.quantize(model, ArraySource(cal_x))  # on by default
    assert not any(e.tensor == "h" for e in plain.equalized) and any(e.tensor == "h" for e in eq.equalized)
    for method in ("entropy", "minmax"):
        before = _sqnr(ref, _run(plain.int8_model(method), val_x))
        after = _sqnr(ref, _run(eq.int8_model(method), val_x))
        assert after > before + 15.0, (method, before, after)  # measured: 11.3 -> 35.7 (entropy), 11.2 -> 35.1


def test_one_pass_with_the_two_pass_statistics(monkeypatch):
    assert_one_pass_equals_two(linear_model(), inputs(40), monkeypatch)


def test_debug_compares_the_equalized_weights_with_the_users():
    from quantkit.datasets.batching import Batcher
    from quantkit.debug import layerwise_error

    model = linear_model()
    x = inputs(32)
    cal = _calibrate(model, x, equalize_pointwise=True)
    e = next(e for e in cal.equalized if e.tensor == "h")
    report = layerwise_error(model, cal.int8_model(), Batcher(ArraySource(x), ["x"], 8))
    assert e.scaled in {p.tensor for p in report.activations}
    matched = [w for w in report.weights if w.tensor in e.weights]
    assert len(matched) == 2 and all(w.sqnr_db > 30.0 for w in matched)


def test_kept_only_where_it_lowers_the_matmuls_own_error(monkeypatch):
    # weight-aware factors exist whenever the weight rows differ, also for an activation without
    # outlier channels (ddddocr's LSTM output, every channel's maximum ~1, into its classifier: its
    # output lost 4 dB). The gate measures the MatMul's own INT8 error on a sample of rows.
    import quantkit.onnx.equalize as eq
    from quantkit.onnx.equalize import linear_gain_db, sample_rows

    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.3, (K, 32)).astype(np.float32)
    nodes = [helper.make_node("Tanh", ["x"], ["h"], name="tanh"), helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = inputs(32) * 3.0
    rows = sample_rows(np.tanh(x))
    harmful = np.linspace(1.0, 8.0, K).astype(np.float32)  # uneven factors on even channels
    assert linear_gain_db(rows, np.ones(K, np.float32), [nodes[1]], {"w": w}) == pytest.approx(0.0, abs=1e-9)
    assert linear_gain_db(rows, harmful, [nodes[1]], {"w": w}) < -3.0
    monkeypatch.setattr(eq, "_linear_scales", lambda *a: harmful)
    assert not any(e.tensor == "h" for e in _calibrate(model, x, equalize_pointwise=True).equalized)
    monkeypatch.undo()
    # the outlier model's tensor passes the same gate by far
    lm, lx = linear_model(), inputs(32)
    consts = {i.name: numpy_helper.to_array(i) for i in lm.graph.initializer}
    hh = lx * np.where(np.isin(np.arange(K), OUTLIERS), 20.0, 0.5).astype(np.float32) + consts["b"]
    readers = [n for n in lm.graph.node if n.name in ("fc1", "fc2")]
    s2 = eq._linear_scales(np.abs(hh).reshape(-1, K).max(axis=0), readers, consts)
    assert linear_gain_db(sample_rows(hh), s2, readers, consts) > 10.0


def test_a_weight_other_tensors_readers_share_is_not_copied_per_tensor():
    # an RNN unrolled into MatMuls over its steps: one weight, a different input tensor each; each
    # tensor's own factors would need its own copy of W (a probe's CRNN: 19 -> 272 MB)
    rng = np.random.default_rng(0)
    steps = 6
    w = rng.normal(0, 0.3, (K, 32)).astype(np.float32)
    g = np.full(K, 0.5, np.float32)
    g[list(OUTLIERS)] = 20.0  # outlier channels: equalized where the weight is not shared
    nodes = [helper.make_node("Split", ["x"], [f"x{t}" for t in range(steps)], axis=1, num_outputs=steps)]
    outs = []
    for t in range(steps):
        nodes += [helper.make_node("Mul", [f"x{t}", "g"], [f"h{t}"]), helper.make_node("MatMul", [f"h{t}", "w"], [f"m{t}"], name=f"mm{t}")]
        outs.append(f"m{t}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1))
    graph = helper.make_graph(nodes, "unrolled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", steps, 32])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what ONNX Runtime 1.30 loads too
    x = np.random.default_rng(1).standard_normal((32, steps, K)).astype(np.float32)
    cal = quantkit.quantize(model, ArraySource(x))
    assert not any(e.weight_axis for e in cal.equalized)
    weights = [i for i in cal.int8_model().graph.initializer if tuple(i.dims) == (K, 32)]
    assert len(weights) == 1  # one weight, not one per step
