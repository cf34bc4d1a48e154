"""The gradient (first-order) sensitivity estimator: against exact errors where the estimate is
exact, against the exact ranking on a model with one broken group, and its fallbacks."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main
from quantkit.debug.fallback import FallbackConfig, fallback
from quantkit.debug.sensitivity import QdqScales, rank_sensitivity
from quantkit.errors import InputError
from quantkit.ptq import ExportConfig, QuantizeConfig, StatsConfig, quantize
from tests.helpers import PW_NODE, ArraySource, outlier_calibration

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def broken():
    # without bias correction: the exact ranking runs the corrected plain model, the gradient
    # estimator the uncorrected fake quantization (it does not model the correction)
    return outlier_calibration(bias_correction=False)


def one_conv_model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> y: one quantization group (x and W). One output channel's weights have an
    outlier, so the per-channel weight error is as large as the activation's."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0] = 40.0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_one_group_estimates_equal_the_exact_errors(precision, rng):
    """With one group, only-float is the FP32 model (error 0) and only-quantized the INT8 model:
    L - dL/da/2 = 0 and dL/da/2 = L up to the second-order term of the activation and weight
    errors together, which is small."""
    from quantkit.debug.gradient import gradient_estimate
    from quantkit.ptq import evaluation_batches

    x = rng.uniform(-1, 3, size=(48, 3, 8, 8)).astype(np.float32)
    # the estimator models the uncorrected fake quantization (it orders groups; bias correction is measured apart)
    cal = quantize(one_conv_model(), ArraySource(x[:32]),
                   QuantizeConfig(StatsConfig(bias_correction=False), export=ExportConfig("minmax")))
    scales = QdqScales.from_calibration(cal)
    assert len(scales.groups) == 1 and scales.groups[0].weights and scales.groups[0].activations
    batches = list(evaluation_batches(ArraySource(x), scales.specs, list(range(32, 48)), scales.run))
    est = gradient_estimate(scales, batches, precision=precision)
    # the exact INT8 error of the Q/DQ model as ONNX defines it (graph optimizations off)
    import onnxruntime as ort

    from quantkit.backends.onnxruntime import session_options

    feed = {"x": x[32:]}
    ref = ort.InferenceSession(cal.model.SerializeToString()).run(None, feed)[0].astype(np.float64)
    sess = ort.InferenceSession(cal.int8_model().SerializeToString(), session_options(optimization="none"),
                                providers=["CPUExecutionProvider"])
    int8 = sess.run(None, feed)[0].astype(np.float64)
    exact = float(((ref - int8) ** 2).sum() / (ref ** 2).sum())
    tol = 0.02 if precision == "float32" else 0.15  # bfloat16 adds its own noise, ~1e-5 of the signal here
    assert est.error == pytest.approx(exact, rel=tol)
    g = scales.groups[0].name
    assert abs(est.only_float[g]) < tol * exact
    assert est.only_quantized[g] == pytest.approx(exact, rel=tol)


def test_gradient_ranking_finds_the_broken_group(broken):
    cal, ev = broken
    exact = rank_sensitivity(cal, ev, subset=24, method_groups=0)
    rep = rank_sensitivity(cal, ev, subset=24, method_groups=0, estimator="gradient")
    assert rep.estimator == "gradient" and rep.ranker is None
    assert rep.subset_indices == exact.subset_indices
    assert rep.rows[0].name == exact.rows[0].name == PW_NODE
    # the INT8 error of the subset it estimates from is the exact ranking's
    assert rep.int8_error == pytest.approx(exact.int8_error, rel=0.05)
    # the other groups matter little, and the estimate says so
    assert all(r.only_float_error > 0.9 * rep.int8_error for r in rep.rows[1:])
    assert all(r.only_quantized_error is not None for r in rep.rows)
    assert rep.to_dict()["estimator"] == "gradient" and "gradient estimate" in rep.table()
    # its INT8 error is that of the model without bias correction (it differs from the exact ranking's)
    assert "INT8 error as the estimate models it (fake quantization, no bias correction)" in rep.table()
    # the subset's error and every sample's, each named (a probe read one against the output's SQNR)
    assert f"{exact.int8_error:.4g} on them, {exact.int8_error_all:.4g} on every sample given" in exact.table()
    assert set(rep.costs) >= {"forward_s", "backward_s", "fp32_pass_s"} and rep.cost_fp32_passes > 0


def test_method_trials_stay_exact_and_count(broken):
    cal, ev = broken
    rep = rank_sensitivity(cal, ev, subset=24, method_groups=1, quantized=False, estimator="gradient")
    assert rep.rows[0].best_method is not None and rep.ranker is not None
    assert rep.counts["suffix_runs"] >= 1 and rep.costs["methods_s"] > 0
    assert all(r.only_quantized_error is None for r in rep.rows)
    # the trials run from the side-by-side pass's FP32 outputs and the trial group's cut only:
    # the same result as the exact ranking's trials
    exact = rank_sensitivity(cal, ev, subset=24, method_groups=1, quantized=False)
    assert exact.rows[0].name == rep.rows[0].name and exact.rows[0].best_method == rep.rows[0].best_method
    assert rep.rows[0].best_method_error == pytest.approx(exact.rows[0].best_method_error, rel=1e-5)
    assert not rep.ranker.covers_all and rep.ranker.fp32_cut == []


def test_a_graph_torch_cannot_run_falls_back_to_the_exact_ranking(broken, monkeypatch, caplog):
    from quantkit.onnx import torch_exec

    cal, ev = broken
    monkeypatch.delitem(torch_exec._OPS, "Relu")
    with caplog.at_level(logging.WARNING, logger="quantkit.debug.sensitivity"):
        rep = rank_sensitivity(cal, ev, subset=16, method_groups=0, estimator="gradient")
    assert rep.estimator == "exact" and rep.rows[0].name == PW_NODE
    assert "cannot run op Relu" in caplog.text and "exact ranking instead" in caplog.text


def test_an_unknown_estimator_is_refused(broken):
    cal, ev = broken
    with pytest.raises(InputError, match="unknown sensitivity estimator 'fast'"):
        rank_sensitivity(cal, ev, subset=16, estimator="fast")
    with pytest.raises(InputError, match="unknown sensitivity estimator"):
        FallbackConfig(max_drop=0.5, estimator="fast")


def test_fallback_with_the_gradient_ranking_meets_the_budget_with_one_group_in_float(broken):
    cal, ev = broken
    res = fallback(cal, ev, None, FallbackConfig(max_drop=0.5, drop_metric="accuracy", estimator="gradient"))
    assert res.met and res.float_groups == [PW_NODE]
    assert res.ranking.estimator == "gradient" and res.ranking.rows[0].name == PW_NODE


def test_debug_rank_with_the_gradient_estimator(broken, tmp_path, capsys):
    cal, ev = broken
    onnx.save(cal.model, tmp_path / "m.onnx")
    onnx.save(cal.int8_model(), tmp_path / "q.onnx")
    np.savez(tmp_path / "ev.npz", image=ev.x[:200], labels=ev.labels[:200])
    args = ["debug", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--npz", str(tmp_path / "ev.npz"),
            "--no-progress", "--subset", "16", "--estimator", "gradient"]
    assert main([*args, "-o", str(tmp_path / "bad")]) == 2  # --estimator without --rank
    assert "--estimator needs --rank" in capsys.readouterr().err
    assert main([*args, "--rank", "-o", str(tmp_path / "dbg")]) == 0
    printed = capsys.readouterr().out
    assert "only float" in printed and "best method" not in printed  # one set of scales: no method column
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())
    assert doc["sensitivity"]["estimator"] == "gradient" and doc["sensitivity"]["rows"][0]["name"] == PW_NODE


def test_the_sensitivity_module_does_not_import_torch():
    code = ("import sys, quantkit.debug.sensitivity, quantkit.debug.fallback, quantkit.onnx.torch_exec; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
