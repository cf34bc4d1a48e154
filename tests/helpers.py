"""Plain constants and model builders shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit import sample

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
