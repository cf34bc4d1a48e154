"""FP32-vs-INT8 metrics (quantkit.compare) against brute-force NumPy on the concatenated outputs:
batches streamed in several sizes give the one-shot numbers; padding rows never count."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.compare import comparison_batch, compare_runners
from quantkit.datasets.batching import Batch
from quantkit.errors import ModelError

K, C = 6, 5  # features in, classes out


def matmul_model(w: np.ndarray, *, batch: int | str = "N", out: str = "y") -> onnx.ModelProto:
    """x [batch, K] -> MatMul(w) -> y [batch, w.shape[1]], and z = x * 2 [batch, K] (a second output)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], [out]),
             helper.make_node("Mul", ["x", "two"], ["z"])]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, w.shape[1]]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, K])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(np.float32(2.0), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def pair(rng):
    """(reference, test) runners: the test model's weights are the reference's plus noise."""
    w = rng.standard_normal((K, C)).astype(np.float32)
    noisy = w + rng.standard_normal((K, C)).astype(np.float32) * 0.3
    return OrtRunner(matmul_model(w)), OrtRunner(matmul_model(noisy))


def batches_of(x: np.ndarray, labels: np.ndarray | None, sizes: list[int], *, pad_to: int | None = None):
    start = 0
    for n in sizes:
        feed = x[start : start + n]
        if pad_to is not None and n < pad_to:  # padding rows: values that would wreck every metric
            feed = np.concatenate([feed, np.full((pad_to - n, K), 1e6, np.float32)])
        yield Batch({"x": feed}, None if labels is None else labels[start : start + n],
                    tuple(range(start, start + n)), n)
        start += n


def brute(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    r = ref.reshape(len(ref), -1).astype(np.float64)
    t = test.reshape(len(test), -1).astype(np.float64)
    cos = np.array([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(r, t)])
    return {
        "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
        "sqnr_db": float(10 * np.log10(np.sum(r**2) / np.sum((r - t) ** 2))),
        "max_abs_error": float(np.max(np.abs(r - t))), "mean_abs_error": float(np.mean(np.abs(r - t))),
    }


@pytest.mark.parametrize("sizes", [[37], [8, 8, 8, 8, 5], [1, 20, 3, 13]])
def test_streamed_metrics_equal_one_shot_numpy(pair, rng, sizes):
    ref_runner, test_runner = pair
    x = rng.standard_normal((37, K)).astype(np.float32)
    labels = rng.integers(0, C, 37)
    report = compare_runners(ref_runner, test_runner, batches_of(x, labels, sizes))
    ref, test = ref_runner.infer({"x": x}), test_runner.infer({"x": x})
    assert report.num_samples == 37 and [m.name for m in report.outputs] == ["y", "z"]
    y = report.outputs[0]
    for key, want in brute(ref["y"], test["y"]).items():
        assert getattr(y, key) == pytest.approx(want, rel=1e-9, abs=1e-12), key
    assert y.top1_agreement == pytest.approx(np.mean(ref["y"].argmax(1) == test["y"].argmax(1)))
    assert 0 < y.top1_agreement < 1  # the noise flips some predictions, so this compares something
    assert report.accuracy_reference == pytest.approx(np.mean(ref["y"].argmax(1) == labels))
    assert report.accuracy_test == pytest.approx(np.mean(test["y"].argmax(1) == labels))
    z = report.outputs[1]  # identical in both models
    assert z.sqnr_db == math.inf and z.cosine_min == pytest.approx(1.0) and z.max_abs_error == 0.0
    assert z.top1_agreement is not None  # [N, K] is 2-D: treated as scores


def test_padding_rows_are_left_out(rng):
    """A fixed-batch pair: the short last batch is padded with huge values, which count nowhere."""
    w = rng.standard_normal((K, C)).astype(np.float32)
    ref_runner = OrtRunner(matmul_model(w, batch=8))
    test_runner = OrtRunner(matmul_model(w * 1.1 + 0.05, batch=8))
    assert comparison_batch(ref_runner, test_runner, 32) == (8, True)
    x = rng.standard_normal((21, K)).astype(np.float32)
    labels = rng.integers(0, C, 21)
    report = compare_runners(ref_runner, test_runner, batches_of(x, labels, [8, 8, 5], pad_to=8))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    test = x.astype(np.float64) @ (w * 1.1 + 0.05).astype(np.float32).astype(np.float64)
    assert report.num_samples == 21
    for key, want in brute(ref, test).items():
        assert getattr(report.outputs[0], key) == pytest.approx(want, rel=1e-5), key
    assert report.accuracy_reference == pytest.approx(np.mean(ref.argmax(1) == labels))


def test_zero_outputs_and_non_classifier_outputs(rng):
    """Both outputs all zero: cosine 1 (not NaN); the test all zero: SQNR 0 dB; an output of
    one column (not class scores) has no top-1 agreement."""
    zero = np.zeros((K, C), np.float32)
    r0, t0 = OrtRunner(matmul_model(zero)), OrtRunner(matmul_model(zero))
    x = rng.standard_normal((4, K)).astype(np.float32)
    m = compare_runners(r0, t0, batches_of(x, None, [4])).outputs[0]
    assert (m.cosine_mean, m.cosine_min, m.sqnr_db) == (1.0, 1.0, math.inf)
    w = rng.standard_normal((K, C)).astype(np.float32)
    m = compare_runners(OrtRunner(matmul_model(w)), t0, batches_of(x, None, [4])).outputs[0]
    assert m.sqnr_db == pytest.approx(0.0) and m.cosine_mean == 0.0  # noise energy == signal energy
    single = compare_runners(OrtRunner(matmul_model(w[:, :1])), OrtRunner(matmul_model(w[:, :1] * 2)),
                             batches_of(x, None, [4]))
    # one value a sample: its cosine is only the sign's agreement, so none is given (NaN, "-" in the table)
    assert single.outputs[0].top1_agreement is None and math.isnan(single.outputs[0].cosine_mean)
    assert single.outputs[0].sqnr_db == pytest.approx(0.0)  # test = 2 x ref: noise == signal
    assert "nan" not in single.table()


def test_mismatched_models_are_refused(rng):
    w = rng.standard_normal((K, C)).astype(np.float32)
    with pytest.raises(ModelError, match="different outputs"):
        compare_runners(OrtRunner(matmul_model(w)), OrtRunner(matmul_model(w, out="logits")), iter(()))
    with pytest.raises(ModelError, match="fp32 a fixed batch size of 4, int8 a fixed batch size of 8"):
        comparison_batch(OrtRunner(matmul_model(w, batch=4)), OrtRunner(matmul_model(w, batch=8)), 16)
    assert comparison_batch(OrtRunner(matmul_model(w)), OrtRunner(matmul_model(w)), 16) == (16, False)
    assert comparison_batch(OrtRunner(matmul_model(w)), OrtRunner(matmul_model(w, batch=4)), 16) == (4, True)


def test_report_table_and_dict(pair, rng):
    x = rng.standard_normal((10, K)).astype(np.float32)
    report = compare_runners(*pair, batches_of(x, rng.integers(0, C, 10), [10]))
    d = report.to_dict()
    assert d["num_samples"] == 10 and d["outputs"][0]["sqnr_db"] == report.outputs[0].sqnr_db and d["skipped"] == []
    table = report.table()
    assert table.splitlines()[0] == "int8 vs fp32 on 10 samples"
    assert f"{report.outputs[0].sqnr_db:.2f}" in table and f"{report.accuracy_test:.4f}" in table


def test_compare_runs_a_qdq_model_as_tensorrt_computes_it_unless_told(tmp_path):
    """`compare` scores a Q/DQ model with exact integer products (TensorRT's arithmetic); `--ort-kernels`
    runs ONNX Runtime's integer kernels instead (machine-dependent: on x86 without VNNI they saturate)."""
    from tests.unit.test_backend_onnxruntime import _qdq_matmul
    from tests.unit.test_fuzz import run_cli

    qdq, w = _qdq_matmul()
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(qdq)  # the same product in float: the weights dequantized, the input as it is
    del fp32.graph.node[:]
    fp32.graph.node.extend([helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=1),
                            helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")])
    onnx.save(fp32, tmp_path / "fp32.onnx")
    onnx.save(qdq, tmp_path / "int8.onnx")
    x = np.round(np.random.default_rng(0).uniform(-1.27, 1.27, (16, 64)) * 100).astype(np.float32) / 100
    np.save(tmp_path / "x.npy", x)  # values on the int8 grid: the exact INT8 model equals FP32
    code, out, err = run_cli(["compare", str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"),
                              "--npz", str(tmp_path / "x.npy"), "--no-progress"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("y "))
    assert float(row.split()[-2]) > 60  # SQNR: float rounding only
    code, out, err = run_cli(["compare", str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"),
                              "--npz", str(tmp_path / "x.npy"), "--no-progress", "--ort-kernels"])
    assert code == 0, err


def test_models_whose_outputs_have_other_shapes_are_refused(tmp_path, capsys):
    """[N, 4] against [N, 8, 1, 1]: the comparison ran and called it a data-dependent shape (exit 0,
    no figures)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.cli import main

    r = np.random.default_rng(0)
    for name, cols, shape in (("a", 4, ["N", 4]), ("b", 8, ["N", 8, 1, 1])):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
        if len(shape) == 4:
            nodes.append(helper.make_node("Reshape", ["m", "s"], ["y"], name="rs"))
        else:
            nodes.append(helper.make_node("Identity", ["m"], ["y"], name="id"))
        inits = [numpy_helper.from_array(r.normal(size=(6, cols)).astype(np.float32), "W"),
                 numpy_helper.from_array(np.array([-1, cols, 1, 1], np.int64), "s")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / f"{name}.onnx")
    np.savez(tmp_path / "d.npz", x=r.normal(size=(8, 6)).astype(np.float32))
    assert main(["compare", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--npz", str(tmp_path / "d.npz"),
                 "--no-progress"]) == 2
    assert "output 'y' is [?, 4] in a.onnx and [?, 8, 1, 1] in b.onnx" in capsys.readouterr().err


def test_a_merged_output_names_the_channel_its_sqnr_hides():
    """A YOLO output [N, 4 + classes, anchors]: box pixels dominate one SQNR, so INT8 that flattened
    every class score (no detections left) read 22 dB. Per-channel SQNR names the lost channel."""
    from quantkit.compare import _OutputStats

    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 640, (4, 4, 100)), rng.uniform(0, 1, (4, 3, 100))], axis=1)
    test = ref.copy()
    test[:, :4] += rng.normal(0, 0.5, (4, 4, 100))  # boxes: small error
    test[:, 5] = 0.0  # one class channel lost
    st = _OutputStats("output0")
    st.update(ref, test)
    m = st.result()
    assert m.sqnr_db > 40 and m.worst_channel == 5 and m.worst_channel_sqnr_db == pytest.approx(0.0, abs=1e-9)
    from quantkit.compare import CompareReport

    assert "'output0' index 5 of axis 1 is at 0.00 dB" in CompareReport("fp32", "int8", 4, [m]).table()
    # a recogniser's [N, T, classes] (top-1 per position): axis 1 is its time steps, not a detector's channels
    from dataclasses import replace

    table = CompareReport("fp32", "int8", 4, [replace(m, top1_per_position=True)]).table()
    assert "position 5 of axis 1 (a time step) is at 0.00 dB" in table and "detector" not in table
    st2 = _OutputStats("y")  # a [N, C] classifier output: no per-channel figure
    st2.update(ref[:, :, 0], test[:, :, 0])
    assert st2.result().worst_channel is None


def test_a_concat_output_is_scored_part_by_part_through_the_runners():
    """An output a Concat writes along axis 1 (boxes beside sigmoid scores): each part's SQNR with
    its channels pooled, and a note when the worst part is far below the whole output's."""
    def head(shift: float) -> onnx.ModelProto:  # the test model's scores 'shift' lower where they are high
        boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4, 50])
        scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 6, 50])
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
        k = numpy_helper.from_array(np.array(shift, np.float32), "k")
        nodes = [helper.make_node("Sigmoid", ["scores"], ["p"]), helper.make_node("Mul", ["p", "p"], ["p2"]),
                 helper.make_node("Mul", ["p2", "k"], ["d"]), helper.make_node("Sub", ["p", "d"], ["q"]),
                 helper.make_node("Concat", ["boxes", "q"], ["out"], axis=1)]
        graph = helper.make_graph(nodes, "head", [boxes, scores], [out], [k])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    rng = np.random.default_rng(1)
    feed = {"boxes": rng.uniform(0, 640, (8, 4, 50)).astype(np.float32),
            "scores": np.where(rng.random((8, 6, 50)) < 0.05, 2.0, -8.0).astype(np.float32)}
    batches = [Batch(feed, None, tuple(range(8)), 8)]
    with OrtRunner(head(0.0)) as ref, OrtRunner(head(0.2)) as test:
        assert ref.concat_parts == {"out": [4, 6]}
        report = compare_runners(ref, test, batches)
    m = report.outputs[0]
    p = 1 / (1 + np.exp(-feed["scores"].astype(np.float64)))
    want = 10 * np.log10(np.square(p).sum() / np.square(0.2 * p * p).sum())
    assert m.parts == [4, 6] and m.parts_sqnr_db[0] == math.inf
    assert m.parts_sqnr_db[1] == pytest.approx(want, abs=1e-3) and m.sqnr_db > want + 30
    assert "'out' is a Concat of 2 parts (axis 1; channels 0-3: inf dB, channels 4-9: " in report.table()


@pytest.mark.parametrize("opset, axis, per_position", [(17, None, True), (17, 2, True), (11, None, False),
                                                        (11, 2, True), (17, 1, False)])
def test_a_softmax_over_the_last_axis_of_a_sequence_gets_top1_per_position(opset, axis, per_position):
    """A CTC recogniser's [N, T, classes] (a Softmax over the last axis): top-1 agreement at each
    of the T steps, against brute force; a Softmax over another axis (or opset 11's default axis 1,
    which spans the last two) has none, like a detector's [N, 4 + classes, anchors]."""
    def seq(w: np.ndarray) -> onnx.ModelProto:
        attrs = {} if axis is None else {"axis": axis}
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["p"], **attrs)],
            "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, K])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 7, C])], [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model

    rng = np.random.default_rng(2)
    w = rng.standard_normal((K, C)).astype(np.float32)
    noisy = (w + rng.standard_normal((K, C)) * 0.5).astype(np.float32)
    x = rng.standard_normal((9, 7, K)).astype(np.float32)
    with OrtRunner(seq(w)) as ref, OrtRunner(seq(noisy)) as test:
        report = compare_runners(ref, test, [Batch({"x": x}, None, tuple(range(9)), 9)])
    m = report.outputs[0]
    if not per_position:
        assert m.top1_agreement is None and "per position" not in report.table()
        return
    want = float(((x @ w).argmax(-1) == (x @ noisy).argmax(-1)).mean())
    assert 0.2 < want < 1.0 and m.top1_agreement == pytest.approx(want)
    assert "output 'p': its top-1 agreement is per position" in report.table()



@pytest.mark.parametrize("head, per_position", [("logits", True), ("split", True), ("layernorm", False)])
def test_a_linear_layers_logits_over_positions_get_top1_per_position(head, per_position):
    """PyTorch recognisers export logits, not a Softmax (the sixth probe: a CRNN's [T, N, 984] at
    42.8 dB changed 25% of its greedy decodes, a captcha reader's Reshape to [N, 4, 62] at 51 dB
    10% of its captchas, and compare printed no top-1). A transformer's hidden states (a
    LayerNormalization) are not classes."""
    from quantkit.onnx.model import last_axis_classes

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = [numpy_helper.from_array(rng.normal(0, 1, (K, 12)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1, 12).astype(np.float32), "b")]
    out_shape = ["N", 7, 12]
    if head == "split":  # [N, 7, 12] -> [N, 7, 3, 4]: three heads of four classes
        nodes.append(helper.make_node("Reshape", ["y", "shape"], ["z"]))
        inits.append(numpy_helper.from_array(np.array([0, 7, 3, 4], np.int64), "shape"))
        out_shape, out = ["N", 7, 3, 4], "z"
    elif head == "layernorm":
        nodes.append(helper.make_node("LayerNormalization", ["y", "g"], ["z"], axis=-1))
        inits.append(numpy_helper.from_array(np.ones(12, np.float32), "g"))
        out = "z"
    else:
        out = "y"
    graph = helper.make_graph(nodes, "h", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, K])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert last_axis_classes(model, out) == per_position


def test_the_table_tells_long_output_names_apart():
    """tf2onnx names a Keras model's outputs ``StatefulPartitionedCall_1:0``, ``:1``...: cut at 24
    characters every row read the same."""
    from quantkit.compare import NAME_WIDTH, CompareReport, OutputMetrics, short_name

    names = [f"StatefulPartitionedCall_1:{k}" for k in range(3)] + ["x" * 80 + "_tail:0"]
    outs = [OutputMetrics(n, 0.99, 0.98, 30.0 + k, 0.01, 0.001, None) for k, n in enumerate(names)]
    rows = CompareReport("fp32", "int8", 4, outs).table().splitlines()[2:]
    shown = [r.split()[0] for r in rows]
    assert shown[:3] == names[:3] and len(set(shown)) == 4
    assert shown[3].endswith("_tail:0") and shown[3].startswith("xxx") and len(shown[3]) == NAME_WIDTH[1]
    assert short_name("short", 24) == "short"


def test_a_reference_at_chance_level_on_the_labels_is_said(pair, rng):
    """Labels of other classes (folders of another model, shifted by one) make both accuracies
    meaningless: the table says so where the reference scores no better than chance."""
    ref_runner, test_runner = pair
    x = rng.standard_normal((8 * C, K)).astype(np.float32)
    right = ref_runner.infer({"x": x})["y"].argmax(1)
    for labels, said in ((right, False), ((right + 1) % C, True)):
        report = compare_runners(ref_runner, test_runner, batches_of(x, labels, [len(x)]))
        assert report.classes == C
        assert report.chance_level is said
        assert ("no better than chance" in report.table()) is said
    few = compare_runners(ref_runner, test_runner, batches_of(x[:C], (right[:C] + 1) % C, [C]))
    assert not few.chance_level  # under two samples a class: chance says nothing


def test_cli_notes_an_int8_model_whose_weights_are_not_the_fp32_models(tmp_path, capsys):
    # a probe compared an INT8 model with another FP32 model of the same graph and names: its loss was
    # put on INT8 (the note named `debug --rank` and `--max-drop`) with no word that the weights differ
    import quantkit
    from quantkit.cli import main
    from quantkit.ptq import QuantizeConfig, StatsConfig
    from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model

    model = make_depthwise_model(variant="fanout")
    x = depthwise_inputs(model, 48)
    cal = quantkit.quantize(model, ArraySource(x[:32]), QuantizeConfig(StatsConfig(bias_correction=False)))
    onnx.save(model, tmp_path / "fp32.onnx")
    onnx.save(cal.int8_model(), tmp_path / "int8.onnx")
    other = onnx.ModelProto()
    other.CopyFrom(model)
    r = np.random.default_rng(0)
    for init in other.graph.initializer:  # another checkpoint: every weight moved by 15%
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array((w * (1 + 0.15 * r.standard_normal(w.shape))).astype(w.dtype),
                                                  init.name))
    onnx.save(other, tmp_path / "other.onnx")
    np.savez(tmp_path / "d.npz", **{model.graph.input[0].name: x[32:]})
    for fp32, noted in (("fp32.onnx", False), ("other.onnx", True)):
        assert main(["compare", str(tmp_path / fp32), str(tmp_path / "int8.onnx"), "--npz", str(tmp_path / "d.npz"),
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert ("not derived from this FP32 model" in out and "not INT8's error alone" in out) == noted, out
