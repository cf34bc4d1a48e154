"""Outputs that are not a float tensor paired row by row with FP32's (found probing wheels):
integer outputs (trueocr's recogniser decodes in the graph: ArgMax class ids first) and outputs
ordered by value (an end-to-end detector's TopK boxes). ``compare`` reports the share of equal
ids and says when rows pair up by rank; ``debug``'s ranking and the fallback measure the first
float output not ordered by a TopK (``onnx.model.error_output``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from quantkit.cli import main
from quantkit.onnx.model import error_output, value_ordered_outputs


def _ids_model(tn: int = 32, classes: int = 40) -> onnx.ModelProto:
    """A recogniser head that decodes in the graph: ids (INT64, ArgMax) first, then conf (float)."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "W2"], ["logits4"], name="conv2"),
             h.make_node("Squeeze", ["logits4", "ax2"], ["logits"], name="sq"),
             h.make_node("Softmax", ["logits"], ["prob"], axis=1, name="sm"),
             h.make_node("ArgMax", ["prob"], ["ids"], axis=1, keepdims=0, name="argmax"),
             h.make_node("ReduceMax", ["prob"], ["conf"], axes=[1], keepdims=0, name="rmax")]
    inits = [nh.from_array(rng.normal(0, 0.3, (16, 1, 3, 3)).astype(np.float32), "W1"),
             nh.from_array(rng.normal(0, 0.3, (classes, 16, 8, 1)).astype(np.float32), "W2"),
             nh.from_array(np.array([2], np.int64), "ax2")]
    g = h.make_graph(nodes, "ids_head", [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 8, tn])],
                     [h.make_tensor_value_info("ids", T.INT64, ["N", tn]),
                      h.make_tensor_value_info("conf", T.FLOAT, ["N", tn])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def _topk_model(k: int = 100) -> onnx.ModelProto:
    """An end-to-end detector head: TopK over the scores, boxes gathered by its indices (dets
    first), and the raw predictions as a second output."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
             h.make_node("Reshape", ["c2", "shp"], ["flat"], name="reshape"),
             h.make_node("Transpose", ["flat"], ["pred"], perm=[0, 2, 1], name="tr"),
             h.make_node("Split", ["pred", "split"], ["boxes", "logit"], axis=2, name="split"),
             h.make_node("Sigmoid", ["logit"], ["score"], name="sig"),
             h.make_node("Squeeze", ["score", "ax2"], ["score2"], name="sq"),
             h.make_node("TopK", ["score2", "k"], ["topv", "topi"], axis=1, name="topk"),
             h.make_node("Unsqueeze", ["topi", "ax2"], ["topi3"], name="unsq"),
             h.make_node("Tile", ["topi3", "rep"], ["topi4"], name="tile"),
             h.make_node("GatherElements", ["boxes", "topi4"], ["selb"], axis=1, name="ge"),
             h.make_node("Unsqueeze", ["topv", "ax2"], ["topv3"], name="unsq2"),
             h.make_node("Concat", ["selb", "topv3"], ["dets"], axis=2, name="cat")]
    inits = [nh.from_array(rng.normal(0, 0.2, (32, 3, 3, 3)).astype(np.float32), "W1"),
             nh.from_array(rng.normal(0, 0.1, (5, 32, 1, 1)).astype(np.float32), "W2"),
             nh.from_array(np.array([0, 5, 400], np.int64), "shp"), nh.from_array(np.array([4, 1], np.int64), "split"),
             nh.from_array(np.array([2], np.int64), "ax2"), nh.from_array(np.array([k], np.int64), "k"),
             nh.from_array(np.array([1, 1, 4], np.int64), "rep")]
    g = h.make_graph(nodes, "topk_head", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 20, 20])],
                     [h.make_tensor_value_info("dets", T.FLOAT, ["N", k, 5]),
                      h.make_tensor_value_info("pred", T.FLOAT, ["N", 400, 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def test_the_error_output_is_the_first_float_one_not_ordered_by_value():
    assert error_output(_ids_model()) == "conf"
    topk = _topk_model()
    assert value_ordered_outputs(topk) == {"dets"}
    assert error_output(topk) == "pred"
    only = onnx.ModelProto()
    only.CopyFrom(topk)
    del only.graph.output[1]  # nothing else: the ordered output itself
    assert error_output(only) == "dets"


def _calibrate_and_compare(tmp_path, model: onnx.ModelProto, shape, capsys) -> str:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for part, seed in (("cal", 1), ("eval", 2)):
        np.savez(tmp_path / f"{part}.npz", x=np.random.default_rng(seed).uniform(0, 1, (32, *shape)).astype(np.float32))
    assert main(["calibrate", str(path), "--npz", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "out"),
                 "--eval-images", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(path), str(tmp_path / "out" / "m.int8.onnx"), "--npz", str(tmp_path / "eval.npz"),
                 "--json", str(tmp_path / "cmp.json"), "--no-progress"]) == 0
    return capsys.readouterr().out


def test_compare_reports_equal_ids_for_an_integer_output(tmp_path, capsys):
    import json

    out = _calibrate_and_compare(tmp_path, _ids_model(), (1, 8, 32), capsys)
    report = {o["name"]: o for o in json.loads((tmp_path / "cmp.json").read_text())["outputs"]}
    ids, conf = report["ids"], report["conf"]
    assert ids["top1_agreement"] is None and 0.5 < ids["match"] <= 1.0 and 0.0 <= ids["exact_samples"] <= ids["match"]
    assert conf["match"] is None and conf["sqnr_db"] > 15.0
    assert "'ids' holds integers" in out and f"{ids['match']:.4f}" in out
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "out" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "eval.npz"), "--min-cosine", "0.5", "--no-progress"]) == 0  # conf's cosine only


def test_compare_says_when_rows_pair_up_by_rank(tmp_path, capsys):
    out = _calibrate_and_compare(tmp_path, _topk_model(), (3, 20, 20), capsys)
    assert "'dets' is computed through a TopK" in out
    assert "'pred' is computed through a TopK" not in out


def test_debug_ranks_on_the_float_output(tmp_path, capsys):
    import json

    _calibrate_and_compare(tmp_path, _ids_model(), (1, 8, 32), capsys)
    capsys.readouterr()
    assert main(["debug", str(tmp_path / "m.onnx"), str(tmp_path / "out" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "eval.npz"), "--rank", "-o", str(tmp_path / "dbg"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "output ids: integers or flags" in out and "output conf: SQNR" in out
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())
    ranking = doc["sensitivity"]
    assert "output 'conf'" in ranking["metric"]  # the float output, named
    errors = [r["only_float_error"] for r in ranking["rows"]]
    assert all(np.isfinite(errors)) and max(errors) < 0.01  # conf's noise/signal (the ids' would be far larger)


def test_a_one_value_output_takes_sqnr_as_its_drop_metric(tmp_path, capsys):
    # [N, 1] (a score): its argmax agrees always and its cosine is a sign, so the default is sqnr and
    # top1-agreement / cosine are refused in one line before any work
    from quantkit.datasets.sources import NumpySource
    from quantkit.debug.fallback import _output_shape, resolve_drop_metric

    rng = np.random.default_rng(3)
    g = h.make_graph([h.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "score",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 1])],
                     [nh.from_array(rng.normal(0, 0.3, (16, 1)).astype(np.float32), "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (40, 16)).astype(np.float32))
    assert _output_shape(model) == (2, 1)
    assert resolve_drop_metric(None, NumpySource(tmp_path / "d.npz"), range(8), output_rank=2, output_values=1) == "sqnr"
    for metric in ("cosine", "top1-agreement"):
        rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "--max-drop", "1",
                   "--drop-metric", metric, "-o", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "one value a sample" in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_an_output_with_a_named_axis_1_is_not_taken_for_class_scores(tmp_path):
    # rapidocrlite's recogniser outputs a per-step confidence [B, T]: top-1 agreement over its time
    # steps was the default drop metric and flipped with any rounding (42 of 62 groups to float on
    # a 5-point budget, the output at 34.7 dB); classes are a fixed number, so the default is sqnr
    # there, and a class metric asked for by name still runs
    from quantkit.datasets.sources import NumpySource
    from quantkit.debug.fallback import drop_metric_for

    rng = np.random.default_rng(4)
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (8, 12, 16)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")

    def model(axis1):
        g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
                          h.make_node("ReduceMax", ["m"], ["y"], name="mx", axes=[2], keepdims=0)], "steps",
                         [h.make_tensor_value_info("x", T.FLOAT, ["B", "T", 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["B", axis1])],
                         [nh.from_array(rng.normal(0, 0.3, (16, 7)).astype(np.float32), "w")])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])

    assert drop_metric_for(model("T"), "y", None, src, range(8)) == "sqnr"
    assert drop_metric_for(model("T"), "y", "top1-agreement", src, range(8)) == "top1-agreement"
    assert drop_metric_for(model(5), "y", None, src, range(8)) == "sqnr"  # a few values, no Softmax: maybe figures
    assert drop_metric_for(model(12), "y", None, src, range(8)) == "top1-agreement"  # a fixed axis: classes
    for axis1, top1 in (("T", False), (12, True)):  # compare shows no top-1 agreement over time steps either
        onnx.save(model(axis1), tmp_path / "m.onnx")
        out = tmp_path / f"c{axis1}.json"
        assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"),
                     "--json", str(out), "--no-progress"]) == 0
        assert (json.loads(out.read_text())["outputs"][0]["top1_agreement"] is not None) == top1


def test_an_output_declared_with_a_traced_constant_dim_calibrates(tmp_path, capsys):
    # PyTorch traces a dim of the tracing input into an output's declared shape (lineless-table-rec's
    # LORE: [batch, 54, 4] that is [batch, cells, 4]); ONNX Runtime's run only warns, but IOBinding
    # checks bound buffers against the declared shape: the capture pass was exit 1
    rng = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["h"]), h.make_node("Relu", ["h"], ["r"]),
                      h.make_node("MatMul", ["r", "W2"], ["y"]), h.make_node("MatMul", ["y", "W3"], ["z"])], "decl",
                     [h.make_tensor_value_info("x", T.FLOAT, ["batch", "cells", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 3, 4]),  # 3: a traced constant
                      h.make_tensor_value_info("z", T.FLOAT, ["batch", "cells", 4])],
                     [nh.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "W1"),
                      nh.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "W2"),
                      nh.from_array(rng.normal(0, 0.3, (4, 4)).astype(np.float32), "W3")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 5, 8)).astype(np.float32))  # 5 cells, not 3
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "--batch-size", "8",
               "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "m.int8.onnx").exists()


def test_an_output_with_its_samples_on_axis_1_is_split_per_sample(tmp_path, capsys):
    # wired-table-rec's centre net returns [1, batch, H, W]: split along axis 0 it was one "sample" a
    # batch (exact samples 0.0 where the maps agree on 99.996% of pixels; cosines changed with the batch size)
    import json

    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Transpose", ["c"], ["y"], perm=[1, 0, 2, 3]),
             h.make_node("ArgMax", ["c"], ["a"], axis=1, keepdims=1),
             h.make_node("Transpose", ["a"], ["ids"], perm=[1, 0, 2, 3])]
    g = h.make_graph(nodes, "ax1", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, "batch", 16, 16]),
                      h.make_tensor_value_info("ids", T.INT64, [1, "batch", 16, 16])],
                     [nh.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)]), tmp_path / "m.onnx")
    x = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    x[::4] *= 0.05
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"),
                 "--eval-images", "0", "--no-progress"]) == 0
    got = {}
    for bs in (1, 16):
        assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "out" / "m.int8.onnx"), "--npz",
                     str(tmp_path / "d.npz"), "--batch-size", str(bs), "--json", str(tmp_path / f"c{bs}.json"),
                     "--no-progress"]) == 0
        got[bs] = {o["name"]: o for o in json.loads((tmp_path / f"c{bs}.json").read_text())["outputs"]}
    for key in ("cosine_min", "cosine_mean"):
        assert got[1]["y"][key] == pytest.approx(got[16]["y"][key], abs=1e-9)
    assert got[1]["ids"]["exact_samples"] == pytest.approx(got[16]["ids"]["exact_samples"])
    assert got[16]["ids"]["match"] > 0.9 and got[1]["y"]["cosine_min"] < got[16]["y"]["cosine_mean"]  # per sample


def _embedding_model(tail: str) -> onnx.ModelProto:
    """x [N, 16] -> Gemm -> y [N, 8] -> an output made by ``tail``: an L2 normalization in one of
    the forms exporters write, or a classifier's ending."""
    rng = np.random.default_rng(5)
    nodes = [h.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    inits = [nh.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w")]
    if tail in ("torch-normalize", "rsqrt", "sum-normalize"):
        inits.append(nh.from_array(np.array(1e-12, np.float32) if tail == "torch-normalize" else np.array([1]),
                                   "eps" if tail == "torch-normalize" else "axes"))
    if tail == "lpnorm":
        nodes.append(h.make_node("LpNormalization", ["y"], ["out"], axis=1, p=2))
    elif tail == "torch-normalize":  # F.normalize: x / expand(clip(ReduceL2(x), eps))
        nodes += [h.make_node("ReduceL2", ["y"], ["n"], axes=[1], keepdims=1),
                  h.make_node("Clip", ["n", "eps"], ["c"]),
                  h.make_node("Shape", ["y"], ["s"]), h.make_node("Expand", ["c", "s"], ["e"]),
                  h.make_node("Div", ["y", "e"], ["d"]), h.make_node("Flatten", ["d"], ["out"])]
    elif tail == "rsqrt":  # x * 1 / sqrt(sum(x * x))
        nodes += [h.make_node("Mul", ["y", "y"], ["sq"]), h.make_node("ReduceSum", ["sq", "axes"], ["ss"], keepdims=1),
                  h.make_node("Sqrt", ["ss"], ["r"]), h.make_node("Reciprocal", ["r"], ["inv"]),
                  h.make_node("Mul", ["inv", "y"], ["out"])]
    elif tail == "softmax":
        nodes.append(h.make_node("Softmax", ["y"], ["out"], axis=1))
    elif tail == "sum-normalize":  # probabilities: x / sum(x), an L1 normalization
        nodes += [h.make_node("Exp", ["y"], ["ex"]), h.make_node("ReduceSum", ["ex", "axes"], ["t"], keepdims=1),
                  h.make_node("Div", ["ex", "t"], ["out"])]
    else:
        nodes[0].output[0] = "out"
    g = h.make_graph(nodes, tail, [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                     [h.make_tensor_value_info("out", T.FLOAT, ["N", 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


@pytest.mark.parametrize("tail, embedding", [("lpnorm", True), ("torch-normalize", True), ("rsqrt", True),
                                             ("softmax", False), ("sum-normalize", False), ("logits", False)])
def test_an_l2_normalized_embedding_takes_cosine_as_its_drop_metric(tmp_path, capsys, tail, embedding):
    # a sentence or face embedding [N, dims] has the shape of a classifier's logits, but its argmax means
    # nothing: its L2 normalization says what it is, and --max-drop measures it by cosine (labels or not)
    import onnxruntime as ort

    from quantkit.debug.fallback import l2_normalized

    model = _embedding_model(tail)
    onnx.checker.check_model(model)
    x = np.random.default_rng(6).normal(0, 1, (48, 16)).astype(np.float32)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if embedding:
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-4)  # the graph normalizes
    assert l2_normalized(model, "out") == embedding
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(48) % 8)
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "--num-images", "24",
                 "--max-drop", "100", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert ("(cosine of output 'out'" in said) == embedding, said
    assert ("(accuracy of output 'out'" in said) == (not embedding), said
    # and compare shows no top-1 agreement for it (0.80 read as one sample in five wrong at cosine 0.994)
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "out" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "d.npz"), "--json", str(tmp_path / "c.json"), "--no-progress"]) == 0
    top1 = json.loads((tmp_path / "c.json").read_text())["outputs"][0]["top1_agreement"]
    assert (top1 is None) == embedding


def test_the_guard_watches_what_a_topk_selects_from():
    """An output ordered by a TopK pairs up with FP32's by rank; the tensor the TopK selects from
    (back through Squeeze, Slice, Transpose... to the op that computes it) pairs by position, and
    bias correction's guard compares it: with the ordered output alone there was nothing to compare."""
    from quantkit.onnx.biascorrect import guard_outputs
    from quantkit.onnx.model import value_sources
    from quantkit.ptq import QuantizeConfig, StatsConfig, quantize
    from tests.helpers import ArraySource

    topk = _topk_model()
    assert value_sources(topk) == ["score"]  # Sigmoid -> Squeeze -> TopK
    assert guard_outputs(topk) == ["pred", "score"]
    only = onnx.ModelProto()
    only.CopyFrom(topk)
    del only.graph.output[1]
    assert guard_outputs(only) == ["score"]
    # a TopK over a Conv stack's features (no score head for bias correction to leave out): the
    # guard's verdict comes from the features, where there was none
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             h.make_node("Reshape", ["r2", "shp"], ["flat"], name="reshape"),
             h.make_node("TopK", ["flat", "k"], ["topv", "topi"], axis=1, name="topk")]
    inits = [nh.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "W1"),
             nh.from_array(rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32), "W2"),
             nh.from_array(np.array([0, -1], np.int64), "shp"), nh.from_array(np.array([50], np.int64), "k")]
    g = h.make_graph(nodes, "topk_features", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 10, 10])],
                     [h.make_tensor_value_info("topv", T.FLOAT, ["N", 50])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    assert guard_outputs(model) == ["r2"]
    x = rng.normal(0, 1, (16, 3, 10, 10)).astype(np.float32)
    cal = quantize(model, ArraySource(x), QuantizeConfig(StatsConfig(bias_correction=True)))
    cal.int8_model()
    check = cal.bias_checks.get("entropy")
    assert check is not None and check["uncorrected_output_sqnr_db"] > 10, check


def test_a_topk_whose_values_are_reduced_orders_nothing(tmp_path, capsys):
    """The eleventh probe's forecaster (Fracast): a TopK on a side branch, its values averaged and
    added to the output. Any TopK upstream made the output 'ordered': every check then compared the
    TopK's input, which INT8 never changes (60 dB on both sides: nothing decided), and compare
    noted a ranking that is not there."""
    from quantkit.onnx.biascorrect import guard_outputs

    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"), h.make_node("Relu", ["h1"], ["r1"], name="relu"),
             h.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"), h.make_node("Abs", ["x"], ["ax"], name="abs"),
             h.make_node("TopK", ["ax", "K"], ["tv", "ti"], axis=1, name="topk"),
             h.make_node("ReduceMean", ["tv"], ["s"], axes=[1], keepdims=1, name="mean"),
             h.make_node("Add", ["m2", "s"], ["y"], name="add")]
    g = h.make_graph(nodes, "side_topk", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
                     [nh.from_array(rng.normal(0, 0.3, (16, 64)).astype(np.float32), "W1"),
                      nh.from_array(rng.normal(0, 0.3, (64, 8)).astype(np.float32), "W2"),
                      nh.from_array(np.array([2], np.int64), "K")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    assert value_ordered_outputs(model) == set() and guard_outputs(model) == ["y"]
    ordered = onnx.ModelProto()  # the same TopK's values as an output: ordered, as before
    ordered.CopyFrom(model)
    ordered.graph.output.append(h.make_tensor_value_info("tv", T.FLOAT, ["N", 2]))
    assert value_ordered_outputs(ordered) == {"tv"}
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (96, 16)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--eval-images", "0"]) == 0
    check = json.loads((tmp_path / "o" / "ranges.json").read_text())["config"]["method_check"]
    assert max(check["output_sqnr_db"].values()) < 59, check  # the output itself, not the cap
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "d.npz"), "--no-progress"]) == 0
    assert "TopK" not in capsys.readouterr().out


def _nan_masked_model() -> onnx.ModelProto:
    """An output NaN by design where a mask is false (caustic-nmr's graph network: ``Where(mask,
    y, NaN)``)."""
    rng = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), h.make_node("Relu", ["h"], ["r"], name="relu"),
                      h.make_node("MatMul", ["r", "W2"], ["y0"], name="fc2"),
                      h.make_node("Where", ["mask", "y0", "nanc"], ["y"], name="masked")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 16]), h.make_tensor_value_info("mask", T.BOOL, ["N", 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])],
                     [nh.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
                      nh.from_array(rng.standard_normal((32, 6)).astype(np.float32), "W2"),
                      nh.from_array(np.array(np.nan, np.float32), "nanc")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_an_output_nan_by_design_is_compared_where_it_has_values(tmp_path, capsys):
    """compare printed SQNR nan and max abs err 0, the method check was skipped without a word,
    and `--max-drop` said its budget could not be met even with every group in float."""
    from quantkit._values import comparable

    rng = np.random.default_rng(1)
    onnx.save(_nan_masked_model(), tmp_path / "m.onnx")
    for name, n in (("cal", 96), ("ev", 48)):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((n, 16)).astype(np.float32),
                 mask=rng.random((n, 6)) < 0.8)
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "plain"),
                 "--eval-dir", str(tmp_path / "ev.npz"), "--no-progress"]) == 0
    assert "the method check's choice" in capsys.readouterr().out  # the check had its figures
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "out"),
                 "--max-drop", "1", "--drop-metric", "sqnr", "--eval-dir", str(tmp_path / "ev.npz"),
                 "--no-progress"]) == 0
    assert "the INT8 model meets the budget" in capsys.readouterr().out  # (--max-drop runs no method check)
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "out" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "ev.npz"), "--json", str(tmp_path / "c.json")]) == 0
    (out,) = json.loads((tmp_path / "c.json").read_text())["outputs"]
    assert 25 < out["sqnr_db"] < 60 and 0 < out["max_abs_error"] < 10 and 0.99 < out["cosine_min"] <= 1
    # where the INT8 model alone gives NaN the error is infinite, not left out
    r, t = comparable(np.array([[1.0, np.nan]]), np.array([[np.nan, np.nan]]))
    assert r.tolist() == [[1.0, 0.0]] and t.tolist() == [[np.inf, 0.0]]


def _squeezed_score_model() -> onnx.ModelProto:
    """x [N, 8] -> Gemm -> Relu -> Gemm -> Squeeze (no axes) -> Sigmoid -> score: PyTorch's
    ``x.squeeze()`` head (speechmos's PLCMOS): [N] for a batch of N, 0-d for a batch of one."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Gemm", ["x", "W1", "B1"], ["g1"], transB=1, name="fc1"),
             h.make_node("Relu", ["g1"], ["r1"], name="relu"),
             h.make_node("Gemm", ["r1", "W2"], ["g2"], transB=1, name="fc2"),
             h.make_node("Squeeze", ["g2"], ["s"], name="squeeze"),
             h.make_node("Sigmoid", ["s"], ["score"], name="sigmoid")]
    inits = [nh.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), "W1"),
             nh.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B1"),
             nh.from_array(rng.normal(0, 0.5, (1, 16)).astype(np.float32), "W2")]
    graph = h.make_graph(nodes, "squeezed", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("score", T.FLOAT, [])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)  # (ONNX Runtime 1.30 reads <= 13)


def test_a_squeezed_output_of_a_batch_of_one_is_that_samples_value(tmp_path):
    """A batch of one sample (--batch-size 1, or 33 samples = 32 + 1) gave a 0-d output and
    IndexError (exit 1) in calibrate's evaluation, compare and debug, after the whole calibration."""
    onnx.save(_squeezed_score_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(0, 1, (64, 8)).astype(np.float32))
    d = str(tmp_path / "d.npz")
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", d, "--num-images", "31", "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0  # 33 evaluated: a last batch of one
    int8 = str(tmp_path / "out" / "m.int8.onnx")
    reports = []
    for size in ("32", "1"):
        assert main(["compare", str(tmp_path / "m.onnx"), int8, "--npz", d, "--batch-size", size, "--no-progress",
                     "--json", str(tmp_path / f"c{size}.json")]) == 0
        reports.append(json.loads((tmp_path / f"c{size}.json").read_text()))
    by = [{o["name"]: o for o in r["outputs"]}["score"] for r in reports]
    assert by[0]["sqnr_db"] == pytest.approx(by[1]["sqnr_db"], abs=1e-3)  # every sample once, either way
    assert main(["debug", str(tmp_path / "m.onnx"), int8, "--npz", d, "--batch-size", "1", "-o",
                 str(tmp_path / "dbg"), "--no-progress"]) == 0


def _scores_model(k: int, softmax: bool) -> onnx.ModelProto:
    """x [N, 8] -> Gemm -> Relu -> Gemm -> out [N, k] (a regression head's k figures; with
    ``softmax``, k classes)."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Gemm", ["x", "W1", "B1"], ["g1"], transB=1, name="fc1"),
             h.make_node("Relu", ["g1"], ["r1"], name="relu"),
             h.make_node("Gemm", ["r1", "W2", "B2"], ["logits" if softmax else "out"], transB=1, name="fc2")]
    if softmax:
        nodes.append(h.make_node("Softmax", ["logits"], ["out"], axis=1, name="softmax"))
    inits = [nh.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), "W1"),
             nh.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B1"),
             nh.from_array(rng.normal(0, 0.5, (k, 16)).astype(np.float32), "W2"),
             nh.from_array(rng.normal(3, 0.1, k).astype(np.float32), "B2")]
    graph = h.make_graph(nodes, "scores", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, ["N", k])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("k, softmax, classes", [(3, False, False), (3, True, True), (12, False, True)])
def test_a_few_figures_a_sample_are_not_classes(k, softmax, classes, tmp_path, capsys):
    """speechmos's three MOS scores ([N, 3] from a Gemm): --max-drop's default metric was their
    top-1 agreement (which of the three scores is largest); compare gave it without a word."""
    from quantkit.debug.fallback import drop_metric_for
    from quantkit.datasets import NumpySource

    model = _scores_model(k, softmax)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(0, 1, (48, 8)).astype(np.float32))
    src = NumpySource(tmp_path / "d.npz")
    assert drop_metric_for(model, "out", None, src, range(48)) == ("top1-agreement" if classes else "sqnr")
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"),
                 "--no-progress", "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())["outputs"][0]
    assert out["top1_agreement"] is not None  # shown (classes without a Softmax read the same), with a note
    assert out["top1_few_values"] == (not classes) and ("few values a sample" in capsys.readouterr().out) == (not classes)


def test_a_model_that_combines_a_batchs_rows_is_said(tmp_path, capsys):
    """ICLabel averages the Softmax of each component's four rows ([-1, 4, classes], ReduceMean):
    compare said "240 samples" of an output of 60 rows, without a word, and called its output a
    few values which no Softmax writes."""
    rng = np.random.default_rng(2)
    nodes = [h.make_node("MatMul", ["x", "W"], ["logits"], name="fc"),
             h.make_node("Softmax", ["logits"], ["p"], axis=1, name="softmax"),
             h.make_node("Reshape", ["p", "shape"], ["g"], name="group"),
             h.make_node("ReduceMean", ["g"], ["out"], axes=[1], keepdims=0, name="mean")]
    graph = h.make_graph(nodes, "grouped", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, ["M", 3])],
                         [nh.from_array(rng.normal(0, 0.5, (8, 3)).astype(np.float32), "W"),
                          nh.from_array(np.array([-1, 4, 3]), "shape")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (48, 8)).astype(np.float32))
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"),
                 "--batch-size", "8", "--no-progress", "--json", str(tmp_path / "c.json")]) == 0
    said = capsys.readouterr().out
    assert "'out' has one row for every 4 samples fed" in said and "figures are over 12 rows" in said
    assert "few values a sample" not in said  # a mean of Softmaxes: class scores
    assert json.loads((tmp_path / "c.json").read_text())["outputs"][0]["rows_per"] == 4
