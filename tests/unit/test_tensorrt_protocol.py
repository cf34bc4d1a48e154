"""The TensorRT route without TensorRT: calibrator calling protocol, cache provenance, build
decisions, shape profiles, parser error text, and the CLI's messages."""

import ctypes
import json

import numpy as np
import pytest

from quantkit.calibrators.cache import CacheProvenance, CalibrationCache, check_cache_matches, sidecar_path, write_cache
from quantkit.datasets import Batcher, SyntheticSource
from quantkit.errors import CacheError, DatasetError, InputError, MissingDependencyError
from quantkit.backends.tensorrt.builder import (
    ShapeProfile,
    TensorRT11ImplicitInt8Error,
    build_mode,
    parse_shapes,
    parser_errors,
    resolve_profiles,
)
from quantkit.backends.tensorrt.calibrator import CalibratorCore, cache_only_core, calibrator_class, make_calibrator
from quantkit.onnx.model import TensorSpec
from quantkit.backends.tensorrt.load import load_tensorrt, tensorrt_available


class HostStager:
    """Stands in for the GPU stager on CPU: two host slots, pointers to their memory."""

    def __init__(self, batches):
        self.it = iter(batches)
        self.slots = [None, None]
        self.turn = 0
        self.closed = False
        self.last_batch = None

    def next_pointers(self):
        batch = next(self.it, None)
        if batch is None:
            return None
        self.last_batch = batch
        self.slots[self.turn] = {k: np.ascontiguousarray(v) for k, v in batch.feed.items()}
        ptrs = {k: v.ctypes.data for k, v in self.slots[self.turn].items()}
        self.turn ^= 1
        return ptrs

    def close(self):
        self.closed = True


class FakeTrtBase:
    """Stands in for tensorrt.IInt8EntropyCalibrator2 where TensorRT is absent: records that
    its __init__ was called, as pybind11 requires."""

    def __init__(self):
        self.base_initialised = True


def read_floats(ptr, count):
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr)).copy()


def drive(calibrator, names):
    """The sequence TensorRT uses: batch size, cache read; if no cache, batches until None,
    then cache write."""
    seen = []
    assert calibrator.get_batch_size() > 0
    if calibrator.read_calibration_cache() is not None:
        return seen
    while True:
        ptrs = calibrator.get_batch(names)
        if ptrs is None:
            break
        assert len(ptrs) == len(names)
        seen.append(ptrs)
    cache = CalibrationCache(100300, "EntropyCalibration2", {"x": 1 / 127, "r1": 0.05})
    calibrator.write_calibration_cache(cache.to_text().encode())
    return seen


pytestmark = pytest.mark.skipif(tensorrt_available(), reason="protocol tests substitute TensorRT's base class")


def test_protocol_serves_every_batch_in_order_then_caches(tmp_path):
    src = SyntheticSource((3, 4, 4), count=10, seed=1)
    batches = Batcher(src, ["x"], 4, last_batch="drop")
    prov = CacheProvenance("abc123", {"crop": [4, 4]}, "EntropyCalibration2", 100300, "entropy")
    core = CalibratorCore(batches, 4, cache_path=tmp_path / "c.cache", provenance=prov, trt_version=100300,
                          stager=HostStager)
    cal = make_calibrator("entropy", core, base=FakeTrtBase)
    assert cal.base_initialised and type(cal).__name__ == "QuantkitInt8EntropyCalibrator2"
    ptrs = []
    # read each batch through its pointer while it is current, as TensorRT does
    first = cal.get_batch(["x"])
    ptrs.append(read_floats(first[0], 4 * 3 * 4 * 4))
    second = cal.get_batch(["x"])
    ptrs.append(read_floats(second[0], 4 * 3 * 4 * 4))
    assert cal.get_batch(["x"]) is None  # 10 samples, batch 4, tail dropped
    expect = [np.stack([src.load(i) for i in range(k, k + 4)]).ravel() for k in (0, 4)]
    np.testing.assert_array_equal(ptrs[0], expect[0])
    np.testing.assert_array_equal(ptrs[1], expect[1])
    cal.write_calibration_cache(CalibrationCache(100300, "EntropyCalibration2", {"x": 0.01}).to_text().encode())
    core.raise_if_failed()
    assert (tmp_path / "c.cache").read_text().startswith("TRT-100300-EntropyCalibration2")
    side = json.loads(sidecar_path(tmp_path / "c.cache").read_text())
    assert side["model_sha256"] == "abc123" and side["preprocess"] == {"crop": [4, 4]}

    # a second build reads the cache and never asks for data
    again = CalibratorCore(Batcher(src, ["x"], 4), 4, cache_path=tmp_path / "c.cache", provenance=prov,
                           trt_version=100300, stager=lambda b: pytest.fail("calibrated despite a valid cache"))
    seen = drive(make_calibrator("entropy", again, base=FakeTrtBase), ["x"])
    assert seen == [] and again.cache_was_read
    again.raise_if_failed()


def test_pointers_follow_the_order_of_names():
    class Two:
        def __init__(self, batches):
            self.done = False

        def next_pointers(self):
            if self.done:
                return None
            self.done = True
            return {"a": 111, "b": 222}

        def close(self):
            pass

    core = CalibratorCore([None], 1, stager=Two)
    assert core.get_batch(["b", "a"]) == [222, 111]


def test_cache_of_another_model_or_preprocessing_is_refused(tmp_path):
    path = tmp_path / "calibration.cache"
    write_cache(path, CalibrationCache(100300, "EntropyCalibration2", {"x": 0.01}))
    from quantkit.calibrators.cache import write_sidecar

    write_sidecar(path, CacheProvenance("model-A", {"mean": [0.5]}, "EntropyCalibration2", 100300, "entropy"))
    with pytest.raises(CacheError, match="another model"):
        check_cache_matches(path, model_sha256="model-B", preprocess=None)
    with pytest.raises(CacheError, match="other preprocessing .*mean"):
        check_cache_matches(path, model_sha256="model-A", preprocess={"mean": [0.4]})
    with pytest.raises(CacheError, match="TensorRT 100300, this is TensorRT 110000"):
        check_cache_matches(path, model_sha256="model-A", preprocess=None, trt_version=110000)
    assert check_cache_matches(path, model_sha256="model-A", preprocess={"mean": [0.5]}).scales["x"] == pytest.approx(0.01)

    # inside TensorRT's callback the refusal is recorded (not raised into C++) and raised after
    core = CalibratorCore([], 1, cache_path=path, stager=HostStager, trt_version=100300,
                          provenance=CacheProvenance("model-B", None, "EntropyCalibration2", 100300))
    assert core.read_calibration_cache() is None
    with pytest.raises(CacheError, match="another model"):
        core.raise_if_failed()


def test_exception_in_callback_is_recorded_and_raised_after_build():
    class Boom:
        def __init__(self, batches):
            pass

        def next_pointers(self):
            raise RuntimeError("decoder exploded on image 7")

        def close(self):
            pass

    core = CalibratorCore([1], 1, stager=Boom)
    cal = make_calibrator("minmax", core, base=FakeTrtBase)
    assert cal.get_batch(["x"]) is None  # calibration ends instead of crashing TensorRT
    assert cal.get_batch(["x"]) is None
    with pytest.raises(Exception, match="decoder exploded on image 7"):
        core.raise_if_failed()


def test_no_data_and_missing_input_names(tmp_path):
    core = CalibratorCore([], 1, stager=HostStager)
    assert core.get_batch(["x"]) is None
    with pytest.raises(DatasetError, match="no batch"):
        core.raise_if_failed()
    src = SyntheticSource((3, 4, 4), count=4)
    core = CalibratorCore(Batcher(src, ["x"], 4), 4, stager=HostStager)
    assert core.get_batch(["image"]) is None
    with pytest.raises(InputError, match=r"asks for inputs \['image'\]"):
        core.raise_if_failed()
    with pytest.raises(CacheError, match="does not exist"):
        cache_only_core(tmp_path / "none.cache")


def test_unknown_calibrator_and_missing_tensorrt(monkeypatch):
    with pytest.raises(InputError, match="unknown TensorRT calibrator 'percentile'") as err:
        calibrator_class("percentile", base=FakeTrtBase)
    assert "percentile and mse scales reach TensorRT" in err.value.hint
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        calibrator_class("entropy")
    # the stubs package's bare `tensorrt` namespace does not count as TensorRT
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(MissingDependencyError, match="only its type stubs"):
        load_tensorrt()


def test_build_modes_and_tensorrt11_message():
    assert build_mode(10, precision="fp32", explicit=False, calibrating=False) == "fp32"
    assert build_mode(10, precision="fp16", explicit=False, calibrating=False) == "fp16"
    assert build_mode(10, precision="int8", explicit=False, calibrating=True) == "int8-implicit"
    assert build_mode(10, precision="int8", explicit=True, calibrating=False) == "int8-explicit"
    assert build_mode(11, precision="int8", explicit=True, calibrating=False) == "int8-explicit"
    with pytest.raises(TensorRT11ImplicitInt8Error) as err:
        build_mode(11, precision="int8", explicit=False, calibrating=True)
    assert "TensorRT 11 removed implicit INT8" in str(err.value)
    assert "quantkit calibrate" in err.value.hint and "quantkit build" in err.value.hint
    with pytest.raises(InputError, match="already holds Q/DQ"):
        build_mode(10, precision="int8", explicit=True, calibrating=True)
    with pytest.raises(InputError, match="needs calibration data"):
        build_mode(10, precision="int8", explicit=False, calibrating=False)
    with pytest.raises(InputError, match="no FP16 flag"):
        build_mode(11, precision="fp16", explicit=False, calibrating=False)


def test_shapes_and_profiles():
    p = parse_shapes(["x=1x3x8x8/4x3x8x8/16x3x8x8", "y=2x5"])
    assert p["x"] == ShapeProfile((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)) and p["y"].max == (2, 5)
    for bad in ["x", "x=1x3/4x3x8", "x=4x3/2x3/8x3", "x=ax3", "x=1x3,x=2x3"]:  # the last: one input twice
        with pytest.raises(InputError):
            parse_shapes(bad)
    specs = [TensorSpec("x", ("N", 3, 8, 8), np.dtype(np.float32)), TensorSpec("s", (1, 2), np.dtype(np.float32))]
    prof = resolve_profiles(specs, {}, batch=32)
    assert prof == {"x": ShapeProfile((1, 3, 8, 8), (32, 3, 8, 8), (32, 3, 8, 8))}
    with pytest.raises(InputError, match="does not fit"):
        resolve_profiles(specs, parse_shapes("x=1x3x9x9"), batch=8)
    with pytest.raises(InputError, match=r"names \['z'\]"):
        resolve_profiles(specs, parse_shapes("z=1x1"), batch=8)
    with pytest.raises(InputError, match="give its profile"):
        resolve_profiles([TensorSpec("t", ("N", "S"), np.dtype(np.int64))], {}, batch=8)


def test_parser_errors_name_nodes():
    class Err:
        def __init__(self, node, name, desc):
            self._n, self._name, self._d = node, name, desc

        def node(self):
            return self._n

        def node_name(self):
            return self._name

        def desc(self):
            return self._d

    class Parser:
        errors = [Err(3, "conv_7", "Unsupported operator DeformConv"), Err(-1, "", "opset 25 unsupported")]
        num_errors = 2

        def get_error(self, i):
            return self.errors[i]

    text = parser_errors(Parser())
    assert "node 3 (conv_7): Unsupported operator DeformConv" in text and "model: opset 25 unsupported" in text
