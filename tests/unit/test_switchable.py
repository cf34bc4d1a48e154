"""The switchable model (every group behind an input) against the Q/DQ model of each state."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.onnxruntime import OrtRunner, session_options
from quantkit.debug.sensitivity import plan_without, quant_groups
from quantkit.debug.switchable import fake_quantized_weight, switchable_model
from quantkit.onnx.qdq import insert_qdq, plan_qdq
from tests.helpers import make_residual_model


def _run(model, feed):
    """All outputs, Q/DQ as ONNX defines it (graph optimizations off)."""
    sess = ort.InferenceSession(model.SerializeToString(), session_options(optimization="none"),
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


def gemm_transa_model() -> onnx.ModelProto:
    """x [4, N] -> Gemm(transA=1, W [4, 3]) -> y [N, 3]: its rows are not x's rows (Where path)
    -> Relu -> Gemm(W2 [3, 2]) -> z [N, 2] (rows split)."""
    r = np.random.default_rng(4)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm_t", transA=1),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["z"], name="gemm")]
    inits = [numpy_helper.from_array(r.normal(size=s).astype(np.float32), n)
             for n, s in (("w", (4, 3)), ("b", (3,)), ("w2", (3, 2)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "N"])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fake_quantized_weight_is_the_qdq_pair_of_onnx():
    from quantkit.calibrators.weights import per_channel_amax, scale_from_amax

    w = np.random.default_rng(0).normal(size=(5, 3, 2, 2)).astype(np.float32)
    w[2] = 0.0  # an all-zero channel: scale 1
    w[1, 0, 0, 0] = 4.0  # an outlier: the other values of its channel round coarsely
    for axis in (0, 1):
        scale = scale_from_amax(per_channel_amax(w, axis))
        zero = np.zeros(scale.shape, np.int8)
        nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=axis),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], axis=axis)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
                                  [helper.make_tensor_value_info("dq", TensorProto.FLOAT, w.shape)],
                                  [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
        dq = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"w": w})[0]
        np.testing.assert_array_equal(fake_quantized_weight(w, axis), dq)


@pytest.mark.parametrize("builder", ["residual", "concat", "siblings", "gemm_transa"])
def test_every_state_equals_the_qdq_model_of_that_state(builder):
    from tests.unit.test_placement import concat_model, siblings_model

    model = {"residual": make_residual_model, "concat": concat_model, "siblings": siblings_model,
             "gemm_transa": gemm_transa_model}[builder]()
    plan = plan_qdq(model)
    groups = quant_groups(model, plan)
    switch = switchable_model(model, plan, groups)
    rng = np.random.default_rng(7)
    inp = model.graph.input[0]
    shape = [d.dim_value or 6 for d in inp.type.tensor_type.shape.dim]
    feed = {inp.name: rng.normal(size=shape).astype(np.float32)}
    with OrtRunner(model, capture=list(plan.activations)) as r:
        _, acts = r.infer_captured(feed)
    if builder == "gemm_transa":
        assert switch.on, "the transA Gemm switches its weight through a Where"
    # the feed is exactly the switch inputs the model declares (a runner checks it strictly)
    declared = {i.name for i in switch.model.graph.input} - {i.name for i in model.graph.input}
    assert set(switch.feed(set(), {t: 1.0 for t in plan.activations})) == declared
    names = [g.name for g in groups]
    states = [set(), set(names)] + [{n for n in names if rng.random() < 0.5} for _ in range(6)]
    for on in states:
        amax = {t: float(np.abs(a).max()) * rng.uniform(0.3, 1.0) for t, a in acts.items()}  # clipping too
        off = [g for g in groups if g.name not in on]
        want_plan = plan_without(model, plan, off)
        want_model = insert_qdq(model, want_plan, amax) if want_plan.activations or want_plan.weights else model
        want = _run(want_model, feed)
        got = _run(switch.model, {**feed, **switch.feed(on, amax)})
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{builder}: {sorted(on)}")
    # all off: the FP32 model
    for w, g in zip(_run(model, feed), _run(switch.model, {**feed, **switch.feed(set(), amax)})):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_a_group_switched_only_through_where_declares_no_unused_input():
    """An activation of unknown rank (a Reshape to a shape fed at run time) is switched through a
    Where, not split by rows: its group reads no select input, so none is declared or fed (the
    runner checks a feed strictly; seen on the PP-OCR recogniser's attention MatMuls)."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"], name="reshape"),
             helper.make_node("MatMul", ["a", "a"], ["y"], name="attn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9]),
                                           helper.make_tensor_value_info("s", TensorProto.INT64, ["k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = plan_qdq(model)
    assert plan.activations, "the MatMul's activation input is planned"
    switch = switchable_model(model, plan, quant_groups(model, plan))
    amax = {t: 2.0 for t in plan.activations}
    declared = {i.name for i in switch.model.graph.input} - {"x", "s"}
    for on in (set(), {g.name for g in quant_groups(model, plan)}):
        feed = switch.feed(on, amax)
        assert set(feed) == declared
        x = np.random.default_rng(0).normal(size=(2, 9)).astype(np.float32)
        with OrtRunner(switch.model) as r:  # a strict runner: the feed matches the inputs
            got = r.infer({"x": x, "s": np.array([2, 3, 3]), **feed})
        a = x.reshape(2, 3, 3)
        if on:
            scale = np.float32(2.0 / 127)
            a = np.clip(np.rint(a / scale), -128, 127) * scale
        np.testing.assert_allclose(next(iter(got.values())), a @ a, rtol=1e-5, atol=1e-5)
