"""A model that declares a dynamic batch but runs one sample at a time only.

Exporters bake the batch of the tracing sample into a Reshape now and then (a khmersm word
segmenter from PyPI, exported by torch's dynamo exporter: input [batch, seq], a Reshape to
[seq, 1, heads, dim] inside). ONNX Runtime then fails on any batch of more than one sample.
quantkit finds that on the first batch (one sample alone runs), warns once per model, and runs
it sample by sample from then on: the calibration, its bias correction and evaluation, compare,
debug and its ranking. Data that does not run even alone is one line, exit 2.
"""

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.backends.onnxruntime import OrtRunner
from quantkit.datasets import NumpySource
from quantkit.errors import InputError
from tests.unit.test_fuzz import run_cli


def _batch_one_model(flat: int = 8 * 6 * 6) -> onnx.ModelProto:
    """x [batch, 3, 6, 6] -> Conv -> Relu -> Conv -> Relu -> Reshape to [1, flat] (batch 1 baked in)
    -> MatMul -> y [1, 10]; ``flat`` other than 288 makes a model no sample runs on."""
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(r.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(r.normal(0, 0.2, (8, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(r.normal(0, 0.1, 8).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array([1, flat], np.int64), "baked"),
        numpy_helper.from_array(r.normal(0, 0.05, (flat, 10)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "baked"], ["flat"], name="view"),
        helper.make_node("MatMul", ["flat", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "batch_one", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["batch", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int = 40) -> np.ndarray:
    return np.random.default_rng(1).normal(0.5, 1.0, (n, 3, 6, 6)).astype(np.float32)


def test_the_runner_finds_it_on_the_first_batch_and_runs_rows(caplog):
    model, x = _batch_one_model(), _data(5)
    with caplog.at_level(logging.WARNING), OrtRunner(model, name="seg.onnx") as r:
        out = r.infer({"x": x})["y"]
        assert r.one_at_a_time
        again = r.infer({"x": x[:3]})["y"]
    rows = np.concatenate([OrtRunner(model).infer({"x": x[i:i + 1]})["y"] for i in range(5)])
    np.testing.assert_allclose(out, rows, rtol=1e-6)
    np.testing.assert_allclose(again, rows[:3], rtol=1e-6)
    said = [r.getMessage() for r in caplog.records if "one sample at a time" in r.getMessage()]
    assert len(said) == 1 and "seg.onnx" in said[0] and "Reshape" in said[0]


def test_quantize_calibrates_corrects_and_evaluates_one_sample_at_a_time(caplog, tmp_path):
    model = _batch_one_model()
    np.savez(tmp_path / "d.npz", x=_data(40))
    with caplog.at_level(logging.WARNING):
        cal = quantkit.quantize(model, NumpySource(tmp_path / "d.npz"), indices=range(30))
        assert cal.config.run.batch_size == 1
        int8 = cal.int8_model()
        report = cal.evaluate(NumpySource(tmp_path / "d.npz"), indices=range(30, 40))
    assert cal.bias_shifts.get(cal.config.method), "bias correction ran (one sample a batch)"
    assert not [r for r in caplog.records if "bias correction skipped" in r.getMessage()]
    assert report.num_samples == 10 and report.outputs[0].sqnr_db > 20
    with OrtRunner(int8) as r:  # the written model is the user's interface: batch still dynamic
        assert r.input_specs[0].static_batch is None


def test_data_that_does_not_run_even_alone_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(_batch_one_model(flat=100), bad)
    np.savez(tmp_path / "d.npz", x=_data(8))
    with pytest.raises(InputError, match=r"ONNX Runtime cannot run .* on this data: .*Reshape"):
        quantkit.quantize(onnx.load(bad), NumpySource(tmp_path / "d.npz"))
    rc, out, err = run_cli(["calibrate", str(bad), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                            "--no-progress"])
    lines = [ln for ln in err.splitlines() if ln.startswith("quantkit: error")]
    assert rc == 2 and len(lines) == 1 and "Reshape" in lines[0] and "onnxruntime_src" not in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_calibrate_compare_and_debug_rank(tmp_path, caplog):
    path = tmp_path / "seg.onnx"
    onnx.save(_batch_one_model(), path)
    np.savez(tmp_path / "cal.npz", x=_data(40)[:30])
    np.savez(tmp_path / "ev.npz", x=_data(40)[30:])
    rc, out, err = run_cli(["calibrate", str(path), "--npz", str(tmp_path / "cal.npz"), "--eval-dir",
                            str(tmp_path / "ev.npz"), "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, err
    assert "on 10 samples" in out
    assert any("one sample at a time" in r.getMessage() for r in caplog.records)
    int8 = tmp_path / "out" / "seg.int8.onnx"
    rc, out, err = run_cli(["compare", str(path), str(int8), "--npz", str(tmp_path / "ev.npz"), "--no-progress"])
    assert rc == 0, err
    rc, out, err = run_cli(["debug", str(path), str(int8), "--npz", str(tmp_path / "ev.npz"), "--rank",
                            "-o", str(tmp_path / "dbg"), "--no-progress"])
    assert rc == 0, err
    assert (tmp_path / "dbg" / "debug.json").is_file()


def _state_model() -> onnx.ModelProto:
    """x [batch, 3, 6, 6] and a state h [2, 8] fed whole (``--batch-axis h=none``): the first
    Conv's output plus h's sum over its 2 rows per channel, then the batch-one Reshape and MatMul
    of ``_batch_one_model``: a model that runs one sample at a time, with an input not to split."""
    m = _batch_one_model()
    g = m.graph
    g.input.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 8]))
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
    g.initializer.append(numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64), "as4d"))
    relu = next(i for i, n in enumerate(g.node) if n.name == "relu1")
    g.node[relu].input[0] = "c1h"
    for k, node in enumerate([helper.make_node("ReduceSum", ["h", "ax0"], ["hs"], keepdims=0, name="hsum"),
                              helper.make_node("Reshape", ["hs", "as4d"], ["h4"], name="h4d"),
                              helper.make_node("Add", ["c1", "h4"], ["c1h"], name="addh")]):
        g.node.insert(relu + k, node)
    onnx.checker.check_model(m)
    return m


def test_an_input_fed_whole_is_not_split_when_a_model_runs_one_sample_at_a_time(tmp_path):
    """compare and debug split every input on axis 0 for such a model: the state [2, 8] became
    [1, 8] and ONNX Runtime's shape error read as the user's data (exit 2), where calibrate ran."""
    onnx.save(_state_model(), tmp_path / "m.onnx")
    h = np.random.default_rng(2).normal(0, 0.3, (2, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=_data(40), h=h)  # h: one array, fed whole to every batch
    data = ["--npz", str(tmp_path / "d.npz"), "--batch-axis", "h=none", "--no-progress"]
    rc, _, err = run_cli(["calibrate", str(tmp_path / "m.onnx"), *data, "--num-images", "24",
                          "-o", str(tmp_path / "out")])
    assert rc == 0, err
    int8 = str(tmp_path / "out" / "m.int8.onnx")
    rc, out, err = run_cli(["compare", str(tmp_path / "m.onnx"), int8, *data])
    assert rc == 0 and "on 40 samples" in out, err
    rc, _, err = run_cli(["debug", str(tmp_path / "m.onnx"), int8, *data, "-o", str(tmp_path / "dbg")])
    assert rc == 0, err
