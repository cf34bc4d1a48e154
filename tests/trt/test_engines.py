"""TensorRT integration: runs wherever TensorRT (and a GPU) is installed; skipped elsewhere with
the reason. Never run on our machines (TensorRT cannot be installed there)."""

import numpy as np
import pytest

from quantkit.datasets import Batcher, SyntheticSource

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


@pytest.fixture
def onnx_path(tmp_path, residual_model):
    import onnx

    path = tmp_path / "residual.onnx"
    onnx.save(residual_model, str(path))
    return path


def _agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean())


def test_fp32_engine_matches_onnxruntime(onnx_path, tmp_path):
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.backends.tensorrt.builder import BuildOptions, build_engine
    from quantkit.backends.tensorrt.runner import TrtRunner

    res = build_engine(onnx_path, tmp_path / "fp32.plan", BuildOptions(precision="fp32", batch=8))
    assert res.mode == "fp32" and res.engine.stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with TrtRunner(res.engine) as trt_runner, OrtRunner(onnx_path) as ort_runner:
        a = trt_runner.infer({"x": x})["y"]
        b = ort_runner.infer({"x": x})["y"]
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_implicit_int8_with_calibrator_then_cache(onnx_path, tmp_path):
    from quantkit.backends.tensorrt.builder import BuildOptions, build_engine
    from quantkit.backends.tensorrt.load import tensorrt_major
    from quantkit.backends.tensorrt.calibrator import CalibratorCore

    if tensorrt_major() >= 11:
        pytest.skip("TensorRT 11 has no implicit INT8")
    src = SyntheticSource((3, 8, 8), count=64, seed=0)
    cache = tmp_path / "calibration.cache"
    core = CalibratorCore(Batcher(src, ["x"], 8, last_batch="drop"), 8, cache_path=cache)
    res = build_engine(onnx_path, tmp_path / "int8.plan", BuildOptions(precision="int8", batch=8), calibrator=core)
    assert res.mode == "int8-implicit" and core.batches_served == 8 and cache.exists()
    again = CalibratorCore([], 8, cache_path=cache, stager=lambda b: pytest.fail("calibrated despite the cache"))
    res2 = build_engine(onnx_path, tmp_path / "int8b.plan", BuildOptions(precision="int8", batch=8), calibrator=again)
    assert res2.calibration_cache_used


def test_explicit_qdq_engine_agrees_with_onnxruntime(onnx_path, tmp_path, residual_model):
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.backends.tensorrt.builder import BuildOptions, build_engine
    from quantkit.backends.tensorrt.runner import TrtRunner
    from quantkit.onnx.model import save_model
    from quantkit.ptq import QuantizeConfig, RunConfig, quantize

    src = SyntheticSource((3, 8, 8), count=64, seed=0)
    cal = quantize(residual_model, src, QuantizeConfig(run=RunConfig(batch_size=16)))
    qdq = save_model(cal.int8_model(), tmp_path / "residual.int8.onnx")
    res = build_engine(qdq, tmp_path / "qdq.plan", BuildOptions(batch=16, layer_info=tmp_path / "layers.json"))
    assert res.mode == "int8-explicit" and (tmp_path / "layers.json").exists()
    x = np.stack([src.load(i) for i in range(16)])
    with TrtRunner(res.engine) as t, OrtRunner(qdq) as o:
        assert _agreement(t.infer({"x": x})["y"], o.infer({"x": x})["y"]) >= 0.9
        times = t.time_device({"x": x}, iterations=20, cuda_graph=True, streams=2)
    assert len(times) >= 20
