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
from quantkit.onnx.model import constant_arrays, tensor_types
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
        origin: per node of ``model``, the index of the original node it was made for (its
            copies, and the switch nodes of the inputs it reads).
        scales: activation tensor -> scalar scale input (float32, or float16 for a float16 tensor).
    """

    model: onnx.ModelProto
    on: dict[str, str] = field(default_factory=dict)
    select: dict[str, str] = field(default_factory=dict)
    scales: dict[str, str] = field(default_factory=dict)
    scale_types: dict[str, int] = field(default_factory=dict)
    origin: list[int] = field(default_factory=list)
    #: ``_scale_feed``'s last (amax, scale inputs)
    _scales_cache: tuple[tuple[float, ...], dict[str, np.ndarray]] | None = field(default=None, init=False, repr=False,
                                                                                compare=False)

    def feed(self, on_groups: set[str] | frozenset[str], amax: Mapping[str, float]) -> dict[str, np.ndarray]:
        """The switch inputs of one variant: ``on_groups`` quantized, activation scales from
        ``amax`` (tensor -> amax; every tensor of ``scales``)."""
        feed: dict[str, np.ndarray] = {}
        for g, name in self.on.items():
            feed[name] = np.array(g in on_groups)
        for g, name in self.select.items():
            feed[name] = np.array([0, 1] if g in on_groups else [1, 0], dtype=np.int64)
        feed.update(self._scale_feed(tuple(float(amax[t]) for t in self.scales)))
        return feed

    def _scale_feed(self, amax: tuple[float, ...]) -> dict[str, np.ndarray]:
        """The scale inputs for ``amax`` (one per tensor of ``scales``, in order), computed once
        per set of ranges: a ranking feeds the same ones to every variant (707 tensors x 1400
        runs were 1.1 million small NumPy calls)."""
        if self._scales_cache is not None and self._scales_cache[0] == amax:
            return self._scales_cache[1]
        scales = scale_from_amax(np.asarray(amax, dtype=np.float32))
        out: dict[str, np.ndarray] = {}
        for (t, name), scale in zip(self.scales.items(), scales):
            value = np.asarray(scale, dtype=np.float32).reshape(())
            if self.scale_types[t] == TensorProto.FLOAT16:
                value = np.asarray(np.maximum(value, np.finfo(np.float16).tiny), dtype=np.float16)
            out[name] = value
        self._scales_cache = (amax, out)
        return out


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


def switchable_model(model: onnx.ModelProto, plan: QdqPlan, groups: Sequence["QuantGroup"],
                     bias_shifts: "Mapping[str, np.ndarray] | None" = None) -> SwitchableModel:
    """``model`` with every pair of ``plan`` behind its group's switch (see the module docstring).

    Every node with a quantized input is in one of ``groups`` (``quant_groups``). ``bias_shifts``
    (Conv node -> shift, the plain INT8 model's bias correction): a split Conv's quantized copy
    gets the corrected bias ``bias - shift`` (the plain model's shifts, not re-measured per
    state: close to the corrected variant's where most groups are on).
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
    pos = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
    starts, ends = f"{_PREFIX}_starts", f"{_PREFIX}_ends"
    new_inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), starts),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), ends)]
    ranks = tensor_ranks(model)
    for name, i in index.items():
        out.select[name] = f"{_PREFIX}_select_{i}"
        inputs.append(helper.make_tensor_value_info(out.select[name], TensorProto.INT64, [2]))
    for j, (t, consumers) in enumerate(plan.activations.items()):
        ttype = types.get(t, TensorProto.FLOAT)
        out.scales[t], out.scale_types[t] = f"{_PREFIX}_scale_{j}", ttype
        inputs.append(helper.make_tensor_value_info(out.scales[t], ttype, []))
        by_group: dict[str, list[str]] = {}
        for c in consumers:
            by_group.setdefault(group_of[c], []).append(c)
        for g, cs in by_group.items():
            # each group's chain goes right before the group's first reader of t, so that every
            # node of the chain sits with the nodes it serves (multi-start runs rely on it)
            made = before.setdefault(min(cs, key=pos.__getitem__), [])
            gated = base = f"{_PREFIX}_{j}_g{index[g]}"
            if ranks.get(t, 0) >= 1:  # the rows go through Q/DQ or around it (one part is empty)
                made += [
                    helper.make_node("Shape", [t], [f"{base}_shape"], name=f"{base}_Shape"),
                    helper.make_node("Slice", [f"{base}_shape", starts, ends], [f"{base}_rows"], name=f"{base}_Slice"),
                    helper.make_node("Mul", [f"{base}_rows", out.select[g]], [f"{base}_split"], name=f"{base}_Mul"),
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
            if ranks.get(t, 0) >= 1:  # Concat emitted before the first node that reads the whole tensor
                parts[gated] = (f"{base}_xf", f"{base}_dequantized")
                gate_group[gated] = g
            else:  # a scalar: Where (slow with broadcasting, but a scalar is small)
                made.append(helper.make_node("Where", [on_input(g), f"{base}_dequantized", t], [gated],
                                             name=f"{base}_Where"))
            for c in cs:
                for k, x in enumerate(nodes[c].input):
                    if x == t:
                        acts.setdefault(c, {})[k] = gated
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
    consts = constant_arrays(model) if bias_shifts else {}

    def corrected(node: onnx.NodeProto, quant: list[str]) -> list[str]:  # the quantized copy's bias
        shift = (bias_shifts or {}).get(node.name)
        if shift is None or node.op_type != "Conv":
            return quant
        has_bias = len(quant) > 2 and bool(quant[2])
        bias = consts[node.input[2]] if has_bias else np.zeros(  # the Conv's type (float16 in a float16 model)
            np.shape(shift), helper.tensor_dtype_to_np_dtype(types.get(node.output[0], TensorProto.FLOAT)))
        name = f"{_PREFIX}_{node.name}_bias_corrected"
        new_inits.append(numpy_helper.from_array((bias.astype(np.float64) - shift).astype(bias.dtype), name))
        return [*quant[:2], name] if len(quant) >= 2 else quant

    def whole(x: str) -> str:  # the gated tensor itself: Concat of its two parts
        if x in parts and x not in joined:
            joined.add(x)
            emitted.append(helper.make_node("Concat", list(parts[x]), [x], axis=0, name=f"{x}_Concat"))
        return x

    spans = []
    for node in model.graph.node:
        spans.append(len(emitted))
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
            quant = corrected(node, [xq, *[whole(x) for x in quant[1:]]])
            emitted.append(_with_inputs(node, quant, [yq], f"{node.name}__quantized"))
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
        emitted.append(_with_inputs(node, corrected(node, [f"{base}_xq", *quant[1:]]), [yq], f"{node.name}__quantized"))
        emitted.append(helper.make_node("Concat", [yf, yq], [node.output[0]], axis=0, name=f"{base}_Concat"))
    spans.append(len(emitted))
    out.origin = [i for i in range(len(spans) - 1) for _ in range(spans[i + 1] - spans[i])]
    # a group whose every node switches through a Where (e.g. a transA Gemm) reads no select input:
    # not declared, not fed (ONNX Runtime drops unused graph inputs, and a feed must match)
    used = {x for n in emitted for x in n.input}
    inputs = [i for i in inputs if i.name in used]
    out.select = {g: name for g, name in out.select.items() if name in used}
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


@dataclass
class MultiStart:
    """A switchable model that starts at any cut: the run from cut k feeds the tensors that
    cross k to the nodes after k, and every input of the graph and every other fed tensor with
    no rows, so the nodes before k run on empty tensors (microseconds) instead of being cut
    off into a model of their own. One session then serves every cut.

        reader r of tensor t (made at m):   Concat(t, fed_{t,r}, axis 0) --> r
        start at k:   fed_{t,r} = t's captured rows if m < k <= r, else 0 rows

    Attributes:
        model: the switchable model with the Concat nodes and the fed inputs.
        fed: per fed input: (tensor, input name, position made, position of the reader).
        empty: graph inputs of the original model (fed with no rows).
    """

    model: onnx.ModelProto
    fed: list[tuple[str, str, int, int]]
    empty: list[str]

    def feed(self, k: int, captured: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The fed inputs of a run from cut ``k`` (``captured``: the tensors at every cut)."""
        out = {}
        for t, name, made, reader in self.fed:
            a = captured[t]
            out[name] = a if made < k <= reader else a[:0]
        return out


def multi_start_model(switch: SwitchableModel, cuts: Sequence[int], cut_tensors: Mapping[str, np.ndarray],
                      constants: set[str], output: str) -> MultiStart | None:
    """``switch`` made to start at any of ``cuts`` (positions in the original graph), or None
    when that is not exact: a switch node's input made before a cut and read after it that is
    not one of the ``cut_tensors`` (name -> an example array, for type and rank), or ``output``
    made before the last cut.

    The caller checks that every tensor of ``cut_tensors`` has the batch on axis 0.
    """
    import bisect

    m = onnx.ModelProto()
    m.CopyFrom(switch.model)
    ks = sorted(set(cuts))
    graph_inputs = [i.name for i in switch.model.graph.input if not i.name.startswith(_PREFIX)]  # switches: fed
    made = {o: switch.origin[j] for j, n in enumerate(switch.model.graph.node) for o in n.output if o}
    made.update({t: -1 for t in graph_inputs})
    if made.get(output, -1) < ks[-1]:
        return None

    def crosses(a: int, b: int) -> bool:  # a cut k with a < k <= b
        i = bisect.bisect_right(ks, a)
        return i < len(ks) and ks[i] <= b

    fed: list[tuple[str, str, int, int]] = []
    nodes: list[onnx.NodeProto] = []
    inputs = []
    for j, node in enumerate(switch.model.graph.node):
        n = onnx.NodeProto()
        n.CopyFrom(node)
        reader = switch.origin[j]
        for s, x in enumerate(n.input):
            if not x or x in constants or x not in made or not crosses(made[x], reader):
                continue
            if x not in cut_tensors:
                return None
            name = f"{_PREFIX}_fed_{len(fed)}"
            a = cut_tensors[x]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                        [f"{name}_d{i}" for i in range(a.ndim)]))
            nodes.append(helper.make_node("Concat", [x, name], [f"{name}_joined"], axis=0, name=f"{name}_Concat"))
            n.input[s] = f"{name}_joined"
            fed.append((x, name, made[x], reader))
        nodes.append(n)
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    m.graph.input.extend(inputs)
    return MultiStart(m, fed, graph_inputs)
