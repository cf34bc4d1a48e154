"""The ONNX Runtime backend and the runner interface: infer == session.run, capture == one
plain call per batch (chunked, with reused buffers, padding rows marked), check_feed's
messages, and the table that picks a backend for a file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantkit.backends import BACKENDS, ENGINE_SUFFIXES, check_feed, runner_from_path
from quantkit.backends.onnxruntime import OrtRunner, create_session
from quantkit.calibrators import HistogramCollector
from quantkit.calibrators.collectors import collect_histograms
from quantkit.datasets import Batcher, SyntheticSource
from quantkit.errors import InputError, ModelError, ShapeMismatchError
from quantkit.onnx.model import TensorSpec, with_outputs
from quantkit.onnx.qdq import plan_qdq
from tests.helpers import make_residual_model

INNER = ["c1", "r1", "a1", "r2", "ct", "fl", "g"]


def test_infer_equals_session_run(residual_model, rng):
    x = rng.standard_normal((5, 3, 8, 8))  # float64: infer casts to the input's dtype
    with OrtRunner(residual_model) as runner:
        assert (runner.backend, runner.device, runner.output_names) == ("onnxruntime", "CPU", ["y"])
        got = runner.infer({"x": x})
    (want,) = create_session(residual_model).run(["y"], {"x": x.astype(np.float32)})
    np.testing.assert_array_equal(got["y"], want)
    assert runner.session is None  # closed by the with block


def _captured(runner: OrtRunner, batches) -> tuple[dict[str, list[np.ndarray]], list[tuple[tuple[int, ...], int]]]:
    """Copies of everything the sink receives (the arrays are reused after the call)."""
    got: dict[str, list[np.ndarray]] = {}
    calls = []

    def sink(batch, rows, tensors):
        calls.append((batch.indices, rows))
        for name, arr in tensors.items():
            got.setdefault(name, []).append(arr[:rows].copy())

    runner.capture(batches, sink)
    return got, calls


@pytest.mark.parametrize("budget_mb", [64.0, 1e-4])  # one call per batch / one sample per call
def test_capture_equals_one_plain_call_per_batch(residual_model, budget_mb):
    names = ["x", *INNER]
    src = SyntheticSource((3, 8, 8), count=20, seed=3)
    with OrtRunner(residual_model, capture=names, capture_budget_mb=budget_mb) as runner:
        assert runner.captured_names == names
        got, calls = _captured(runner, Batcher(src, ["x"], 8))
    session = create_session(with_outputs(residual_model, INNER))
    want: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in Batcher(src, ["x"], 8):
        want["x"].append(batch.feed["x"])
        for n, arr in zip(INNER, session.run(INNER, batch.feed)):
            want[n].append(arr)
    for n in names:
        np.testing.assert_allclose(np.concatenate(got[n]), np.concatenate(want[n]), rtol=1e-5, atol=1e-6,
                                   err_msg=n)
    assert sum(rows for _, rows in calls) == 20
    assert len(calls) == (3 if budget_mb == 64.0 else 20)  # chunks of one sample, buffers reused


def test_histograms_do_not_depend_on_the_capture_budget(residual_model, monkeypatch):
    """A larger budget (more cores) runs larger chunks, handed over in the pieces the smallest
    budget would have run: the same histograms bin for bin, the same first range. Pieces of one
    sample here (SINK_PIECE_MB tiny); before, a whole batch in one update started every
    histogram at that batch's amax instead of the first sample's."""
    import quantkit.backends.onnxruntime as backend

    monkeypatch.setattr(backend, "SINK_PIECE_MB", 1e-4)
    names = plan_qdq(residual_model).activation_names
    src = SyntheticSource((3, 8, 8), count=20, seed=3)
    results = []
    for budget in (1e-4, 64.0):
        with OrtRunner(residual_model, capture=names, capture_budget_mb=budget) as runner:
            got, calls = _captured(runner, Batcher(src, ["x"], 8))
            assert [rows for _, rows in calls] == [1] * 20
            results.append(collect_histograms(runner, Batcher(src, ["x"], 8), num_bins=256, sample_stride=1))
    for n in names:
        small, large = (r[n].compute() for r in results)
        assert small.amax == large.amax, n
        np.testing.assert_array_equal(small.counts, large.counts, err_msg=n)


def test_capture_session_is_made_without_a_copy_of_the_model(residual_model, monkeypatch):
    """The extra outputs are appended to the model's serialized bytes (protobuf merges a repeated
    field by appending), not to a copy of the ModelProto (a 90 MB transformer: 0.04 s copy)."""
    import quantkit.backends.onnxruntime as backend

    monkeypatch.setattr(backend, "with_outputs", None, raising=False)  # no copy may be made
    before = residual_model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with OrtRunner(residual_model, capture=INNER) as runner:
        assert [o.name for o in runner.session.get_outputs()] == ["y", *INNER]
        outs, captured = runner.infer_captured({"x": x})
    want = create_session(with_outputs(residual_model, INNER)).run(["y", *INNER], {"x": x})
    assert residual_model.SerializeToString() == before
    np.testing.assert_array_equal(outs["y"], want[0])
    for n, w in zip(INNER, want[1:]):
        np.testing.assert_array_equal(captured[n], w, err_msg=n)


def test_capture_of_a_fixed_batch_model_marks_the_padding(rng):
    """A fixed batch of 4 and 10 samples: the padded last batch runs whole, and the sink is told
    that only its first 2 rows are samples."""
    model = make_residual_model(batch=4)
    src = SyntheticSource((3, 8, 8), count=10, seed=1)
    with OrtRunner(model, capture=["r1"], capture_budget_mb=1e-4) as runner:  # never chunked below the batch
        got, calls = _captured(runner, Batcher(src, ["x"], 4, last_batch="pad"))
    assert [rows for _, rows in calls] == [4, 4, 2]
    x = np.stack([src.load(i) for i in range(10)])
    want = np.concatenate([create_session(with_outputs(model, ["r1"])).run(["r1"], {"x": x[s : s + 4] if s < 8 else
                           np.concatenate([x[8:], x[9:], x[9:]])})[0] for s in (0, 4, 8)])[:10]
    np.testing.assert_allclose(np.concatenate(got["r1"]), want, rtol=1e-5, atol=1e-6)


def test_collect_histograms_sees_what_capture_hands_over(residual_model):
    """collect_histograms == a collector per tensor fed the captured chunks, bin by bin."""
    names = plan_qdq(residual_model).activation_names
    src = SyntheticSource((3, 8, 8), count=20, seed=3)
    with OrtRunner(residual_model, capture=names, capture_budget_mb=1e-4) as runner:
        collected = collect_histograms(runner, Batcher(src, ["x"], 8), num_bins=256, sample_stride=1)
        got, _ = _captured(runner, Batcher(src, ["x"], 8))
    for n in names:
        ref = HistogramCollector(256, name=n)
        for arr in got[n]:
            ref.update(arr)
        a, b = collected[n].compute(), ref.compute()
        assert (a.bin_width, a.observed_min, a.observed_max) == (b.bin_width, b.observed_min, b.observed_max), n
        np.testing.assert_array_equal(a.counts, b.counts, err_msg=n)


def test_capture_errors_surface(residual_model):
    src = SyntheticSource((3, 8, 8), count=20, seed=3)

    def sink(batch, rows, tensors):
        raise RuntimeError(f"sink failed on {batch.indices[0]}")

    with OrtRunner(residual_model, capture=["r1"]) as runner, pytest.raises(RuntimeError, match="sink failed on 0"):
        runner.capture(Batcher(src, ["x"], 8), sink)


def test_batcher_feeds_wrong_shape(residual_model):
    runner = OrtRunner(residual_model)
    batch = next(iter(Batcher(SyntheticSource((3, 9, 9), count=2), ["x"], 2)))
    with pytest.raises(ShapeMismatchError, match="'x'.*expects \\?x3x8x8"):
        runner.infer(batch.feed)


def test_check_feed_messages():
    specs = [TensorSpec("x", (4, 3, 8, 8), np.dtype(np.float32)), TensorSpec("m", ("N", 5), np.dtype(np.bool_))]
    ok = {"x": np.zeros((4, 3, 8, 8), np.float32), "m": np.zeros((7, 5), bool)}
    check_feed(ok, specs)
    with pytest.raises(InputError, match=r"inputs given \['x'\] do not match the model inputs \['x', 'm'\]") as err:
        check_feed({"x": ok["x"]}, specs)
    assert "name the data arrays" in err.value.hint
    with pytest.raises(ShapeMismatchError, match=r"'x': batch has shape \(2, 3, 8, 8\), the model expects 4x3x8x8") as err:
        check_feed({**ok, "x": np.zeros((2, 3, 8, 8), np.float32)}, specs)
    assert err.value.hint == "the model has a fixed batch size of 4; feed batches of that size"
    with pytest.raises(ShapeMismatchError, match=r"'x': batch has shape \(4, 8, 8, 3\)") as err:
        check_feed({**ok, "x": np.zeros((4, 8, 8, 3), np.float32)}, specs)
    assert "--resize/--crop/--layout" in err.value.hint and "each sample after the batch axis" in err.value.hint
    with pytest.raises(ShapeMismatchError, match=r"'m': batch has shape \(7,\), the model expects \?x5") as err:
        check_feed({**ok, "m": np.zeros(7, bool)}, specs)
    # the eleventh probe: one sample saved without its batch axis ([1024, 2] for ?x1024x2) was read as 1024
    # samples, and the hint spoke of resizing images
    assert "one axis fewer" in err.value.hint and "[1, ...]" in err.value.hint


def test_runner_from_path_table(tmp_path, residual_model):
    assert set(ENGINE_SUFFIXES) == {".plan", ".engine", ".trt"} and BACKENDS[".onnx"][1] == "OrtRunner"
    for name in ("m.onnx", "m.ONNX", "m.model"):  # .onnx, any case, and anything else: ONNX Runtime
        onnx.save(residual_model, tmp_path / name)
        with runner_from_path(tmp_path / name, threads=1) as r:
            assert isinstance(r, OrtRunner) and r.name == name
    with pytest.raises(ModelError, match="does not exist") as err:
        runner_from_path(tmp_path / "gone.plan")  # missing: reported before TensorRT is needed
    assert "check the path" in err.value.hint
    with pytest.raises(ModelError, match="is a folder"):
        runner_from_path(tmp_path)
    with pytest.raises(ModelError, match="not a readable ONNX model|not an ONNX model"):
        (tmp_path / "junk.onnx").write_bytes(b"junk" * 10)
        runner_from_path(tmp_path / "junk.onnx")


@pytest.mark.parametrize("suffix", [".plan", ".engine", ".TRT"])
def test_engines_go_to_tensorrt_without_onnxruntime_options(tmp_path, monkeypatch, suffix):
    import quantkit.backends.tensorrt.runner as trt_runner

    seen = []
    monkeypatch.setattr(trt_runner, "TrtRunner", lambda path, **kwargs: seen.append((path, kwargs)) or "engine")
    (tmp_path / f"m{suffix}").write_bytes(b"serialized engine")
    assert runner_from_path(tmp_path / f"m{suffix}", threads=2, capture=["r1"], capture_budget_mb=1.0) == "engine"
    assert seen == [(tmp_path / f"m{suffix}", {})]


def test_capture_session_does_not_spin(residual_model):
    """A capture pass histograms on a worker thread beside ONNX Runtime: its idle intra-op
    threads sleep rather than spin on the cores that thread needs; plain inference keeps spinning."""
    def spinning(runner: OrtRunner) -> str | None:
        try:
            return runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: ONNX Runtime's default, spinning
            return None

    with OrtRunner(residual_model, capture=["r1"]) as capturing, OrtRunner(residual_model) as plain:
        assert spinning(capturing) == "0"
        assert spinning(plain) is None


def _qdq_matmul(k: int = 64) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Q/DQ (scale 0.01, int8) -> MatMul with per-column int8 weights of +-127: the products'
    pair sums reach 2 x 255 x 127, past int16 (ONNX Runtime's uint8 x int8 kernels on x86 CPUs
    without VNNI saturate there). Returns the model and its weights as integers."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((k, 4), 127, np.int8)
    w[:, 1] = -127
    w[::2, 2] = 100
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx"),
             numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(4, 0.02, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), w


def test_a_qdq_model_computes_what_tensorrt_computes_whatever_the_cpu():
    """Quantized MatMul as TensorRT computes it (int8 values, exact integer products, scales after):
    ONNX Runtime's integer kernels gave errors up to 205 of 206 on the 2-core AVX2 machine (no VNNI);
    the default session (its Q/DQ fusion left out) gives the exact result up to float rounding."""
    model, w = _qdq_matmul()
    r = np.random.default_rng(0)
    x = np.stack([np.full(64, 1.27, np.float32), r.uniform(-1.3, 1.3, 64).astype(np.float32),
                  np.full(64, -0.9, np.float32)])
    xq = np.clip(np.round(x / np.float32(0.01)), -127, 127)
    exact = (xq @ w.astype(np.float64)) * 0.01 * 0.02
    with OrtRunner(model) as runner:
        y = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-3 * np.abs(exact).max())
    with OrtRunner(model, integer_kernels=True) as runner:  # ONNX Runtime's deployment kernels: they run
        assert runner.infer({"x": x})["y"].shape == (3, 4)


def test_capture_budget_follows_the_threads(monkeypatch):
    """A capture call may return 16 MiB a thread, within 64..512 MiB: 64 on a 2-core machine, as
    before; 256 on 16 cores, where chunks of 2-3 samples left ONNX Runtime's threads idle."""
    from quantkit.backends import onnxruntime as ortb

    assert ortb.default_capture_budget_mb(2) == 64.0
    assert ortb.default_capture_budget_mb(16) == 256.0
    assert ortb.default_capture_budget_mb(128) == 512.0
    monkeypatch.setattr(ortb.os, "cpu_count", lambda: 16)
    assert ortb.default_capture_budget_mb(None) == 256.0
    assert ortb.default_capture_budget_mb(4) == 64.0  # --threads 4 on that machine


def test_cpu_has_vnni_reads_the_flags(tmp_path):
    from quantkit.backends.onnxruntime import cpu_has_vnni

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx2\n")
    assert cpu_has_vnni(str(info)) is False
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # an Arm CPU: not said
    assert cpu_has_vnni(str(info)) is None
    assert cpu_has_vnni(str(tmp_path / "missing")) is None


def test_fold_weight_qdq_same_outputs_fewer_nodes(tmp_path):
    """A check session computes each weight's Q/DQ pair once (``fold_weight_qdq``): the same
    outputs, the activations' pairs kept. With ONNX Runtime's WeightBiasQuantization on, the folded
    Conv weight was quantized again, per tensor (``create_session`` leaves it out)."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.backends.onnxruntime import OrtRunner, create_session, fold_weight_qdq
    from quantkit.onnx.qdq import insert_qdq, plan_qdq

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "wc"),
             numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "wm"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wm"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = plan_qdq(m)
    q = insert_qdq(m, plan, {t: 3.0 for t in plan.activations})
    folded = fold_weight_qdq(q)
    count = lambda model, op: sum(n.op_type == op for n in model.graph.node)  # noqa: E731
    assert count(folded, "QuantizeLinear") == count(q, "QuantizeLinear") - 2  # the two weights' pairs
    assert count(folded, "DequantizeLinear") == count(q, "DequantizeLinear") - 2
    assert not {"wc", "wm"} & {i.name for i in folded.graph.initializer}  # read by their QuantizeLinear only
    x = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    want = create_session(q).run(["y"], {"x": x})[0]
    got = create_session(folded).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with OrtRunner(q) as r:  # what compare, debug and --max-drop run
        np.testing.assert_allclose(r.infer({"x": x})["y"], want, rtol=1e-5, atol=1e-5)
    assert fold_weight_qdq(m) is m  # nothing to fold


def test_fold_weight_qdq_int8_weights_of_other_tools():
    """ONNX Runtime's and NNCF's Q/DQ models keep int8 weights behind a DequantizeLinear alone:
    folded too, the same outputs; a DequantizeLinear that a non-weighted op reads stays."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.backends.onnxruntime import create_session, fold_weight_qdq

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, size=(8, 4)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.full(4, 0.02, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
             numpy_helper.from_array(rng.integers(-127, 128, size=(4,)).astype(np.int8), "b_q"),
             numpy_helper.from_array(np.float32(0.1), "b_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=1, name="dq_w"),
             helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b"),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded = fold_weight_qdq(m)
    assert [n.name for n in folded.graph.node] == ["dq_b", "mm", "add"]  # the Add's operand is not a weight
    x = rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(create_session(folded).run(["y"], {"x": x})[0], create_session(m).run(["y"], {"x": x})[0],
                               rtol=1e-6, atol=1e-6)
