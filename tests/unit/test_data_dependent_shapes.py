"""Outputs whose shape depends on the values: the boxes NonMaxSuppression keeps, NonZero's indices.

INT8 moves a score across the threshold now and then, so the FP32 and INT8 models return
different numbers of rows for the same batch. compare and debug paired the two arrays element by
element and failed with NumPy's broadcast error (exit 1); such a batch is now left out of that
output's figures and counted, and the table says so.
"""

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.cli import main
from quantkit.compare import _OutputStats
from quantkit.datasets import NumpySource
from quantkit.debug import layerwise_error
from quantkit.ptq import RunConfig, evaluation_batches


def _nonzero_model() -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv -> y (float) and idx = NonZero(y > 0) ([4, K]: K depends on y)."""
    r = np.random.default_rng(0)
    w = numpy_helper.from_array(r.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Greater", ["y", "zero"], ["pos"], name="gt"),
             helper.make_node("NonZero", ["pos"], ["idx"], name="nz")]
    graph = helper.make_graph(nodes, "nz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8]),
                               helper.make_tensor_value_info("idx", TensorProto.INT64, [4, "K"])], [w, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_output_stats_leave_out_batches_whose_shapes_differ():
    st = _OutputStats("boxes")
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    st.update(a, a + 0.01)
    st.update(a, np.vstack([a, a[:1]]))  # one more box kept
    m = st.result()
    assert (m.shape_differs, m.batches) == (1, 2) and math.isfinite(m.sqnr_db)
    only = _OutputStats("boxes")
    only.update(a, a[:3])
    m = only.result()
    assert m.shape_differs == 1 and math.isnan(m.sqnr_db) and math.isnan(m.cosine_mean)
    # nothing compared: no error figure (it read 0.0, which compare --json's readers took for a perfect match)
    assert math.isnan(m.max_abs_error) and math.isnan(m.mean_abs_error)
    from quantkit.compare import CompareReport

    row = [line for line in CompareReport("r", "t", 4, [m]).table().splitlines() if "boxes" in line][0]
    assert row.split()[1:] == ["-"] * 5, row


def test_compare_and_debug_report_a_data_dependent_output(tmp_path, capsys):
    model = _nonzero_model()
    x = np.random.default_rng(1).normal(0, 1, (24, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    cal = quantkit.quantize(model, NumpySource(tmp_path / "d.npz"), indices=range(16))
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    onnx.save(model, fp32)
    onnx.save(cal.int8_model(), int8)
    batches = evaluation_batches(NumpySource(tmp_path / "d.npz"), cal.specs, range(24), RunConfig(batch_size=4))
    rep = layerwise_error(cal.model, cal.int8_model(), batches)
    idx = next(o for o in rep.outputs if o.name == "idx")
    assert idx.batches == 6 and idx.shape_differs >= 1, "the test needs a batch where INT8 keeps other indices"
    assert math.isfinite(next(o for o in rep.outputs if o.name == "y").sqnr_db)
    rc = main(["compare", str(fp32), str(int8), "--npz", str(tmp_path / "d.npz"), "--batch-size", "4",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "data-dependent shape" in out
    rc = main(["debug", str(fp32), str(int8), "--npz", str(tmp_path / "d.npz"), "--batch-size", "4",
               "-o", str(tmp_path / "dbg"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "output idx" in out


def test_a_data_dependent_error_output_cannot_set_a_budget_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # the error output is the first float one (integer ids are skipped): here the NonZero indices as floats
    model = _nonzero_model()
    outs = list(model.graph.output)
    model.graph.node.append(helper.make_node("Cast", ["idx"], ["idxf"], to=TensorProto.FLOAT, name="cast"))
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("idxf", TensorProto.FLOAT, [4, "K"]), outs[0]])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(0, 1, (48, 3, 8, 8)).astype(np.float32))
    import quantkit.ptq

    def calibrated(*args, **kwargs):  # refused before the calibration: it was found only after it
        raise AssertionError("calibrated an output --max-drop cannot budget")

    monkeypatch.setattr(quantkit.ptq, "quantize", calibrated)
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "--max-drop", "0",
               "--drop-metric", "sqnr", "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "data-dependent shape" in err and "'idxf' is [4," in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_integer_data_dependent_first_output_leaves_the_budget_to_the_float_one(tmp_path, capsys):
    # NonZero's int64 indices first: the fallback measures y, the first float output, and meets the budget
    model = _nonzero_model()
    outs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([outs[1], outs[0]])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(0, 1, (48, 3, 8, 8)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "--max-drop", "1",
               "--drop-metric", "sqnr", "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0 and (tmp_path / "out" / "m.int8.onnx").exists()


def test_a_selection_by_an_input_is_not_refused_before_the_calibration():
    """The pre-check runs only where the selection reads a weighted layer's values: NonZero of an
    input mask (the tokens an attention mask keeps) is the same in the FP32 and INT8 models."""
    from quantkit.debug.fallback import _selected_by_computed_values

    model = _nonzero_model()
    assert _selected_by_computed_values(model, "idx")
    assert not _selected_by_computed_values(model, "y")
    model.graph.node[1].input[0] = "x"  # Greater(x, 0): a selection by the input's values
    assert not _selected_by_computed_values(model, "idx")
