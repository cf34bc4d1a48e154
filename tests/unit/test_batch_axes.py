"""Inputs that are not all batched on axis 0: an RNN state [layers, N, C], a 0-d sample-rate
scalar, a fixed-shape tensor. The .npz feed finds each input's batch axis from the model's input
shape (or takes a declared one) and feeds an input without one as it is, in every batch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.datasets import Batcher, NumpySource
from quantkit.errors import DatasetError


def _rnn_like(tmp_path, *, state_shape=(2, "batch", 4), sr_shape=()):
    """y = MatMul(x, W) * float(sr) / 16000; state_out = state + y[None] (x [batch, 8], state
    [2, batch, 4], sr a scalar int64): the layout of a streaming VAD's inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    k = numpy_helper.from_array(np.array(1 / 16000, np.float32), "k")
    ax = numpy_helper.from_array(np.array([0], np.int64), "ax")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["srf", "k"], ["gain"], name="gain"),
        helper.make_node("Mul", ["mm", "gain"], ["y"], name="y"),
        helper.make_node("Unsqueeze", ["y", "ax"], ["y3"], name="y3"),
        helper.make_node("Add", ["state", "y3"], ["state_out"], name="state_out"),
    ]
    graph = helper.make_graph(
        nodes, "rnn_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, list(state_shape)),
         helper.make_tensor_value_info("sr", TensorProto.INT64, list(sr_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 4])],
        [w, k, ax])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "rnn.onnx"
    onnx.save(model, path)
    return path


def _npz(tmp_path, n=10, name="feed.npz", **extra):
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((n, 8)).astype(np.float32),
              "state": rng.standard_normal((2, n, 4)).astype(np.float32),
              "sr": np.array(16000, np.int64), **extra}
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name, arrays


SHAPES = {"x": ("batch", 8), "state": (2, "batch", 4), "sr": ()}


def test_batch_axes_from_model_shapes(tmp_path):
    path, arrays = _npz(tmp_path)
    src = NumpySource(path, shapes=SHAPES)
    assert src.batch_axes_ == {"x": 0, "state": 1, "sr": None}
    assert len(src) == 10
    batches = list(Batcher(src, ["x", "state", "sr"], 4))
    assert [b.size for b in batches] == [4, 4, 2]
    last = batches[-1]
    np.testing.assert_array_equal(last.feed["state"], arrays["state"][:, 8:10])
    np.testing.assert_array_equal(last.feed["x"], arrays["x"][8:10])
    assert last.feed["sr"].shape == () and int(last.feed["sr"]) == 16000  # the scalar, as is, every batch
    np.testing.assert_array_equal(last.rows(1, 2)["state"], arrays["state"][:, 9:10])
    assert int(last.rows(1, 2)["sr"]) == 16000


def test_fixed_batch_1_model_with_state_stacked_on_axis_1(tmp_path, capsys):
    """A model exported for batch 1 ([1, 8] input, [2, 1, 4] state: silero-vad's OpenVINO
    variant): N samples stacked as [N, 8] and [2, N, 4] are batched on axes 0 and 1 (the state
    was fed whole before, and ONNX Runtime refused it: exit 1)."""
    from quantkit.cli import main

    path, arrays = _npz(tmp_path, n=6)
    src = NumpySource(path, shapes={"x": (1, 8), "state": (2, 1, 4), "sr": ()})
    assert src.batch_axes_ == {"x": 0, "state": 1, "sr": None}
    feeds = list(Batcher(src, ["x", "state", "sr"], 1))
    assert len(feeds) == 6 and feeds[4].feed["state"].shape == (2, 1, 4)
    np.testing.assert_array_equal(feeds[4].feed["state"], arrays["state"][:, 4:5])
    model = _rnn_like(tmp_path, state_shape=(2, 1, 4))
    fixed = onnx.load(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # x: [1, 8]
    onnx.save(fixed, model)
    rc = main(["calibrate", str(model), "--npz", str(path), "--eval-images", "0", "--no-progress",
               "-o", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err


def test_batch_axis_declared_and_fixed_shape_input(tmp_path):
    # no model shapes: axis 0 unless declared; a 0-d array has no batch axis
    path, arrays = _npz(tmp_path)
    src = NumpySource(path, batch_axes={"state": 1})
    assert src.batch_axes_ == {"x": 0, "state": 1, "sr": None}
    # a fixed-shape input ([3, 4] declared and given so) is fed as is, the same in every batch
    path2, arrays2 = _npz(tmp_path, name="f.npz", table=np.ones((3, 4), np.float32))
    src2 = NumpySource(path2, shapes={**SHAPES, "table": (3, 4)})
    assert src2.batch_axes_["table"] is None
    assert all(b.feed["table"].shape == (3, 4) for b in Batcher(src2, ["x", "state", "sr", "table"], 3))
    # "none" declared: fed as is even where the shape would allow a batch axis
    src3 = NumpySource(path, shapes=SHAPES, batch_axes={"state": None})
    assert src3.batch_axes_["state"] is None


def test_batch_axis_ambiguous_or_inconsistent_is_one_error(tmp_path):
    rng = np.random.default_rng(2)
    # two dynamic dims with the same size on both inputs, and axis 0 not shared: cannot tell
    np.savez(tmp_path / "amb.npz", a=rng.standard_normal((6, 6)).astype(np.float32),
             b=rng.standard_normal((3, 6, 6)).astype(np.float32))
    with pytest.raises(DatasetError, match=r"batch axis of 'b' \(3, 6, 6\) is ambiguous") as info:
        NumpySource(tmp_path / "amb.npz", shapes={"a": ("n", "t"), "b": (3, "n", "t")})
    assert "--batch-axis" in info.value.hint and "\n" not in str(info.value)
    # no size common to every batched input
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 8), np.float32), state=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DatasetError, match=r"share no batch size"):
        NumpySource(tmp_path / "bad.npz", shapes={"x": ("batch", 8), "state": (2, "batch", 4)})
    with pytest.raises(DatasetError, match=r"'state'.*axis 3.*3 dimensions"):
        NumpySource(tmp_path / "bad.npz", batch_axes={"state": 3})


def test_calibrate_model_with_state_on_axis_1_and_scalar(tmp_path, capsys):
    from quantkit.cli import main

    model = _rnn_like(tmp_path)
    path, _ = _npz(tmp_path, n=20)
    rc = main(["calibrate", str(model), "--npz", str(path), "--batch-size", "8", "--eval-images", "0",
               "--no-progress", "-o", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    import onnxruntime as ort

    int8 = next((tmp_path / "out").glob("*.int8.onnx"))
    s = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    y, st = s.run(None, {"x": np.ones((3, 8), np.float32), "state": np.zeros((2, 3, 4), np.float32),
                         "sr": np.array(16000, np.int64)})
    assert y.shape == (3, 4) and st.shape == (2, 3, 4)


def test_cli_batch_axis_flag(tmp_path, capsys):
    from quantkit.cli import main

    model = _rnn_like(tmp_path, state_shape=(2, "b2", 4))  # the state's batch dim is not named like x's
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "sq.npz", x=rng.standard_normal((2, 8)).astype(np.float32),
             state=rng.standard_normal((2, 2, 4)).astype(np.float32), sr=np.array(16000, np.int64))
    # [2, 2, 4] for [2, ?, 4]: axis 1 is the only dynamic dim, so no flag needed here; a wrong
    # declaration is refused in one line
    rc = main(["calibrate", str(model), "--npz", str(tmp_path / "sq.npz"), "--batch-axis", "state=5",
               "--eval-images", "0", "--no-progress", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "'state'" in err and "axis 5" in err
    rc = main(["calibrate", str(model), "--npz", str(tmp_path / "sq.npz"), "--batch-axis", "state=1",
               "--eval-images", "0", "--no-progress", "-o", str(tmp_path / "o2")])
    assert rc == 0, capsys.readouterr().err


def test_one_sample_of_a_batch_1_model_with_a_time_axis_is_one_sample(tmp_path):
    # x [1, T, 8] given as (1, 50, 8): one sample of 50 time steps, as (N, 50, 8) is N samples (a
    # probe's streaming VAD was read as 50 one-step samples, 33.8 -> 16.9 dB); its caches as they are
    from quantkit.datasets.sources import batch_axes_from_shapes

    shapes = {"x": (1, "T", 8), "cache": (1, 128)}
    assert batch_axes_from_shapes({"x": (1, 50, 8), "cache": (1, 128)}, shapes, {}, where="d") == \
        {"x": 0, "cache": None}
    assert batch_axes_from_shapes({"x": (5, 50, 8), "cache": (1, 128)}, shapes, {}, where="d") == \
        {"x": 0, "cache": None}
    # an LSTM state [1, N, H] stacked on axis 1 beside its inputs keeps axis 1
    state = {"x": ("N", 6, 8), "h": (1, "N", 16)}
    assert batch_axes_from_shapes({"x": (64, 6, 8), "h": (1, 64, 16)}, state, {}, where="d") == {"x": 0, "h": 1}
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 50, 8), np.float32), cache=np.zeros((1, 128), np.float32))
    assert len(NumpySource(tmp_path / "one.npz", shapes=shapes)) == 1


def _two_token_inputs(tmp_path, first=("N", "N")):
    """y = mean_T(x * mask) @ W: two [N, T] inputs, both axes dynamic (a transformer's ids and mask)."""
    w = numpy_helper.from_array(np.arange(1, 5, dtype=np.float32).reshape(1, 4), "W")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "mask"], ["xm"]),
         helper.make_node("ReduceMean", ["xm"], ["r"], axes=[1], keepdims=1),
         helper.make_node("MatMul", ["r", "W"], ["y"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first[0], "T"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [first[1], "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [first[0], 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "two.onnx")
    return tmp_path / "two.onnx"


@pytest.mark.parametrize("mask_rows", [1, 150])
def test_arrays_of_different_sample_counts_are_not_batched_on_their_shared_sequence_axis(tmp_path, capsys, mask_rows):
    # a probe's BERT (ids, mask, token types, all [N, T] dynamic) given 200 ids and one token-type row:
    # axis 0 disagreed, and the one size every array had, T = 76, became the batch axis ("calibrated 76
    # samples", exit 0); 200 against 150 rows got ONNX Runtime's Gather error instead of the counts
    from quantkit.cli import main
    from quantkit.datasets.sources import batch_axes_from_shapes

    model = _two_token_inputs(tmp_path)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((200, 76)).astype(np.float32),
             mask=np.ones((mask_rows, 76), np.float32))
    before = (tmp_path / "d.npz").read_bytes()
    for verb in (["calibrate", str(model)], ["compare", str(model), str(model)]):
        rc = main([*verb, "--npz", str(tmp_path / "d.npz"), "--no-progress", "-o", str(tmp_path / "out")]
                  if verb[0] == "calibrate" else [*verb, "--npz", str(tmp_path / "d.npz"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"different numbers of samples on axis 0 ('x' 200, 'mask' {mask_rows})" in err, err
        assert "--batch-axis NAME=none" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and (tmp_path / "d.npz").read_bytes() == before
    if mask_rows == 1:  # declared as fed whole: every batch of x beside the one mask row
        assert main(["compare", str(model), str(model), "--npz", str(tmp_path / "d.npz"), "--batch-axis", "mask=none",
                     "--no-progress"]) == 0
        assert "on 200 samples" in capsys.readouterr().out
    # time-major inputs of their own lengths, [S, N] and [T, N] (torch's nn.Transformer): batched on axis 1
    assert batch_axes_from_shapes({"src": (7, 32), "tgt": (5, 32)}, {"src": ("S", "N"), "tgt": ("T", "N")}, {},
                                  where="d") == {"src": 1, "tgt": 1}
    # and unnamed first dims decide nothing either way: the shared size as before
    assert batch_axes_from_shapes({"a": (7, 32), "b": (5, 32)}, {"a": (None, None), "b": (None, None)}, {},
                                  where="d") == {"a": 1, "b": 1}


def test_an_npz_of_empty_arrays_says_it_holds_no_samples(tmp_path, capsys):
    # a probe's .npz of shape (0, 224, 224, 3) got "arrays must share a non-zero size" and a hint to
    # declare a batch axis; the fix is samples
    from quantkit.cli import main

    model = _two_token_inputs(tmp_path)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 76), np.float32), mask=np.zeros((0, 76), np.float32))
    with pytest.raises(DatasetError, match=r"holds 0 samples") as info:
        NumpySource(tmp_path / "empty.npz", shapes={"x": ("N", "T"), "mask": ("N", "T")})
    assert "--batch-axis" not in info.value.hint
    assert main(["calibrate", str(model), "--npz", str(tmp_path / "empty.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "holds 0 samples" in capsys.readouterr().err and not (tmp_path / "o").exists()
