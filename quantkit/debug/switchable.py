"""One model for every mixed-precision variant: each quantization group switched by an input.

The sensitivity ranking runs many variants of one Q/DQ plan (a group in float, a group alone
quantized, a group on another range method). Building a Q/DQ model and an ONNX Runtime session
per variant cost ~0.65 s each on ResNet-18; here the variants are input values of one model,
built once:

    activation t (scale input s_t), for each group g among t's consumers:
        t --QuantizeLinear(s_t)--DequantizeLinear(s_t)--+
        t ----------------------------------------------+--Where(on_g)--> g's nodes
    weighted node c of group g (Conv, ConvTranspose; Gemm/MatMul whose rows are the first input):
        x --Split(axis 0, [n*(1-on_g), n*on_g])--> c(x_float, W)  --+--Concat(axis 0)--> c's output
                                              \\-> c(x_quant, Wq) --/
        (Wq = DequantizeLinear(QuantizeLinear(W)) per output channel, computed once here)

- Activation scales are inputs, so a method trial is another feed. ONNX Runtime's CPU provider
  accepts non-constant scales on QuantizeLinear/DequantizeLinear (opset 13), runs them as
  element-wise fake quantization in float and fuses nothing into integer kernels.
- Weights stay constant initializers: ONNX Runtime prepacks a Conv's weight only when it is
  constant; a Conv that reads ``Where(on, Wq, W)`` ran 2.3x slower on ResNet-18 (2 cores). So a
  weighted node is there twice, with W and with Wq, and the batch is split between them by
  the group's switch: the copy that gets no rows costs nothing. A weighted node whose rows
  cannot be split that way (Gemm with transA=1, a MatMul whose weight is the first input) reads
  ``Where(on, Wq, W)`` instead (exact, slower).
- A group on runs exactly what ``insert_qdq`` writes for its pairs (the same scales, round half
  to even, saturation to int8); off, its nodes read the float tensors. The outputs equal those
  of the Q/DQ model of the same state up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.calibrators.weights import per_channel_amax, scale_from_amax
from quantkit.onnx.model import tensor_types
from quantkit.onnx.qdq import QdqPlan, _constant_weights_to_initializers

if TYPE_CHECKING:
    from quantkit.debug.sensitivity import QuantGroup

_PREFIX = "qk_switch"


@dataclass
class SwitchableModel:
    """The model and the names of its switch inputs.

    Attributes:
        model: the FP32 graph with every planned Q/DQ pair behind a switch.
        select: group name -> int64 [2] input: [rows in float, rows quantized] as [1, 0] or
            [0, 1] times the rows of each tensor it splits.
        on: group name -> bool scalar input, for the groups that also switch through a Where.
        scales: activation tensor -> scalar scale input (float32, or float16 for a float16 tensor).
    """

    model: onnx.ModelProto
    on: dict[str, str] = field(default_factory=dict)
    select: dict[str, str] = field(default_factory=dict)
    scales: dict[str, str] = field(default_factory=dict)
    scale_types: dict[str, int] = field(default_factory=dict)

    def feed(self, on_groups: set[str] | frozenset[str], amax: Mapping[str, float]) -> dict[str, np.ndarray]:
        """The switch inputs of one variant: ``on_groups`` quantized, activation scales from
        ``amax`` (tensor -> amax; every tensor of ``scales``)."""
        feed: dict[str, np.ndarray] = {}
        for g, name in self.on.items():
            feed[name] = np.array(g in on_groups)
        for g, name in self.select.items():
            feed[name] = np.array([0, 1] if g in on_groups else [1, 0], dtype=np.int64)
        for t, name in self.scales.items():
            scale = scale_from_amax(np.float32(amax[t])).reshape(())
            if self.scale_types[t] == TensorProto.FLOAT16:
                scale = np.asarray(np.maximum(scale, np.finfo(np.float16).tiny), dtype=np.float16)
            feed[name] = scale
        return feed


def fake_quantized_weight(values: np.ndarray, axis: int) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(W)) per channel along ``axis``, as ``insert_qdq``'s pair
    computes it (scale = channel amax / 127, round half to even, int8 saturation)."""
    w = np.asarray(values)
    ax = axis % w.ndim
    scale = scale_from_amax(per_channel_amax(w, ax))
    if w.dtype == np.float16:
        scale = np.asarray(np.maximum(scale, np.finfo(np.float16).tiny), dtype=np.float16)
    shape = [1] * w.ndim
    shape[ax] = -1
    s = scale.reshape(shape)
    q = np.clip(np.rint(w / s), -128, 127)
    return (q * s).astype(w.dtype)


def _splittable(node: onnx.NodeProto, weight_slots: set[int]) -> bool:
    """Whether ``node``'s output rows along axis 0 come from its first input's rows alone."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return weight_slots <= {1, 2} and 0 not in weight_slots
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return not trans_a and 0 not in weight_slots
    if node.op_type == "MatMul":
        return weight_slots == {1}
    return False


def switchable_model(model: onnx.ModelProto, plan: QdqPlan, groups: Sequence["QuantGroup"]) -> SwitchableModel:
    """``model`` with every pair of ``plan`` behind its group's switch (see the module docstring).

    Every node with a quantized input is in one of ``groups`` (``quant_groups``).
    """
    model = _constant_weights_to_initializers(model, {plan.weight_tensor(k) for k in plan.weights})
    types = tensor_types(model)
    inits = {i.name: i for i in model.graph.initializer}
    group_of = {n: g.name for g in groups for n in g.nodes}
    out = SwitchableModel(onnx.ModelProto())
    inputs: list[onnx.ValueInfoProto] = []
    new_inits: list[onnx.TensorProto] = []
    zero = f"{_PREFIX}_zero_point"
    new_inits.append(numpy_helper.from_array(np.zeros((), dtype=np.int8), zero))
    index = {g.name: i for i, g in enumerate(groups)}

    def on_input(g: str) -> str:  # only where a Where switches (scalars, unsplittable weighted nodes)
        if g not in out.on:
            out.on[g] = f"{_PREFIX}_on_{index[g]}"
            inputs.append(helper.make_tensor_value_info(out.on[g], TensorProto.BOOL, []))
        return out.on[g]

    # the pairs each node reads: input slot -> replacement
    acts: dict[str, dict[int, str]] = {}
    parts: dict[str, tuple[str, str]] = {}  # gated tensor -> (float rows, Q/DQ rows)
    gate_group: dict[str, str] = {}  # gated tensor -> the group whose switch splits it
    weights: dict[str, dict[int, str]] = {}
    before: dict[str, list[onnx.NodeProto]] = {}  # nodes to emit before a node
    nodes = {n.name: n for n in model.graph.node if n.name}
    order = [n.name for n in model.graph.node]
    starts, ends = f"{_PREFIX}_starts", f"{_PREFIX}_ends"
    new_inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), starts),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), ends)]
    ranks = tensor_ranks(model)
    for i, g in enumerate(groups):
        out.select[g.name] = f"{_PREFIX}_select_{i}"
        inputs.append(helper.make_tensor_value_info(out.select[g.name], TensorProto.INT64, [2]))
    for j, (t, consumers) in enumerate(plan.activations.items()):
        ttype = types.get(t, TensorProto.FLOAT)
        out.scales[t], out.scale_types[t] = f"{_PREFIX}_scale_{j}", ttype
        inputs.append(helper.make_tensor_value_info(out.scales[t], ttype, []))
        first = min(consumers, key=order.index)
        made = before.setdefault(first, [])
        rows = f"{_PREFIX}_{j}_rows"
        if ranks.get(t, 0) >= 1:
            made += [helper.make_node("Shape", [t], [f"{rows}_shape"], name=f"{rows}_Shape"),
                     helper.make_node("Slice", [f"{rows}_shape", starts, ends], [rows], name=f"{rows}_Slice")]
        gated: dict[str, str] = {}
        for c in consumers:
            g = group_of[c]
            if g not in gated:
                k = index[g]
                gated[g] = base = f"{_PREFIX}_{j}_g{k}"
                if ranks.get(t, 0) >= 1:  # the rows go through Q/DQ or around it (one part is empty)
                    made += [
                        helper.make_node("Mul", [rows, out.select[g]], [f"{base}_split"], name=f"{base}_Mul"),
                        helper.make_node("Split", [t, f"{base}_split"], [f"{base}_xf", f"{base}_xq"], axis=0,
                                         name=f"{base}_Split")]
                    src = f"{base}_xq"
                else:
                    src = t
                made += [
                    helper.make_node("QuantizeLinear", [src, out.scales[t], zero], [f"{base}_quantized"],
                                     name=f"{base}_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [f"{base}_quantized", out.scales[t], zero],
                                     [f"{base}_dequantized"], name=f"{base}_DequantizeLinear")]
                if ranks.get(t, 0) >= 1:  # emitted before the first node that reads the whole tensor
                    parts[gated[g]] = (f"{base}_xf", f"{base}_dequantized")
                    gate_group[gated[g]] = g
                else:  # a scalar: Where (slow with broadcasting, but a scalar is small)
                    made.append(helper.make_node("Where", [on_input(g), f"{base}_dequantized", t], [gated[g]],
                                                 name=f"{base}_Where"))
            for k, x in enumerate(nodes[c].input):
                if x == t:
                    acts.setdefault(c, {})[k] = gated[g]
    fq: dict[str, str] = {}
    for name, (axis, consumers) in plan.weights.items():
        w = plan.weight_tensor(name)
        fq[name] = f"{_PREFIX}_w{len(fq)}_fq"
        new_inits.append(numpy_helper.from_array(fake_quantized_weight(numpy_helper.to_array(inits[w]), axis),
                                                 fq[name]))
        for c in consumers:
            for k, x in enumerate(nodes[c].input):
                if x == w:
                    weights.setdefault(c, {})[k] = fq[name]
    emitted: list[onnx.NodeProto] = []
    joined: set[str] = set()

    def whole(x: str) -> str:  # the gated tensor itself: Concat of its two parts
        if x in parts and x not in joined:
            joined.add(x)
            emitted.append(helper.make_node("Concat", list(parts[x]), [x], axis=0, name=f"{x}_Concat"))
        return x

    for node in model.graph.node:
        emitted.extend(before.get(node.name, []))
        read = list(node.input)
        for k, x in acts.get(node.name, {}).items():
            read[k] = x
        wslots = weights.get(node.name)
        g = group_of.get(node.name, "")
        if wslots and _splittable(node, set(wslots)) and len(node.output) == 1 and gate_group.get(read[0]) == g:
            # the weighted node of the group that gates its input: its float copy reads the
            # float rows, its quantized copy the Q/DQ rows (no second Split, no Concat between)
            xf, xq = parts[read[0]]
            base, quant = f"{_PREFIX}_{node.name}", list(read)
            for k, x in wslots.items():
                quant[k] = x
            yf, yq = f"{base}_yf", f"{base}_yq"
            emitted.append(_with_inputs(node, [xf, *[whole(x) for x in read[1:]]], [yf], f"{node.name}__float"))
            emitted.append(_with_inputs(node, [xq, *[whole(x) for x in quant[1:]]], [yq], f"{node.name}__quantized"))
            emitted.append(helper.make_node("Concat", [yf, yq], [node.output[0]], axis=0, name=f"{base}_Concat"))
            continue
        read = [whole(x) for x in read]
        if not wslots:
            emitted.append(_with_inputs(node, read))
            continue
        quant = list(read)
        for k, x in wslots.items():
            quant[k] = x
        if not _splittable(node, set(wslots)) or len(node.output) != 1:
            for k, x in wslots.items():
                sel = f"{_PREFIX}_{node.name}_w{k}"
                emitted.append(helper.make_node("Where", [on_input(g), x, read[k]], [sel], name=f"{sel}_Where"))
                read[k] = sel
            emitted.append(_with_inputs(node, read))
            continue
        base = f"{_PREFIX}_{node.name}"
        emitted += [
            helper.make_node("Shape", [read[0]], [f"{base}_shape"], name=f"{base}_Shape"),
            helper.make_node("Slice", [f"{base}_shape", starts, ends], [f"{base}_rows"], name=f"{base}_Slice"),
            helper.make_node("Mul", [f"{base}_rows", out.select[g]], [f"{base}_split"], name=f"{base}_Mul"),
            helper.make_node("Split", [read[0], f"{base}_split"], [f"{base}_xf", f"{base}_xq"], axis=0,
                             name=f"{base}_Split")]
        yf, yq = f"{base}_yf", f"{base}_yq"
        emitted.append(_with_inputs(node, [f"{base}_xf", *read[1:]], [yf], f"{node.name}__float"))
        emitted.append(_with_inputs(node, [f"{base}_xq", *quant[1:]], [yq], f"{node.name}__quantized"))
        emitted.append(helper.make_node("Concat", [yf, yq], [node.output[0]], axis=0, name=f"{base}_Concat"))
    graph = helper.make_graph(emitted, model.graph.name, [*model.graph.input, *inputs], list(model.graph.output),
                              [*model.graph.initializer, *new_inits], value_info=[])
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    out.model = m
    return out


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor that shape inference knows (graph inputs, outputs, activations)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op shape inference does not know: ranks stay unknown, Where is used
        inferred = model
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}


def _with_inputs(node: onnx.NodeProto, inputs: Sequence[str], outputs: Sequence[str] | None = None,
                 name: str | None = None) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(inputs)
    if outputs is not None:
        del n.output[:]
        n.output.extend(outputs)
    if name is not None:
        n.name = name
    return n
