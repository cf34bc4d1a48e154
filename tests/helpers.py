"""Plain constants and model builders shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit import sample

if TYPE_CHECKING:
    from quantkit.ptq import Calibration

#: CLI flags that preprocess the bundled digits as the sample model expects (gray, 1/255, mean/std)
DIGITS = ["--preprocess", "none", "--color", "gray", "--scale", repr(1 / 255),
          "--mean", str(sample.preprocess().mean[0]), "--std", str(sample.preprocess().std[0]), "--no-progress"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (and ``root`` itself if a file) with its SHA-256."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make_residual_model(opset: int = 17, *, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv -> Add(residual from Relu) -> Relu -> ConvTranspose
    -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> MatMul -> y[N,4]."""
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        helper.make_node("ConvTranspose", ["r2", "wt"], ["ct"], name="convt", strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["ct"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    inits = [_init("w1", w(8, 3, 3, 3)), _init("b1", w(8)), _init("w2", w(8, 8, 3, 3)),
             _init("wt", w(8, 6, 1, 1)), _init("wg", w(5, 6)), _init("bg", w(5)), _init("wm", w(5, 4))]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


#: sizes of the token model: vocabulary, sequence length, embedding, hidden, classes
VOCAB, T, D, H, C = 50, 6, 8, 12, 4


def make_token_model(mask_type: int = TensorProto.BOOL) -> onnx.ModelProto:
    """ids int64 [N, T] -> Gather(table [VOCAB, D]) -> * mask -> MatMul -> Relu -> ReduceMean(T)
    -> MatMul -> y [N, C]; mask [N, T] is bool (or float)."""
    r = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((r.standard_normal(s) * 0.5).astype(np.float32))  # noqa: E731
    table, w1, w2 = w(VOCAB, D), w(D, H), w(H, C)
    table.name, w1.name, w2.name = "table", "w1", "w2"
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("Cast", ["mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"], name="unsq"),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node("MatMul", ["masked", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("ReduceMean", ["hr"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", T]),
         helper.make_tensor_value_info("mask", mask_type, ["N", T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])], [table, w1, w2, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class ArraySource:
    """Preprocessed samples in memory, with labels (a Source for tests)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None = None):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def load(self, index: int) -> np.ndarray:
        return self.x[index]

    def label(self, index: int) -> int | None:
        return None if self.labels is None else int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"array[{index}]"


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled digits preprocessed for the sample model: (x [N,1,32,32], labels, test mask)."""
    images, labels, test = sample.load_digits()
    pp = sample.metadata()["preprocess"]
    x = ((images.astype(np.float32) / 255.0 - pp["mean"][0]) / pp["std"][0])[:, None]
    return x, labels, test


#: the sample model's depthwise conv, its output's consumer (the pointwise conv) and their weights
DW_WEIGHT, DW_BIAS, PW_WEIGHT, PW_NODE = "onnx::Conv_74", "onnx::Conv_75", "onnx::Conv_77", "/pw/pw.0/Conv"


def make_outlier_digits(factor: float = 300.0, channel: int = 3) -> onnx.ModelProto:
    """The sample model with one outlier channel at the pointwise conv's input: the depthwise
    conv's channel ``channel`` scaled by ``factor`` (ReLU keeps the scale) and the pointwise
    conv's weights on that input channel divided by it. The FP32 function is unchanged; INT8
    breaks at that one tensor (per-tensor scale set by the outlier channel)."""
    m = onnx.load(sample.model_path())
    inits = {i.name: i for i in m.graph.initializer}

    def scaled(name: str, index: tuple, by: float) -> None:
        a = numpy_helper.to_array(inits[name]).copy()
        a[index] *= by
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    scaled(DW_WEIGHT, (channel,), factor)
    scaled(DW_BIAS, (channel,), factor)
    scaled(PW_WEIGHT, (slice(None), channel), 1.0 / factor)
    return m


def outlier_calibration(*, bias_correction: bool = True) -> tuple["Calibration", "ArraySource"]:
    """The outlier digits CNN (``make_outlier_digits``) calibrated with ``percentile`` on 256
    training digits, and the test digits with their labels: the debug tests' lossy model (without
    pointwise equalization, the default, which resolves the outlier channel by itself)."""
    from quantkit.ptq import ExportConfig, QuantizeConfig, StatsConfig, quantize

    x, labels, test = digits_arrays()
    cal = quantize(make_outlier_digits(), ArraySource(x[~test][:256]),
                   QuantizeConfig(StatsConfig(bias_correction=bias_correction, equalize_pointwise=False),
                                  export=ExportConfig("percentile")))
    return cal, ArraySource(x[test], labels[test])


def make_depthwise_model(*, variant: str = "plain", multiplier: int = 1, channels: int = 16,
                         seed: int = 0) -> onnx.ModelProto:
    """A depthwise block with channel ranges spread like PP-PicoDet-LCNet's (max|x| per channel
    from ~0.1 to ~40): x[N,4,8,8] -> Conv 1x1 (output channel c scaled by 10^(-2..1)) ->
    HardSwish -> h -> depthwise Conv 3x3 (group=C, ``multiplier`` outputs per channel, the small
    channels amplified as a BatchNorm after it would) -> Relu -> Conv 1x1 -> y[N,6].

    variants: ``plain``; ``input`` (x[N,C,8,8] feeds the depthwise Conv directly, its channels
    spread by the data: feed ``depthwise_inputs``); ``fanout`` (h also feeds a 1x1 Conv whose
    output is added to y's Conv input); ``shared`` (a second branch with its own spread reads
    the same depthwise weight); ``constant`` (the depthwise weight is a Constant node).
    """
    r = np.random.default_rng(seed)
    c, m = channels, multiplier
    spread = np.logspace(-2, 1, c).astype(np.float32)
    r.shuffle(spread)
    w1 = (r.standard_normal((c, 4, 1, 1)) * spread[:, None, None, None]).astype(np.float32)
    wd = (r.standard_normal((c * m, 1, 3, 3)) / np.repeat(spread, m)[:, None, None, None] * 0.1).astype(np.float32)
    w3 = (r.standard_normal((6, c * m, 1, 1)) * 0.3).astype(np.float32)
    dw_in = "x" if variant == "input" else "h"
    nodes = [] if variant == "input" else [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hswish1")]
    inits = [] if variant == "input" else [_init("w1", w1)]
    if variant == "constant":
        nodes.append(helper.make_node("Constant", [], ["wd"], name="wd_const", value=_init("wd", wd)))
    else:
        inits.append(_init("wd", wd))
    nodes += [helper.make_node("Conv", [dw_in, "wd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["d"], ["r"], name="relu")]
    head = "r"
    if variant == "shared":  # a second branch, spread the other way round, through the same weight
        w1b = (r.standard_normal((c, 4, 1, 1)) * spread[::-1, None, None, None]).astype(np.float32)
        inits.append(_init("w1b", w1b))
        nodes += [helper.make_node("Conv", ["x", "w1b"], ["c1b"], name="conv1b"),
                  helper.make_node("HardSwish", ["c1b"], ["hb"], name="hswish1b"),
                  helper.make_node("Conv", ["hb", "wd"], ["db"], name="dwb", group=c, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["db"], ["rb"], name="relub"),
                  helper.make_node("Add", ["r", "rb"], ["rr"], name="add_branches")]
        head = "rr"
    if variant == "fanout":
        ws = (r.standard_normal((c * m, c, 1, 1)) * 0.05).astype(np.float32)
        inits.append(_init("ws", ws))
        nodes += [helper.make_node("Conv", ["h", "ws"], ["side"], name="side_conv"),
                  helper.make_node("Add", ["r", "side"], ["rs"], name="add_side")]
        head = "rs"
    inits.append(_init("w3", w3))
    nodes += [helper.make_node("Conv", [head, "w3"], ["c3"], name="conv3"),
              helper.make_node("GlobalAveragePool", ["c3"], ["gp"], name="gap"),
              helper.make_node("Flatten", ["gp"], ["y"], name="flatten")]
    cin = c if variant == "input" else 4
    graph = helper.make_graph(nodes, f"depthwise_{variant}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_se_pointwise_model(*, channels: int = 16, kernel: int = 1, seed: int = 0) -> onnx.ModelProto:
    """A squeeze-and-excite block into a group-1 Conv, as in PP-OCRv5's recogniser:
    x[N,C,8,8] (channels spread by the data: feed ``depthwise_inputs``) -> GlobalAveragePool ->
    Conv 1x1 -> Relu -> Conv 1x1 -> HardSigmoid -> g; t = x * g -> Conv ``kernel`` x ``kernel``
    (group 1, input column c weighted by the inverse of channel c's spread, as a folded
    BatchNorm after it would) -> Relu -> GlobalAveragePool -> y[N,6]."""
    r = np.random.default_rng(seed)
    c = channels
    spread = np.logspace(-2, 1.5, c).astype(np.float32)  # depthwise_inputs' channel spread
    w_sq = (r.standard_normal((4, c, 1, 1)) * 0.3).astype(np.float32)
    w_ex = (r.standard_normal((c, 4, 1, 1)) * 0.3).astype(np.float32)
    w_pw = (r.standard_normal((6, c, kernel, kernel)) / spread[None, :, None, None] * 0.1).astype(np.float32)
    pad = kernel // 2
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["sq_in"], name="se_pool"),
             helper.make_node("Conv", ["sq_in", "w_sq"], ["sq"], name="se_squeeze"),
             helper.make_node("Relu", ["sq"], ["sq_r"], name="se_relu"),
             helper.make_node("Conv", ["sq_r", "w_ex"], ["ex"], name="se_excite"),
             helper.make_node("HardSigmoid", ["ex"], ["g"], name="se_gate", alpha=1 / 6),
             helper.make_node("Mul", ["x", "g"], ["t"], name="se_mul"),
             helper.make_node("Conv", ["t", "w_pw"], ["p"], name="pw", pads=[pad] * 4),
             helper.make_node("Relu", ["p"], ["pr"], name="pw_relu"),
             helper.make_node("GlobalAveragePool", ["pr"], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "se_pointwise",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [_init("w_sq", w_sq), _init("w_ex", w_ex), _init("w_pw", w_pw)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def depthwise_inputs(model: onnx.ModelProto, count: int, seed: int = 0) -> np.ndarray:
    """Inputs for ``make_depthwise_model``: N(0, 1), or for the ``input`` variant channels spread
    like the other variants' h."""
    r = np.random.default_rng(seed)
    shape = [count] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = r.standard_normal(shape).astype(np.float32)
    if shape[1] != 4:
        x *= np.logspace(-2, 1.5, shape[1]).astype(np.float32)[None, :, None, None]
    return x


def as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with every float32 initializer, input, output and
    value_info in float16: a float16 model as exporters write them."""
    from onnx import TensorProto, numpy_helper

    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def calibrate_then_debug(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path, capsys: Any) -> str:
    """`calibrate` ``model`` on ``x`` (its input "x") through the CLI, then `debug --rank` the FP32
    model against the INT8 model it wrote; debug's printed table (both must exit 0)."""
    from quantkit.cli import main

    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=x)
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["debug", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "--npz", str(tmp_path / "c.npz"),
                 "--rank", "-o", str(tmp_path / "dbg"), "--no-progress"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out
