"""--exclude / --exclude-op-type: the excluded ops keep float inputs, the rest of the plan stays."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.cli import main
from quantkit.datasets import SyntheticSource
from quantkit.errors import InputError
from quantkit.onnx.qdq import exclude_from_plan, plan_qdq
from quantkit.ptq import QuantizeConfig, StatsConfig, quantize
from tests.helpers import make_residual_model


def _dq_consumers(model: onnx.ModelProto) -> set[str]:
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if dq & set(n.input)}


def test_excluded_nodes_read_float_inputs_and_the_rest_is_unchanged():
    m = make_residual_model()
    full = plan_qdq(m)
    plan, excluded = exclude_from_plan(m, full, names=["gemm"], op_types=["Add"])
    assert {e["node"] for e in excluded} == {"gemm", "add1"}
    consumers = {c for cs in plan.activations.values() for c in cs} | {c for _, cs in plan.weights.values() for c in cs}
    assert "gemm" not in consumers and "add1" not in consumers
    assert "wg" not in plan.weights and set(plan.weights) == set(full.weights) - {"wg"}
    untouched = {t: c for t, c in full.activations.items() if not {"gemm", "add1"} & set(c)}
    assert all(plan.activations[t] == c for t, c in untouched.items())

    src = SyntheticSource((3, 8, 8), count=32, seed=4)
    cal = quantize(m, src, QuantizeConfig(StatsConfig(exclude=("gemm",), exclude_op_types=("Add",))))
    int8 = cal.int8_model()
    assert _dq_consumers(int8) & {"gemm", "add1"} == set() and "conv1" in _dq_consumers(int8)
    x = np.stack([src.load(i) for i in range(8)])
    ref, out = OrtRunner(cal.model).infer({"x": x})["y"], OrtRunner(int8).infer({"x": x})["y"]
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()
    assert cal.ranges_document()["excluded"] == excluded


def test_regular_expressions_match_whole_names():
    m = make_residual_model()
    _, excluded = exclude_from_plan(m, plan_qdq(m), names=["conv[12]"])
    assert sorted(e["node"] for e in excluded) == ["add1", "conv1", "conv2"]  # add1 fuses into conv2
    with pytest.raises(InputError, match="matches no whole node name; 3 name") as e:
        exclude_from_plan(m, plan_qdq(m), names=["conv"])  # a prefix is not a whole name: said so
    assert "--exclude '.*conv.*'" in e.value.hint


def test_patterns_that_match_nothing_are_refused_with_close_names():
    m = make_residual_model()
    with pytest.raises(InputError, match="matches no node") as e:
        exclude_from_plan(m, plan_qdq(m), names=["conv3"])
    assert "conv1" in e.value.hint
    with pytest.raises(InputError, match="no Softmax node") as e:
        exclude_from_plan(m, plan_qdq(m), op_types=["Softmax"])
    assert "Conv" in e.value.hint
    with pytest.raises(InputError, match="not a valid regular expression"):
        exclude_from_plan(m, plan_qdq(m), names=["conv("])


def test_exclusions_through_the_cli(tmp_path, capsys):
    m = make_residual_model()
    onnx.save(m, tmp_path / "m.onnx")
    src = SyntheticSource((3, 8, 8), count=48, seed=2)
    np.save(tmp_path / "x.npy", np.stack([src.load(i) for i in range(48)]))
    args = ["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "--num-images", "32", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "o"), "--exclude", "matmul", "--exclude-op-type", "ConvTranspose"]) == 0
    ranges = json.loads((tmp_path / "o" / "ranges.json").read_text())
    assert sorted(e["node"] for e in ranges["excluded"]) == ["convt", "matmul"]
    assert json.loads((tmp_path / "o" / "report.json").read_text())["excluded"] == ranges["excluded"]
    assert "kept in float" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "o2"), "--exclude", "nope"]) == 2
    assert "matches no node" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert main([*args, "-o", str(tmp_path / "o3"), "--exclude", ".*"]) == 2
    assert "left after the exclusions" in capsys.readouterr().err


def test_a_shared_scale_group_is_kept_or_dropped_whole():
    """Excluding the Conv that reads a Concat's output drops the whole group {a, cat}: a keeps no
    Q/DQ of its own, though conv_c reads it, and nothing else moves."""
    from tests.unit.test_placement import concat_model

    m = concat_model()
    full = plan_qdq(m)
    assert full.groups == (("a", "cat"),)
    plan, excluded = exclude_from_plan(m, full, names=["conv_d"])
    assert "cat" not in plan.activations and "a" not in plan.activations and plan.groups == ()
    assert plan.activations["x"] == full.activations["x"]
    assert {e["node"] for e in excluded} == {"conv_d", "a", "conv_c"}
    assert any(e["matched"] == "dropped with its group" for e in excluded)
    # conv_c read `a` only: with a's pair gone with its group, its weight's pair goes too (a float input
    # beside a quantized weight only added the weight's rounding, no INT8 layer)
    assert "wc" not in plan.weights and "wd" not in plan.weights and "wa" in plan.weights
    assert next(e for e in excluded if e["node"] == "conv_c")["matched"] == "its input's shared-scale group went"
    kept, _ = exclude_from_plan(m, full, names=["conv_b"])  # no group member loses its consumers
    assert kept.groups == (("a", "cat"),) and kept.activations["x"] == ("conv_a",)


def test_an_add_that_fuses_into_an_excluded_conv_loses_its_pair_too():
    """add1's residual input is quantized for conv2's INT8 epilogue (TensorRT fuses the Add into
    the Conv that writes its other input); with conv2 in float the pair was left alone on the Add."""
    m = make_residual_model()
    full = plan_qdq(m)
    assert any("add1" in cs for cs in full.activations.values())
    plan, excluded = exclude_from_plan(m, full, names=["conv2"])
    assert {e["node"] for e in excluded} == {"conv2", "add1"}
    assert not any("add1" in cs for cs in plan.activations.values())
    # conv1 excluded leaves add1 alone: its fused Conv (conv2) is still INT8
    plan, excluded = exclude_from_plan(m, full, names=["conv1"])
    assert {e["node"] for e in excluded} == {"conv1"} and any("add1" in cs for cs in plan.activations.values())


def test_a_budget_met_only_with_every_group_in_float_says_the_model_has_no_int8(tmp_path, caplog):
    import logging

    m = make_residual_model()
    onnx.save(m, tmp_path / "m.onnx")
    src = SyntheticSource((3, 8, 8), count=48, seed=3)
    np.save(tmp_path / "x.npy", np.stack([src.load(i) for i in range(48)]))
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "--num-images", "32",
                   "--max-drop", "0", "--drop-metric", "sqnr", "--no-progress", "-o", str(tmp_path / "o")])
    assert rc == 0
    assert any("has no INT8 layer" in r.getMessage() for r in caplog.records)
    int8 = onnx.load(str(tmp_path / "o" / "m.int8.onnx"))
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] not in {i.name for i in int8.graph.initializer}
                   for n in int8.graph.node)


def test_threads_beyond_the_machine_are_refused_before_the_work(tmp_path, capsys):
    """--threads 100000 crashed the process (SIGSEGV) under an address-space limit; 20000 ran for
    minutes; 1000 deadlocked there."""
    m = tmp_path / "m.onnx"
    onnx.save(make_residual_model(), m)
    with pytest.raises(SystemExit) as e:
        main(["compare", str(m), str(m), "--npz", str(tmp_path / "x.npy"), "--threads", "100000"])
    assert e.value.code == 2 and "at most" in capsys.readouterr().err


def test_an_exclusion_that_changes_nothing_is_said_once_and_the_summary_names_the_flags(tmp_path, caplog, capsys):
    """It was said once a prepared model (three times a run: the checks prepare the model again),
    and the summary credited --exclude where --exclude-op-type or --exclude-from had been given."""
    import logging

    onnx.save(make_residual_model(), tmp_path / "m.onnx")
    src = SyntheticSource((3, 8, 8), count=64, seed=3)
    np.save(tmp_path / "x.npy", np.stack([src.load(i) for i in range(64)]))
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "--exclude-op-type", "Relu",
                   "--exclude-op-type", "Gemm", "--no-progress", "-o", str(tmp_path / "o")])
    assert rc == 0
    assert sum("--exclude-op-type Relu matches" in r.getMessage() for r in caplog.records) == 1
    assert "kept in float by --exclude-op-type" in capsys.readouterr().out


def test_an_exclusion_leaves_the_weights_of_ops_that_never_read_a_quantized_input():
    """The onnxruntime target leaves some weighted ops' inputs float (a Gemm after a ReduceMean):
    any exclusion took their weight pairs too, as if a shared-scale group had gone (a layout
    detector's quantized weights 102 -> 20 for one excluded Relu)."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(size=(4, 3, 3, 3)).astype(np.float32), "wc"),
             numpy_helper.from_array(r.normal(size=(5, 4)).astype(np.float32), "wg")]
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "wg"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    full = plan_qdq(m, "onnxruntime")
    assert "wg" in full.weights and "fc" not in {c for cs in full.activations.values() for c in cs}
    plan, excluded = exclude_from_plan(m, full, names=["conv"])
    assert "wg" in plan.weights and "wc" not in plan.weights
    assert [e["node"] for e in excluded] == ["conv"]
