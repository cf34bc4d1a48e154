"""Bias correction: the mean error INT8 adds to a Conv's output goes into its bias (issue 13, the
PP-OCR recogniser's zero-sum edge kernels on a text line's flat background)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.ptq import ExportConfig, QuantizeConfig, StatsConfig
from tests.helpers import ArraySource


def _conv_model(w: np.ndarray, *, group: int, bias: np.ndarray | None, pads: int = 0) -> onnx.ModelProto:
    c_out, _, k, _ = w.shape
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=[k, k], pads=[pads] * 4)
    c_in = w.shape[1] * group
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from quantkit.backends.onnxruntime import OrtRunner

    with OrtRunner(model) as r:
        return r.infer({"x": x})["y"].astype(np.float64)


def _zero_sum_edges(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Depthwise 3x3 edge detectors whose taps sum to ~0 (as the recogniser's first depthwise Conv)."""
    w = rng.normal(0, 0.02, (channels, 1, 3, 3))
    w[:, 0, 1, 0], w[:, 0, 1, 2] = 0.37, -0.37
    w -= w.mean(axis=(2, 3), keepdims=True)
    return w


def _flat_background(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """A large per-channel offset (the background) with a little texture on it."""
    offset = np.linspace(8.0, 24.0, channels)[None, :, None, None]
    return (offset + rng.normal(0, 0.3, (n, channels, 12, 12))).astype(np.float32)


def test_zero_sum_kernel_on_an_offset_keeps_its_mean():
    # without correction each channel's output is off by offset x (change of the tap sum): the mean
    # error is 3-10x the output's own spread; with it, the mean error is gone on held-out data
    rng = np.random.default_rng(0)
    model = _conv_model(_zero_sum_edges(rng, 8), group=8, bias=np.zeros(8), pads=1)
    cal_x, val_x = _flat_background(rng, 32, 8), _flat_background(rng, 32, 8)
    ref = _run(model, val_x)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the zero padding is not background

    def mean_error(cal: quantkit.Calibration) -> float:
        err = (_run(cal.int8_model(), val_x) - ref)[interior]
        return float(np.abs(err.mean(axis=(0, 2, 3))).max())

    plain = mean_error(quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=False))))
    on = QuantizeConfig(StatsConfig(bias_correction=True))
    corrected = mean_error(quantkit.quantize(model, ArraySource(cal_x), on))
    assert plain > 0.05, plain  # the effect is there to correct
    assert corrected < 0.2 * plain, (plain, corrected)


@pytest.mark.parametrize("bias", [True, False])
def test_shift_is_the_median_error_and_cancels_it(bias):
    # one grouped 1x1 Conv: the shift is the per-channel median of (uncorrected INT8 - FP32) that
    # ONNX Runtime measures on the calibration data, and the corrected model's median error is ~0
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.0, (6, 2, 1, 1))
    model = _conv_model(w, group=3, bias=rng.normal(0, 1, 6) if bias else None)
    x = (rng.normal(0, 1, (16, 6, 12, 12)) + rng.normal(0, 3, (1, 6, 1, 1))).astype(np.float32)
    plain = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))

    def median_error(m: onnx.ModelProto) -> np.ndarray:
        return np.median(np.moveaxis(_run(m, x) - _run(model, x), 1, 0).reshape(6, -1), axis=1)

    measured = median_error(plain.int8_model())
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    for method in ("entropy", "minmax"):
        corrected_model = cal.int8_model(method)  # measures the method's shifts
        shift = cal.bias_shifts[method]["conv"]
        if method == "entropy":  # a strided sample of the positions: close to the full median
            np.testing.assert_allclose(shift, measured, atol=0.25 * float(np.abs(measured).max()))
        left = median_error(corrected_model)
        assert np.abs(left).max() < 0.3 * np.abs(shift).max(), (method, left, shift)


def test_off_switch_and_fp32_model_unchanged():
    rng = np.random.default_rng(2)
    model = _conv_model(_zero_sum_edges(rng, 4), group=4, bias=None)
    x = _flat_background(rng, 8, 4)
    off = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))
    assert off.int8_model() is not None and off.bias_shifts == {}
    assert StatsConfig().bias_correction  # the default: on
    assert [len(n.input) for n in off.int8_model().graph.node if n.op_type == "Conv"] == [2]
    on = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    (conv,) = [n for n in on.int8_model().graph.node if n.op_type == "Conv"]
    assert conv.input[2] == "conv_bias_corrected"  # a Conv without a bias gets one
    assert len(on.model.graph.node[0].input) == 2  # the FP32 reference keeps its own


def _chain_model(rng: np.random.Generator, channels: int = 8) -> onnx.ModelProto:
    """x -> depthwise zero-sum edges (+bias) -> HardSwish -> 1x1 Conv -> HardSwish -> depthwise edges -> y,
    plus a side 1x1 Conv on x (the same depth as the first Conv): the recogniser's stem in small."""
    c = channels
    inits = [numpy_helper.from_array(_zero_sum_edges(rng, c).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, c).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (c, c, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(_zero_sum_edges(rng, c).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(0, 0.4, (c, c, 1, 1)).astype(np.float32), "ws")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", group=c, kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("HardSwish", ["c1"], ["a1"], name="hs1"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("HardSwish", ["c2"], ["a2"], name="hs2"),
             helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3", group=c, kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["x", "ws"], ["side"], name="side", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 12, 12]),
                               helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", c, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _conv_means(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    from quantkit.backends.onnxruntime import create_session

    names = ["c1", "c2", "y"]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names[:2])
    outs = create_session(m).run(names, {"x": x})
    return {t: o.astype(np.float64)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3)) for t, o in zip(names, outs)}


def test_levels_group_convs_that_do_not_read_each_other():
    from quantkit.onnx.biascorrect import conv_levels

    levels = conv_levels(_chain_model(np.random.default_rng(3)))
    assert [[n.name for n in level] for level in levels] == [["conv1", "side"], ["conv2"], ["conv3"]]


def test_sequential_correction_matches_every_convs_mean_down_a_chain():
    # the later Convs' shifts hold the earlier ones' (a flat background through zero-sum edges and
    # hard-swish): measured in order, every Conv's mean matches FP32 on the correction data, and the
    # output's mean error on held-out data falls well below the uncorrected model's
    rng = np.random.default_rng(6)
    model = _chain_model(rng)
    cal_x, val_x = _flat_background(rng, 32, 8), _flat_background(rng, 32, 8)
    off = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=False)))
    on = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    ref_cal, ref_val = _conv_means(model, cal_x), _conv_means(model, val_x)
    got_cal = _conv_means(on.int8_model(), cal_x)
    spread = {t: float(np.abs(v).max()) + 1e-3 for t, v in ref_cal.items()}
    for t in ("c1", "c2", "y"):  # measured on the whole correction set (zero padding included); border-free here
        assert np.abs(got_cal[t] - ref_cal[t]).max() < 0.1 * spread[t] + 0.02, t
    val_off, val_on = _conv_means(off.int8_model(), val_x), _conv_means(on.int8_model(), val_x)
    for t in ("c1", "c2"):
        err_off, err_on = np.abs(val_off[t] - ref_val[t]).max(), np.abs(val_on[t] - ref_val[t]).max()
        assert err_off > 0.03, (t, err_off)  # the effect is there to correct (0.11, 0.05)
        assert err_on < 0.3 * err_off, (t, err_off, err_on)  # (0.015, 0.003)
    assert np.abs(val_on["y"] - ref_val["y"]).max() < np.abs(val_off["y"] - ref_val["y"]).max()
    assert set(on.bias_shifts["entropy"]) == {"conv1", "conv2", "conv3", "side"}


def test_mixed_precision_variants_are_corrected_too():
    # debug's and the fallback's variants (a group in float) get their own correction, so
    # `--max-drop` measures and writes the same kind of model as plain `calibrate`
    from quantkit.debug.sensitivity import QdqScales

    rng = np.random.default_rng(7)
    model = _chain_model(rng)
    cal_x = _flat_background(rng, 32, 8)
    on = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    off = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=False)))
    ref = _conv_means(model, cal_x)
    for cal, corrected in ((on, True), (off, False)):
        scales = QdqScales.from_calibration(cal)
        last = next(g for g in scales.groups if "conv3" in g.nodes)
        variant = scales.int8_model([last.name])
        names = {i.name for i in variant.graph.initializer}
        assert ("conv2_bias_corrected" in names) == corrected
        err = np.abs(_conv_means(variant, cal_x)["c2"] - ref["c2"]).max()
        assert (err < 0.01) == corrected, err


def test_the_fp32_reference_is_measured_once_per_calibration(monkeypatch):
    # every method's model and every fallback variant is corrected against the same FP32 run: it is
    # made once (the cache) and the corrected models equal those of a fresh calibration
    from quantkit.onnx import biascorrect as bc

    rng = np.random.default_rng(9)
    model = _chain_model(rng)
    cal_x = _flat_background(rng, 32, 8)
    runs = []
    real = bc.reference
    monkeypatch.setattr(bc, "reference", lambda *a, **k: runs.append(1) or real(*a, **k))
    cal = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    for method in ("entropy", "minmax", "percentile"):
        cal.int8_model(method)
    from quantkit.onnx.qdq import insert_qdq

    amax = cal.amax(quantized_only=True)  # a fallback variant (no guard): the guard's reference serves it
    cal.bias_corrected(insert_qdq(cal.model, cal.plan, dict(amax, a1=amax["a1"] * 0.7)))
    assert len(runs) == 1
    # variants with a group in float correct fewer layers (another set of them): the reference of
    # the set before serves them, not a run of their own kept beside it (a probe's BERT grew by
    # 200 MB a fallback step, 2 -> 4.4 GB)
    from quantkit.debug.sensitivity import QdqScales

    scales = QdqScales.from_calibration(cal)
    named = [g.name for g in scales.groups if any(n.startswith("conv") for n in g.nodes)]
    variants = [scales.int8_model([g]) for g in named]
    assert len(named) >= 3 and len(runs) == 1
    assert list(cal._correction_reference) == [bc._REFERENCE_KEY]
    fresh = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    for method in ("minmax", "percentile"):
        fresh.int8_model(method)
        for conv, shift in fresh.bias_shifts[method].items():
            np.testing.assert_array_equal(cal.bias_shifts[method][conv], shift)
    for g, variant in zip(named, variants):  # each variant as a calibration of its own corrects it
        alone = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
        expected = QdqScales.from_calibration(alone).int8_model([g])
        assert [(i.name, i.raw_data) for i in variant.graph.initializer] == \
            [(i.name, i.raw_data) for i in expected.graph.initializer], g


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 4, 4096), (64, 3, 40, 40), (1, 6)])
def test_channel_samples_are_every_kth_position_of_the_channel_major_layout(shape):
    from quantkit.onnx.biascorrect import SAMPLE_POSITIONS, channel_samples

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    n = max(1, shape[0] - 1)
    flat = np.moveaxis(x[:n], 1, 0).reshape(shape[1], -1)  # what it samples, written out in full
    per_row = int(np.prod(shape[2:], dtype=np.int64))
    step = max(1, flat.shape[1] // SAMPLE_POSITIONS)
    while step > 1 and np.gcd(step, per_row) != 1:  # the largest step that visits every position of a row
        step -= 1
    np.testing.assert_array_equal(channel_samples(x, n), flat[:, ::step])


def test_channel_samples_visit_every_column_and_every_channel_of_a_channel_last_output():
    """A step of 64 over [N, C, 64, 64] read column 0 only; of 4 over a channel-last [N, H, W, 4]
    output its first channel only, and the guard read 60 dB for an output at -6.5 dB."""
    from quantkit.onnx.biascorrect import channel_samples, output_samples, output_sqnr

    x = np.arange(32 * 2 * 64 * 64, dtype=np.float32).reshape(32, 2, 64, 64)
    columns = channel_samples(x, 32)[0].astype(np.int64) % 64
    assert len(set(columns.tolist())) == 64
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((32, 64, 64, 4)).astype(np.float32)
    got = ref.copy()
    got[..., 1::2] += 3 * rng.standard_normal(got[..., 1::2].shape).astype(np.float32)
    true = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())
    assert output_sqnr({"y": [output_samples(ref)]}, {"y": [output_samples(got)]}) == pytest.approx(true, abs=1.0)


def test_the_correction_samples_the_same_positions_at_any_batch_size():
    """The positions a shift is estimated on are the whole correction set's, however it is split
    into batches: each batch took 2048 (up to 8192 over four or more), and a tiny CREPE's
    correction moved its output figure by 1 dB between --batch-size 8 and 32, which turned the
    pointwise check's verdict."""
    from quantkit.onnx.biascorrect import SAMPLE_POSITIONS, channel_samples, feed_starts

    x = np.random.default_rng(1).normal(size=(32, 4, 80, 80)).astype(np.float32)
    whole = channel_samples(x, 32)
    assert SAMPLE_POSITIONS <= whole.shape[1] <= SAMPLE_POSITIONS * 1.15  # (a step coprime with 6400: 23, not 25)
    for sizes in ([8, 8, 8, 8], [1] * 32, [5, 27], [3, 10, 19]):
        feeds = [({}, n) for n in sizes]
        starts, total = feed_starts(feeds)
        assert total == 32
        split = np.concatenate([channel_samples(x[s:s + n], n, start=s, total=total)
                                for (_, n), s in zip(feeds, starts)], axis=1)
        np.testing.assert_array_equal(split, whole)
    # a fixed batch's padding rows are not samples: the first n rows only
    padded = np.concatenate([x[24:], x[31:].repeat(4, axis=0)])
    np.testing.assert_array_equal(channel_samples(padded, 8, start=24, total=32),
                                  channel_samples(x[24:], 8, start=24, total=32))


def test_a_subgraph_reading_an_outer_tensor_is_fed_it():
    # silero-vad's If nodes read main-graph tensors inside their branches (no explicit input):
    # a segment that holds such a node must be fed those tensors too (this ran into ONNX
    # Runtime's "not output of any previous nodes", exit 1)
    rng = np.random.default_rng(8)
    c = 4
    branch = [helper.make_node("Relu", ["a1"], ["r"], name="inner_relu"), helper.make_node("Identity", ["r"], ["b_out"])]
    then_g = helper.make_graph(branch, "then", [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["a1"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    inits = [numpy_helper.from_array(_zero_sum_edges(rng, c).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (c, c, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(True), "cond")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", group=c, kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("HardSwish", ["c1"], ["a1"], name="hs1"),
             helper.make_node("If", ["cond"], ["b"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    x = _flat_background(rng, 16, c)
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    q = cal.int8_model()
    assert set(cal.bias_shifts["entropy"]) == {"conv1", "conv2"}
    off = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))
    ref = _run(model, x).mean(axis=(0, 2, 3))
    err_on = np.abs(_run(q, x).mean(axis=(0, 2, 3)) - ref).max()
    err_off = np.abs(_run(off.int8_model(), x).mean(axis=(0, 2, 3)) - ref).max()
    assert err_on < 0.3 * err_off, (err_on, err_off)


def test_a_correction_that_cannot_run_leaves_the_model_uncorrected(monkeypatch, caplog):
    import quantkit.onnx.biascorrect as bc

    rng = np.random.default_rng(9)
    model = _conv_model(_zero_sum_edges(rng, 4), group=4, bias=None)
    x = _flat_background(rng, 8, 4)
    # no method check: it would make the model before the correction breaks
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True),
                                                                  export=ExportConfig(method_check=False)))

    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : something new")

    monkeypatch.setattr(bc, "sequential_correction", broken)
    q = cal.int8_model()
    assert [len(n.input) for n in q.graph.node if n.op_type == "Conv"] == [2]  # no bias added
    assert cal.bias_shifts["entropy"] == {}
    assert "bias correction skipped" in caplog.text and "INVALID_GRAPH" in caplog.text


def test_one_dimensional_convs_are_left_alone():
    # measured on the corpus: silero-vad's 1-D front end lost frame accuracy with the correction
    rng = np.random.default_rng(10)
    w = rng.normal(0, 0.3, (4, 4, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv1d", kernel_shape=[3], pads=[1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = (rng.normal(0, 1, (16, 4, 32)) + 5.0).astype(np.float32)
    cal = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    assert [len(n.input) for n in cal.int8_model().graph.node if n.op_type == "Conv"] == [2]
    assert cal.bias_shifts["entropy"] == {}


@pytest.mark.parametrize("flags, on", [([], True), (["--no-bias-correction"], False), (["--bias-correction"], True)])
def test_cli_default_on_and_its_switch(digits_dirs, tmp_path, flags, on):
    import json

    from quantkit import sample
    from quantkit.cli import main
    from tests.helpers import DIGITS

    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "64", *DIGITS, *flags]) == 0
    ranges = json.loads((out / "ranges.json").read_text())
    assert json.dumps(ranges).count('"bias_correction": true') == (1 if on else 0)
    model = onnx.load(str(next(out.glob("*.int8.onnx"))))
    assert any(i.name.endswith("_bias_corrected") for i in model.graph.initializer) == on


def test_cli_says_when_the_guard_left_the_correction_out(digits_dirs, tmp_path, monkeypatch, capsys):
    import json

    from quantkit import sample
    from quantkit.cli import main
    from quantkit.onnx import biascorrect as bc
    from tests.helpers import DIGITS

    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: 8 * real(d))  # shifts that hurt
    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "64", "--eval-images", "32", *DIGITS]) == 0
    said = capsys.readouterr().out
    check = json.loads((out / "report.json").read_text())["bias_correction"]
    assert not check["applied"] and check["output_sqnr_db"] < check["uncorrected_output_sqnr_db"]
    assert f"bias correction left out: the outputs' per-channel SQNR against FP32 on its 32 samples was {check['output_sqnr_db']:.1f}" in said
    assert json.loads((out / "ranges.json").read_text())["bias_correction_checks"]["entropy"] == check
    model = onnx.load(str(next(out.glob("*.int8.onnx"))))
    assert not any(i.name.endswith("_bias_corrected") for i in model.graph.initializer)


@pytest.mark.parametrize("k", [1, 2, 3, 1000, 1001, 8192])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threaded", [False, True])
def test_row_medians_are_numpys(k, dtype, threaded, monkeypatch):
    from quantkit.onnx import biascorrect
    from quantkit.onnx.biascorrect import row_medians

    monkeypatch.setattr(biascorrect, "MEDIAN_THREADS_FROM", 1 if threaded else 1 << 40)
    monkeypatch.setattr(biascorrect.os, "cpu_count", lambda: 4)

    a = (np.random.default_rng(k).standard_normal((9, k)) * 3).astype(dtype)
    a[:, ::7] = 0.5  # ties
    want = np.median(a, axis=1)
    for got in (row_medians(a.copy()), row_medians(np.asfortranarray(a))):  # the layout channel_samples gives
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_a_variant_reuses_the_depths_before_its_change(monkeypatch):
    # the fallback's variants differ from the plain model from some depth on: the depths before take
    # the plain model's shifts and run as one segment; the shifts equal a fresh correction's
    from quantkit.debug.sensitivity import QdqScales
    from quantkit.onnx import biascorrect as bc

    rng = np.random.default_rng(11)
    model = _chain_model(rng)
    cal_x = _flat_background(rng, 32, 8)
    config = QuantizeConfig(StatsConfig(bias_correction=True))
    cal = quantkit.quantize(model, ArraySource(cal_x), config)
    fresh = quantkit.quantize(model, ArraySource(cal_x), config)
    scales, fresh_scales = QdqScales.from_calibration(cal), QdqScales.from_calibration(fresh)
    last = next(g for g in scales.groups if "conv3" in g.nodes)
    scales.int8_model()  # the plain model: every depth measured, into the history

    measured: list[list[str]] = [[], []]
    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: measured[-1].append(d.shape) or real(d))
    variant = scales.int8_model([last.name])
    fresh._correction_history.clear()  # every depth measured again
    measured.append([])
    expected = fresh_scales.int8_model([last.name])
    # conv3's group in float: only conv3 measured; conv1, side (one depth) and conv2 from the history
    assert (len(measured[-2]), len(measured[-1])) == (1, 4)
    got = {i.name: numpy_helper.to_array(i) for i in variant.graph.initializer if i.name.endswith("_bias_corrected")}
    want = {i.name: numpy_helper.to_array(i) for i in expected.graph.initializer if i.name.endswith("_bias_corrected")}
    assert got.keys() == want.keys() and got
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_change_in_the_middle_measures_from_its_depth_on(monkeypatch):
    # a different scale at the second depth: the first depth is reused, the second and third measured
    from quantkit.onnx import biascorrect as bc
    from quantkit.onnx.qdq import insert_qdq

    rng = np.random.default_rng(12)
    model = _chain_model(rng)
    cal_x = _flat_background(rng, 32, 8)
    cal = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    fresh = quantkit.quantize(model, ArraySource(cal_x), QuantizeConfig(StatsConfig(bias_correction=True)))
    amax = cal.amax(quantized_only=True)
    cal.int8_model()
    fresh._correction_history.clear()
    changed = dict(amax, a1=amax["a1"] * 0.7)  # conv2's input
    qdq = insert_qdq(cal.model, cal.plan, changed)
    measured: list[str] = []
    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: measured.append("m") or real(d))
    shifts = cal._bias_corrected(qdq).shifts
    assert len(measured) == 2  # conv2 and conv3; conv1 and side from the history
    expected = fresh._bias_corrected(insert_qdq(fresh.model, fresh.plan, changed)).shifts
    assert shifts.keys() == expected.keys() == {"conv1", "side", "conv2", "conv3"}
    for conv in shifts:
        np.testing.assert_array_equal(shifts[conv], expected[conv])


def test_the_replaced_biases_are_not_left_behind():
    # a corrected Conv reads <node>_bias_corrected: its old bias, read by nothing else, goes (ONNX
    # Runtime warned "Removing initializer" for each, and the file carried them twice)
    rng = np.random.default_rng(13)
    model = _chain_model(rng)
    cal = quantkit.quantize(model, ArraySource(_flat_background(rng, 32, 8)),
                            QuantizeConfig(StatsConfig(bias_correction=True)))
    out = cal.int8_model()
    names = {i.name for i in out.graph.initializer}
    read = {t for n in out.graph.node for t in n.input}
    assert "conv1_bias_corrected" in names and "b1" not in names
    assert names <= read | {i.name for i in out.graph.input}


def test_a_score_heads_convs_are_not_corrected():
    """A detector's class head (Convs into a Sigmoid, read at a few anchors above a threshold) is
    not corrected: the median over all anchors is the background's (YOLOv8 on document pages:
    box F1 against FP32 0.05 corrected, 0.77 with its heads left out). Its chain back to where it
    branches off goes with it; the backbone, and a Conv that makes an image (no score op), keep
    their correction."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.onnx.biascorrect import score_head_convs

    r = np.random.default_rng(0)
    names = ["stem", "neck", "cls0", "cls1", "box0", "box1"]
    inits = [numpy_helper.from_array(r.normal(size=(4, 4, 1, 1)).astype(np.float32), f"w_{n}") for n in names]
    conv = {n: helper.make_node("Conv", [i, f"w_{n}"], [n], name=n)
            for n, i in (("stem", "x"), ("neck", "stem"), ("cls0", "neck"), ("cls1", "cls0"), ("box0", "neck"),
                         ("box1", "box0"))}
    nodes = [*conv.values(), helper.make_node("Sigmoid", ["cls1"], ["scores"], name="sig"),
             helper.make_node("Concat", ["box1", "scores"], ["out"], name="cat", axis=1)]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert score_head_convs(model) == {"cls0", "cls1"}
    nodes[-2] = helper.make_node("Relu", ["cls1"], ["scores"], name="sig")  # an image, not scores
    graph = helper.make_graph(nodes, "img", list(graph.input), list(graph.output), inits)
    assert score_head_convs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])) == set()


def _guarded_chain(rng: np.random.Generator) -> onnx.ModelProto:
    """``_chain_model`` with a node after its last Conv (the guard's outputs come from the rest of
    the graph) besides ``side``, an output no later node reads."""
    model = _chain_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 8, 12, 12]))
    return model


def _guarded_calibration() -> quantkit.Calibration:
    """``_guarded_chain`` calibrated with bias correction on a flat background (the corrections help)."""
    rng = np.random.default_rng(6)
    model = _guarded_chain(rng)
    return quantkit.quantize(model, ArraySource(_flat_background(rng, 32, 8)),
                             QuantizeConfig(StatsConfig(bias_correction=True)))


def _outputs_sqnr(model: onnx.ModelProto, fp32: onnx.ModelProto, feeds) -> float:
    """``output_sqnr`` of ``model`` against ``fp32``, each run whole on ``feeds``."""
    from quantkit.backends.onnxruntime import create_session
    from quantkit.onnx.biascorrect import guard_outputs, output_samples, output_sqnr

    names = guard_outputs(fp32)
    runs = []
    for m in (fp32, model):
        session = create_session(m)
        got: dict[str, list] = {t: [] for t in names}
        for feed, n in feeds:
            for t, x in zip(names, session.run(names, dict(feed))):
                got[t].append(output_samples(x))
        runs.append(got)
    return output_sqnr(*runs)


def test_the_guard_keeps_a_correction_that_helps_and_measures_what_a_whole_run_measures():
    from quantkit.onnx.qdq import insert_qdq

    cal = _guarded_calibration()
    q = cal.int8_model()
    check = cal.bias_checks["entropy"]
    assert check["applied"] and set(cal.bias_shifts["entropy"]) == {"conv1", "conv2", "conv3", "side"}
    assert check["output_sqnr_db"] > check["uncorrected_output_sqnr_db"] + 1.0, check
    # the corrected outputs come from the segments' tensors and the rest of the graph: as a whole run
    assert abs(_outputs_sqnr(q, cal.model, cal.correction_feeds) - check["output_sqnr_db"]) < 0.01
    plain = insert_qdq(cal.model, cal.plan, cal.amax(quantized_only=True))
    assert abs(_outputs_sqnr(plain, cal.model, cal.correction_feeds) - check["uncorrected_output_sqnr_db"]) < 0.01


def test_the_guard_leaves_out_a_correction_that_hurts_and_variants_follow(monkeypatch):
    # each shift made 6x the measured median: the corrected outputs agree worse with FP32 than the
    # uncorrected ones (by more than the margin), so the uncorrected model is the one made, bit for bit,
    # with no shifts; the
    # fallback's variants of that method are not corrected either
    from quantkit.debug.sensitivity import QdqScales
    from quantkit.onnx import biascorrect as bc
    from quantkit.onnx.qdq import insert_qdq

    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: 6 * real(d))
    cal = _guarded_calibration()
    q = cal.int8_model()
    check = cal.bias_checks["entropy"]
    assert not check["applied"], check
    assert check["output_sqnr_db"] < check["uncorrected_output_sqnr_db"] - bc.GUARD_MARGIN_DB, check
    assert cal.bias_shifts["entropy"] == {}
    plain = insert_qdq(cal.model, cal.plan, cal.amax(quantized_only=True))
    assert q.SerializeToString() == plain.SerializeToString()
    scales = QdqScales.from_calibration(cal)
    variant = scales.int8_model([next(g for g in scales.groups if "conv3" in g.nodes).name])
    assert not any(i.name.endswith("_bias_corrected") for i in variant.graph.initializer)


def test_a_correction_that_hurts_on_a_few_samples_only_is_kept(monkeypatch):
    # the same harmful shifts, but the uncorrected model better on too few resamples of the samples
    # (better_share below CHECK_CONFIDENCE): the figure is one or two samples', and the default stands
    from quantkit.onnx import biascorrect as bc

    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: 6 * real(d))
    monkeypatch.setattr(bc, "better_share", lambda *a, **k: 0.6)
    cal = _guarded_calibration()
    cal.int8_model()
    check = cal.bias_checks["entropy"]
    assert check["applied"] and check["uncorrected_better_share"] == 0.6, check
    assert check["output_sqnr_db"] < check["uncorrected_output_sqnr_db"] - bc.GUARD_MARGIN_DB, check
    assert cal.bias_shifts["entropy"]


def test_better_share_is_paired_and_counts_samples_not_one_outlier():
    from quantkit.onnx.biascorrect import better_share, output_sqnr

    rng = np.random.default_rng(3)
    ref = [rng.normal(0, 1, (2, 64)).astype(np.float32) for _ in range(2)]  # two feeds, [C, positions]
    a = [r + rng.normal(0, 0.10, r.shape).astype(np.float32) for r in ref]
    b = [r + rng.normal(0, 0.05, r.shape).astype(np.float32) for r in ref]
    assert better_share({"y": ref}, {"y": a}, {"y": b}) == 1.0  # b better on every sample
    assert better_share({"y": ref}, {"y": b}, {"y": a}) == 0.0
    # a model with one sample far off: its figure is much lower, but the other model is better on one sample only
    worse = [x.copy() for x in b]
    worse[0][:, 5] += 4.0
    close = [r + rng.normal(0, 0.05, r.shape).astype(np.float32) for r in ref]
    assert output_sqnr({"y": ref}, {"y": close}) > output_sqnr({"y": ref}, {"y": worse}) + 5
    assert 0.3 < better_share({"y": ref}, {"y": worse}, {"y": close}) < 0.9
    # each feed's samples as its blocks (here one position a sample): the same verdicts
    assert better_share({"y": ref}, {"y": a}, {"y": b}, rows=[64, 64]) == 1.0
    assert 0.3 < better_share({"y": ref}, {"y": worse}, {"y": close}, rows=[64, 64]) < 0.9
    # feeds that do not compare in both (another shape) are left out; nothing left: 1.0 (the figures decide)
    assert better_share({"y": ref}, {"y": [None, a[1]]}, {"y": [b[0], b[1]]}) == 1.0
    assert better_share({"y": ref}, {"y": [None, None]}, {"y": b}) == 1.0


def test_a_loss_within_the_guards_margin_keeps_the_correction(monkeypatch):
    # the corrections move some models' outputs by about the margin either way with the batching alone:
    # a correction that costs less than GUARD_MARGIN_DB is kept
    from quantkit.onnx import biascorrect as bc

    real = bc.row_medians
    monkeypatch.setattr(bc, "row_medians", lambda d: 3 * real(d))  # 26.5 -> 24.1 dB
    monkeypatch.setattr(bc, "GUARD_MARGIN_DB", 5.0)
    cal = _guarded_calibration()
    cal.int8_model()
    check = cal.bias_checks["entropy"]
    assert check["applied"] and check["output_sqnr_db"] < check["uncorrected_output_sqnr_db"], check
    assert set(cal.bias_shifts["entropy"]) == {"conv1", "conv2", "conv3", "side"}


def test_output_sqnr_is_the_mean_of_each_channels_sqnr():
    from quantkit.onnx.biascorrect import GUARD_DB, output_samples, output_sqnr

    rng = np.random.default_rng(14)
    ref = [rng.normal(0, 1, (4, 3, 5)).astype(np.float32) for _ in range(2)]
    scale = np.array([1e-3, 1e-1, 0.0])[None, :, None]  # channel 2 exact: clipped to the top
    got = [(r + scale * rng.normal(0, 1, r.shape)).astype(np.float32) for r in ref]
    boxes = [rng.normal(0, 50, (4, 7)).astype(np.float32), rng.normal(0, 50, (2, 7)).astype(np.float32)]
    moved = [boxes[0] + 1, boxes[1][:1] + 1]  # the second feed's shape differs (NMS): left out
    want = []
    r, g = np.concatenate(ref).astype(np.float64), np.concatenate(got).astype(np.float64)
    for c in range(3):
        s, e = np.square(r[:, c]).sum(), np.square(g[:, c] - r[:, c]).sum()
        want.append(min(GUARD_DB[1], 10 * np.log10(s / e)) if e else GUARD_DB[1])
    b = boxes[0].astype(np.float64)
    want += list(np.clip(10 * np.log10(np.square(b).sum(0) / np.square(1.0) / len(b)), *GUARD_DB))
    samples = {"scores": [output_samples(x) for x in ref], "boxes": [output_samples(x) for x in boxes]}
    other = {"scores": [output_samples(x) for x in got], "boxes": [output_samples(x) for x in moved]}
    assert output_sqnr(samples, other) == pytest.approx(float(np.mean(want)), abs=1e-4)
    assert output_samples(np.arange(4)) is None  # integer outputs are not compared
    assert output_sqnr({"a": [None]}, {"a": [None]}) is None


def _linear_model(rng: np.random.Generator, bias_as_constant_node: bool) -> onnx.ModelProto:
    """x [N, T, 8] -> MatMul + Add (a Linear, as paddle2onnx writes it: the bias possibly a Constant
    node) -> Relu -> MatMul + Add -> Softmax (a classifier's last Linear: a score head)."""
    w1 = rng.normal(0, 1, (8, 16)).astype(np.float32)
    w1 -= w1.mean(axis=0, keepdims=True)  # features that sum the offset input away: rounding leaves a shift
    w2 = rng.normal(0, 1, (16, 4)).astype(np.float32)
    b1, b2 = rng.normal(0, 1, 16).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                        numpy_helper.from_array(b2, "b2")]
    if bias_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["b1"], name="b1_const", value=numpy_helper.from_array(b1, "v")))
    else:
        inits.append(numpy_helper.from_array(b1, "b1"))
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
              helper.make_node("Add", ["m1", "b1"], ["h"], name="fc1_bias"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w2"], ["m2"], name="fc2"),
              helper.make_node("Add", ["m2", "b2"], ["logits"], name="fc2_bias"),
              helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("constant_node", [False, True])
def test_a_linear_layers_bias_add_is_corrected_along_its_features(constant_node):
    """MatMul + Add (a Linear; the SVTR neck of PP-OCR's recogniser, transformers): the Add's
    constant takes the per-feature median error, measured along the last axis; the classifier's
    last Linear before its Softmax (a score head) is left alone."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.biascorrect import linear_units

    rng = np.random.default_rng(3)
    model = _linear_model(rng, constant_node)
    assert set(linear_units(model)) == {"fc1_bias", "fc2_bias"}
    x = (rng.normal(0, 0.2, (32, 6, 8)) + np.linspace(2, 9, 8)).astype(np.float32)  # an offset per input feature
    on = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    off = quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=False)))
    q = on.int8_model()
    assert set(on.bias_shifts["entropy"]) == {"fc1_bias"}

    def h_error(m: onnx.ModelProto) -> np.ndarray:
        with OrtRunner(m, capture=["h"]) as r:
            got = r.infer_captured({"x": x})[1]["h"].astype(np.float64)
        with OrtRunner(model, capture=["h"]) as r:
            ref = r.infer_captured({"x": x})[1]["h"].astype(np.float64)
        return np.median((got - ref).reshape(-1, 16), axis=0)

    before, after = np.abs(h_error(off.int8_model())).max(), np.abs(h_error(q)).max()
    assert before > 1e-3 and after < 0.3 * before, (before, after)
    assert not any(n.op_type == "Constant" and n.output[0] == "b1" for n in q.graph.node)  # replaced, not left


def test_a_swish_activation_is_not_a_score_op():
    """SiLU written as x * Sigmoid(x) on the way to an output (YOLO's mask prototypes) made its
    Convs look like a score head, so they missed the correction; a real score Sigmoid still counts."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.onnx.biascorrect import score_head_convs

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(size=(4, 4, 1, 1)).astype(np.float32), f"w_{n}") for n in ("a", "b")]
    nodes = [helper.make_node("Conv", ["x", "w_a"], ["a"], name="a"),
             helper.make_node("Sigmoid", ["a"], ["sa"], name="sig_a"),
             helper.make_node("Mul", ["a", "sa"], ["act"], name="silu_a"),
             helper.make_node("Conv", ["act", "w_b"], ["protos"], name="b")]
    outs = [helper.make_tensor_value_info("protos", TensorProto.FLOAT, ["N", 4, 8, 8])]
    graph = helper.make_graph(nodes, "protos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              outs, inits)
    assert score_head_convs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])) == set()
    nodes += [helper.make_node("Sigmoid", ["protos"], ["y"], name="score")]  # now a score head, and its chain
    graph = helper.make_graph(nodes, "scores", list(graph.input),
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    assert score_head_convs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])) == {"a", "protos"}
