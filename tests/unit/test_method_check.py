"""The method check (``Calibration.check_method``): the default method's bias-corrected Q/DQ model
against percentile's and minmax's, from the one pass, the better by the guard's figure written."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import quantkit
import quantkit.onnx.biascorrect
from quantkit.errors import InputError
from quantkit.ptq import ExportConfig, QuantizeConfig, RunConfig, StatsConfig
from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model


def _calibrate(export: ExportConfig = ExportConfig(), samples: int = 64, **stats) -> quantkit.Calibration:
    """The first 32 samples correct the biases, the next 32 check the method."""
    model = make_depthwise_model(variant="fanout")
    return quantkit.quantize(model, ArraySource(depthwise_inputs(model, samples)),
                             QuantizeConfig(StatsConfig(**stats), RunConfig(batch_size=8), export))


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Each QuantizeLinear's input -> its scale (weights' too: those do not depend on the method)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]].reshape(-1)[0]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1}


def test_which_configurations_are_checked():
    assert ExportConfig().checks_method  # the default: entropy, checked
    assert ExportConfig(method="entropy").checks_method  # the API's default value, not a choice it can tell
    assert not ExportConfig(method="entropy", method_check=False).checks_method  # `calibrate --method entropy`
    assert not ExportConfig(method="minmax").checks_method  # another method, chosen: written as it is
    assert not ExportConfig(method="minmax", method_check=True).checks_method  # no alternative defined for it
    with pytest.raises(InputError):
        ExportConfig(method_check="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("margin", [-np.inf, np.inf])
def test_the_alternative_is_written_only_where_it_agrees_better(monkeypatch, tmp_path, margin):
    # any margin below the figures' difference takes the alternative of the highest figure, any above
    # keeps entropy: the calibration's method, its Q/DQ model, cache and ranges.json then all follow
    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", margin)
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    cal = _calibrate()
    check = cal.method_check
    db = check["output_sqnr_db"]
    best = max(("percentile", "minmax"), key=db.__getitem__)
    chosen = best if margin < 0 else "entropy"
    assert check is not None and check["configured"] == "entropy" and check["alternative"] == best
    assert check["alternatives"] == ["percentile", "minmax"] and set(db) == {"entropy", "percentile", "minmax"}
    assert check["chosen"] == chosen and cal.config.method == chosen
    assert set(cal._int8) == {chosen}  # the other Q/DQ model is not held (made again if asked for)
    held = cal._int8[chosen]
    # each figure: the model the guard kept (corrected on samples 0-31), measured on samples 32-63
    from functools import partial

    from quantkit.backends.onnxruntime import create_session
    from quantkit.onnx.biascorrect import heldout_sqnr

    model = make_depthwise_model(variant="fanout")
    x = depthwise_inputs(model, 64)
    assert check["samples"] == 32 and cal.check_feeds is None  # used once, not held
    for m in ("entropy", "percentile", "minmax"):
        want = heldout_sqnr(cal.int8_model(m), model, [({"x": x[32:]}, 32)], partial(create_session, threads=1))
        assert check["output_sqnr_db"][m] == pytest.approx(want, abs=0.01)
    scales = _activation_scales(held)
    amax = cal.amax(chosen, quantized_only=True)
    assert scales and all(scales[t] == pytest.approx(amax[t] / 127, rel=1e-6) for t in scales if t in amax)
    assert cal.int8_model() is cal.int8_model(chosen) and set(cal._int8) == {"entropy", "percentile", "minmax"}
    assert cal.cache().scales["h"] == pytest.approx(cal.ranges["h"].amax[chosen] / 127, rel=1e-6)
    paths = cal.save(tmp_path / "out", model_stem="m")
    doc = json.loads(paths["ranges"].read_text())
    assert doc["method"] == chosen and doc["config"]["method_check"] == check


def test_an_alternative_better_on_a_few_samples_only_is_not_taken(monkeypatch, caplog):
    # the alternative's figure higher by any margin, but not on most resamples of the check's samples
    # (Yahoo's open_nsfw: 80% of the output error on 5 of 112 images; the check took percentile, 7 dB
    # below entropy's model on held-out data)
    import quantkit.onnx.biascorrect as bc

    shares = []

    def share(ref, a, b, parts=None, rows=None):
        shares.append(bc.output_sqnr(ref, b, parts) - bc.output_sqnr(ref, a, parts))  # (entropy's, then the other's)
        return 0.7

    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", -np.inf)
    monkeypatch.setattr(bc, "better_share", share)
    with caplog.at_level("INFO"):
        cal = _calibrate()
    check = cal.method_check
    db = check["output_sqnr_db"]
    best, other = sorted(("percentile", "minmax"), key=lambda m: -db[m])
    assert check["chosen"] == "entropy" and cal.config.method == "entropy" and check["alternative_better_share"] == 0.7
    assert check["alternative"] == best
    # called once an alternative, the higher figure first, with entropy's samples, then the alternative's
    assert shares == pytest.approx([db[best] - db["entropy"], db[other] - db["entropy"]], abs=0.01)
    assert f"{best} higher on 70% of resamples of the samples, 90% needed" in caplog.text


def test_the_alternatives_are_tried_from_the_highest_figure_and_the_first_on_most_samples_is_taken(monkeypatch):
    # the higher figure on a few samples only, the next on most of them: the next is written
    import quantkit.onnx.biascorrect as bc

    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", -np.inf)
    first = _calibrate().method_check
    db = first["output_sqnr_db"]
    best, other = sorted(("percentile", "minmax"), key=lambda m: -db[m])
    calls = iter([0.7, 0.95])
    monkeypatch.setattr(bc, "better_share", lambda *a, **k: next(calls))
    cal = _calibrate()
    check = cal.method_check
    assert check["output_sqnr_db"] == db
    assert check["chosen"] == check["alternative"] == other == cal.config.method
    assert check["alternative_better_share"] == 0.95 and set(cal._int8) == {other}
    # and an alternative within the margin of the configured method is not tried at all
    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", np.inf)
    monkeypatch.setattr(bc, "better_share", lambda *a, **k: pytest.fail("no alternative leads by the margin"))
    kept = _calibrate().method_check
    assert kept["chosen"] == "entropy" and "alternative_better_share" not in kept and kept["alternative"] == best


def test_the_check_is_the_same_as_computing_both_methods_by_hand():
    # the figures come from the same models `int8_model(method)` makes without the check
    checked = _calibrate()
    plain = _calibrate(ExportConfig(method_check=False))
    assert plain.method_check is None and plain.config.method == "entropy"
    for m in ("entropy", "percentile", "minmax"):
        plain.int8_model(m)
        assert plain.bias_checks[m] == checked.bias_checks[m]
        assert plain.int8_model(m).SerializeToString() == checked.int8_model(m).SerializeToString()


def test_no_check_without_bias_correction_or_samples_after_the_corrections_or_for_a_chosen_method(caplog):
    with caplog.at_level("INFO", logger="quantkit"):
        assert _calibrate(bias_correction=False).method_check is None  # the check compares corrected models
    assert "no method check: it compares bias-corrected models (entropy kept; --no-bias-correction)" in caplog.text
    few = _calibrate(samples=32 + quantkit.ptq.METHOD_CHECK_MIN_SAMPLES - 1)  # too few samples to check on
    assert few.method_check is None and few.config.method == "entropy"
    assert _calibrate(samples=32 + quantkit.ptq.METHOD_CHECK_MIN_SAMPLES).method_check is not None
    cal = _calibrate(ExportConfig(method="mse"))
    assert cal.method_check is None and cal.config.method == "mse" and set(cal._int8) <= {"mse"}


def test_an_alternative_that_cannot_be_made_keeps_the_method(monkeypatch, caplog):
    made = quantkit.ptq.Calibration._made_int8

    def failing(self, method, fp32, plan, variant=""):
        if method == "percentile":
            raise ValueError("made-up failure")
        return made(self, method, fp32, plan, variant)

    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", -np.inf)  # it would be taken if it could be made
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    monkeypatch.setattr(quantkit.ptq.Calibration, "_made_int8", failing)
    with caplog.at_level("WARNING"):
        cal = _calibrate()
    assert cal.method_check is None and cal.config.method == "entropy"
    assert "the method check was skipped (entropy kept)" in caplog.text and "made-up failure" in caplog.text


@pytest.mark.parametrize("explicit", [False, True, "budget"])
def test_cli_writes_the_checks_verdict_unless_a_method_is_named(digits_dirs, tmp_path, monkeypatch, capsys, caplog,
                                                                  explicit):
    """Named methods are written as they are; with --max-drop (``explicit == "budget"``) there is no
    check either: the fallback measures the methods on the evaluation data."""
    from quantkit import sample
    from quantkit.cli import main
    from tests.helpers import DIGITS

    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", -np.inf)  # percentile whenever it is checked
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    caplog.set_level(logging.INFO, logger="quantkit")
    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "64", "--eval-images", "32", *DIGITS,
                 *(["--max-drop", "50"] if explicit == "budget" else ["--method", "entropy"] if explicit else [])]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    ranges = json.loads((out / "ranges.json").read_text())
    if not explicit:
        db = report["method_check"]["output_sqnr_db"]
    want = "entropy" if explicit else max(("percentile", "minmax"), key=db.__getitem__)
    assert report["method"] == ranges["method"] == want
    assert ("method_check" in report) == ("method_check" in ranges["config"]) == (not explicit)
    assert (f"quantized ({want}: the method check's choice" in said) == (not explicit)
    assert f"int8.onnx ({want})" in said  # the comparison table names the method written
    if not explicit:
        assert report["method_check"]["chosen"] == want and "--method entropy writes entropy" in said
    assert ("no method check: --max-drop's fallback" in caplog.text) == (explicit == "budget")


def test_the_summary_names_the_other_figure_and_the_way_back_only_after_a_switch():
    from quantkit.cli.calibrate import _method_note

    assert _method_note(None) == ""
    kept = {"configured": "entropy", "alternative": "percentile", "chosen": "entropy",
            "output_sqnr_db": {"entropy": 40.5, "percentile": 40.0}}
    said = _method_note(kept)
    assert "40.5 dB, percentile 40.0 dB" in said and "--method" not in said
    switched = {**kept, "chosen": "percentile", "output_sqnr_db": {"entropy": 4.93, "percentile": 6.85}}
    said = _method_note(switched)
    assert "6.8 dB, entropy 4.9 dB" in said and "--method entropy writes entropy unchecked" in said


@pytest.mark.parametrize("margin", [-np.inf, np.inf])
def test_the_checks_models_made_side_by_side_are_those_made_one_after_another(monkeypatch, margin):
    # on machines of CHECK_PARALLEL_CORES cores the method check's two models are made in two
    # threads: the same calibration to the bit, whichever method is taken
    import threading

    monkeypatch.setattr(quantkit.ptq, "METHOD_CHECK_MARGIN_DB", margin)
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    made = quantkit.ptq.Calibration._made_int8
    threads: list[str] = []

    def spy(self, method, fp32, plan, variant=""):
        threads.append(threading.current_thread().name)
        return made(self, method, fp32, plan, variant)

    monkeypatch.setattr(quantkit.ptq.Calibration, "_made_int8", spy)
    # and each guard's pass of the uncorrected model beside its correction's segments
    from quantkit.onnx import biascorrect

    passes = biascorrect._output_samples_of
    guards: list[str] = []

    def spy_pass(*args):
        guards.append(threading.current_thread().name)
        return passes(*args)

    monkeypatch.setattr(biascorrect, "_output_samples_of", spy_pass)
    monkeypatch.setattr(quantkit.ptq, "CHECK_PARALLEL_CORES", 10**6)
    serial = _calibrate()
    assert threads and not any(t.startswith("quantkit-check") for t in threads)
    assert guards and not any(t.startswith("quantkit-guard") for t in guards)
    threads.clear()
    guards.clear()
    monkeypatch.setattr(quantkit.ptq, "CHECK_PARALLEL_CORES", 1)
    monkeypatch.setattr(quantkit.ptq, "_free_memory_gb", lambda: 1e3)
    side = _calibrate()
    assert sorted(t.startswith("quantkit-check") for t in threads) == [False, True, True, True]  # the variant after
    assert sum(t.startswith("quantkit-guard") for t in guards) == 4  # the four guarded corrections
    assert side.bias_checks == serial.bias_checks
    assert serial.pointwise_check is not None  # the pointwise check's variant was compared too
    assert side.method_check == serial.method_check and side.pointwise_check == serial.pointwise_check
    db = serial.method_check["output_sqnr_db"]
    assert side.config.method == serial.config.method == (
        max(("percentile", "minmax"), key=db.__getitem__) if margin < 0 else "entropy")
    assert side.int8_model().SerializeToString() == serial.int8_model().SerializeToString()
    assert set(side._int8) == set(serial._int8)


def test_the_work_after_the_pass_is_reported_as_it_starts():
    """`calibrate`'s bar sat at 100% through the bias corrections and checks (most of a
    recogniser's calibration): ``on_stage`` names each as it starts."""
    model = make_depthwise_model(variant="fanout")
    stages: list[str] = []
    cal = quantkit.quantize(model, ArraySource(depthwise_inputs(model, 64)),
                            QuantizeConfig(StatsConfig(), RunConfig(batch_size=8)), on_stage=stages.append)
    assert stages[0] == "method check (entropy against percentile and minmax, each bias-corrected)"
    assert {"bias correction (entropy)", "bias correction (percentile)", "bias correction (minmax)"} <= set(stages[1:])
    before = len(stages)
    cal.int8_model("mse")
    assert stages[before:] == ["bias correction (mse)"]
    cal.int8_model("mse")  # made once
    assert len(stages) == before + 1


def test_calibrate_says_when_the_work_after_the_pass_took_most_of_the_time(digits_dirs, tmp_path, monkeypatch, capsys):
    # a probe's head-pose net calibrated in 29 s against one FP32 pass of 0.3 s with no word on what took it
    import quantkit.cli.calibrate as cc
    from quantkit import sample
    from quantkit.cli import main
    from tests.helpers import DIGITS

    stages = cc._Stages()
    ticks = iter([100.0, 140.0])
    stages._clock = lambda: next(ticks)
    stages.start = 90.0  # a pass of 10 s, then 40 s of corrections and checks
    stages.stage("bias correction (entropy)", type("Bar", (), {"set_description_str": lambda self, s: None})())
    stages.stop()
    said = stages.note(checked=True, corrected=True)
    assert said is not None and "pass took 10 s and the work after it 40 s (bias correction)" in said
    assert "--method entropy" in said and "--no-bias-correction" in said
    assert "--method" not in stages.note(checked=False, corrected=True)
    stages.end = 125.0  # 25 s after the pass: under SLOW_STAGES_S, nothing said
    assert stages.note(checked=True, corrected=True) is None

    monkeypatch.setattr(cc, "SLOW_STAGES_S", 0.0)
    monkeypatch.setattr(cc, "SLOW_STAGES_RATIO", 0.0)
    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "64", "--eval-images", "16", "--no-progress", *DIGITS]) == 0
    said = capsys.readouterr().out
    assert "note: the calibration pass took" in said and "method check" in said, said
