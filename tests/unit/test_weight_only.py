"""Weight-only quantized models: int8 weights behind a DequantizeLinear, float activations, no
QuantizeLinear (the fifth probe's SFace and YuNet, opset 21, per block; refused before as
"already quantized", with no FP32 model to calibrate instead)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from quantkit.errors import ModelError
from quantkit.onnx.model import check_not_quantized, fold_weight_dequantize

RNG = np.random.default_rng(0)


def _model(form: str, *, activation_q: bool = False) -> onnx.ModelProto:
    """x [N, 16, 8, 8] -> Conv(DQ(int8 weight), DQ(int32 bias)) -> Relu -> y: the weight stored
    [8, 144] and reshaped to [8, 16, 3, 3] after its DequantizeLinear, quantized per tensor, per
    output channel, or in blocks of 32 along its inputs (opset 21)."""
    wq = RNG.integers(-127, 128, (8, 144)).astype(np.int8)
    if form == "tensor":
        scale, attrs = np.array(0.01, np.float32), {}
    elif form == "axis":
        scale, attrs = RNG.uniform(0.005, 0.02, 8).astype(np.float32), {"axis": 0}
    else:
        scale, attrs = RNG.uniform(0.005, 0.02, (8, 5)).astype(np.float32), {"axis": 1, "block_size": 32}
    zero = np.zeros(scale.shape, np.int8)
    bq = RNG.integers(-1000, 1000, 8).astype(np.int32)
    inits = [nh.from_array(wq, "wq"), nh.from_array(scale, "ws"), nh.from_array(zero, "wz"), nh.from_array(bq, "bq"),
             nh.from_array(np.array(1e-4, np.float32), "bs"), nh.from_array(np.array([8, 16, 3, 3], np.int64), "shape")]
    nodes = [h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w2d"], name="dq_w", **attrs),
             h.make_node("Reshape", ["w2d", "shape"], ["w"]),
             h.make_node("DequantizeLinear", ["bq", "bs"], ["b"], name="dq_b"),
             h.make_node("Conv", ["xin", "w", "b"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["y"])]
    if activation_q:  # a real Q/DQ model: the activation quantized too
        inits.append(nh.from_array(np.array(0.05, np.float32), "xs"))
        nodes[:0] = [h.make_node("QuantizeLinear", ["x", "xs"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "xs"], ["xin"])]
    else:
        nodes.insert(0, h.make_node("Identity", ["x"], ["xin"]))
    model = h.make_model(h.make_graph(nodes, "wo", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16, 8, 8])],
                                      [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 8, 8])], inits),
                         opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("form", ["tensor", "axis", "block"])
def test_a_weight_only_model_is_its_dequantized_fp32_model(form):
    model = _model(form)
    folded = fold_weight_dequantize(model)
    assert not any(n.op_type == "DequantizeLinear" for n in folded.graph.node)
    assert {i.name for i in folded.graph.initializer} >= {"w2d", "b"} and "wq" not in {i.name for i in folded.graph.initializer}
    check_not_quantized(folded)  # (the model itself is refused: it has DequantizeLinear nodes)
    with pytest.raises(ModelError):
        check_not_quantized(model)
    x = RNG.normal(0, 1, (2, 16, 8, 8)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (model, folded)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_a_model_that_quantizes_activations_too_is_still_refused():
    model = _model("axis", activation_q=True)
    assert fold_weight_dequantize(model) is model
    with pytest.raises(ModelError, match="already quantized"):
        check_not_quantized(fold_weight_dequantize(model))


def test_calibrate_takes_a_weight_only_model(tmp_path, capsys):
    from quantkit.cli import main

    onnx.save(_model("block"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 16, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    assert "2 activations" not in capsys.readouterr().err
    int8 = onnx.load(str(tmp_path / "o" / "m.int8.onnx"))
    conv = next(n for n in int8.graph.node if n.op_type == "Conv")
    producers = {o: n for n in int8.graph.node for o in n.output}
    dq = producers[conv.input[1]]  # the weight: quantkit's per-channel DequantizeLinear of an int8 initializer
    assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 0
    assert producers[conv.input[0]].op_type == "DequantizeLinear"  # and the activation


def test_debug_reads_a_weight_only_reference_and_its_int8_model(tmp_path, capsys):
    """The FP32 reference of `debug` is the user's weight-only model: its DequantizeLinear weights
    are its float weights there too (it was refused as "given as the FP32 reference, has
    QuantizeLinear/DequantizeLinear nodes"), --rank included."""
    from tests.helpers import calibrate_then_debug

    out = calibrate_then_debug(_model("axis"), RNG.normal(0, 1, (64, 16, 8, 8)).astype(np.float32), tmp_path, capsys)
    assert "output y: SQNR" in out


def test_inspect_says_a_model_is_weight_only(tmp_path, capsys):
    from quantkit.cli import main

    onnx.save(_model("block"), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "weight-only quantized: 2 DequantizeLinear weight(s)" in out and "already quantized" not in out
    assert "Q/DQ plan: 1 activation tensors (per tensor), 1 weights (per channel)" in out


def test_an_output_dtype_of_opset_23_is_the_folded_weights_type():
    """DequantizeLinear(int8, float16 scale, output_dtype=FLOAT) folded to float16: "Conv bound to
    different types"."""
    from quantkit.onnx.model import _dequantize

    node = h.make_node("DequantizeLinear", ["q", "s"], ["w"], output_dtype=T.FLOAT)
    out = _dequantize(node, [np.array([[2, -4]], np.int8), np.array(0.5, np.float16)])
    assert out.dtype == np.float32 and out.tolist() == [[1.0, -2.0]]


def test_a_folded_initializer_listed_as_a_graph_input_leaves_the_inputs():
    """IR-3 style: the int8 weight an initializer and a graph input too; the folded model asked for it."""
    model = _model("axis")
    model.graph.input.append(h.make_tensor_value_info("wq", T.INT8, [8, 144]))
    folded = fold_weight_dequantize(model)
    assert [i.name for i in folded.graph.input] == ["x"]


def test_the_refusal_of_a_quantized_model_names_the_activations_node():
    model = _model("axis", activation_q=True)
    with pytest.raises(ModelError, match="node 'xq'"):  # its QuantizeLinear (unnamed: its output), not dq_w
        check_not_quantized(model)
