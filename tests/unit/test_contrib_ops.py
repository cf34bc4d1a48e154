"""ONNX Runtime's fused ops (com.microsoft FusedConv, FusedGemm, FusedMatMul), as a model saved
after ONNX Runtime's graph optimizations holds them (the fifth probe's MarbleNet: six FusedConvs
left in float without a word, and written into a model TensorRT's parser cannot read)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from quantkit.onnx.contrib import CONTRIB, standard_ops

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid(CONTRIB, 1)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _conv_model(activation: str | None, params: list[float], with_sum: bool) -> onnx.ModelProto:
    w = nh.from_array(RNG.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w")
    b = nh.from_array(RNG.normal(0, 0.3, 8).astype(np.float32), "b")
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1]}
    if activation is not None:
        attrs.update(activation=activation, **({"activation_params": params} if params else {}))
    inputs = ["x", "w", "b", *(["z"] if with_sum else [])]
    nodes = [h.make_node("FusedConv", inputs, ["y"], name="fc", domain=CONTRIB, **attrs)]
    ins = [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])]
    if with_sum:
        ins.append(h.make_tensor_value_info("z", T.FLOAT, ["N", 8, 6, 6]))
    return _model(nodes, ins, [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 6, 6])], [w, b])


@pytest.mark.parametrize("activation, params", [(None, []), ("Relu", []), ("LeakyRelu", [0.1]), ("Clip", [-0.5, 0.7]),
                                                ("HardSigmoid", [0.3, 0.4]), ("Sigmoid", []), ("Tanh", [])])
@pytest.mark.parametrize("with_sum", [False, True])
def test_a_fused_conv_is_the_conv_sum_and_activation_it_fuses(activation, params, with_sum):
    model = _conv_model(activation, params, with_sum)
    feed = {"x": RNG.normal(0, 1, (2, 4, 6, 6)).astype(np.float32)}
    if with_sum:
        feed["z"] = RNG.normal(0, 1, (2, 8, 6, 6)).astype(np.float32)
    std = standard_ops(model)
    onnx.checker.check_model(std)
    assert not any(n.domain == CONTRIB for n in std.graph.node) and CONTRIB not in [o.domain for o in std.opset_import]
    np.testing.assert_allclose(_run(std, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_a, trans_b, alpha", [(0, 0, 1.0), (0, 1, 0.5), (1, 0, 2.0), (1, 1, 0.125)])
def test_a_fused_matmul_is_its_transposes_product_and_scale(trans_a, trans_b, alpha):
    a_shape = (2, 3, 5, 4) if trans_a else (2, 3, 4, 5)
    b = nh.from_array(RNG.normal(0, 1, (6, 5) if trans_b else (5, 6)).astype(np.float32), "b")
    nodes = [h.make_node("FusedMatMul", ["a", "b"], ["y"], name="fm", domain=CONTRIB, alpha=alpha, transA=trans_a,
                         transB=trans_b)]
    model = _model(nodes, [h.make_tensor_value_info("a", T.FLOAT, list(a_shape))],
                   [h.make_tensor_value_info("y", T.FLOAT, [2, 3, 4, 6])], [b])
    feed = {"a": RNG.normal(0, 1, a_shape).astype(np.float32)}
    std = standard_ops(model)
    onnx.checker.check_model(std)
    assert not any(n.domain == CONTRIB for n in std.graph.node)
    np.testing.assert_allclose(_run(std, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_fused_gemm_is_the_gemm_and_activation_it_fuses():
    w = nh.from_array(RNG.normal(0, 0.3, (6, 5)).astype(np.float32), "w")
    c = nh.from_array(RNG.normal(0, 0.3, 6).astype(np.float32), "c")
    nodes = [h.make_node("FusedGemm", ["x", "w", "c"], ["y"], name="fg", domain=CONTRIB, transB=1, alpha=0.5,
                         activation="LeakyRelu", activation_alpha=0.2)]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 5])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])], [w, c])
    feed = {"x": RNG.normal(0, 1, (4, 5)).astype(np.float32)}
    std = standard_ops(model)
    assert [n.op_type for n in std.graph.node] == ["Gemm", "LeakyRelu"]
    np.testing.assert_allclose(_run(std, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_other_contrib_ops_stay_and_are_named(caplog):
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]),
             h.make_node("FastGelu", ["m"], ["y"], name="gelu", domain=CONTRIB)]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
                   [nh.from_array(RNG.normal(0, 1, (4, 4)).astype(np.float32), "w")])
    with caplog.at_level(logging.WARNING):
        std = standard_ops(model, name="m.onnx")
    assert [n.op_type for n in std.graph.node] == ["MatMul", "FastGelu"] and CONTRIB in [o.domain for o in std.opset_import]
    assert "m.onnx: 1 node(s) of ONNX Runtime's own domain (com.microsoft: FastGelu)" in caplog.text


def _fused_then_conv() -> onnx.ModelProto:
    """FusedConv (Relu) 'fc' -> Conv 'c2' -> out [N, 4, 6, 6]: the FusedConv's input and output quantized."""
    model = _conv_model("Relu", [], False)
    model.graph.node.append(h.make_node("Conv", ["y", "w2"], ["out"], name="c2", pads=[1, 1, 1, 1]))
    model.graph.initializer.append(nh.from_array(RNG.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2"))
    del model.graph.output[:]
    model.graph.output.append(h.make_tensor_value_info("out", T.FLOAT, ["N", 4, 6, 6]))
    return model


def test_calibrate_quantizes_a_fused_conv_and_writes_standard_ops(tmp_path):
    from quantkit.cli import main

    onnx.save(_fused_then_conv(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 4, 6, 6)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    int8 = onnx.load(str(tmp_path / "o" / "m.int8.onnx"))
    assert not any(n.domain == CONTRIB for n in int8.graph.node)
    fc = next(n for n in int8.graph.node if n.name == "fc")  # the former FusedConv: a Conv reading Q/DQ
    producers = {o: n.op_type for n in int8.graph.node for o in n.output}
    assert fc.op_type == "Conv" and producers[fc.input[0]] == "DequantizeLinear" and producers[fc.input[1]] == \
        "DequantizeLinear"


def test_debug_reads_a_reference_with_fused_ops(tmp_path, capsys):
    """`debug`'s FP32 reference is the user's model, FusedConv and all: matched to the INT8
    model's standard Conv, --rank included."""
    from tests.helpers import calibrate_then_debug

    out = calibrate_then_debug(_fused_then_conv(), RNG.normal(0, 1, (64, 4, 6, 6)).astype(np.float32), tmp_path, capsys)
    assert "output out: SQNR" in out and "fc" in out


def test_inspect_plans_as_calibrate_does(tmp_path, capsys):
    from quantkit.cli import main

    model = _conv_model("Relu", [], False)
    model.graph.node.append(h.make_node("FastGelu", ["y"], ["g"], name="gelu", domain=CONTRIB))
    del model.graph.output[:]
    model.graph.output.append(h.make_tensor_value_info("g", T.FLOAT, ["N", 8, 6, 6]))
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "com.microsoft): 1 of 2 written as the standard ops they fuse; left as they are" in out and "FastGelu" in out
    assert "Q/DQ plan: 1 activation tensors (per tensor), 1 weights (per channel)" in out


# ---- the adversarial review's findings (twenty-second session) ------------------------------------------------------

@pytest.mark.parametrize("op", ["FusedConv", "FusedMatMul"])
def test_a_model_whose_only_layers_are_fused_ops_calibrates(tmp_path, op):
    """Its layer check ran before the rewrite: "has no Conv, ConvTranspose, Gemm or MatMul nodes"."""
    from quantkit.cli import main

    if op == "FusedConv":
        model = _conv_model("Relu", [], False)
        shape = (64, 4, 6, 6)
    else:
        nodes = [h.make_node("FusedMatMul", ["a", "b"], ["y"], name="fm", domain=CONTRIB, alpha=0.5, transB=1)]
        model = _model(nodes, [h.make_tensor_value_info("a", T.FLOAT, ["N", 5])],
                       [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])],
                       [nh.from_array(RNG.normal(0, 1, (6, 5)).astype(np.float32), "b")])
        shape = (64, 5)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **{model.graph.input[0].name: RNG.normal(0, 1, shape).astype(np.float32)})
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0


def test_new_node_names_do_not_clash_with_the_models_own():
    """A node already named like a new one (``fc_relu``): ONNX Runtime refused the rewritten model."""
    model = _conv_model("Relu", [], False)
    model.graph.node.append(h.make_node("Identity", ["y"], ["y2"], name="fc_relu"))
    del model.graph.output[:]
    model.graph.output.append(h.make_tensor_value_info("y2", T.FLOAT, ["N", 8, 6, 6]))
    std = standard_ops(model)
    names = [n.name for n in std.graph.node]
    assert len(names) == len(set(names))
    feed = {"x": RNG.normal(0, 1, (2, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_run(std, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_sum_input_without_a_bias_is_bias_corrected(tmp_path):
    """FusedConv(x, W, "", Z) became Conv(x, W, ""); bias correction then appended a fourth input and
    its model did not load: the correction was skipped with a warning."""
    import quantkit
    from quantkit.datasets.sources import NumpySource

    model = _conv_model("Relu", [], True)
    model.graph.node[0].input[2] = ""
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 4, 6, 6)).astype(np.float32),
             z=RNG.normal(0, 1, (64, 8, 6, 6)).astype(np.float32))
    std = standard_ops(model)
    assert list(next(n for n in std.graph.node if n.op_type == "Conv").input) == ["x", "w"]
    cal = quantkit.quantize(model, NumpySource(tmp_path / "c.npz"))
    cal.int8_model()
    assert cal.bias_shifts.get(cal.config.method)


def test_a_contrib_op_inside_a_subgraph_keeps_its_opset_import(caplog):
    then = h.make_graph([h.make_node("FusedGemm", ["x", "w"], ["t"], name="in_branch", domain=CONTRIB,
                                     activation="Relu")], "then", [], [h.make_tensor_value_info("t", T.FLOAT, [4, 4])])
    other = h.make_graph([h.make_node("Identity", ["x"], ["e"])], "else", [], [h.make_tensor_value_info("e", T.FLOAT, [4, 4])])
    nodes = [h.make_node("FusedMatMul", ["x", "w"], ["m"], name="top", domain=CONTRIB),
             h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [4, 4]), h.make_tensor_value_info("c", T.BOOL, [])],
                   [h.make_tensor_value_info("y", T.FLOAT, [4, 4]), h.make_tensor_value_info("m", T.FLOAT, [4, 4])],
                   [nh.from_array(RNG.normal(0, 1, (4, 4)).astype(np.float32), "w")])
    with caplog.at_level(logging.WARNING):
        std = standard_ops(model, name="if.onnx")
    onnx.checker.check_model(std)
    assert CONTRIB in [o.domain for o in std.opset_import] and "(com.microsoft: FusedGemm)" in caplog.text


def test_a_fused_matmul_transposing_what_another_fused_op_makes_is_rewritten():
    """Attention's scores in an optimized transformer: FusedMatMul(h, h, transB) where h comes from
    another com.microsoft op, whose rank ONNX's shape inference does not give (ONNX Runtime's does)."""
    nodes = [h.make_node("FusedMatMul", ["x", "w"], ["h"], name="proj", domain=CONTRIB, alpha=0.5),
             h.make_node("FusedMatMul", ["h", "h"], ["s"], name="scores", domain=CONTRIB, transB=1, alpha=0.25)]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 5, 8])],
                   [h.make_tensor_value_info("s", T.FLOAT, ["N", 5, 5])],
                   [nh.from_array(RNG.normal(0, 1, (8, 6)).astype(np.float32), "w")])
    std = standard_ops(model)
    assert not any(n.domain == CONTRIB for n in std.graph.node)
    feed = {"x": RNG.normal(0, 1, (3, 5, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(std, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_the_rank_inference_writes_nothing_where_it_stays_incomplete(tmp_path, monkeypatch):
    """ONNX Runtime's infer_shapes() saves "sym_shape_infer_temp.onnx" into the working directory when
    a shape stays unknown: the user's folder. An op it does not know makes the operand here."""
    monkeypatch.chdir(tmp_path)
    nodes = [h.make_node("NoSuchOp", ["x"], ["u"], name="odd", domain=CONTRIB),
             h.make_node("FusedMatMul", ["u", "w"], ["y"], name="fm", domain=CONTRIB, transA=1)]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, None)],
                   [nh.from_array(RNG.normal(0, 1, (4, 4)).astype(np.float32), "w")])
    standard_ops(model, warn=False)
    assert list(tmp_path.iterdir()) == []


def test_onnx_runtime_layout_ops_are_refused_and_other_domains_namesakes_stay_float(tmp_path, capsys):
    """A model ONNX Runtime saved at ORT_ENABLE_ALL holds com.microsoft.nchwc Convs whose weights are
    in its blocked order: calibrate took them for ONNX Convs (per-channel scales along another
    tensor's rows, bias correction) without a word, and wrote them into the model for TensorRT."""
    import onnxruntime as ort

    from quantkit.cli import main
    from quantkit.onnx.qdq import plan_qdq
    from tests.helpers import make_residual_model

    onnx.save(make_residual_model(), tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "all.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    saved = onnx.load(tmp_path / "all.onnx")
    if not any(n.domain == "com.microsoft.nchwc" for n in saved.graph.node):
        pytest.skip("this ONNX Runtime wrote no NCHWc ops (a CPU without the blocked kernels)")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "all.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "com.microsoft.nchwc" in err and "ORT_ENABLE_EXTENDED" in err, err
    assert not (tmp_path / "o").exists()
    # an op of another domain that has a standard op's name is that domain's op: no Q/DQ for it
    m = make_residual_model()
    conv = next(n for n in m.graph.node if n.name == "conv2")
    conv.domain = "example.custom"
    m.opset_import.append(onnx.helper.make_opsetid("example.custom", 1))
    assert "conv2" not in {c for cs in plan_qdq(m).activations.values() for c in cs}
    assert "conv1" in {c for cs in plan_qdq(m).activations.values() for c in cs}
