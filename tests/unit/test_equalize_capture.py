"""Depthwise equalization inside the calibration pass: one ONNX Runtime pass, the statistics of
the two-pass route (a separate first pass, then the equalized model) to FP32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

import quantkit
import quantkit.onnx.equalize as equalize
import quantkit.onnx.equalize_capture as equalize_capture
from quantkit.backends.onnxruntime import OrtRunner
from quantkit.ptq import EQUALIZE_SAMPLES, QuantizeConfig, RunConfig, StatsConfig
from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model


@pytest.fixture(autouse=True)
def one_pass(monkeypatch):
    """The one-pass route (ptq.EQUALIZE_ONE_PASS, the default): these tests exercise it; the
    equalization it finds, not the pointwise check's verdict on it (another test's subject)."""
    monkeypatch.setattr(quantkit.ptq, "EQUALIZE_ONE_PASS", True)
    monkeypatch.setattr(quantkit.ptq, "POINTWISE_CHECK_MARGIN_DB", float("inf"))


def test_the_two_passes_when_the_fold_is_off(monkeypatch):
    monkeypatch.setattr(quantkit.ptq, "EQUALIZE_ONE_PASS", False)
    model = make_depthwise_model(variant="plain")
    calls = _passes(monkeypatch)
    assert _calibrate(model, depthwise_inputs(model, 16)).equalized and len(calls) == 2


def _calibrate(model, x, batch_size=8, **stats):
    return quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(**stats), RunConfig(batch_size=batch_size)))


def _passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = OrtRunner.capture
    monkeypatch.setattr(OrtRunner, "capture", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


@pytest.mark.parametrize("pointwise", [False, True])
@pytest.mark.parametrize("samples", [EQUALIZE_SAMPLES - 8, EQUALIZE_SAMPLES + 20])
@pytest.mark.parametrize("variant,multiplier", [("plain", 1), ("plain", 2), ("fanout", 1), ("input", 1)])
def test_one_pass_with_the_two_pass_statistics(monkeypatch, variant, multiplier, samples, pointwise):
    model = make_depthwise_model(variant=variant, multiplier=multiplier)
    x = depthwise_inputs(model, samples)
    calls = _passes(monkeypatch)
    one = _calibrate(model, x, equalize_pointwise=pointwise)
    assert len(calls) == 1  # the first pass of equalization is the calibration pass
    monkeypatch.setattr(equalize_capture, "HELD_BYTES", 0)  # too large to hold: the two passes
    two = _calibrate(model, x, equalize_pointwise=pointwise)
    assert len(calls) == 1 + 1 + 2
    assert one.equalized and [e.to_dict() for e in one.equalized] == [e.to_dict() for e in two.equalized]
    assert list(one.histograms) == list(two.histograms) and list(one.ranges) == list(two.ranges)
    for e in one.equalized:  # t and t * s: the same float32 values as ONNX Runtime's Mul gives
        for t in (e.tensor, e.scaled):
            a, b = one.histograms[t].counts, two.histograms[t].counts
            if not pointwise:
                np.testing.assert_array_equal(a, b)
            else:  # a tensor after another equalized Conv (W / s): FP32 rounding moves a value across a bin edge
                assert np.abs(a - b).sum() <= 1e-4 * a.sum() + 2, t
    for t, r in one.ranges.items():  # after the depthwise Conv: FP32 rounding of W / s apart
        for m, a in r.amax.items():
            assert a == pytest.approx(two.ranges[t].amax[m], rel=1e-5), (t, m)
    assert one.num_samples == two.num_samples == samples


def test_first_samples_decide_the_scales_whatever_the_chunks(monkeypatch):
    """The scales come from the first EQUALIZE_SAMPLES samples only, also when a chunk
    straddles that boundary: samples after it (here with a quiet channel made loud) change them not."""
    model = make_depthwise_model(variant="input")
    x = depthwise_inputs(model, EQUALIZE_SAMPLES + 12)
    loud = x.copy()
    loud[EQUALIZE_SAMPLES:, 0] *= 1000.0
    a = _calibrate(model, x[:EQUALIZE_SAMPLES], batch_size=EQUALIZE_SAMPLES)
    refit = _calibrate(model, loud, batch_size=12)
    # ... except that a raised channel outgrowing its fit goes back to 1 after the pass (test_equalize_refit)
    assert all(e.scales[0] == 1.0 for e in refit.equalized) and any(e.scales[0] > 1.0 for e in a.equalized)
    monkeypatch.setattr(equalize, "refit_scales", lambda *args, **kw: None)
    b = _calibrate(model, loud, batch_size=12)  # batches 0-11, 12-23, 24-35 (straddles 32), 36-43
    assert [e.to_dict() for e in a.equalized] == [e.to_dict() for e in b.equalized]
