import numpy as np
import onnx
import pytest

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.datasets import SyntheticSource
from quantkit.errors import ModelError
from quantkit.onnx.model import ensure_opset, input_specs, opset_version
from quantkit.onnx.qdq import insert_qdq, plan_qdq
from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize
from tests.helpers import make_residual_model


def test_plan_follows_tensorrt_rules(residual_model):
    plan = plan_qdq(residual_model)
    # inputs of weighted ops + the residual input of the Add that follows conv2
    assert plan.activations == {
        "x": ("conv1",), "r1": ("conv2", "add1"), "r2": ("convt",), "fl": ("gemm",), "g": ("matmul",),
    }
    assert plan.weights == {
        "w1": (0, ("conv1",)), "w2": (0, ("conv2",)), "wt": (1, ("convt",)),
        "wg": (0, ("gemm",)), "wm": (1, ("matmul",)),
    }
    assert "y" not in plan.activations  # never on network outputs


def test_insert_runs_in_ort_and_keeps_io(residual_model):
    plan = plan_qdq(residual_model)
    q = insert_qdq(residual_model, plan, {t: 3.0 for t in plan.activations})
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == len(plan.activations) + len(plan.weights)
    assert [(s.name, s.shape) for s in input_specs(q)] == [("x", ("N", 3, 8, 8))]
    assert [o.name for o in q.graph.output] == ["y"]
    # weights stay float, with per-channel Q/DQ
    wq = next(n for n in q.graph.node if n.name == "wt_QuantizeLinear")
    assert next(a.i for a in wq.attribute if a.name == "axis") == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = OrtRunner(q).infer({"x": x})["y"]
    assert out.shape == (2, 4) and np.all(np.isfinite(out))


def test_calibrated_int8_close_to_fp32(residual_model):
    src = SyntheticSource((3, 8, 8), count=96)
    cal = quantize(residual_model, src, QuantizeConfig(run=RunConfig(batch_size=32)))
    assert cal.num_samples == 96
    x = np.stack([src.load(i) for i in range(32)])
    ref = OrtRunner(residual_model).infer({"x": x})["y"]
    for method in ("minmax", "mse", "entropy"):
        q = OrtRunner(cal.int8_model(method)).infer({"x": x})["y"]
        cos = (ref * q).sum() / np.linalg.norm(ref) / np.linalg.norm(q)
        assert cos > 0.99, method


def test_opset_upgrade_from_11():
    m = make_residual_model(opset=11)
    up = ensure_opset(m)
    assert opset_version(up) == 13
    assert opset_version(insert_qdq(up, plan_qdq(up), {t: 1.0 for t in plan_qdq(up).activations})) == 13


def test_opset_upgrade_keeps_unnamed_dims():
    """Converting opset 11 to 13 must not name the unknown batch dims of the inputs and outputs
    (the converter wrote 'unk__0' on the output, so the Q/DQ model's outputs differed)."""
    m = make_residual_model(opset=11)
    for vi in (*m.graph.input, *m.graph.output):
        vi.type.tensor_type.shape.dim[0].Clear()
    up = ensure_opset(m)
    assert [vi.type for vi in (*up.graph.input, *up.graph.output)] == [vi.type for vi in (*m.graph.input, *m.graph.output)]
    q = insert_qdq(up, plan_qdq(up), {t: 1.0 for t in plan_qdq(up).activations})
    assert not q.graph.output[0].type.tensor_type.shape.dim[0].HasField("dim_param")
    # nor the intermediate tensors', which ONNX Runtime propagates to the outputs it reports
    import onnxruntime as ort

    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.shape for o in sess.get_outputs()] == [[None, 4]]


def test_unreadable_model_error_is_one_line(tmp_path):
    """onnx.load's parse errors span lines (a .json file is parsed as JSON ModelProto); the
    ModelError is one line."""
    from quantkit.onnx.model import load_model

    p = tmp_path / "ranges.json"
    p.write_text('{"method": "entropy"}')
    with pytest.raises(ModelError, match="is not a readable ONNX model") as e:
        load_model(p)
    assert "\n" not in str(e.value)


def test_already_quantized_refused(residual_model):
    plan = plan_qdq(residual_model)
    q = insert_qdq(residual_model, plan, {t: 1.0 for t in plan.activations})
    with pytest.raises(ModelError, match="already has"):
        plan_qdq(q)


def test_fixed_batch_model_drops_short_tail():
    m = make_residual_model(batch=8)
    cal = quantize(m, SyntheticSource((3, 8, 8), count=20), QuantizeConfig(run=RunConfig(batch_size=32)))
    assert cal.num_samples == 16


def test_nothing_to_quantize():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ModelError, match="nothing to quantize"):
        quantize(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), SyntheticSource((4,), 4))


def test_nan_activation_names_tensor(residual_model):
    from quantkit.errors import NonFiniteError

    m = onnx.ModelProto()
    m.CopyFrom(residual_model)
    # make conv1's bias NaN: every activation after it is NaN
    for init in m.graph.initializer:
        if init.name == "b1":
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(8, np.nan, np.float32), "b1"))
    with pytest.raises(NonFiniteError, match="'r1' has NaN"):
        quantize(m, SyntheticSource((3, 8, 8), count=8))


def test_onnxruntime_target_quantizes_every_consumed_activation(residual_model):
    """--target onnxruntime: a Q/DQ pair on every float activation a node reads (so ONNX Runtime
    can run integer kernels); weights as for TensorRT; the model still agrees with FP32."""
    from quantkit.onnx.model import float_activations

    trt_plan, ort_plan = plan_qdq(residual_model), plan_qdq(residual_model, "onnxruntime")
    consumed = {t for n in residual_model.graph.node for t in n.input} & set(float_activations(residual_model))
    assert set(ort_plan.activations) == consumed - set(ort_plan.weights)
    assert set(trt_plan.activations) < set(ort_plan.activations) and ort_plan.weights == trt_plan.weights
    assert "c1" in ort_plan.activations and "c1" not in trt_plan.activations  # a Conv output, read by Relu
    with pytest.raises(ModelError, match="unknown Q/DQ target"):
        plan_qdq(residual_model, "openvino")

    src = SyntheticSource((3, 8, 8), count=32, seed=1)
    cal = quantize(residual_model, src, QuantizeConfig(StatsConfig(target="onnxruntime"), RunConfig(batch_size=16)))
    assert set(cal.plan.activations) == set(ort_plan.activations)
    q = cal.int8_model("minmax")
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == len(ort_plan.activations) + len(ort_plan.weights)
    x = np.stack([src.load(i) for i in range(16)])
    ref = OrtRunner(residual_model).infer({"x": x})["y"]
    out = OrtRunner(q).infer({"x": x})["y"]
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cos.mean() > 0.99


def _weights_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer given by a Constant node instead (what some
    exporters write)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [onnx.helper.make_node("Constant", [], [i.name], name=f"{i.name}_const", value=i) for i in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def test_constant_node_weights_get_qdq_like_initializers(residual_model):
    """Weights from Constant nodes are quantized per channel exactly as initializers are (they
    used to crash insert_qdq: "'Variable' object has no attribute 'values'")."""
    const_model = _weights_as_constant_nodes(residual_model)
    plan = plan_qdq(const_model)
    assert plan == plan_qdq(residual_model)
    amax = {t: 3.0 for t in plan.activations}
    q, ref = insert_qdq(const_model, plan, amax), insert_qdq(residual_model, plan, amax)
    assert sorted(n.name for n in q.graph.node if n.op_type == "QuantizeLinear") == \
        sorted(n.name for n in ref.graph.node if n.op_type == "QuantizeLinear")
    assert [(s.name, s.shape) for s in input_specs(q)] == [("x", ("N", 3, 8, 8))]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(OrtRunner(q).infer({"x": x})["y"], OrtRunner(ref).infer({"x": x})["y"])
