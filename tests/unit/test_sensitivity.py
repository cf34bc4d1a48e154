"""Quantization groups and the sensitivity ranking, against exclude_from_plan and full-model runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.cli import main
from quantkit.datasets import SyntheticSource
from quantkit.debug.sensitivity import (QdqScales, plan_only, plan_without, quant_groups, ranking_from_file,
                                        rank_sensitivity)
from quantkit.errors import InputError
from quantkit.onnx.qdq import exclude_from_plan, insert_qdq, plan_qdq
from tests.helpers import PW_NODE, make_residual_model, outlier_calibration


def _pairs(plan):
    return {(t, c) for t, cs in plan.activations.items() for c in cs} | {(w, c) for w, (_, cs) in plan.weights.items()
                                                                         for c in cs}


@pytest.mark.parametrize("builder", ["residual", "concat", "siblings"])
def test_a_group_in_float_is_exclude_from_plan_of_its_nodes(builder):
    from tests.unit.test_placement import concat_model, siblings_model

    m = {"residual": make_residual_model, "concat": concat_model, "siblings": siblings_model}[builder]()
    plan = plan_qdq(m)
    groups = quant_groups(m, plan)
    # every node with a quantized input is in exactly one group
    nodes = [n for g in groups for n in g.nodes]
    assert sorted(nodes) == sorted({c for _, c in _pairs(plan)})
    for g in groups:
        kept, _ = exclude_from_plan(m, plan, names=list(g.nodes), follow_fusions=False)
        assert plan_without(m, plan, [g]) == kept
        removed = _pairs(plan) - _pairs(kept)
        assert removed == {p for p in _pairs(plan) if p[1] in g.nodes}, g  # only this group's pairs go
        assert {t for t, _ in removed} == set(g.activations) | set(g.weights)
        assert _pairs(plan_only(plan, g)) == removed
    if builder == "concat":  # conv_c reads `a`, conv_d reads `cat`: one shared scale, one group
        assert any(set(g.nodes) == {"conv_c", "conv_d"} for g in groups)


@pytest.fixture(scope="module")
def broken():
    # without bias correction: the ranking's errors are checked against full-model runs of each
    # variant, and a corrected variant is measured again while the switchable model keeps the
    # plain model's shifts (test_the_ranking_runs_the_bias_corrected_plain_model checks those)
    return outlier_calibration(bias_correction=False)


def _error(model, feed, ref, optimization="none"):
    """Noise/signal of ``model``'s logits; by default as ONNX defines Q/DQ (graph optimizations
    off: ONNX Runtime's optimized Q/DQ model runs integer kernels that round differently)."""
    import onnxruntime as ort

    from quantkit.backends.onnxruntime import session_options

    sess = ort.InferenceSession(model.SerializeToString(), session_options(optimization=optimization),
                                providers=["CPUExecutionProvider"])
    out = sess.run(["logits"], feed)[0].astype(np.float64)
    return float(((ref - out) ** 2).sum() / (ref ** 2).sum())


def test_ranking_finds_the_broken_group_and_its_errors_equal_full_model_runs(broken):
    cal, ev = broken
    rep = rank_sensitivity(cal, ev, subset=24)
    assert rep.rows[0].name == PW_NODE
    assert rep.rows[0].only_float_error < 0.01 * rep.int8_error  # the whole loss is in that group
    assert len(rep.subset_indices) == 24 and len(rep.rows) == len(quant_groups(cal.model, cal.plan))
    # the subset = the samples with the largest INT8 error
    feed_all = {"image": ev.x}
    ref_all = OrtRunner(cal.model).infer(feed_all)["logits"].astype(np.float64)
    int8_all = OrtRunner(cal.int8_model()).infer(feed_all)["logits"].astype(np.float64)
    per = ((ref_all - int8_all) ** 2).sum(1) / (ref_all ** 2).sum(1)
    assert sorted(rep.subset_indices) == sorted(np.argsort(-per, kind="stable")[:24].tolist())
    # suffix runs from the cached cut tensors == the whole variant model on the subset
    feed = {"image": ev.x[rep.subset_indices]}
    ref = ref_all[rep.subset_indices]
    scales = QdqScales.from_calibration(cal)
    for row in rep.rows:
        g = scales.group(row.name)
        assert row.only_float_error == pytest.approx(_error(scales.int8_model([g.name]), feed, ref), rel=2e-3, abs=1e-9)
        # ONNX Runtime's optimized Q/DQ model (integer kernels for some pairs, rounding otherwise) is
        # within a few percent (3.3% here once depthwise equalization rescaled the pw input)
        assert row.only_float_error == pytest.approx(_error(scales.int8_model([g.name]), feed, ref, "all"), rel=0.05)
        plan = plan_only(cal.plan, g)
        only = insert_qdq(cal.model, plan, {t: cal.ranges[t].amax["percentile"] for t in plan.activations})
        assert row.only_quantized_error == pytest.approx(_error(only, feed, ref), rel=2e-3, abs=1e-9)
    best = rep.rows[0]
    assert best.best_method is not None and best.best_method_error <= rep.int8_error
    assert rep.cost_fp32_passes > 0 and rep.costs["fp32_pass_s"] > 0
    doc = json.loads(json.dumps(rep.to_dict()))
    assert doc["rows"][0]["rank"] == 1 and doc["rows"][0]["nodes"] == [PW_NODE]


def test_debug_rank_writes_a_ranking_that_exclude_from_reads(broken, tmp_path, capsys):
    cal, ev = broken
    onnx.save(cal.model, tmp_path / "m.onnx")
    onnx.save(cal.int8_model(), tmp_path / "q.onnx")
    np.savez(tmp_path / "ev.npz", image=ev.x[:200], labels=ev.labels[:200])
    args = ["debug", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--npz", str(tmp_path / "ev.npz"),
            "--no-progress", "--rank", "--subset", "16"]
    assert main([*args, "-o", str(tmp_path / "dbg")]) == 0
    assert "sensitivity of" in capsys.readouterr().out
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())
    assert doc["sensitivity"]["rows"][0]["name"] == PW_NODE and "layerwise" in doc
    rows = ranking_from_file(str(tmp_path / "dbg" / "debug.json"))
    assert rows[0]["nodes"] == [PW_NODE]
    # calibrate --exclude-from: the top group stays in float, and the INT8 model is then close
    cal_args = ["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "ev.npz"), "--num-images", "64",
                "--method", "percentile", "--no-progress"]
    assert main([*cal_args, "-o", str(tmp_path / "o"), "--exclude-from", str(tmp_path / "dbg" / "debug.json"),
                 "--top", "1"]) == 0
    ranges = json.loads((tmp_path / "o" / "ranges.json").read_text())
    assert ranges["excluded"][0]["node"] == PW_NODE  # and the Add that fuses into it (residual pair alone)
    assert all(e["matched"] == f"fuses into {PW_NODE} (excluded)" for e in ranges["excluded"][1:])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["outputs"][0]["top1_agreement"] > 0.95


def test_exclude_from_a_file_without_a_ranking_is_one_line(tmp_path, capsys, residual_model_path):
    (tmp_path / "r.json").write_text(json.dumps({"layerwise": {}}))
    src = SyntheticSource((3, 8, 8), count=40, seed=2)
    np.save(tmp_path / "x.npy", np.stack([src.load(i) for i in range(40)]))
    base = ["calibrate", str(residual_model_path), "--npz", str(tmp_path / "x.npy"), "--no-progress",
            "-o", str(tmp_path / "o")]
    assert main([*base, "--exclude-from", str(tmp_path / "r.json"), "--top", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("quantkit: error: --exclude-from") and "no sensitivity ranking" in err[0] and len(err) == 2
    assert main([*base, "--exclude-from", str(tmp_path / "r.json")]) == 2
    assert "needs --top" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="no sensitivity ranking"):
        ranking_from_file(str(tmp_path / "r.json"))


def test_ranking_builds_no_model_per_variant_and_one_session_per_cut(broken, monkeypatch):
    """Every variant is a feed of one switchable model: no insert_qdq per variant, at most one
    ONNX Runtime session per distinct cut (created lazily, reused by every kind and method)."""
    import quantkit.backends.onnxruntime as backend
    import quantkit.debug.sensitivity as sensitivity

    cal, ev = broken
    cal.int8_model()  # the plain model of the side-by-side pass, made before
    made, arenas = [], []
    real = backend.create_session
    monkeypatch.setattr(backend, "create_session",
                        lambda *a, **k: made.append(1) or arenas.append(k.get("arena", True)) or real(*a, **k))

    def no_build(*a, **k):
        raise AssertionError("insert_qdq called for a variant")

    monkeypatch.setattr(sensitivity, "insert_qdq", no_build)
    scales = QdqScales.from_calibration(cal)
    rep = rank_sensitivity(scales, ev, subset=16)
    cuts = len({sensitivity._Cuts(cal.model, scales.groups).position[g.name] for g in scales.groups})
    # suffix sessions + the 2 capture runners + the 2 runners of the side-by-side pass
    assert len(made) <= cuts + 4, (len(made), cuts)
    assert rep.rows[0].name == PW_NODE and rep.rows[0].best_method is not None
    # the kept suffix sessions hold no memory arena (a text detector's ranking peaked at 15 GB with them)
    assert False in arenas


def test_method_trials_run_once_per_distinct_scales(broken, monkeypatch):
    """A method whose amax on the group's tensors equals the current one or an already tried
    method's gives the same model: it is not run again, and gets the same error."""
    import quantkit.debug.sensitivity as sensitivity

    cal, ev = broken
    base = QdqScales.from_calibration(cal)
    ranges = {t: {"percentile": r["percentile"], "copy": r["percentile"], "minmax": r["minmax"],
                  "minmax_too": r["minmax"]} for t, r in base.ranges.items()}
    scales = QdqScales(base.model, base.specs, base.plan, ranges, "percentile", base.run, plain=base.plain)
    calls = []
    real = sensitivity._Ranker.with_method
    monkeypatch.setattr(sensitivity._Ranker, "with_method", lambda self, g, m: calls.append(m) or real(self, g, m))
    rep = rank_sensitivity(scales, ev, subset=16, method_groups=1)
    assert calls == ["minmax"]
    top = rep.rows[0]
    assert top.name == PW_NODE and top.best_method in ("minmax", "percentile")


def test_one_multi_start_session_gives_the_errors_of_a_session_per_cut(broken, monkeypatch):
    """The one session that starts at any cut (nodes before the cut on empty tensors) gives the
    same errors as suffix models cut off at each group (the path for models where that fails)."""
    import quantkit.debug.sensitivity as sensitivity

    cal, ev = broken
    multi = rank_sensitivity(cal, ev, subset=16)
    assert multi.counts["sessions"] == 1
    monkeypatch.setattr(sensitivity._Ranker, "_multi_start", lambda self: None)
    per_cut = rank_sensitivity(cal, ev, subset=16)
    assert per_cut.counts["sessions"] > 1
    assert [r.name for r in multi.rows] == [r.name for r in per_cut.rows]
    for a, b in zip(multi.rows, per_cut.rows):
        assert a.only_float_error == pytest.approx(b.only_float_error, rel=1e-6)
        assert a.only_quantized_error == pytest.approx(b.only_quantized_error, rel=1e-6)


def test_a_model_that_cannot_run_on_empty_tensors_falls_back_to_sessions_per_cut(broken, monkeypatch):
    import quantkit.debug.switchable as switchable

    cal, ev = broken
    want = rank_sensitivity(cal, ev, subset=16)

    def fails(self, k, captured):  # what ONNX Runtime does for, e.g., a Reshape to [0, -1] of no rows
        raise RuntimeError("cannot infer the -1 dimension of an empty tensor")

    monkeypatch.setattr(switchable.MultiStart, "feed", fails)
    got = rank_sensitivity(cal, ev, subset=16)
    assert got.counts["sessions"] > 2  # the multi-start one, then a session per run of cuts
    assert [r.name for r in got.rows] == [r.name for r in want.rows]
    assert [r.only_float_error for r in got.rows] == pytest.approx([r.only_float_error for r in want.rows], rel=1e-6)


def test_the_ranking_runs_the_bias_corrected_plain_model():
    # with bias correction (the default), the switchable model's quantized Conv copies carry the
    # plain model's corrected biases: its all-on state is the written INT8 model, not the uncorrected one
    from quantkit.debug.sensitivity import _Ranker

    cal, ev = outlier_calibration()
    scales = QdqScales.from_calibration(cal)
    assert scales.bias_shifts  # measured for the plain model
    subset = list(range(48))
    feed = {"image": ev.x[subset]}
    ref = OrtRunner(cal.model).infer(feed)["logits"].astype(np.float64)
    corrected = _error(cal.int8_model(), feed, ref)
    uncorrected = _error(insert_qdq(cal.model, cal.plan, cal.amax("percentile", quantized_only=True)), feed, ref)
    assert abs(corrected - uncorrected) > 0.05 * corrected  # the correction matters here
    assert _Ranker(scales, ev, subset).use_state([], {}) == pytest.approx(corrected, rel=2e-3)


def test_a_recurrent_model_is_ranked_without_the_empty_rows_run(tmp_path):
    """The ranking's one multi-start session feeds the nodes before a cut 0 rows, and ONNX Runtime
    ends the process on a GRU fed 0 rows (exit 134, no exception: g2p-en's encoder-decoder in the
    fifteenth probe, `debug --rank` and `--max-drop` alike): run in a child process, which must
    rank it through a session per run of cuts."""
    import subprocess
    import sys

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    h, f = 8, 8
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["at", "W", "R"], ["seq"], hidden_size=h, name="gru"),
             helper.make_node("Squeeze", ["seq", "one"], ["sq"]),
             helper.make_node("Transpose", ["sq"], ["st"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["st", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (f, f)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 3 * h, f)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 3 * h, h)).astype(np.float32), "R"),
             numpy_helper.from_array(np.array([1]), "one"),
             numpy_helper.from_array(rng.normal(0, 0.4, (h, 5)).astype(np.float32), "w2")]
    g = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, f])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.normal(0, 1, (48, 6, f)).astype(np.float32))
    data = ["--npz", str(tmp_path / "x.npy"), "--no-progress"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o"), *data]) == 0
    run = subprocess.run([sys.executable, "-m", "quantkit", "debug", str(tmp_path / "m.onnx"),
                          str(tmp_path / "o" / "m.int8.onnx"), "-o", str(tmp_path / "d"), "--rank", *data],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    ranked = json.loads((tmp_path / "d" / "debug.json").read_text())
    assert "sensitivity" in json.dumps(ranked)
