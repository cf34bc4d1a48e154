"""The ONNX-in-torch executor against ONNX Runtime, and its gradients against finite differences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.onnx.torch_exec import TorchGraph, UnsupportedOpError
from tests.helpers import make_outlier_digits, make_residual_model

torch = pytest.importorskip("torch")


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def cnn_graph(rng):
    """Convolutions with the padding and pooling variants the corpus' CNN exports use."""
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)  # group 3
    w3 = rng.normal(size=(4, 6, 2, 2)).astype(np.float32)
    wt = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    fc = rng.normal(size=(5, 3)).astype(np.float32)
    bn = [rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.normal(size=6).astype(np.float32),
          rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[0, 1, 1, 2], strides=[1, 2]),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], epsilon=1e-3),
        helper.make_node("HardSigmoid", ["n1"], ["h1"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["n1", "h1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], group=3, auto_pad="SAME_UPPER", strides=[2, 1]),
        helper.make_node("HardSwish", ["c2"], ["a2"]),
        helper.make_node("Clip", ["a2", "lo", "hi"], ["k2"]),
        helper.make_node("MaxPool", ["k2"], ["p2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1),
        helper.make_node("AveragePool", ["k2"], ["q2"], kernel_shape=[3, 2], strides=[3, 2], count_include_pad=0,
                         pads=[1, 0, 1, 0]),
        helper.make_node("Resize", ["p2", "", "scales"], ["r2"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], dilations=[2, 1]),
        helper.make_node("ConvTranspose", ["c3", "wt"], ["t3"], strides=[2, 2], output_padding=[1, 1]),
        helper.make_node("Sigmoid", ["t3"], ["s3"]),
        helper.make_node("Pad", ["s3", "pads"], ["d3"], mode="reflect"),
        helper.make_node("GlobalAveragePool", ["d3"], ["g3"]),
        helper.make_node("GlobalMaxPool", ["q2"], ["g4"]),
        helper.make_node("Flatten", ["g3"], ["f3"]),
        helper.make_node("Gemm", ["f3", "fc"], ["y"], transB=1, alpha=0.5),
        helper.make_node("Flatten", ["g4"], ["z"], axis=4),
    ]
    inits = [_init("w1", w1), _init("w2", w2), _init("w3", w3), _init("wt", wt), _init("fc", fc),
             _init("s", bn[0]), _init("b", bn[1]), _init("m", bn[2]), _init("v", bn[3]),
             _init("lo", np.float32(-0.5)), _init("hi", np.float32(3.0)),
             _init("scales", np.array([1, 1, 2, 2], np.float32)), _init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1]))]
    m = _model(nodes, [_f("x", ["N", 3, 17, 20])], [_f("y", None), _f("z", None)], inits)
    return m, {"x": rng.normal(size=(2, 3, 17, 20)).astype(np.float32)}


def transformer_graph(rng):
    """Attention with the shape arithmetic of a torch/tf2onnx export."""
    d, h = 8, 2
    wqkv = rng.normal(size=(d, 3 * d)).astype(np.float32) / 3
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.INT64),
        helper.make_node("Gather", ["emb", "idsf"], ["e"], axis=0),
        helper.make_node("Add", ["x", "e"], ["xe"]),
        helper.make_node("LayerNormalization", ["xe", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "wqkv"], ["qkv"]),
        helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=-1),
        helper.make_node("Concat", ["n1", "minus1", "heads", "hd"], ["hshape"], axis=0),
        helper.make_node("Reshape", ["q", "hshape"], ["qh"]),
        helper.make_node("Reshape", ["k", "hshape"], ["kh"]),
        helper.make_node("Reshape", ["v", "hshape"], ["vh"]),
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["att"]),
        helper.make_node("Div", ["att", "sqrtd"], ["atts"]),
        helper.make_node("Softmax", ["atts"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "back"], ["o2"]),
        helper.make_node("Div", ["o2", "sqrt2"], ["u"]),
        helper.make_node("Erf", ["u"], ["eu"]),
        helper.make_node("Add", ["eu", "one"], ["eu1"]),
        helper.make_node("Mul", ["o2", "eu1"], ["gelu"]),
        helper.make_node("Pow", ["gelu", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Sqrt", ["ms"], ["rms"]),
        helper.make_node("Tanh", ["rms"], ["tr"]),
        helper.make_node("Sub", ["gelu", "tr"], ["g2"]),
        helper.make_node("Slice", ["g2", "st", "en", "ax", "stp"], ["sl"]),
        helper.make_node("Squeeze", ["sl", "zero1"], ["y"]),
    ]
    inits = [_init("emb", rng.normal(size=(10, d)).astype(np.float32)), _init("zero", np.array(0)),
             _init("zero1", np.array([0])), _init("gamma", rng.uniform(0.5, 1.5, d).astype(np.float32)),
             _init("beta", rng.normal(size=d).astype(np.float32)), _init("wqkv", wqkv),
             _init("split", np.array([d, d, d])), _init("minus1", np.array([-1])), _init("heads", np.array([h])),
             _init("hd", np.array([d // h])), _init("sqrtd", np.float32(2.0)), _init("back", np.array([0, 0, -1])),
             _init("sqrt2", np.float32(np.sqrt(2))), _init("one", np.float32(1)), _init("two", np.float32(2)),
             _init("axes", np.array([-1])), _init("st", np.array([-1, 6])), _init("en", np.array([-1000, 0])),
             _init("ax", np.array([1, 2])), _init("stp", np.array([-2, -3]))]
    m = _model(nodes, [_f("x", [1, 5, d]), helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 5])],
               [_f("y", None)], inits, opset=18)
    return m, {"x": rng.normal(size=(1, 5, d)).astype(np.float32),
               "ids": rng.integers(0, 10, size=(1, 5)).astype(np.int32)}


def _ort(m, feed):
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.mark.parametrize("build", ["cnn", "transformer", "residual", "outlier"])
def test_outputs_equal_onnxruntime(build, rng):
    if build == "cnn":
        m, feed = cnn_graph(rng)
    elif build == "transformer":
        m, feed = transformer_graph(rng)
    else:
        m = make_residual_model() if build == "residual" else make_outlier_digits()
        shape = [d.dim_value or 3 for d in m.graph.input[0].type.tensor_type.shape.dim]
        feed = {m.graph.input[0].name: rng.normal(size=shape).astype(np.float32)}
    ref = _ort(m, feed)
    with torch.no_grad():
        out = TorchGraph(m).run(feed)
    assert len(out) == len(ref)
    for r, o in zip(ref, out.values()):
        assert tuple(o.shape) == r.shape
        np.testing.assert_allclose(o.numpy(), r, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(r).max())))


def test_an_op_it_cannot_run_is_named_before_anything_runs(rng):
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Det", ["r"], ["y"])],
               [_f("x", [3, 3])], [_f("y", None)], [])
    with pytest.raises(UnsupportedOpError, match="op Det .*node"):
        TorchGraph(m)


def test_gradients_through_the_graph_equal_finite_differences(rng):
    m, feed = transformer_graph(rng)
    g = TorchGraph(m, dtype=torch.float64)
    ids = torch.from_numpy(feed["ids"])

    def f(x):
        return g.run({"x": x, "ids": ids})["y"]

    x = torch.from_numpy(feed["x"].astype(np.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)
