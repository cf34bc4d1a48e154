"""Graph edges exporters write that the checks' own ONNX Runtime sessions tripped on (a probe of
wheels, twenty-first session): an input no node reads (paddle2onnx's ``length``), an output that
is a constant, an input passed through as an output. ``OrtRunner`` fed the first with zeros; the
bias correction's and the method check's sessions, fed the batches as they are, failed, and the
calibration was written uncorrected and unchecked. A constant output measured the budget."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import quantkit
from quantkit.datasets.sources import NumpySource
from quantkit.onnx.biascorrect import guard_outputs
from quantkit.onnx.model import error_output

RNG = np.random.default_rng(0)
W1, B1 = RNG.normal(0, 0.3, (16, 32)).astype(np.float32), RNG.normal(0, 0.1, 32).astype(np.float32)
W2, B2 = RNG.normal(0, 0.3, (32, 8)).astype(np.float32), RNG.normal(0, 0.1, 8).astype(np.float32)


def _model(*, unread: bool = False, constant: bool = False, passthrough: bool = False,
           outputs_first: bool = False) -> onnx.ModelProto:
    """x [N, 16] -> MatMul + bias -> Relu -> MatMul + bias -> y [N, 8]; and optionally an INT64
    input no node reads, a constant output, an input passed through as an output (listed before
    y with ``outputs_first``)."""
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m1"]), h.make_node("Add", ["m1", "B1"], ["a1"]),
             h.make_node("Relu", ["a1"], ["r1"]), h.make_node("MatMul", ["r1", "W2"], ["m2"]),
             h.make_node("Add", ["m2", "B2"], ["y"])]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])]
    inits = [nh.from_array(a, n) for a, n in ((W1, "W1"), (B1, "B1"), (W2, "W2"), (B2, "B2"))]
    extra = []
    if unread:
        inputs.append(h.make_tensor_value_info("length", T.INT64, ["N"]))
    if constant:
        inits.append(nh.from_array(np.arange(4, dtype=np.float32), "table"))
        extra.append(h.make_tensor_value_info("table", T.FLOAT, [4]))
    if passthrough:
        inputs.append(h.make_tensor_value_info("aux", T.FLOAT, ["N", 3]))
        extra.append(h.make_tensor_value_info("aux", T.FLOAT, ["N", 3]))
    outputs = [*extra, *outputs] if outputs_first else [*outputs, *extra]
    model = h.make_model(h.make_graph(nodes, "edges", inputs, outputs, inits), opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8  # what ONNX Runtime 1.30 loads too (onnx 1.23 writes 14)
    onnx.checker.check_model(model)
    return model


def _data(tmp_path, n: int = 64, **extra: bool) -> NumpySource:
    arrays = {"x": RNG.normal(0, 1, (n, 16)).astype(np.float32)}
    if extra.get("unread"):
        arrays["length"] = np.full(n, 16, np.int64)
    if extra.get("passthrough"):
        arrays["aux"] = RNG.normal(0, 1, (n, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **arrays)
    return NumpySource(tmp_path / "d.npz")


@pytest.mark.parametrize("edge", ["unread", "constant", "passthrough"])
def test_the_checks_run_on_a_graph_with_the_edge(tmp_path, caplog, edge):
    model = _model(**{edge: True})
    with caplog.at_level(logging.WARNING):
        cal = quantkit.quantize(model, _data(tmp_path, **{edge: True}))
        cal.int8_model()
    assert "skipped" not in caplog.text, caplog.text  # bias correction and the method check ran
    assert cal.method_check is not None and cal.bias_shifts.get(cal.config.method)


def test_outputs_no_node_computes_are_not_measured():
    model = _model(constant=True, passthrough=True, outputs_first=True)
    assert guard_outputs(model) == ["y"]
    assert error_output(model) == "y"  # the constant first: the budget read it as met at once
    assert error_output(model, "table") == "table"  # asked for by name: as asked


def _float_first_model() -> onnx.ModelProto:
    """feat = Tanh(x) (no quantized op on its way: a GRU's state alone is like it) listed first,
    then y through the two MatMuls."""
    model = _model()
    model.graph.node.append(h.make_node("Tanh", ["x"], ["feat"]))
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([h.make_tensor_value_info("feat", T.FLOAT, ["N", 16]), *outputs])
    return model


def test_an_output_no_quantized_op_reaches_is_neither_measured_nor_compared(tmp_path):
    model = _float_first_model()
    assert error_output(model) == "y"  # feat is exact in INT8: any budget read as met, even 0
    cal = quantkit.quantize(model, _data(tmp_path))
    assert guard_outputs(model, cal.int8_model()) == ["y"]
    check = cal.method_check
    # the figures are y's alone, not the mean with feat's (clipped) exact one
    assert check is not None and max(check["output_sqnr_db"].values()) < 60.0


def _calibrate_to_a_zero_budget(tmp_path, model: onnx.ModelProto, *flags: str) -> int:
    """``calibrate m.onnx --npz c.npz --eval-dir e.npz --max-drop 0 --drop-metric sqnr -o o`` in
    ``tmp_path`` (64 calibration and 32 evaluation samples of x [N, 16]); its exit code."""
    from quantkit.cli import main

    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 16)).astype(np.float32))
    np.savez(tmp_path / "e.npz", x=RNG.normal(0, 1, (32, 16)).astype(np.float32))
    return main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "--eval-dir",
                 str(tmp_path / "e.npz"), "-o", str(tmp_path / "o"), "--max-drop", "0", "--drop-metric", "sqnr",
                 "--threads", "1", *flags])


def test_max_drop_measures_the_output_int8_reaches_and_the_summary_counts_the_float_groups(tmp_path, capsys):
    assert _calibrate_to_a_zero_budget(tmp_path, _float_first_model(), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "of output 'y'" in out and "of output 'feat'" not in out
    assert "group(s) then kept in float by --max-drop" in out  # a budget of 0 dB: every group in float
    # the counts before it are the calibration's; the written model's follow (a probe read 8 and 8 for 8 Q nodes)
    written = onnx.load(str(tmp_path / "o" / "m.int8.onnx"))
    q = sum(1 for n in written.graph.node if n.op_type == "QuantizeLinear")
    assert f"(the model written: {q} activations and" in out


@pytest.mark.parametrize("flags, lines", [((), True), (("--no-progress",), False)])
def test_the_rankings_of_max_drop_and_debug_say_their_progress_off_a_terminal(tmp_path, capsys, monkeypatch,
                                                                              flags, lines):
    """The fourth probe stopped a --max-drop run on a recogniser after 4 minutes of a ranking that said
    nothing: off a terminal (no bar) a line every RANK_LOG_SECONDS (0 here), none with --no-progress."""
    from quantkit.cli import common, main

    monkeypatch.setattr(common, "RANK_LOG_SECONDS", 0.0)
    assert _calibrate_to_a_zero_budget(tmp_path, _model(), *flags) == 0
    err = capsys.readouterr().err
    assert ("ranking: 1 of 2 group(s) measured" in err) == lines, err
    # the calibration pass and the evaluation's comparison say theirs too (a piped log looked hung)
    assert ("calibrating: 64 of 64 img" in err) == lines and ("comparing: 32 of 32 img" in err) == lines, err
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "p"),
                 "--threads", "1", "--no-progress"]) == 0  # (the budget of 0 left no Q/DQ pair in 'o')
    capsys.readouterr()
    assert main(["debug", str(tmp_path / "m.onnx"), str(tmp_path / "p" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "e.npz"), "--rank", "-o", str(tmp_path / "dbg"), *flags]) == 0
    err = capsys.readouterr().err
    assert ("ranking: 2 of 2 group(s) measured" in err) == lines, err


def test_an_exclusion_of_nodes_that_read_nothing_quantized_says_so(tmp_path, caplog):
    model = _model()
    with caplog.at_level(logging.WARNING):
        cal = quantkit.quantize(model, _data(tmp_path), quantkit.QuantizeConfig(
            quantkit.StatsConfig(exclude_op_types=("Relu",))))
    assert "--exclude-op-type Relu matches 1 node(s) (Relu) that read no quantized tensor" in caplog.text
    assert cal.excluded == []


def test_a_calibration_on_few_samples_is_warned_about(tmp_path, caplog):
    # a probe's captcha model calibrated on its one sample: the checks read 43 dB there, -1 to 5 held out
    with caplog.at_level(logging.INFO):
        cal = quantkit.quantize(_model(), _data(tmp_path, n=4))
    assert "calibrated on 4 sample(s)" in caplog.text and "no method check: it needs 16" in caplog.text
    assert cal.method_check is None


def _non_tensor_output_model(kind: str) -> onnx.ModelProto:
    """The edges model with a second output that is not a tensor: skl2onnx's classifier output
    (``ZipMap`` of the probabilities: ``seq(map(int64, tensor(float)))``, its default) or a
    ``SequenceConstruct`` of them (``seq(tensor(float))``)."""
    model = _model()
    model.graph.node.append(h.make_node("Softmax", ["y"], ["prob"], axis=1))
    if kind == "zipmap":
        model.graph.node.append(h.make_node("ZipMap", ["prob"], ["prob_map"], domain="ai.onnx.ml",
                                            classlabels_int64s=list(range(8))))
        value = h.make_sequence_type_proto(h.make_map_type_proto(T.INT64, h.make_tensor_type_proto(T.FLOAT, None)))
        model.opset_import.append(h.make_opsetid("ai.onnx.ml", 1))
    else:
        model.graph.node.append(h.make_node("SequenceConstruct", ["prob"], ["prob_map"]))
        value = h.make_sequence_type_proto(h.make_tensor_type_proto(T.FLOAT, None))
    model.graph.output.append(h.make_value_info("prob_map", value))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["zipmap", "sequence"])
def test_a_non_tensor_output_keeps_its_type_and_is_named_as_not_compared(tmp_path, capsys, kind):
    """Found by the fourth probe: graphsurgeon wrote skl2onnx's ZipMap output as a tensor of no
    element type, and ONNX Runtime refused the INT8 model ("Invalid tensor data type 0": exit 2,
    read as the user's model; with --eval-images 0 the file was written)."""
    import onnxruntime as ort

    from quantkit.cli import main

    model = _non_tensor_output_model(kind)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 16)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    int8 = tmp_path / "o" / "m.int8.onnx"
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [(o.name, o.type) for o in sess.get_outputs()] == [(o.name, o.type) for o in fp32.get_outputs()]
    probs = sess.run(["prob_map"], {"x": RNG.normal(0, 1, (2, 16)).astype(np.float32)})[0]
    assert len(probs) == (2 if kind == "zipmap" else 1)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "m.onnx"), str(int8), "--npz", str(tmp_path / "c.npz")]) == 0
    assert "'prob_map' not compared: not a tensor" in capsys.readouterr().out


def test_an_optional_output_keeps_its_type(tmp_path):
    """An ``optional(tensor)`` output: graphsurgeon's exporter failed on it (an unbound local, exit 1)."""
    import onnxruntime as ort

    from quantkit.cli import main

    model = _model()
    model.opset_import[0].version = 18
    model.graph.node.append(h.make_node("Optional", ["y"], ["maybe"]))
    model.graph.output.append(h.make_value_info("maybe", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, None))))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(0, 1, (64, 16)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    sess = ort.InferenceSession(str(tmp_path / "o" / "m.int8.onnx"), providers=["CPUExecutionProvider"])
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "optional(tensor(float))"]


def test_a_conv_with_an_empty_bias_slot_is_bias_corrected(tmp_path):
    """Conv(x, W, ""): bias correction appended a fourth input, the corrected model did not load,
    and the correction was skipped with a warning."""
    w1 = nh.from_array(RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = nh.from_array(RNG.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [h.make_node("Conv", ["x", "w1", ""], ["c"], name="c1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]), h.make_node("Conv", ["r", "w2", ""], ["y"], name="c2", pads=[1, 1, 1, 1])]
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                                      [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])], [w1, w2]),
                         opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    np.savez(tmp_path / "d.npz", x=RNG.normal(0.5, 1, (64, 3, 8, 8)).astype(np.float32))
    cal = quantkit.quantize(model, NumpySource(tmp_path / "d.npz"))
    int8 = cal.int8_model()
    assert cal.bias_shifts.get(cal.config.method)
    assert all(len(n.input) == 3 for n in int8.graph.node if n.op_type == "Conv")
