"""Run an ONNX graph in PyTorch, with autograd (needs torch).

ONNX Runtime's inference package has no reverse mode; the gradient sensitivity estimator
(``quantkit.debug.sensitivity``, ``estimator="gradient"``) needs one vector-Jacobian product of
the output error through the whole network. ``TorchGraph`` evaluates the graph node by node with
torch operators, so ``loss.backward()`` works through it, and lets the caller replace any node's
inputs on the way (``replace``: how the estimator puts its gated fake quantization in front of
a quantization group's nodes without writing a new graph).

Covered: the ops of the FP32 graphs quantkit ranks (CNNs, the real-model corpus's PaddlePaddle,
tf2onnx and torch exports, transformers): see ``supported_ops()``. Control flow (If, Loop,
Scan), recurrent ops (LSTM, GRU) and ops of other domains are not; ``TorchGraph`` raises
``UnsupportedOpError`` naming them before running anything, so a caller can fall back.

Integer tensors (shapes, indices) are int64 torch tensors like any other; they carry no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit._deps import require
from quantkit.errors import ModelError

#: node index, its input tensors (None for an empty name) -> the inputs the node reads instead
Replace = Callable[[int, list[Any]], list[Any]]
#: node index, the inputs it read, its outputs -> the outputs the later nodes read instead
After = Callable[[int, list[Any], list[Any]], list[Any]]


class UnsupportedOpError(ModelError):
    """The graph has an op ``TorchGraph`` cannot run in torch."""


@dataclass(frozen=True)
class _Node:
    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


_OPS: dict[str, Callable[..., Any]] = {}


def _op(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def supported_ops() -> list[str]:
    """The ONNX op types (default domain) that ``TorchGraph`` runs."""
    return sorted([*_OPS, "Constant"])


class TorchGraph:
    """``model``'s main graph as torch operations.

    Args:
        model: an ONNX model (default-domain ops of ``supported_ops()``, no subgraphs).
        dtype: float tensors of the initializers and Constant nodes are cast to it
            (None: as stored).

    Raises:
        UnsupportedOpError: an op it cannot run (named, with the first node that has it).
    """

    def __init__(self, model: onnx.ModelProto, *, dtype: Any = None):
        self.torch = torch = require("torch", extra="torch")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        missing: dict[str, str] = {}
        for n in model.graph.node:
            if n.domain not in ("", "ai.onnx") or (n.op_type not in _OPS and n.op_type != "Constant"):
                missing.setdefault(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}", n.name)
        if missing:
            op, first = next(iter(missing.items()))
            raise UnsupportedOpError(
                f"the torch executor cannot run op {op} (node {first!r})"
                + (f" nor {', '.join(list(missing)[1:])}" if len(missing) > 1 else ""),
                hint="use the exact estimator (estimator='exact')")
        self.consts: dict[str, Any] = {}
        for init in model.graph.initializer:
            self.consts[init.name] = self._tensor(numpy_helper.to_array(init), dtype)
        self.nodes: list[_Node] = []
        for n in model.graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                self.consts[n.output[0]] = self._tensor(_constant_value(attrs), dtype)
                continue
            self.nodes.append(_Node(n.op_type, n.name, tuple(n.input), tuple(n.output), attrs))
        self.inputs = [i.name for i in model.graph.input if i.name not in self.consts]
        self.outputs = [o.name for o in model.graph.output]
        self._last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for x in node.inputs:
                self._last[x] = i

    def call(self, i: int, inputs: list[Any]) -> list[Any]:
        """Node ``i``'s outputs for ``inputs`` (no hooks)."""
        ys = _OPS[self.nodes[i].op](self.nodes[i], inputs, self)
        return list(ys) if isinstance(ys, (list, tuple)) else [ys]

    def _tensor(self, a: np.ndarray, dtype: Any) -> Any:
        t = self.torch.from_numpy(np.array(a, copy=True))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None, *,
            replace: Replace | None = None, after: After | None = None,
            compute: Callable[[int, list[Any]], list[Any] | None] | None = None) -> dict[str, Any]:
        """The ``outputs`` (default: the graph's) for ``feeds`` (name -> torch tensor or array).

        ``replace(i, inputs)`` is called before node ``i`` (of ``self.nodes``) runs and returns
        the inputs it reads instead (or the same list); ``after(i, inputs, outputs)`` after it,
        returning the outputs the later nodes read; ``compute(i, inputs)``, when it returns a
        list, replaces the node's own computation. Tensors no later node reads are freed.
        """
        torch = self.torch
        want = list(self.outputs if outputs is None else outputs)
        env: dict[str, Any] = dict(self.consts)
        for k, v in feeds.items():
            env[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        keep = set(want)
        for i, node in enumerate(self.nodes):
            xs = [env[x] if x else None for x in node.inputs]
            if replace is not None:
                xs = replace(i, xs)
            try:
                done = compute(i, xs) if compute is not None else None
                ys = _OPS[node.op](node, xs, self) if done is None else done
            except UnsupportedOpError:
                raise
            except Exception as err:  # torch raises RuntimeError, IndexError, ...: the caller falls back
                raise UnsupportedOpError(f"the torch executor failed on node {node.name!r} ({node.op}): {err}",
                                         hint="use the exact estimator (estimator='exact')") from err
            if not isinstance(ys, (list, tuple)):
                ys = [ys]
            if after is not None:
                ys = after(i, xs, list(ys))
            for name, y in zip(node.outputs, ys):
                if name:
                    env[name] = y
            for x in node.inputs:
                if x and self._last.get(x) == i and x not in keep and x not in self.consts:
                    env.pop(x, None)
        return {k: env[k] for k in want}


def _constant_value(attrs: Mapping[str, Any]) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dt)
    for key, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dt)
    raise UnsupportedOpError(f"a Constant node with {sorted(attrs)}: not supported by the torch executor")


# ------------------------------------------------------------------ helpers
def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if hasattr(t, "reshape") else t)]


_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _dtype(g: TorchGraph, onnx_type: int) -> Any:
    try:
        return getattr(g.torch, _DTYPES[onnx_type])
    except KeyError:
        raise UnsupportedOpError(f"cast to ONNX type {onnx_type}: not supported by the torch executor") from None


def _spatial_pads(node: _Node, x: Any, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] of a Conv/pool, auto_pad resolved."""
    nd = len(kernel)
    auto = node.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for d in range(nd):
            size = int(x.shape[2 + d])
            out = math.ceil(size / strides[d])
            total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(node.attrs.get("pads", [0] * (2 * nd)))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> torch F.pad's [b_last, e_last, ..., b1, e1]."""
    nd = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(nd)):
        out += [pads[d], pads[nd + d]]
    return out


def _sym(pads: Sequence[int]) -> list[int] | None:
    nd = len(pads) // 2
    return list(pads[:nd]) if list(pads[:nd]) == list(pads[nd:]) else None


# ------------------------------------------------------------------ element-wise
@_op("Add")
def _add(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0] + x[1]


@_op("Sub")
def _sub(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0] - x[1]


@_op("Mul")
def _mul(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0] * x[1]


@_op("Div")
def _div(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    if not x[0].is_floating_point():
        return g.torch.div(x[0], x[1], rounding_mode="trunc")
    return x[0] / x[1]


@_op("Pow")
def _pow(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.pow(x[0], x[1].to(x[0].dtype) if x[0].is_floating_point() else x[1])


@_op("Max", "Min", "Sum", "Mean")
def _variadic(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    out = x[0]
    for y in x[1:]:
        out = {"Max": g.torch.maximum, "Min": g.torch.minimum}.get(n.op, g.torch.add)(out, y)
    return out / len(x) if n.op == "Mean" else out


@_op("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor")
def _compare(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    t = g.torch
    fn = {"Equal": t.eq, "Greater": t.gt, "GreaterOrEqual": t.ge, "Less": t.lt, "LessOrEqual": t.le,
          "And": t.logical_and, "Or": t.logical_or, "Xor": t.logical_xor}[n.op]
    return fn(x[0], x[1])


@_op("Not")
def _not(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.logical_not(x[0])


@_op("Where")
def _where(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.where(x[0].bool(), x[1], x[2])


@_op("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Floor", "Ceil",
     "Identity", "Sign", "Sin", "Cos", "Softplus", "Round")
def _unary(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    t, v = g.torch, x[0]
    if n.op == "Identity":
        return v
    fn = {"Relu": t.relu, "Sigmoid": t.sigmoid, "Tanh": t.tanh, "Erf": t.erf, "Exp": t.exp, "Log": t.log,
          "Sqrt": t.sqrt, "Reciprocal": t.reciprocal, "Neg": t.neg, "Abs": t.abs, "Floor": t.floor, "Ceil": t.ceil,
          "Sign": t.sign, "Sin": t.sin, "Cos": t.cos, "Softplus": t.nn.functional.softplus, "Round": t.round}[n.op]
    return fn(v)


@_op("Dropout")
def _dropout(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return [x[0], g.torch.ones_like(x[0], dtype=g.torch.bool)]


@_op("LeakyRelu")
def _leaky(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.nn.functional.leaky_relu(x[0], float(n.attrs.get("alpha", 0.01)))


@_op("Elu")
def _elu(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.nn.functional.elu(x[0], float(n.attrs.get("alpha", 1.0)))


@_op("HardSigmoid")
def _hard_sigmoid(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    alpha, beta = float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))
    return g.torch.clamp(alpha * x[0] + beta, 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0] * g.torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0)


@_op("Clip")
def _clip(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    if g.opset < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
    out = x[0]
    if lo is not None:
        out = g.torch.clamp(out, min=float(lo))
    if hi is not None:
        out = g.torch.clamp(out, max=float(hi))
    return out


@_op("Cast")
def _cast(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0].to(_dtype(g, int(n.attrs["to"])))


# ------------------------------------------------------------------ normalization, softmax
@_op("Softmax", "LogSoftmax")
def _softmax(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    fn = g.torch.softmax if n.op == "Softmax" else g.torch.log_softmax
    if g.opset >= 13:
        return fn(x[0], int(n.attrs.get("axis", -1)))
    axis = int(n.attrs.get("axis", 1)) % x[0].dim()  # before opset 13: over the flattened dims from axis
    shape = x[0].shape
    return fn(x[0].reshape(*shape[:axis], -1), -1).reshape(shape)


@_op("BatchNormalization")
def _batch_norm(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.nn.functional.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0,
                                            float(n.attrs.get("epsilon", 1e-5)))


@_op("LayerNormalization")
def _layer_norm(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axis = int(n.attrs.get("axis", -1)) % x[0].dim()
    shape = list(x[0].shape[axis:])
    bias = x[2] if len(x) > 2 else None
    return g.torch.nn.functional.layer_norm(x[0], shape, x[1].expand(shape), None if bias is None else bias.expand(shape),
                                            float(n.attrs.get("epsilon", 1e-5)))


@_op("InstanceNormalization")
def _instance_norm(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.nn.functional.instance_norm(x[0], weight=x[1], bias=x[2], eps=float(n.attrs.get("epsilon", 1e-5)))


# ------------------------------------------------------------------ reductions
def _axes(n: _Node, x: list[Any], g: TorchGraph, since: int) -> list[int] | None:
    if g.opset >= since:
        return _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    a = n.attrs.get("axes")
    return list(a) if a is not None else None


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
def _reduce(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    t, v = g.torch, x[0]
    axes = _axes(n, x, g, 13 if n.op == "ReduceSum" else 18)
    keep = bool(n.attrs.get("keepdims", 1))
    if not axes:
        if n.attrs.get("noop_with_empty_axes", 0):
            return v
        axes = list(range(v.dim()))
    axes = sorted(a % v.dim() for a in axes)
    if n.op == "ReduceMean":
        return v.mean(dim=axes, keepdim=keep)
    if n.op == "ReduceSum":
        return v.sum(dim=axes, keepdim=keep)
    if n.op == "ReduceSumSquare":
        return (v * v).sum(dim=axes, keepdim=keep)
    if n.op == "ReduceL2":
        return t.sqrt((v * v).sum(dim=axes, keepdim=keep))
    out = v
    for a in reversed(axes):
        out = {"ReduceMax": t.amax, "ReduceMin": t.amin}[n.op](out, dim=a, keepdim=keep) if n.op != "ReduceProd" \
            else t.prod(out, dim=a, keepdim=keep)
    return out


# ------------------------------------------------------------------ layout
@_op("Shape")
def _shape(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    dims = list(x[0].shape)
    start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
    return g.torch.tensor(dims[start:None if end is None else int(end)], dtype=g.torch.int64)


@_op("Size")
def _size(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.tensor(x[0].numel(), dtype=g.torch.int64)


@_op("Reshape")
def _reshape(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    shape = _ints(x[1])
    if not n.attrs.get("allowzero", 0):
        shape = [int(x[0].shape[i]) if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


@_op("Flatten")
def _flatten(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axis = int(n.attrs.get("axis", 1))
    axis = axis + x[0].dim() if axis < 0 else axis  # axis == rank is allowed: (all, 1)
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


@_op("Transpose")
def _transpose(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    perm = n.attrs.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


@_op("Concat")
def _concat(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.cat([v for v in x if v is not None], dim=int(n.attrs["axis"]))


@_op("Split")
def _split(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axis = int(n.attrs.get("axis", 0))
    if len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    elif "split" in n.attrs:
        sizes = list(n.attrs["split"])
    else:
        parts = int(n.attrs.get("num_outputs", len(n.outputs)))
        total = int(x[0].shape[axis])
        each = -(-total // parts)
        sizes = [min(each, total - i * each) for i in range(parts)]
    return list(g.torch.split(x[0], sizes, dim=axis))


@_op("Slice")
def _slice(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    v = x[0]
    if g.opset < 10:
        starts, ends = list(n.attrs["starts"]), list(n.attrs["ends"])
        axes = list(n.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * v.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= v.dim()
        size = int(v.shape[a])
        if st > 0:
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(0, min(size, e + size if e < 0 else e))
            index[a] = slice(s, max(s, e), st)
        else:  # torch has no negative steps: take the range forward, then flip
            s = max(-1, min(size - 1, s + size if s < 0 else s))
            e = max(-1, min(size - 1, e + size if e < -1 else e)) if e >= -size - 1 else -1
            idx = list(range(s, e, st))
            index[a] = g.torch.tensor(idx if idx else [], dtype=g.torch.int64)
            flips.append(a)
    out = v
    for a, ix in enumerate(index):  # one axis at a time (tensor indices do not combine like slices)
        if isinstance(ix, slice):
            if ix != slice(None):
                out = out[(slice(None),) * a + (ix,)]
        else:
            out = out.index_select(a, ix)
    return out


@_op("Gather")
def _gather(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axis = int(n.attrs.get("axis", 0)) % x[0].dim()
    idx = x[1].long()
    idx = g.torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = x[0].index_select(axis, idx.reshape(-1))
    return out.reshape((*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1:]))


@_op("Unsqueeze")
def _unsqueeze(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axes = _ints(x[1]) if g.opset >= 13 else list(n.attrs["axes"])
    rank = x[0].dim() + len(axes)
    out = x[0]
    for a in sorted(a % rank for a in axes):
        out = out.unsqueeze(a)
    return out


@_op("Squeeze")
def _squeeze(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    axes = (_ints(x[1]) if len(x) > 1 and x[1] is not None else None) if g.opset >= 13 else n.attrs.get("axes")
    if not axes:
        return x[0].squeeze()
    out = x[0]
    for a in sorted((a % x[0].dim() for a in axes), reverse=True):
        out = out.squeeze(a)
    return out


@_op("Expand")
def _expand(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0].expand(*g.torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))


@_op("Tile")
def _tile(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return x[0].repeat(*_ints(x[1]))


@_op("ConstantOfShape")
def _constant_of_shape(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    value = numpy_helper.to_array(n.attrs["value"]) if "value" in n.attrs else np.zeros(1, np.float32)
    fill = g.torch.from_numpy(np.array(value).reshape(-1)[:1].copy())
    return fill.expand(*_ints(x[0])).clone() if _ints(x[0]) else fill.reshape(())


@_op("Range")
def _range(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    start, limit, delta = (v.item() for v in x[:3])
    return g.torch.arange(start, limit, delta, dtype=x[0].dtype)


@_op("Pad")
def _pad(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    mode = n.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if g.opset >= 11:
        pads = _ints(x[1])
        value = float(x[2].item()) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(x[0].dim()))
    else:
        pads, value, axes = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0)), list(range(x[0].dim()))
    full = [0] * (2 * x[0].dim())
    for i, a in enumerate(axes):
        a %= x[0].dim()
        full[a], full[x[0].dim() + a] = pads[i], pads[len(axes) + i]
    tpad = _torch_pad(full)
    while len(tpad) > 2 and tpad[-1] == 0 and tpad[-2] == 0:  # torch pads the last dims only
        tpad = tpad[:-2]
    if mode == "constant":
        return g.torch.nn.functional.pad(x[0], tpad, value=value)
    if mode in ("reflect", "edge"):
        return g.torch.nn.functional.pad(x[0], tpad, mode="reflect" if mode == "reflect" else "replicate")
    raise UnsupportedOpError(f"Pad mode {mode!r} (node {n.name!r}): not supported by the torch executor")


# ------------------------------------------------------------------ linear algebra, convolution
@_op("MatMul")
def _matmul(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    return g.torch.matmul(x[0], x[1])


@_op("Gemm")
def _gemm(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    a = x[0].t() if n.attrs.get("transA", 0) else x[0]
    b = x[1].t() if n.attrs.get("transB", 0) else x[1]
    out = float(n.attrs.get("alpha", 1.0)) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        out = out + float(n.attrs.get("beta", 1.0)) * x[2]
    return out


@_op("Conv", "ConvTranspose")
def _conv(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    F = g.torch.nn.functional
    v, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise UnsupportedOpError(f"{n.op} of {nd} spatial dims (node {n.name!r}): not supported by the torch executor")
    strides = list(n.attrs.get("strides", [1] * nd))
    dil = list(n.attrs.get("dilations", [1] * nd))
    groups = int(n.attrs.get("group", 1))
    kernel = list(w.shape[2:])
    if n.op == "Conv":
        pads = _spatial_pads(n, v, kernel, strides, dil)
        sym = _sym(pads)
        if sym is None:
            v, sym = F.pad(v, _torch_pad(pads)), [0] * nd
        fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return fn(v, w, bias, strides, sym, dil, groups)
    pads = list(n.attrs.get("pads", [0] * (2 * nd)))
    auto = n.attrs.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID") or "output_shape" in n.attrs:
        raise UnsupportedOpError(f"ConvTranspose with auto_pad/output_shape (node {n.name!r}): not supported by the "
                                 "torch executor")
    sym = _sym(pads)
    if sym is None:
        raise UnsupportedOpError(f"ConvTranspose with asymmetric pads (node {n.name!r}): not supported by the "
                                 "torch executor")
    out_pad = list(n.attrs.get("output_padding", [0] * nd))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(v, w, bias, strides, sym, out_pad, groups, dil)


@_op("MaxPool", "AveragePool")
def _pool(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    F = g.torch.nn.functional
    v = x[0]
    kernel = list(n.attrs["kernel_shape"])
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise UnsupportedOpError(f"{n.op} of {nd} spatial dims (node {n.name!r}): not supported by the torch executor")
    strides = list(n.attrs.get("strides", [1] * nd))
    dil = list(n.attrs.get("dilations", [1] * nd))
    ceil = bool(n.attrs.get("ceil_mode", 0))
    pads = _spatial_pads(n, v, kernel, strides, dil)
    sym = _sym(pads)
    if n.op == "MaxPool":
        if len(n.outputs) > 1 and n.outputs[1]:
            raise UnsupportedOpError(f"MaxPool with indices (node {n.name!r}): not supported by the torch executor")
        if sym is None or any(2 * p > k for p, k in zip(sym, kernel)):
            v, sym = F.pad(v, _torch_pad(pads), value=-math.inf), [0] * nd
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return fn(v, kernel, strides, sym, dil, ceil_mode=ceil)
    if any(d != 1 for d in dil):
        raise UnsupportedOpError(f"AveragePool with dilations (node {n.name!r}): not supported by the torch executor")
    include = bool(n.attrs.get("count_include_pad", 0))
    if sym is None or any(2 * p > k for p, k in zip(sym, kernel)):
        if not include and any(pads):
            raise UnsupportedOpError(f"AveragePool with asymmetric pads that exclude the padding (node {n.name!r}): "
                                     "not supported by the torch executor")
        v, sym = F.pad(v, _torch_pad(pads)), [0] * nd
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return fn(v, kernel, strides, sym, ceil, include)


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    dims = list(range(2, x[0].dim()))
    return x[0].mean(dim=dims, keepdim=True) if n.op == "GlobalAveragePool" else x[0].amax(dim=dims, keepdim=True)


@_op("Resize", "Upsample")
def _resize(n: _Node, x: list[Any], g: TorchGraph) -> Any:
    F = g.torch.nn.functional
    v = x[0]
    mode = n.attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = n.attrs.get("coordinate_transformation_mode", b"half_pixel" if n.op == "Resize" else b"asymmetric")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    near = n.attrs.get("nearest_mode", b"round_prefer_floor")
    near = near.decode() if isinstance(near, bytes) else near
    if n.op == "Upsample" or g.opset < 11:
        scales_t = x[1] if len(x) > 1 else None
        sizes = None
        if n.op == "Upsample" and g.opset < 9:
            scales_t = n.attrs.get("scales")
        ctm, near = "asymmetric", "floor"
    else:
        scales_t = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if sizes is not None:
        out_size = sizes[2:]
        kw: dict[str, Any] = {"size": out_size}
    else:
        if scales_t is None:
            raise UnsupportedOpError(f"Resize without scales or sizes (node {n.name!r})")
        scales = [float(s) for s in (scales_t.reshape(-1).tolist() if hasattr(scales_t, "reshape") else scales_t)]
        if scales[:2] != [1.0, 1.0]:
            raise UnsupportedOpError(f"Resize of the batch or channel axis (node {n.name!r}): not supported by the "
                                     "torch executor")
        kw = {"scale_factor": scales[2:]}
    if mode == "nearest":
        # torch's "nearest" is ONNX's asymmetric + floor
        if ctm != "asymmetric" or near != "floor":
            raise UnsupportedOpError(f"Resize nearest with {ctm}/{near} (node {n.name!r}): not supported by the torch "
                                     "executor (asymmetric/floor is)")
        return F.interpolate(v, mode="nearest", **kw)
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        nd = v.dim() - 2
        tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        return F.interpolate(v, mode=tmode, align_corners=ctm == "align_corners", **kw)
    raise UnsupportedOpError(f"Resize mode {mode!r} with {ctm} (node {n.name!r}): not supported by the torch executor")
