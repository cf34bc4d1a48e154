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
    (lambda: RunConfig(threads=-1), "threads must be >= 1"),
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
