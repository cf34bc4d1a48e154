"""The pieces of benchmarks/debug_fallback.py and benchmarks/lossy_models.py that do not need the
fallback itself: the outlier rewrite keeps the FP32 function, the float-layer count, the targets."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import debug_fallback  # noqa: E402
import lossy_models  # noqa: E402


def conv_relu_conv(rng: np.random.Generator) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 (4 ch, bias) -> Relu -> MaxPool -> conv2 (5 ch) -> y."""
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(5, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4, 4])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    if outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend([helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_outlier_channel_keeps_the_fp32_function_and_makes_one_channel_large():
    rng = np.random.default_rng(0)
    plain = conv_relu_conv(rng)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    out = lossy_models.add_outlier_channel(plain, "conv1", "conv2", channel=2, factor=256.0)
    y0, r0 = run(plain, x, ["r1"])
    y1, r1 = run(out, x, ["r1"])
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * float(np.abs(y0).max()))
    # channel 2 of the tensor between the convs is 256x larger, the others unchanged
    np.testing.assert_allclose(r1[:, 2], 256.0 * r0[:, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r1[:, [0, 1, 3]], r0[:, [0, 1, 3]])
    # the input model is not modified
    assert np.array_equal(numpy_helper.to_array(plain.graph.initializer[0]),
                          numpy_helper.to_array(conv_relu_conv(np.random.default_rng(0)).graph.initializer[0]))


def test_outlier_channel_costs_plain_ptq_accuracy_that_one_float_group_restores():
    """The premise of the benchmark's synthetic model, on the tiny graph: per-tensor INT8 of the
    outlier tensor ruins the output; leaving conv2 (its activation and weight) in float does not.
    (Pointwise equalization, quantkit's default, resolves such a channel by itself: off here.)"""
    import quantkit
    from quantkit.datasets import NumpySource
    from quantkit.ptq import QuantizeConfig, StatsConfig

    rng = np.random.default_rng(1)
    model = lossy_models.add_outlier_channel(conv_relu_conv(rng), "conv1", "conv2", channel=2, factor=256.0)
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)

    def sqnr(int8: onnx.ModelProto) -> float:
        ref, test = run(model, x)[0], run(int8, x)[0]
        return 10 * np.log10((ref ** 2).sum() / ((ref - test) ** 2).sum())

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "x.npz"
        np.savez(npz, x=x)
        src = NumpySource(npz)
        plain = quantkit.quantize(model, src, QuantizeConfig(stats=StatsConfig(equalize_pointwise=False)))
        excluded = quantkit.quantize(model, src, QuantizeConfig(stats=StatsConfig(exclude=("conv2",),
                                                                                  equalize_pointwise=False)))
    assert sqnr(plain.int8_model()) < 15.0
    assert sqnr(excluded.int8_model()) > sqnr(plain.int8_model()) + 10.0
    assert debug_fallback.float_weighted_ops(excluded.int8_model()) == ["conv2"]
    assert debug_fallback.float_weighted_ops(plain.int8_model()) == []


def _row(qk_groups: int, met: bool, qk_s: float, nncf_s: float, nncf_float: int) -> debug_fallback.Row:
    case = debug_fallback.Case("m", Path("m.onnx"), "x", Path("c.npz"), Path("e.npz"))
    qk = {"met": met, "metric": 99.0, "float_groups": [f"g{i}" for i in range(qk_groups)], "num_groups": 12,
          "seconds": qk_s, "ranking_cost": 2.5, "float_ops": qk_groups, "steps": []}
    nncf = {"metric": 99.1, "reverted": nncf_float, "quantized_ops": 12, "float_ops": nncf_float, "wall": nncf_s,
            "seconds": nncf_s - 2}
    return debug_fallback.Row(case, fp32=99.4, ptq=90.0, ptq_float_ops=0, qk=qk, nncf=nncf)


@pytest.mark.parametrize("groups,met,nncf_s,expect", [
    (1, True, 50.0, ["**met**", "**met**", "**met**"]),      # 1/12 in float, NNCF reverts 2, 10x slower
    (2, True, 20.0, ["**not met**", "**met**", "**not met**"]),   # 2/12 = 17% > 10%; only 4x faster
    (1, False, 50.0, ["**not met**", "**met**", "**met**"]),  # the budget was not met
])
def test_targets_follow_the_numbers(groups, met, nncf_s, expect):
    lines = debug_fallback.table([_row(groups, met, 5.0, nncf_s, 2)], 0.5)
    target = next(ln for ln in lines if ln.startswith("| m | **"))
    assert [c.strip() for c in target.strip("|").split("|")[1:]] == expect


def test_quantkit_column_says_why_when_the_fallback_is_missing():
    row = _row(1, True, 5.0, 50.0, 2)
    row.qk = {"error": "not available: ImportError: No module named 'quantkit.debug.fallback'"}
    text = "\n".join(debug_fallback.table([row], 0.5))
    assert "not available: ImportError" in text
