"""Budgeted mixed-precision fallback: meets the budget with few groups in float, says so when it cannot."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantkit.cli import main
from quantkit.debug.fallback import MIN_METHOD_GAIN, FallbackConfig, fallback
from quantkit.debug.sensitivity import quant_groups
from quantkit.errors import InputError
from quantkit.ptq import ExportConfig, QuantizeConfig, StatsConfig, quantize
from tests.helpers import DIGITS, PW_NODE, ArraySource, digits_arrays, make_outlier_digits, snapshot


@pytest.fixture(scope="module")
def broken():
    x, labels, test = digits_arrays()
    # without pointwise equalization (the default), which resolves the outlier channel by itself
    cal = quantize(make_outlier_digits(), ArraySource(x[~test][:256]),
                   QuantizeConfig(StatsConfig(equalize_pointwise=False), export=ExportConfig("percentile")))
    ev = ArraySource(x[test][:300], labels[test][:300])
    return cal, ev


def test_fallback_meets_the_budget_with_one_group_in_float(broken):
    cal, ev = broken
    seen = []
    res = fallback(cal, ev, None, FallbackConfig(max_drop=0.5, drop_metric="accuracy"), on_step=seen.append)
    assert res.drop_before > 15  # plain PTQ clearly loses (19.3 points; 20.x before Conv bias correction)
    assert res.met and res.drop_after <= 0.5 and res.float_groups == [PW_NODE]
    assert res.num_groups == len(quant_groups(cal.model, cal.plan)) and res.float_nodes == [PW_NODE]
    # the model returned is the one measured: its accuracy against the labels, recomputed
    rep = cal.evaluate(ev, int8_model=res.int8_model)
    assert 100 * (rep.accuracy_reference - rep.accuracy_test) == pytest.approx(res.drop_after)
    assert res.int8_metric_after == pytest.approx(100 * rep.accuracy_test)
    assert not any(n.input and PW_NODE == n.name and any("DequantizeLinear" in i for i in n.input)
                   for n in res.int8_model.graph.node)
    assert [s["action"] for s in res.steps][:2] == ["int8", "rank"] and seen == res.steps
    # the ranking skips the only-quantized runs no step reads: one suffix run per group, plus trials
    ranking = res.ranking
    assert all(r.only_quantized_error is None for r in ranking.rows) and ranking.rows[0].name == PW_NODE
    assert ranking.counts["suffix_runs"] <= res.num_groups + FallbackConfig(0).method_groups * len(cal.ranges[
        next(iter(cal.plan.activations))].amax)
    assert res.steps[-1]["action"] == "float" and res.steps[-1]["groups"] == [PW_NODE]
    for s in res.steps:
        if s["action"] == "method" and s["kept"]:  # (a group switched, then floated, has no method)
            g = s["groups"][0]
            assert res.method_overrides.get(g) == (None if g in res.float_groups else s["method"])
        if s.get("validated") is False:  # checked on the subset only: it did not lower the subset's error
            assert not s["kept"] and s["subset_error"] > (1 - MIN_METHOD_GAIN) * s["subset_error_before"]
    json.dumps(res.to_dict())  # the report is JSON


def test_fallback_reads_the_evaluation_data_once(broken):
    """Every step validates on the same evaluation batches: they are read once, with the FP32
    pass, and held (they are small), not decoded again for every model measured; the decisions
    stay those of the first test."""
    cal, ev = broken
    loads: list[int] = []

    class Counting(ArraySource):
        def load(self, index: int) -> np.ndarray:
            loads.append(index)
            return super().load(index)

    res = fallback(cal, Counting(ev.x, ev.labels), None, FallbackConfig(max_drop=0.5, drop_metric="accuracy"),
                   ranking_source=ArraySource(ev.x), ranking_indices=range(len(ev)))
    measured = sum(1 for s in res.steps if s["action"] not in ("rank", "rerank") and s.get("validated") is not False)
    assert measured >= 3 and res.float_groups == [PW_NODE]
    assert sorted(loads) == list(range(len(ev)))


def test_a_budget_already_met_changes_nothing(broken):
    cal, ev = broken
    res = fallback(cal, ev, None, FallbackConfig(max_drop=100.0))
    assert res.met and res.float_groups == [] and res.int8_model is cal.int8_model() and len(res.steps) == 1


def test_an_unmeetable_budget_says_so(broken):
    cal, ev = broken
    res = fallback(cal, ev, None, FallbackConfig(max_drop=0.5, drop_metric="top1-agreement", max_float_groups=0,
                                                 method_groups=0))
    assert not res.met and res.float_groups == [] and res.drop_after > 0.5
    assert "cannot be met" in res.message and "limit of 0" in res.message


def test_accuracy_without_labels_is_refused_before_any_work(broken, monkeypatch):
    cal, ev = broken
    unlabelled = ArraySource(ev.x)
    import quantkit.debug.fallback as fb

    monkeypatch.setattr(fb, "_Evaluator", None)  # no work may start
    with pytest.raises(InputError, match="needs labels"):
        fallback(cal, unlabelled, None, FallbackConfig(max_drop=1.0, drop_metric="accuracy"))
    with pytest.raises(InputError, match=">= 0"):
        FallbackConfig(max_drop=-1)
    with pytest.raises(InputError, match="unknown drop metric"):
        FallbackConfig(max_drop=1, drop_metric="f1")


def test_interrupted_fallback_raises_through(broken):
    cal, ev = broken

    def stop(step):
        if step["action"] == "rank":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fallback(cal, ev, None, FallbackConfig(max_drop=0.5), on_step=stop)


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("outlier")
    onnx.save(make_outlier_digits(), root / "m.onnx")
    x, labels, test = digits_arrays()
    np.savez(root / "d.npz", image=x[:700], labels=labels[:700])
    np.savez(root / "nolabels.npz", image=x[:700])
    return root


def _args(root, out, *extra, data="d.npz"):
    return ["calibrate", str(root / "m.onnx"), "--npz", str(root / data), "--num-images", "256", "--eval-images", "300",
            "--method", "percentile", "--no-equalize-pointwise", "--no-progress", "-o", str(out), *extra]


def test_calibrate_max_drop_writes_the_model_that_meets_it(digits_files, tmp_path, capsys):
    root = digits_files
    assert main(_args(root, tmp_path / "o", "--max-drop", "0.5")) == 0
    captured = capsys.readouterr()
    assert "fallback step" in captured.err and "budget met" in captured.out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    fb = report["fallback"]
    assert fb["met"] and fb["drop_metric"] == "accuracy" and fb["float_groups"] == [PW_NODE] and fb["steps"]
    # the report's comparison is of the written model
    assert 100 * (report["accuracy_reference"] - report["accuracy_test"]) == pytest.approx(fb["drop_after"])
    ranges = json.loads((tmp_path / "o" / "ranges.json").read_text())
    assert ranges["fallback"]["float_groups"] == [PW_NODE]
    assert ranges["fallback"]["method_overrides"] == fb["method_overrides"]
    sens = json.loads((tmp_path / "o" / "sensitivity.json").read_text())
    assert sens["rows"][0]["name"] == PW_NODE
    model = onnx.load(tmp_path / "o" / "m.int8.onnx")
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pw = next(n for n in model.graph.node if n.name == PW_NODE)
    assert not dq & set(pw.input)  # the pointwise conv reads float inputs
    # the TensorRT cache agrees: the float group's tensor has no range (TensorRT 10's implicit
    # INT8 then runs its reader in higher precision), the others keep theirs
    from quantkit.calibrators.cache import read_cache

    cache = read_cache(tmp_path / "o" / "calibration.cache")
    assert pw.input[0] in ranges["tensors"] and pw.input[0] not in cache.scales
    cached = [t for t, r in ranges["tensors"].items() if "equalized_from" not in r]  # a scaled copy is not cached
    assert sorted(cache.scales) == sorted(t for t in cached if t != pw.input[0])
    # the ranking feeds --exclude-from
    assert main(_args(root, tmp_path / "o2", "--exclude-from", str(tmp_path / "o" / "sensitivity.json"),
                      "--top", "1")) == 0
    assert json.loads((tmp_path / "o2" / "ranges.json").read_text())["excluded"][0]["node"] == PW_NODE
    # a ranking of another model, or one with damaged node names: one line naming the file (was
    # "--exclude '/escaped\\.name' matches no node", and exit 1 for names that are not text)
    other, damaged = tmp_path / "other.json", tmp_path / "damaged.json"
    other.write_text(json.dumps({"rows": [{"name": "g", "nodes": ["/backbone/conv_9/Conv"]}]}))
    damaged.write_text(json.dumps({"rows": [{"name": "g", "nodes": [1, 2]}]}))
    capsys.readouterr()
    assert main(_args(root, tmp_path / "o3", "--exclude-from", str(other), "--top", "1")) == 2
    assert "names node '/backbone/conv_9/Conv', which this model does not have" in capsys.readouterr().err
    assert main(_args(root, tmp_path / "o3", "--exclude-from", str(damaged), "--top", "1")) == 2
    assert "holds no sensitivity ranking" in capsys.readouterr().err


def test_calibrate_max_drop_bad_input_writes_nothing(digits_files, tmp_path, capsys, monkeypatch):
    root = digits_files
    before = snapshot(root)
    # no labels with --drop-metric accuracy: one line before any work
    import quantkit.ptq as ptq

    monkeypatch.setattr(ptq, "quantize", None)
    assert main(_args(root, tmp_path / "a", "--max-drop", "1", "--drop-metric", "accuracy", data="nolabels.npz")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs labels" in err[0] and len(err) == 2
    monkeypatch.undo()
    # an unmeetable budget (at most 0 groups in float): exit 2, nothing written
    assert main(_args(root, tmp_path / "b", "--max-drop", "0.5", "--max-float-groups", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("quantkit: error: the budget of 0.5 accuracy points cannot be met")
    assert "nothing was written" in err[-2]
    # interrupted (Ctrl-C during the fallback): 130, no partial artifact
    import quantkit.cli.calibrate as cc

    def interrupt(step):
        if step["action"] != "int8":
            raise KeyboardInterrupt

    monkeypatch.setattr(cc, "_print_step", interrupt)
    assert main(_args(root, tmp_path / "c", "--max-drop", "0.5")) == 130
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == [] and snapshot(root) == before


@pytest.mark.parametrize("metric", ["sqnr", "cosine"])
def test_a_zero_budget_ends_at_the_fp32_outputs_and_puts_back_what_did_not_help_first(metric):
    from quantkit.datasets import SyntheticSource
    from tests.helpers import make_residual_model

    src = SyntheticSource((3, 8, 8), count=64, seed=1)
    cal = quantize(make_residual_model(), src)
    res = fallback(cal, src, range(32, 64), FallbackConfig(max_drop=0.0, drop_metric=metric))
    assert res.met and res.drop_after == 0.0 and res.drop_before > 0
    prev, no_help, floated = res.drop_before, set(), []
    for s in res.steps:
        if s["action"] == "float":
            if s["drop"] >= prev:
                no_help.add(s["groups"][0])
            prev = s["drop"]
            floated.append(s["groups"][0])
        elif s["action"] == "method" and s["kept"]:
            prev = s["drop"]
    # every group in float is tried in INT8 again but the last one floated (the state without it
    # was measured: over the budget); those that did not help first, each from the latest
    tried = [s["groups"][0] for s in res.steps if s["action"] == "int8 again"]
    assert sorted(tried) == sorted(floated[:-1])
    assert tried == sorted(reversed(floated[:-1]), key=lambda g: g not in no_help)
    assert sorted(res.float_groups) == sorted([floated[-1], *(s["groups"][0] for s in res.steps
                                                               if s["action"] == "int8 again" and not s["kept"])])


def test_a_task_metric_sets_the_budget_in_its_own_points(broken):
    """A caller's per-sample metric (here: accuracy computed from the outputs and the labels the
    caller holds) drives the fallback like the built-in one, and its figures are its own."""
    cal, ev = broken
    labels = ev.labels
    calls = []

    def correct(out, indices):
        calls.append(len(indices))
        return 100.0 * (out.argmax(1) == labels[indices])

    res = fallback(cal, ev, None, FallbackConfig(max_drop=0.5), task_metric=correct)
    builtin = fallback(cal, ev, None, FallbackConfig(max_drop=0.5, drop_metric="accuracy"))
    assert res.drop_metric == "task" and res.met and res.float_groups == builtin.float_groups == [PW_NODE]
    assert res.drop_before == pytest.approx(builtin.drop_before) and res.fp32_metric == pytest.approx(
        builtin.fp32_metric)
    measured = [s for s in res.steps if s["action"] not in ("rank", "rerank") and s.get("validated", True)]
    assert sum(calls) == len(ev) * (1 + len(measured))  # FP32 + every validated step

    with pytest.raises(InputError, match="2 score"):
        fallback(cal, ev, None, FallbackConfig(max_drop=0.5), task_metric=lambda out, idx: np.zeros(2))
    with pytest.raises(InputError, match="drop metric 'sqnr' too"):
        fallback(cal, ev, None, FallbackConfig(max_drop=0.5, drop_metric="sqnr"), task_metric=correct)


def test_a_method_bad_everywhere_is_switched_for_the_whole_model():
    """Every tensor's plain scale far too small (the way TensorRT's unguarded KL search clipped
    RapidOCR's classifier: -21.9 points): one whole-model switch to another method of the same
    pass meets the budget, no group in float; without the whole-model step (method_groups=0: no
    switch at all) groups go to float instead."""
    from quantkit.debug.sensitivity import QdqScales

    x, labels, test = digits_arrays()
    # written with entropy-trt, which the whole-model switch never lands on: the cache must change
    cal = quantize(make_outlier_digits(), ArraySource(x[~test][:256]), QuantizeConfig(export=ExportConfig("entropy-trt")))
    ev = ArraySource(x[test][:300], labels[test][:300])
    scales = QdqScales.from_calibration(cal)
    for amax in scales.ranges.values():
        amax["tiny"] = amax["minmax"] / 40.0
    scales.method, scales.plain, scales.bias_shifts = "tiny", None, None
    res = fallback(scales, ev, None, FallbackConfig(max_drop=0.5, drop_metric="accuracy"))
    assert res.drop_before > 10 and res.met and res.float_groups == []
    whole = [s for s in res.steps if s["action"] == "method" and s["groups"] == ["(every group)"]]
    assert len(whole) == 1 and whole[0]["kept"]
    assert set(res.method_overrides) == {g.name for g in scales.groups}
    assert set(res.method_overrides.values()) == {whole[0]["method"]} and "every group on" in res.message
    # the TensorRT cache written with the result carries the switched method's ranges
    from quantkit.calibrators.cache import CalibrationCache

    method = whole[0]["method"]
    before = cal.cache().scales
    cal.apply_fallback(res)
    assert cal.int8_model() is res.int8_model
    after = cal.cache().scales
    want = CalibrationCache.from_amax({t: cal.ranges[t].amax[method] for t in after}, method).scales
    assert after == want and set(after) == set(before) and after != before
    # an equalized tensor is in the cache under its own name: it follows its scaled copy's group
    own = [e.tensor for e in cal.equalized if e.tensor in after]
    assert own and method != cal.config.method, (own, method)
    without = fallback(scales, ev, None, FallbackConfig(max_drop=0.5, drop_metric="accuracy", method_groups=0))
    assert not without.method_overrides and len(without.float_groups) > 0


def test_a_group_switched_then_floated_is_not_reported_as_switched():
    """The fourth probe's recogniser: the summary said "2 group(s) switched by --max-drop" where
    one of the two had gone to float after its switch. Here every group is switched first (the
    whole-model step), then a budget of 0 floats them: none is reported switched."""
    from quantkit.debug.sensitivity import QdqScales

    x, labels, test = digits_arrays()
    cal = quantize(make_outlier_digits(), ArraySource(x[~test][:256]), QuantizeConfig(export=ExportConfig("entropy-trt")))
    scales = QdqScales.from_calibration(cal)
    for amax in scales.ranges.values():
        amax["tiny"] = amax["minmax"] / 40.0
    scales.method, scales.plain, scales.bias_shifts = "tiny", None, None
    res = fallback(scales, ArraySource(x[test][:100], labels[test][:100]), None,
                   FallbackConfig(max_drop=0.0, drop_metric="sqnr"))
    assert any(s["action"] == "method" and s["kept"] for s in res.steps)  # switched first
    assert res.float_groups and not set(res.method_overrides) & set(res.float_groups)
    # FP32's infinite SQNR is written as "inf" as in every result file (it was null)
    from quantkit._io import json_safe

    assert json_safe(res.to_dict())["fp32_metric"] == "inf"


def test_eval_dir_takes_an_npz_with_labels(digits_files, tmp_path, capsys):
    """--eval-dir may name an .npz (with 'labels' for --drop-metric accuracy), as --npz reads it:
    the budget is measured on it, not on the held-out part of --npz."""
    root = digits_files
    x, labels, test = digits_arrays()
    np.savez(tmp_path / "eval.npz", image=x[test][:200], labels=labels[test][:200])
    args = _args(root, tmp_path / "o", "--max-drop", "0.5", "--eval-dir", str(tmp_path / "eval.npz"))
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["num_samples"] == 200 and report["fallback"]["met"]


@pytest.mark.parametrize("estimator", ["exact", "gradient"])
def test_ranked_again_after_a_whole_model_switch_that_is_not_enough(estimator):
    """A kept whole-model switch that leaves the budget unmet ranks the groups again in the new
    state; with the gradient estimator the ranking's exact ranker holds only the method trials'
    cuts, so a ranker of every group is made for it (that re-ranking failed with a KeyError)."""
    if estimator == "gradient":
        pytest.importorskip("torch")
    from quantkit.debug.sensitivity import QdqScales

    x, labels, test = digits_arrays()
    cal = quantize(make_outlier_digits(), ArraySource(x[~test][:256]))
    ev = ArraySource(x[test][:300], labels[test][:300])
    scales = QdqScales.from_calibration(cal)
    for amax in scales.ranges.values():
        amax["tiny"] = amax["minmax"] / 40.0
    scales.method, scales.plain, scales.bias_shifts = "tiny", None, None
    # sqnr with no room at all: only FP32 meets it, so the switch is kept and is not enough
    res = fallback(scales, ev, None, FallbackConfig(max_drop=0.0, drop_metric="sqnr", estimator=estimator,
                                                    max_float_groups=1))
    actions = [(s["action"], s["groups"], s.get("kept")) for s in res.steps]
    assert actions[2] == ("method", ["(every group)"], True) and actions[3][0] == "rerank"
    assert actions[4][0] == "float" and not res.met and "limit of 1 group" in res.message


def test_a_budget_below_one_evaluation_sample_is_warned_about(broken, caplog):
    """0.5 points of 128 samples (0.78 a sample) means no sample may change: said, not silent."""
    cal, ev = broken
    fallback(cal, ev, list(range(100)), FallbackConfig(max_drop=100.0 / 101, drop_metric="top1-agreement"))
    assert "less than one evaluation sample" in caplog.text
    caplog.clear()
    fallback(cal, ev, list(range(100)), FallbackConfig(max_drop=1.0, drop_metric="top1-agreement"))
    assert "less than one evaluation sample" not in caplog.text


def test_the_summary_names_the_method_the_fallback_switched_to():
    """After --max-drop switched every group to percentile, the compare table and the summary
    still said "(entropy)"."""
    from types import SimpleNamespace

    from quantkit.cli.calibrate import _switches_note

    assert _switches_note(None) == ""
    every = SimpleNamespace(method_overrides={"a": "percentile", "b": "percentile"}, num_groups=2)
    assert _switches_note(every) == "; every group switched to percentile by --max-drop"
    some = SimpleNamespace(method_overrides={"a": "mse"}, num_groups=5)
    assert _switches_note(some) == "; 1 group(s) switched to mse by --max-drop"


def test_top1_agreement_of_a_sequence_softmax_is_per_position(tmp_path):
    """A recogniser's [N, T, classes] (a Softmax over the last axis): --drop-metric top1-agreement was
    refused as "needs a classifier output [N, classes]"; it is the share of positions whose argmax
    agrees, as `compare` reports it (the default stays sqnr)."""
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.datasets.sources import NumpySource
    from quantkit.debug.fallback import drop_metric_for

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (8, 12)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["p"])],
                              "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 8])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10, 12])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (64, 10, 8)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    assert drop_metric_for(model, "p", None, src, range(64)) == "sqnr"
    assert drop_metric_for(model, "p", "top1-agreement", src, range(64)) == "top1-agreement"
    cal = quantize(model, src)
    res = fallback(cal, src, range(32, 64), FallbackConfig(max_drop=100.0, drop_metric="top1-agreement"))
    ref, got = (onnx_out(m, np.load(tmp_path / "d.npz")["x"][32:]) for m in (cal.model, res.int8_model))
    want = 100.0 * float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert res.met and res.int8_metric_after == pytest.approx(want) and 50.0 < want <= 100.0


def onnx_out(model, x):
    from quantkit.backends.onnxruntime import create_session

    return create_session(model.SerializeToString()).run(None, {"x": x})[0]


def test_an_accuracy_budget_on_labels_of_other_classes_is_refused(digits_files, tmp_path, capsys):
    """Labels shifted by one class (class folders named after the next digit): FP32 scored 0% and
    the budget read as met ("drop -3.5 <= 1") on an INT8 model that lost 24 points."""
    root = digits_files
    x, labels, test = digits_arrays()
    np.savez(tmp_path / "eval.npz", image=x[test][:200], labels=(labels[test][:200] + 1) % 10)
    rc = main(_args(root, tmp_path / "o", "--max-drop", "1", "--drop-metric", "accuracy", "--eval-dir",
                    str(tmp_path / "eval.npz")))
    err = capsys.readouterr().err
    assert rc == 2 and "no better than chance (1 in 10)" in err, err
    assert not (tmp_path / "o").exists()
