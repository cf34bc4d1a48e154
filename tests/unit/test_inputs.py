"""Model inputs that are not float32: float64 data, int64 token ids, int32 data, bool masks."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit import sample
from quantkit.cli import main
from quantkit.datasets import Batcher, NumpySource, SyntheticSource
from quantkit.datasets.dtypes import DtypeMismatchError, cast_for_input
from quantkit.errors import InputError
from tests.helpers import T, VOCAB, make_token_model

@pytest.fixture(scope="module")
def token_model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("tokens") / "tokens.onnx"
    onnx.save(make_token_model(), p)
    return p


def _token_data(n=40, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, VOCAB, (n, T), dtype=np.int64)
    mask = np.ones((n, T), bool)
    mask[:, T - 2:] = r.random((n, 2)) < 0.5
    return ids, mask


# ---- the cast rules ------------------------------------------------------------------------

@pytest.mark.parametrize("data, dtype, expect", [
    (np.array([0.5, -2.25], np.float64), np.float32, np.array([0.5, -2.25], np.float32)),
    (np.array([1, 7], np.int32), np.int64, np.array([1, 7], np.int64)),
    (np.array([1, 7], np.int64), np.int32, np.array([1, 7], np.int32)),
    (np.array([3.0, 4.0]), np.int64, np.array([3, 4], np.int64)),
    (np.array([0, 1, 1], np.int64), np.bool_, np.array([False, True, True])),
    (np.array([True, False]), np.int64, np.array([1, 0], np.int64)),
    (np.array([0, 255], np.uint8), np.float32, np.array([0.0, 255.0], np.float32)),
])
def test_safe_casts_keep_every_value(data, dtype, expect):
    out = cast_for_input(data, dtype, name="x")
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("data, dtype, match", [
    (np.array([1.5, 2.0]), np.int64, "1.5.*not whole numbers"),
    (np.array([2**40], np.int64), np.int32, "do not fit int32"),
    (np.array([0, 2], np.int64), np.bool_, "0 and 1"),
    (np.array([1e39]), np.float32, "overflow float32"),
    (np.array([2**30 + 1], np.int64), np.float32, "not exact in float32"),
    (np.array(["a"]), np.float32, "numeric"),
])
def test_lossy_casts_are_refused_with_one_line(data, dtype, match):
    with pytest.raises(DtypeMismatchError, match=match) as err:
        cast_for_input(data, dtype, name="ids", where="data.npz")
    assert isinstance(err.value, InputError) and "'ids'" in str(err.value) and "\n" not in str(err.value)


def test_text_for_a_string_input_is_taken_from_str_and_utf8_bytes_arrays():
    """A STRING input (skl2onnx's text pipelines, TF text models): .npz keeps NumPy str arrays
    without pickling (an object array it refuses), so those are what the input takes."""
    out = cast_for_input(np.array([["héllo"], ["w"]]), object, name="text")
    assert out.dtype == object and out.tolist() == [["héllo"], ["w"]] and isinstance(out[0, 0], str)
    assert cast_for_input(np.array(["héllo".encode()]), object, name="text").tolist() == ["héllo"]
    with pytest.raises(DtypeMismatchError, match="not UTF-8"):
        cast_for_input(np.array([b"\xff\xfe"]), object, name="text")
    with pytest.raises(DtypeMismatchError, match="and text") as err:  # numbers for text: the hint says how
        cast_for_input(np.array([1.0]), object, name="text")
    assert "NumPy str array" in err.value.hint  # not "as object": an object array is what .npz cannot keep


def test_a_string_input_model_calibrates_and_compares_from_a_str_npz(tmp_path, capsys):
    """Found by the fourth probe: a model with a STRING input was refused twice (exit 2) on a
    valid model: a str array, "save the array as object"; then the object array, "cannot be read
    without unpickling"."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["text"], ["text_out"])], "g",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", text=np.array([["hello world"], ["good movie"]] * 32),
             x=np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "'text_out' holds integers, flags or text" in out and "1.0000 of the samples equal" in out


def test_float64_cast_noted_once(caplog):
    noted: set[str] = set()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            cast_for_input(np.zeros(2), np.float32, name="x", noted=noted)
    assert len([r for r in caplog.records if "float64" in r.getMessage()]) == 1


# ---- integer and bool model inputs ---------------------------------------------------------

def test_token_model_calibrates_through_the_api(tmp_path):
    import onnxruntime as ort

    from quantkit.ptq import QuantizeConfig, RunConfig, quantize

    ids, mask = _token_data()
    np.savez(tmp_path / "t.npz", ids=ids.astype(np.int32), mask=mask)  # int32 ids: cast to int64
    model = make_token_model()
    cal = quantize(model, NumpySource(tmp_path / "t.npz"), QuantizeConfig(run=RunConfig(batch_size=16)))
    scaled = {e.scaled: e.tensor for e in cal.equalized}  # a MatMul input may be equalized: t * s
    assert {"masked", "pooled"} <= {scaled.get(t, t) for t in cal.plan.activations}
    assert cal.num_samples == 40
    int8 = cal.int8_model()
    assert [(i.name, i.type.tensor_type.elem_type) for i in int8.graph.input] == [
        ("ids", TensorProto.INT64), ("mask", TensorProto.BOOL)]
    from quantkit.backends.onnxruntime import create_session

    sess = create_session(int8)  # as TensorRT computes it (ONNX Runtime's own kernels saturate on AVX2: 6.6 dB)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y8 = sess.run(None, {"ids": ids, "mask": mask})[0]
    y32 = ref.run(None, {"ids": ids, "mask": mask})[0]
    sqnr = 10 * np.log10((y32**2).sum() / ((y32 - y8) ** 2).sum())
    assert sqnr > 20, sqnr


def test_token_model_cli_npz(token_model_path, tmp_path, capsys):
    ids, mask = _token_data()
    np.savez(tmp_path / "t.npz", ids=ids, mask=mask.astype(np.int64))  # 0/1 mask as int64: cast to bool
    out = tmp_path / "out"
    assert main(["calibrate", str(token_model_path), "--npz", str(tmp_path / "t.npz"), "-o", str(out),
                 "--num-images", "24", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] and report["num_samples"] == 16
    q = onnx.load(out / "tokens.int8.onnx")
    assert [i.name for i in q.graph.input] == ["ids", "mask"]


def test_token_model_refusals_exit_2(token_model_path, tmp_path, digits_dirs, capsys):
    ids, mask = _token_data()
    np.savez(tmp_path / "f.npz", ids=ids + 0.5, mask=mask)
    assert main(["calibrate", str(token_model_path), "--npz", str(tmp_path / "f.npz"), "-o", str(tmp_path / "o1"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'ids'" in err and "float64" in err and "int64" in err and "Traceback" not in err
    assert main(["calibrate", str(token_model_path), "--images", str(digits_dirs[1]), "-o", str(tmp_path / "o2"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--npz" in err and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    one = tmp_path / "ids_only.onnx"  # a single int64 input: the image folder is refused for its dtype
    onnx.save(_ids_only_model(), one)
    assert main(["calibrate", str(one), "--images", str(digits_dirs[1]), "-o", str(tmp_path / "o3"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'ids' is int64" in err and "--npz" in err


def _ids_only_model():
    g = helper.make_graph(  # ids used as numbers, not as indices of a table: no obvious range
        [helper.make_node("Cast", ["ids"], ["f"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones((T, 2), np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_float64_npz_on_the_digits_model(tmp_path, caplog, capsys):
    images, labels, test = sample.load_digits()
    pp = sample.preprocess()
    x = ((images[test][:64].astype(np.float64) / 255 - pp.mean[0]) / pp.std[0])[:, None]
    np.savez(tmp_path / "d.npz", image=x, labels=labels[test][:64])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(sample.model_path()), "--npz", str(tmp_path / "d.npz"), "-o", str(out),
                   "--num-images", "48", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    notes = [r.getMessage() for r in caplog.records if "cast to float32" in r.getMessage()]
    assert len(notes) == 1 and "'image'" in notes[0]  # one note, though two batchers read the data
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_reference"] >= 0.9
    assert main(["compare", str(sample.model_path()), str(out / "digits_cnn.int8.onnx"), "--npz",
                 str(tmp_path / "d.npz"), "--no-progress"]) == 0


def test_model_without_quantizable_float_activation(tmp_path):
    from quantkit.errors import ModelError
    from quantkit.ptq import prepare

    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="g")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.zeros((5, 3), np.float32), "table")])
    with pytest.raises(ModelError, match="nothing to quantize"):
        prepare(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_model_without_layers_is_refused_before_its_opset_is_upgraded(monkeypatch):
    # luscinia's 194 MB tree ensemble was refused only after the opset upgrade: 30-50 s and 5.7 GB
    import quantkit.ptq
    from quantkit.errors import ModelError

    g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"], name="a")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.ones(3, np.float32), "b")])

    def no_upgrade(*a, **k):
        raise AssertionError("upgraded before the refusal")

    monkeypatch.setattr(quantkit.ptq, "ensure_opset", no_upgrade)
    with pytest.raises(ModelError, match=r"has no Conv, ConvTranspose, Gemm or MatMul nodes \(its ops: .*\): nothing to quantize"):
        quantkit.ptq.prepare(helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)]))


# ---- synthetic data for integer inputs -------------------------------------------------------

def test_synthetic_integer_range():
    src = SyntheticSource((T,), count=8, dtype="int64", value_range=(3, 9), seed=2)
    x = np.stack([src.load(i) for i in range(8)])
    assert x.dtype == np.int64 and x.min() >= 3 and x.max() < 9 and len(np.unique(x)) > 3
    np.testing.assert_array_equal(src.load(5), src.load(5))
    with pytest.raises(InputError, match="value_range"):
        SyntheticSource((T,), dtype="int64")
    m = SyntheticSource((T,), count=4, dtype="bool", seed=1)
    assert m.load(0).dtype == np.bool_


def test_synthetic_for_model_takes_the_vocabulary_from_the_gather():
    from quantkit.datasets.sources import synthetic_for_model
    from quantkit.ptq import quantize

    model = make_token_model()
    src = synthetic_for_model(model, count=32)
    batch = next(iter(Batcher(src, ["ids", "mask"], 32)))
    ids = batch.feed["ids"]
    assert ids.dtype == np.int64 and ids.shape == (32, T) and ids.min() >= 0 and ids.max() < VOCAB
    assert ids.max() >= VOCAB - 5  # the whole table is used, not a guess
    assert batch.feed["mask"].dtype == np.bool_
    cal = quantize(model, src)
    assert cal.num_samples == 32
    m2 = _ids_only_model()
    with pytest.raises(InputError, match="value range is unknown"):
        synthetic_for_model(m2, count=4)
    assert synthetic_for_model(m2, count=4, ranges={"ids": (0, 8)}).load(0)["ids"].max() < 8


def test_a_string_input_of_one_string_a_sample_calibrates(tmp_path):
    """A STRING input [N] (one string a sample): a sample of the 1-D text array is a Python str, and
    batching it failed with "'str' object has no attribute 'shape'" (exit 1)."""
    keys = ["", "cat", "dog", "café"]
    nodes = [helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml", keys_strings=keys,
                              values_floats=[0.5, 1.0, -1.0, 2.0], default_float=0.0),
             helper.make_node("Unsqueeze", ["code", "ax1"], ["code2"]),
             helper.make_node("Concat", ["x", "code2"], ["xc"], axis=1), helper.make_node("MatMul", ["xc", "W"], ["out"])]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                           helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(rng.standard_normal((9, 4)).astype(np.float32), "W"),
                               numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 8)).astype(np.float32),
             s=np.array(rng.choice(keys + ["other"], 64).tolist()))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
