"""The Python API's bad input: one InputError naming the field or value (raw TypeError,
AttributeError and IndexError before, or silently wrong: a str split into letters, a negative
index counted from the end)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantkit import sample
from quantkit.datasets import SyntheticSource
from quantkit.debug.fallback import FallbackConfig
from quantkit.errors import InputError
from quantkit.ptq import ExportConfig, QuantizeConfig, RunConfig, StatsConfig, quantize

SRC = SyntheticSource((1, 32, 32), count=8, seed=0)


@pytest.mark.parametrize("make, what", [
    (lambda: StatsConfig(num_bins="2048"), "StatsConfig.num_bins must be int"),
    (lambda: StatsConfig(num_bins=2048.0), "StatsConfig.num_bins must be int"),
    (lambda: StatsConfig(num_bins=2**40), "at most"),
    (lambda: StatsConfig(sample_stride=None), "sample_stride"),
    (lambda: StatsConfig(exclude="conv"), "tuple of names"),
    (lambda: StatsConfig(equalize="no"), "StatsConfig.equalize must be bool"),
    (lambda: RunConfig(batch_size="32"), "RunConfig.batch_size"),
    (lambda: RunConfig(threads=-1), "threads must be from 1 to"),
    (lambda: RunConfig(threads=10**6), "threads must be from 1 to"),
    (lambda: ExportConfig(params=[("percentile", 99.9)]), "ExportConfig.params must be Mapping"),
    (lambda: QuantizeConfig(stats={}), "QuantizeConfig.stats must be StatsConfig"),
    (lambda: FallbackConfig(0.5, subset="4"), "FallbackConfig.subset"),
    (lambda: FallbackConfig(True), "--max-drop"),
])
def test_config_fields_of_the_wrong_type_are_named(make, what):
    with pytest.raises(InputError, match=what):
        make()


def test_numpy_integers_are_integers():
    assert StatsConfig(num_bins=np.int64(1024)).num_bins == 1024
    assert RunConfig(batch_size=np.int32(8), threads=np.int64(2)).batch_size == 8


def test_quantize_takes_a_path_and_refuses_what_is_not_a_model_or_a_source():
    cal = quantize(str(sample.model_path()), SRC)
    assert cal.int8_model() is not None
    model = onnx.load(str(sample.model_path()))
    with pytest.raises(InputError, match="onnx.ModelProto or a model file's path"):
        quantize(None, SRC)
    with pytest.raises(InputError, match="quantkit data source"):
        quantize(model, [np.zeros((1, 32, 32), np.float32)])
    with pytest.raises(InputError, match="quantkit data source"):
        quantize(model, (x for x in ()))


@pytest.mark.parametrize("indices", [[0, 10**6], [-1], [0.5], "01"])
def test_sample_indices_outside_the_source_are_refused(indices):
    with pytest.raises(InputError):
        quantize(str(sample.model_path()), SRC, indices=indices)


def test_evaluate_and_fallback_check_their_indices_too():
    from quantkit.debug.fallback import fallback

    cal = quantize(str(sample.model_path()), SRC)
    with pytest.raises(InputError, match="not in 0..7"):
        cal.evaluate(SRC, [0, 50])
    with pytest.raises(InputError, match="not in 0..7"):
        fallback(cal, SRC, [-1], FallbackConfig(0.5, drop_metric="sqnr"))


@pytest.fixture(scope="module")
def cal():
    return quantize(str(sample.model_path()), SRC)


def test_indices_may_be_an_iterator_and_must_select_a_sample(cal):
    """A generator of indices was read by the check and then calibrated on nothing; an empty
    selection was a RuntimeError ("no data was collected"), the class of quantkit's own faults."""
    from quantkit.errors import DatasetError

    once = quantize(str(sample.model_path()), SRC, indices=(i for i in range(4)))
    listed = quantize(str(sample.model_path()), SRC, indices=[0, 1, 2, 3])
    assert once.ranges.keys() == listed.ranges.keys()
    assert all(once.ranges[t].amax == listed.ranges[t].amax for t in listed.ranges)
    with pytest.raises(DatasetError, match="select no sample"):
        quantize(str(sample.model_path()), SRC, indices=[])
    class Empty(SyntheticSource):
        def __len__(self):
            return 0

    with pytest.raises(DatasetError, match="holds no samples"):
        cal.evaluate(Empty((1, 32, 32), count=8, seed=0))

    class BadLength(SyntheticSource):
        def __len__(self):
            return "16"

    with pytest.raises(InputError, match="len"):
        quantize(str(sample.model_path()), BadLength((1, 32, 32), count=8, seed=0))


def test_api_misuse_is_named_in_one_error(cal, tmp_path):
    from quantkit.calibrators.methods import method_params
    from quantkit.debug.fallback import fallback

    with pytest.raises(InputError, match="fallback takes the Calibration"):
        fallback(None, SRC, None, FallbackConfig(0.5, drop_metric="sqnr"))
    with pytest.raises(InputError, match="apply_fallback takes the FallbackResult"):
        cal.apply_fallback("x")
    with pytest.raises(InputError, match="without 'method'"):
        cal.save(tmp_path / "out", model_stem="m", metadata={"method": "minmax"})
    with pytest.raises(InputError, match="folder's path"):
        cal.save(None, model_stem="m")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="must be a number"):
        method_params({"percentile": "x"})


@pytest.mark.parametrize("version, header", [(101300, 101300), ("10.13.0", 101300), ("8.6", 80600)])
def test_the_cache_header_takes_a_version_number_or_string(cal, version, header):
    assert cal.cache(trt_version=version).version == header


@pytest.mark.parametrize("version", [10, -1, "10", True, 10.13])
def test_a_cache_version_that_is_no_version_is_refused(cal, version):
    """``trt_version=10`` wrote the header ``TRT-10-`` (a TensorRT 0.0.10 cache to TensorRT)."""
    with pytest.raises(InputError, match="not a version number"):
        cal.cache(trt_version=version)


def test_layerwise_error_takes_paths_and_dict_batches(cal, tmp_path):
    """Plain dict batches were an AttributeError ('dict' object has no attribute 'size'), a path
    another ('str' object has no attribute 'graph')."""
    from quantkit.datasets import Batcher
    from quantkit.debug.layerwise import layerwise_error

    int8 = tmp_path / "m.int8.onnx"
    onnx.save(cal.int8_model(), int8)
    name = cal.specs[0].name
    x = np.stack([SRC.load(i) for i in range(8)]).astype(np.float32)
    by_dict = layerwise_error(str(sample.model_path()), int8, [{name: x[:4]}, {name: x[4:]}])
    by_batch = layerwise_error(onnx.load(str(sample.model_path())), onnx.load(str(int8)),
                               Batcher(SRC, [name], 4))
    assert by_dict.num_samples == by_batch.num_samples == 8
    assert [p.tensor for p in by_dict.activations] == [p.tensor for p in by_batch.activations]
    figures = lambda r: [x for p in r.activations for x in (p.local_sqnr_db, p.accumulated_sqnr_db)]  # noqa: E731
    assert figures(by_dict) == pytest.approx(figures(by_batch), abs=1e-6)
    with pytest.raises(InputError, match="each batch must be"):
        layerwise_error(str(sample.model_path()), int8, [x])
    with pytest.raises(InputError, match="same number of samples"):
        layerwise_error(str(sample.model_path()), int8, [{name: x, "other": x[:2]}])
    with pytest.raises(InputError, match="onnx.ModelProto or a model file's path"):
        layerwise_error(None, int8, [])
