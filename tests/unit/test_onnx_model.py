"""quantkit.onnx.model: load errors that name the file, input/output specs (fixed, symbolic, -1
and unnamed dims, dtypes), opset conversion, float activations, extra outputs, atomic save."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.errors import ModelError
from quantkit.onnx.model import (ensure_opset, float_activations, input_specs, load_model, opset_version,
                                 output_specs, save_model, tensor_types, with_outputs)
from tests.helpers import make_residual_model, make_token_model


def test_load_model_errors_name_the_file(tmp_path, residual_model_path):
    cases = {
        tmp_path / "missing.onnx": "does not exist",
        tmp_path: "is a folder",
    }
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    cases[tmp_path / "junk.onnx"] = "not a readable ONNX model|not an ONNX model with a graph"
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    onnx.save(empty, tmp_path / "empty.onnx")
    cases[tmp_path / "empty.onnx"] = "no nodes found"
    bad = make_residual_model()
    bad.graph.node[1].input[0] = "nowhere"  # a node reads a tensor nothing makes
    onnx.save(bad, tmp_path / "invalid.onnx")
    cases[tmp_path / "invalid.onnx"] = "is not a valid ONNX model"
    for path, message in cases.items():
        with pytest.raises(ModelError, match=message) as err:
            load_model(path)
        assert repr(str(path)) in str(err.value) and "\n" not in str(err.value), path
    assert load_model(residual_model_path).graph.name == "residual"


def _io_model() -> onnx.ModelProto:
    """Inputs with a fixed, a symbolic, a -1 and an unnamed dim; int64 and float16 inputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, -1, None])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [4, "T"])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, -1, None])
    w = onnx.numpy_helper.from_array(np.ones(1, np.float32), "w")
    ids_out = helper.make_tensor_value_info("ids_out", TensorProto.INT64, [4, "T"])
    h_out = helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, [2])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"]), helper.make_node("Identity", ["ids"], ["ids_out"]),
                               helper.make_node("Identity", ["h"], ["h_out"])], "io",
                              [x, ids, h, helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
                              [y, ids_out, h_out], [w])  # every input is read (unused inputs are left out of the specs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_and_output_specs():
    m = _io_model()
    specs = input_specs(m)
    assert [s.name for s in specs] == ["x", "ids", "h"]  # the initializer 'w' listed as an input is not one
    x, ids, h = specs
    assert x.shape[:2] == ("batch", 3) and x.static_batch is None and x.dtype == np.float32
    assert x.shape == ("batch", 3, None, None)  # -1 and an unnamed dim are dynamic
    assert (ids.shape, ids.dtype, ids.static_batch) == ((4, "T"), np.dtype(np.int64), 4)
    assert (h.shape, h.dtype, h.static_batch) == ((2,), np.dtype(np.float16), 2)
    y = output_specs(m)[0]
    assert (y.name, y.shape, y.dtype) == ("y", ("batch", 3, None, None), np.float32)


def test_minus_one_batch_is_dynamic():
    m = _io_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert input_specs(m)[0].static_batch is None


def test_spec_dims_of_real_files(tmp_path):
    """What the specs say about dims is what ONNX Runtime reports for the same file."""
    path = tmp_path / "m.onnx"
    onnx.save(make_token_model(), path)
    runner = OrtRunner(path)
    for spec, meta in zip(runner.input_specs, runner.session.get_inputs()):
        assert spec.name == meta.name
        assert [d if isinstance(d, int) else "?" for d in spec.shape] == [d if isinstance(d, int) else "?" for d in meta.shape]


def test_ensure_opset_converts_old_models_and_keeps_new_ones(rng):
    new = make_residual_model(17)
    assert ensure_opset(new) is new
    old = make_residual_model(11)
    converted = ensure_opset(old, 13)
    assert opset_version(converted) == 13 and opset_version(old) == 11
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(converted).infer({"x": x})["y"], OrtRunner(old).infer({"x": x})["y"],
                               rtol=1e-5, atol=1e-6)


def test_ensure_opset_failure_is_one_line_with_a_hint():
    m = make_residual_model(11)
    m.graph.node[0].op_type = "NoSuchOp"  # the converter has no adapter for it
    with pytest.raises(ModelError, match="uses opset 11; per-channel Q/DQ needs opset 13") as err:
        ensure_opset(m)
    assert "\n" not in str(err.value) and "opset_version>=13" in err.value.hint


def test_float_activations_list_every_float_tensor_once():
    m = make_residual_model()
    assert float_activations(m) == ["x", "c1", "r1", "c2", "a1", "r2", "ct", "gp", "fl", "g", "y"]
    tokens = float_activations(make_token_model())
    assert "ids" not in tokens and "mask" not in tokens  # int64 and bool inputs
    assert "maskf" in tokens and "emb" in tokens and "y" in tokens


def test_tensor_types_infer_without_the_weights(monkeypatch, rng):
    """Shape inference serializes the model it gets: tensor_types hands it the graph without the
    large float weights (a 90 MB transformer took 0.35 s), and types every tensor as a full
    inference does: the same dict as onnx.shape_inference on the whole model."""
    w = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)  # 1728 values: stripped
    shape = np.array([0, -1], dtype=np.int64)  # a small initializer that inference reads: kept
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Reshape", ["h", "shape"], ["flat"]),
             helper.make_node("ReduceMax", ["flat"], ["y"], keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                          [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(shape, "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    before = m.SerializeToString()
    full = onnx.shape_inference.infer_shapes(m).graph
    want = {vi.name: vi.type.tensor_type.elem_type for vi in [*full.value_info, *full.input, *full.output]}
    want.update({"w": TensorProto.FLOAT, "shape": TensorProto.INT64})
    seen = []
    infer = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda model, *a, **k: seen.append(model) or
                        infer(model, *a, **k))
    assert tensor_types(m) == want and want["h"] == TensorProto.FLOAT16 and want["flat"] == TensorProto.FLOAT16
    assert m.SerializeToString() == before
    assert seen and seen[0].ByteSize() < w.nbytes  # the weights were not handed to shape inference


def test_with_outputs_adds_names_and_leaves_the_model(rng):
    m = make_residual_model()
    before = m.SerializeToString()
    extra = with_outputs(m, ["r1", "y", "g"])  # (a name given twice is added twice: callers dedupe)
    assert m.SerializeToString() == before
    assert [o.name for o in extra.graph.output] == ["y", "r1", "g"]
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    sess = OrtRunner(extra).session
    y, r1, g = sess.run(["y", "r1", "g"], {"x": x})
    assert r1.shape == (2, 8, 8, 8) and r1.min() >= 0 and g.shape == (2, 5)  # r1 is a Relu output
    np.testing.assert_allclose(y, OrtRunner(m).infer({"x": x})["y"], rtol=1e-6)


def test_save_model_is_atomic_and_follows_the_umask(tmp_path):
    m = make_residual_model()
    old = os.umask(0o077)
    try:
        p = save_model(m, tmp_path / "sub" / "m.onnx")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o600 and sorted(x.name for x in p.parent.iterdir()) == ["m.onnx"]
    assert onnx.load(str(p)).SerializeToString() == m.SerializeToString()
