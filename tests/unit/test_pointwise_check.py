"""The pointwise check (``Calibration.check_pointwise``) and the guard's view of a Concat's parts
(``biascorrect.output_sqnr`` with ``concat_parts``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import quantkit
import quantkit.onnx.biascorrect
from quantkit.ptq import ExportConfig, QuantizeConfig, RunConfig, StatsConfig
from tests.helpers import ArraySource, depthwise_inputs, make_depthwise_model


def _head(axis: int = 1, classes: int | str = 6) -> onnx.ModelProto:
    """boxes [N, 4, P] and Sigmoid(scores [N, classes, P]) concatenated along ``axis``: a YOLO head."""
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4, 50])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes, 50])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Sigmoid", ["scores"], ["p"]),
                               helper.make_node("Concat", ["boxes", "p"], ["out"], axis=axis)],
                              "head", [boxes, scores], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_concat_parts_of_a_detector_head():
    from quantkit.onnx.model import concat_parts

    assert concat_parts(_head()) == {"out": [4, 6]}
    assert concat_parts(_head(axis=-2)) == {"out": [4, 6]}  # axis 1 of a rank-3 output
    assert concat_parts(_head(axis=2)) == {}  # along the anchors: not channels
    assert concat_parts(_head(classes="C")) == {}  # a part's size unknown


def test_output_sqnr_counts_a_concats_worst_part_pooled():
    from quantkit.onnx.biascorrect import GUARD_DB, output_samples, output_sqnr

    rng = np.random.default_rng(3)
    boxes = rng.uniform(0, 640, (8, 4, 50))
    scores = np.where(rng.random((8, 6, 50)) < 0.02, 0.8, 1e-3)  # a few detections, most classes silent
    ref = np.concatenate([boxes, scores], axis=1).astype(np.float32)
    got = ref.copy()
    got[:, :4] += rng.normal(0, 0.5, got[:, :4].shape)  # boxes nearly exact
    got[:, 4:] -= 0.1 * (ref[:, 4:] > 0.5)  # the detections' scores 0.1 lower
    r, g = {"out": [output_samples(ref)]}, {"out": [output_samples(got)]}

    def db(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.clip(10 * np.log10(np.square(a).sum() / np.square(b - a).sum()), *GUARD_DB))

    scores_db = db(ref[:, 4:].astype(np.float64), got[:, 4:].astype(np.float64))
    assert output_sqnr(r, g, {"out": [4, 6]}) == pytest.approx(scores_db, abs=1e-3)
    per_channel = output_sqnr(r, g)
    assert per_channel is not None and per_channel > scores_db + 10  # the silent classes' channels read exact
    assert output_sqnr(r, g, {"out": [4, 5]}) == per_channel  # parts that do not add up: per channel


def _calibrate(model: onnx.ModelProto, x: np.ndarray, **stats) -> quantkit.Calibration:
    """Entropy without the method check (test_method_check), so that both calibrations compared keep it."""
    return quantkit.quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(**stats), RunConfig(batch_size=8),
                                                                   ExportConfig(method_check=False)))


@pytest.mark.parametrize("variant", ["plain", "input"])
def test_the_check_keeps_pointwise_equalization_that_helps(variant):
    model = make_depthwise_model(variant=variant)
    cal = _calibrate(model, depthwise_inputs(model, 40))
    check = cal.pointwise_check
    assert check is not None and check["kept"], check
    assert check["output_sqnr_db"] >= check["unequalized_output_sqnr_db"] - quantkit.ptq.POINTWISE_CHECK_MARGIN_DB
    assert any(e.input_axis for e in cal.equalized)
    assert cal.ranges_document()["config"]["pointwise_check"] == check


def test_pointwise_equalization_better_without_on_a_few_samples_only_is_kept(monkeypatch):
    model = make_depthwise_model(variant="plain")
    seen = []

    def share(ref, a, b, parts=None, rows=None):
        seen.append((len(ref), len(a), len(b)))
        return 0.5

    monkeypatch.setattr(quantkit.ptq, "POINTWISE_CHECK_MARGIN_DB", -np.inf)
    monkeypatch.setattr(quantkit.onnx.biascorrect, "better_share", share)
    cal = _calibrate(model, depthwise_inputs(model, 40))
    check = cal.pointwise_check
    assert check["kept"] and check["unequalized_better_share"] == 0.5, check
    assert any(e.input_axis or e.weight_axis for e in cal.equalized)
    assert len(seen) == 1 and cal._guard_samples == {} and not cal._pointwise_pending  # not held after the check


@pytest.mark.parametrize("variant", ["plain", "fanout", "input"])
def test_a_calibration_without_pointwise_equalization_from_the_same_statistics(monkeypatch, tmp_path, variant):
    # the check told to leave it out: the calibration becomes the one --no-equalize-pointwise makes
    # (the depthwise equalization kept), its Q/DQ model, ranges and cache from the same pass
    from quantkit.backends.onnxruntime import OrtRunner

    model = make_depthwise_model(variant=variant)
    x = depthwise_inputs(model, 40)
    monkeypatch.setattr(quantkit.ptq, "POINTWISE_CHECK_MARGIN_DB", -np.inf)
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    cal = _calibrate(model, x)
    monkeypatch.undo()
    reference = _calibrate(model, x, equalize_pointwise=False)
    check = cal.pointwise_check
    assert check is not None and not check["kept"], check
    assert not any(e.input_axis or e.weight_axis for e in cal.equalized)
    assert [e.to_dict() for e in cal.equalized] == [e.to_dict() for e in reference.equalized]
    assert cal.plan.activation_names == reference.plan.activation_names
    assert set(cal.ranges) == set(reference.ranges)
    for t in reference.ranges:  # the same tensors' histograms from the one pass
        assert cal.ranges[t].amax["entropy"] == pytest.approx(reference.ranges[t].amax["entropy"], rel=1e-4), t
    bias = cal.bias_checks["entropy"]  # the variant's guarded correction
    assert bias["output_sqnr_db" if bias["applied"] else "uncorrected_output_sqnr_db"] == \
        check["unequalized_output_sqnr_db"] and "entropy" in cal.bias_shifts
    q = cal.int8_model()
    assert not any(n.op_type == "Mul" and n.output[0].endswith("_equalized") and
                   any(c in n.output[0] for c in ("r_equalized", "rs_equalized")) for n in q.graph.node)
    with OrtRunner(cal.int8_model()) as a, OrtRunner(reference.int8_model()) as b:
        ya, yb = a.infer({"x": x[:8]}), b.infer({"x": x[:8]})
    for k in ya:
        np.testing.assert_allclose(ya[k], yb[k], rtol=1e-3, atol=1e-3 * float(np.abs(yb[k]).max()))
    paths = cal.save(tmp_path / "out", model_stem="m")
    doc = json.loads(paths["ranges"].read_text())
    assert doc["config"]["pointwise_check"] == check
    cached = set(cal.cache().scales)
    assert not any(t.endswith("_equalized") for t in cached) and cached <= set(reference.ranges)


def test_cli_says_when_the_check_left_pointwise_equalization_out(monkeypatch):
    from quantkit.cli.calibrate import _pointwise_note

    assert _pointwise_note(None) == "" and _pointwise_note({"kept": True, "output_sqnr_db": 3.0,
                                                             "unequalized_output_sqnr_db": 1.0}) == ""
    said = _pointwise_note({"kept": False, "output_sqnr_db": 11.1, "unequalized_output_sqnr_db": 13.1})
    assert "pointwise equalization left out" in said and "11.1 dB with it, 13.1 without" in said


def test_a_variant_that_cannot_be_made_leaves_the_calibration_as_it_is(monkeypatch, caplog):
    # the check is a check, not a requirement: a failure making the model without pointwise
    # equalization (here made up) keeps the equalized calibration, with a warning, not an exit 1
    model = make_depthwise_model(variant="plain")
    x = depthwise_inputs(model, 40)
    reference = _calibrate(model, x)
    made = quantkit.ptq.Calibration._made_int8

    def failing_variant(self, method, fp32, plan, variant=""):
        if variant:
            raise ValueError("made-up failure")
        return made(self, method, fp32, plan, variant)

    monkeypatch.setattr(quantkit.ptq.Calibration, "_made_int8", failing_variant)
    with caplog.at_level("WARNING"):
        cal = _calibrate(model, x)
    assert cal.pointwise_check is None and "the pointwise check was skipped" in caplog.text
    assert "made-up failure" in caplog.text
    assert [e.to_dict() for e in cal.equalized] == [e.to_dict() for e in reference.equalized]
    assert cal.int8_model().SerializeToString() == reference.int8_model().SerializeToString()


@pytest.mark.parametrize("margin", [float("inf"), -float("inf")])
def test_cli_writes_the_checks_verdict(digits_dirs, tmp_path, monkeypatch, capsys, margin):
    # kept (any margin above the difference) or left out (any below it): report.json and ranges.json carry
    # the verdict, the summary says when it left pointwise equalization out, and the model follows
    from quantkit import sample
    from quantkit.cli import main
    from tests.helpers import DIGITS

    monkeypatch.setattr(quantkit.ptq, "POINTWISE_CHECK_MARGIN_DB", margin)
    monkeypatch.setattr(quantkit.onnx.biascorrect, "CHECK_CONFIDENCE", 0.0)  # the margin alone decides
    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "64", "--eval-images", "32", *DIGITS]) == 0
    said = capsys.readouterr().out
    check = json.loads((out / "report.json").read_text())["pointwise_check"]
    ranges = json.loads((out / "ranges.json").read_text())
    assert ranges["config"]["pointwise_check"] == check and check["kept"] == (margin > 0)
    assert ("pointwise equalization left out" in said) == (margin < 0)
    model = onnx.load(str(next(out.glob("*.int8.onnx"))))
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node}
    readers = [groups[c] for e in ranges.get("equalized", []) for c in e["consumers"]]
    assert readers and any(g == 1 for g in readers) == (margin > 0)  # left out: the depthwise ones stay
    scaled = {e["scaled"] for e in ranges.get("equalized", [])}
    assert len([n for n in model.graph.node if n.op_type == "Mul" and n.output[0] in scaled]) == len(scaled)
