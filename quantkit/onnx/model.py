"""Loading and inspecting ONNX models: clear errors, input specs, opset, hash."""

from __future__ import annotations

import heapq
import logging
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantkit._io import file_sha256  # noqa: F401  (re-exported: the model hash of caches and ranges)
from quantkit._io import input_file
from quantkit.errors import InputError, ModelError

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MIN_QDQ_OPSET_FLOAT16 = 19  # QuantizeLinear / DequantizeLinear of float16 (scale of the float type)

#: op types that only a quantized model holds (ONNX, and ONNX Runtime's com.microsoft domain);
#: every ``QLinear*`` op counts too
QUANTIZED_OP_TYPES = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm", "QAttention",
    "QOrderedAttention", "QOrderedGelu", "QOrderedLayerNormalization", "QOrderedLongformerAttention",
    "QOrderedMatMul", "QEmbedLayerNormalization", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized",
})


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints; str or None for dynamic dims), numpy dtype.

    A dim written as ``-1`` or ``0`` (what some exporters write for "any size"), a symbolic dim
    and an unnamed one are all dynamic: None, or the symbol's name.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def static_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


def dims_text(shape: Sequence[Any]) -> str:
    """A declared shape as messages write it: ``[?, 3, 224, 224]`` (a dynamic dim as ``?``)."""
    return "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"


def fixed_batch(specs: Sequence[TensorSpec], axes: Mapping[str, int | None] | None = None) -> int | None:
    """The batch size a model fixes: the smallest static dim on an input's batch axis.

    ``axes`` are the data's batch axes by input name (``quantkit.datasets.batching.data_batch_axes``:
    axis 0 for an input it does not name, None for one fed whole); without them, the first input's
    axis 0. An RNN state ``[layers, 1, C]`` batched on axis 1 beside an input with a dynamic batch
    (speechmos's AECMOS GRU) fixes batches of one sample."""
    if not axes:
        return specs[0].static_batch if specs else None
    sizes = [d for s in specs if (ax := axes.get(s.name, 0)) is not None and ax < len(s.shape)
             and isinstance(d := s.shape[ax], int)]
    return min(sizes) if sizes else None


def as_model(model: Any, what: str) -> onnx.ModelProto:
    """``model`` as a ModelProto: one given, or a model file's path loaded (``load_model``);
    InputError for anything else, as "{what} an onnx.ModelProto or a model file's path"."""
    if isinstance(model, (str, os.PathLike)):  # a path is a natural thing to pass
        return load_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"{what} an onnx.ModelProto or a model file's path, got {type(model).__name__}")
    return model


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and check an ONNX model file; ModelError names the file and the problem."""
    p = input_file(path, "ONNX model file", ModelError)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others (ParseError's text spans lines)
        reason = " ".join(str(err).split())
        raise ModelError(f"{str(p)!r} is not a readable ONNX model ({type(err).__name__}: {reason})") from err
    _load_external_data(model, p)
    if not model.graph.node:
        raise ModelError(f"{str(p)!r} is not an ONNX model with a graph (no nodes found)")
    order = _topological_order(model.graph)
    if order is not None:  # ONNX Runtime runs such a model; the checker (and quantkit's passes) want it sorted
        log.info("%s: its nodes are not in topological order; sorted (in memory, the file is not changed)", p.name)
        nodes = [model.graph.node[i] for i in order]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    if tensor_bytes(model) <= EXTERNAL_DATA_BYTES:
        _declare_outputs(model, p.name)
    if 0 < model.ir_version < 4 and {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}:
        # IR 3 wanted every initializer listed as a graph input; old converters (OnnxMLTools, early
        # keras2onnx) left them out, and ONNX Runtime runs such files: IR 4 dropped the rule
        log.info("%s: IR version %d with weights not listed as graph inputs (as ONNX Runtime accepts); read as IR 4 "
                 "(in memory, the file is not changed)", p.name, model.ir_version)
        model.ir_version = 4
    try:
        # past protobuf's 2 GB limit the checker reads the file itself (it cannot take the message)
        onnx.checker.check_model(model if tensor_bytes(model) <= EXTERNAL_DATA_BYTES else str(p))
    except onnx.checker.ValidationError as err:
        said = " ".join(str(err).split())[:400] or "validation failed"
        raise ModelError(f"{str(p)!r} is not a valid ONNX model: {said}") from err
    return model


def _declare_outputs(model: onnx.ModelProto, name: str) -> None:
    """Graph outputs declared without a type or shape (ONNX Runtime runs such a model; the checker
    refuses it) get those shape inference finds, in memory; the file is not changed."""
    def declared(v: onnx.ValueInfoProto) -> bool:
        t = v.type.tensor_type
        return v.type.HasField("tensor_type") and bool(t.elem_type) and t.HasField("shape")

    missing = [o for o in model.graph.output if not o.type.HasField("sequence_type") and
               not o.type.HasField("optional_type") and not declared(o)]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (the checker then says what is wrong)
        return
    found = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output) if declared(v)}
    filled = [o.name for o in missing if o.name in found]
    for o in missing:
        if o.name in found:
            o.type.CopyFrom(found[o.name].type)
    if filled:
        log.info("%s: output(s) %s declared without a type or shape: taken from shape inference (in memory)",
                 name, ", ".join(filled))


def _topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices in an order where every tensor is made before it is read (stable: the file's
    order where it allows), when the file's order is not one; None when it is already, or when
    no order exists (a cycle, a tensor nobody makes: the checker says so)."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    reads = [[t for t in node_reads(n) if t in producer] for n in graph.node]
    if all(all(producer[t] < k for t in r) for k, r in enumerate(reads)):
        return None
    waiting = [len({producer[t] for t in r if producer[t] != k}) for k, r in enumerate(reads)]
    readers: dict[int, list[int]] = {}
    for k, r in enumerate(reads):
        for j in {producer[t] for t in r if producer[t] != k}:
            readers.setdefault(j, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for j in readers.get(k, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    return order if len(order) == len(graph.node) else None


def external_locations(model: onnx.ModelProto) -> list[tuple[TensorProto, str]]:
    """The tensors ``model`` (its subgraphs too) keeps in external data files, each with the
    ``location`` it names ("" when none)."""
    from onnx import external_data_helper

    return [(t, next((e.value for e in t.external_data if e.key == "location"), ""))
            for t in external_data_helper._get_all_tensors(model)
            if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL]


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the tensors that ``model`` keeps in external data files, only from files inside the
    model's own folder: a ``location`` that is absolute, climbs out with ``..`` or is a symlink
    resolving outside is refused (a model file must not make quantkit read arbitrary files)."""
    from onnx import external_data_helper

    tensors = external_locations(model)
    if not tensors:
        return
    folder = path.resolve().parent
    for t, location in tensors:
        if "\0" in location:  # no file system path holds one (os functions raise ValueError)
            raise ModelError(f"{str(path)!r}: tensor {t.name!r} keeps its data in {location!r}, a name with a NUL "
                             "byte, which no file has", hint="the model file is damaged: save it again")
        try:
            target = (folder / location).resolve()
        except (RuntimeError, OSError) as err:  # a loop of symbolic links
            raise ModelError(f"{str(path)!r}: tensor {t.name!r} keeps its data in {location!r}, which cannot be "
                             f"resolved ({err})", hint="copy the model's external data file next to it") from None
        inside = bool(location) and not os.path.isabs(location) and ".." not in Path(location).parts and (
            folder in target.parents)
        if not inside:
            raise ModelError(
                f"{str(path)!r}: tensor {t.name!r} keeps its data in {location!r}, outside the model's folder; "
                "quantkit reads external data only from files beside the model",
                hint="save the model with its external data file in the same folder (onnx.save(..., location=NAME))")
        if not target.is_file():
            what = "which is not a regular file" if target.exists() else "which does not exist"
            raise ModelError(f"{str(path)!r}: tensor {t.name!r} keeps its data in {location!r}, {what} "
                             f"in {str(folder)!r}", hint="copy the model's external data file next to it")
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as err:
        reason = " ".join(str(err).split())
        raise ModelError(f"{str(path)!r}: cannot read its external data ({type(err).__name__}: {reason})") from err


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value) if d.dim_value > 0 else None)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
    return TensorSpec(vi.name, tuple(dims), np.dtype(dtype))


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs in ``node``'s attributes: If branches, Loop and Scan bodies."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, at any depth."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            stack.extend(subgraphs(node))


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs reads (outer-scope reads too)."""
    return {t for g in all_graphs(graph) for node in g.node for t in node.input}


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its inputs and the outer-scope tensors its subgraphs (If, Loop,
    Scan bodies) read."""
    out = [t for t in node.input if t]
    for g in subgraphs(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        for inner in g.node:
            out.extend(t for t in node_reads(inner) if t not in local)
            local.update(inner.output)
    return list(dict.fromkeys(out))


def unused_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs (not initializers) that no node reads and no output is: they need no data;
    ONNX Runtime still wants them fed (quantkit's runner feeds zeros)."""
    inits = {i.name for i in model.graph.initializer}
    read = read_names(model.graph) | {o.name for o in model.graph.output}
    return [_spec(vi) for vi in model.graph.input if vi.name not in inits and vi.name not in read]


def unused_input_zeros(model: onnx.ModelProto) -> dict[str, Any]:
    """A feed for ``unused_inputs``: zeros of each one's declared shape (1 for a dynamic dim)."""
    return {s.name: np.zeros([d if isinstance(d, int) else 1 for d in s.shape], s.dtype) for s in unused_inputs(model)}


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that are not initializers and that the graph reads (``unused_inputs`` apart)."""
    inits = {i.name for i in model.graph.initializer}
    unused = {s.name for s in unused_inputs(model)}
    return [_spec(vi) for vi in model.graph.input if vi.name not in inits and vi.name not in unused]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's tensor outputs (a sequence or map output has no rows to compare: left out,
    ``non_tensor_outputs``)."""
    return [_spec(vi) for vi in model.graph.output if vi.name not in non_tensor_outputs(model)]


def non_tensor_value(vi: onnx.ValueInfoProto) -> bool:
    """Whether ``vi`` is declared as something other than a plain tensor: a sequence, a map, an
    optional or a sparse tensor (no type at all reads as a tensor)."""
    return vi.type.WhichOneof("value") not in (None, "tensor_type")


def non_tensor_outputs(model: onnx.ModelProto) -> list[str]:
    """Graph outputs declared as sequences, maps or optionals."""
    return [vi.name for vi in model.graph.output
            if vi.type.WhichOneof("value") not in (None, "tensor_type", "sparse_tensor_type")]


#: ops whose outputs order rows by their values: a graph output after one pairs its rows with
#: FP32's by rank, not by object (an end-to-end detector's top-k boxes, or the boxes that
#: NonMaxSuppression keeps, in score order: ultralytics' ``export(nms=True)``), and near ties
#: reorder them
VALUE_ORDERING_OPS = ("TopK", "NonMaxSuppression")
#: the element types of float tensors (an output of another type holds ids, counts or flags)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


#: ops whose outputs do not carry the order of an input's rows: reductions (a TopK's values
#: averaged), arg-reductions, global pools, and shape queries (a Reshape reading a TopK output's
#: Shape keeps its own rows where they are)
ORDER_DROPPING_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "GlobalAveragePool",
                      "GlobalMaxPool", "GlobalLpPool", "Shape", "Size")


def value_ordered_outputs(model: onnx.ModelProto) -> set[str]:
    """The graph outputs whose rows a ``VALUE_ORDERING_OPS`` node (TopK, NonMaxSuppression) orders:
    its outputs, and what ops other than ``ORDER_DROPPING_OPS`` compute from them (the boxes an NMS
    keeps, gathered). A TopK on a side branch whose values are reduced before they join the output
    (a forecaster adding the mean of its top-2 inputs) orders nothing: that output pairs by
    position (the eleventh probe: every check read its TopK's input, which INT8 never changes, at
    the 60 dB cap, and compare called the output ordered)."""
    ordered: set[str] = set()
    for node in model.graph.node:  # topological order (ONNX's)
        if node.op_type in VALUE_ORDERING_OPS or \
                (node.op_type not in ORDER_DROPPING_OPS and any(t in ordered for t in node_reads(node))):
            ordered.update(t for t in node.output if t)
    return {out.name for out in model.graph.output if out.name in ordered}


def _ordering_nodes(output: str, producer: Mapping[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The ``VALUE_ORDERING_OPS`` nodes ``output`` is computed through (the walk back from it stops
    at each of them)."""
    stack, seen, found = [output], set(), []
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if t in seen or node is None:
            continue
        seen.add(t)
        if node.op_type in VALUE_ORDERING_OPS:
            found.append(node)
            continue
        stack.extend(node_reads(node))
    return found


#: ops that select or re-lay-out values (their input 0) on the way from a detector head to a TopK or
#: NonMaxSuppression: ultralytics' ``nms=True`` scores are Concat -> Transpose -> Slice ->
#: ReduceMax -> Gather -> GatherND (the candidates above the threshold) -> Unsqueeze -> NMS
SELECTION_OPS = ("Identity", "Cast", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
                 "Gather", "GatherND", "GatherElements", "ReduceMax", "Expand", "Tile")


def value_sources(model: onnx.ModelProto) -> list[str]:
    """The tensors that the ``VALUE_ORDERING_OPS`` nodes of value-ordered graph outputs select
    from, followed back through ``SELECTION_OPS`` (input 0) to the op that computes them: TopK's
    values, NonMaxSuppression's scores. An NMS export's outputs pair up with FP32's by rank, but
    the head output its scores come from (YOLO's [N, 4 + classes, anchors] Concat) pairs by
    position, and it is where INT8's error on the scores can be measured."""
    producer = {out: node for node in model.graph.node for out in node.output if out}
    ordered = value_ordered_outputs(model)
    found: list[str] = []
    for out in model.graph.output:
        if out.name not in ordered:
            continue
        for node in _ordering_nodes(out.name, producer):
            source = node.input[1] if node.op_type == "NonMaxSuppression" and len(node.input) > 1 else node.input[0]
            while source in producer and producer[source].op_type in SELECTION_OPS and producer[source].input:
                source = producer[source].input[0]
            if source in producer and source not in found:
                found.append(source)
    return found


#: the weighted ops whose inputs Q/DQ pairs feed (``quantkit.onnx.qdq``)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: the ops INT8 quantizes (and an Einsum that may be a MatMul): a graph output computed through
#: none of them is the same in the INT8 model
QUANTIZABLE_OPS = (*WEIGHTED_OPS, "Einsum")


def outputs_through(model: onnx.ModelProto, ops: Collection[str]) -> set[str]:
    """The graph outputs computed through a node of ``ops`` (in the main graph, or inside a
    subgraph of a node on the way)."""
    reached: set[str] = set()
    for node in model.graph.node:  # in topological order, as ONNX requires
        if node.op_type in ops or any(t in reached for t in node_reads(node)) or \
                any(inner.op_type in ops for g in subgraphs(node) for sub in all_graphs(g) for inner in sub.node):
            reached.update(t for t in node.output if t)
    return {o.name for o in model.graph.output if o.name in reached}


def error_output(model: onnx.ModelProto, name: str | None = None) -> str:
    """The graph output whose error against FP32 ``debug``'s ranking and the fallback measure:
    ``name`` when given (``--error-output``: a detector's class scores rather than its boxes),
    else the first float output computed through an op INT8 quantizes (``QUANTIZABLE_OPS``: not
    a constant, an input passed through, or a GRU's state alone: the same in INT8, where any
    budget reads as met) and not ordered by value (``value_ordered_outputs``), else the first
    float output, else the first output. An in-graph ArgMax's class ids (trueocr's recogniser
    puts them first) or a TopK's sorted boxes (an end-to-end YOLO) would measure rounding of
    ids and reordering of near ties, not the error INT8 adds.

    Raises:
        InputError: ``name`` is not a float output of the model (the message lists them).
    """
    outs = list(model.graph.output)
    floats = [o for o in outs if o.type.tensor_type.elem_type in (0, *FLOAT_TYPES)]
    if name is None:  # an output no quantizable op computes (a constant, an input passed through, a
        reached = outputs_through(model, QUANTIZABLE_OPS)  # GRU's state alone) is the same in INT8
        if any(o.name in reached for o in floats):
            floats = [o for o in floats if o.name in reached]
    if name is not None:
        if name not in {o.name for o in floats}:
            raise InputError(f"--error-output {name!r} is not a float output of the model",
                             hint=f"its float outputs: {', '.join(o.name for o in floats) or 'none'}")
        return name
    ordered = value_ordered_outputs(model) if floats else set()
    pick = next((o for o in floats if o.name not in ordered), floats[0] if floats else outs[0])
    return pick.name


def is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OP_TYPES or op_type.startswith("QLinear")


def _dequantize(node: onnx.NodeProto, values: Sequence[np.ndarray]) -> np.ndarray:
    """A DequantizeLinear of constants, in NumPy: ``(x - zero_point) * scale`` per tensor, per axis
    or per block (opset 21's ``block_size`` along ``axis``), in the scale's float type."""
    x, scale = values[0].astype(np.float64), np.asarray(values[1])
    zero = np.asarray(values[2]).astype(np.float64) if len(values) > 2 else np.zeros(scale.shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    s64 = scale.astype(np.float64)
    if scale.ndim and x.ndim:
        axis %= x.ndim
        if block > 0:  # scale [.., ceil(d / block), ..]: each value repeated over its block
            s64 = np.repeat(s64, block, axis=axis).take(range(x.shape[axis]), axis=axis)
            zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        else:  # per axis: [d] along axis
            shape = [1] * x.ndim
            shape[axis] = -1
            s64, zero = s64.reshape(shape), zero.reshape(shape)
    out_type = int(attrs.get("output_dtype", 0))  # opset 23: the output's type, when not the scale's
    return ((x - zero) * s64).astype(helper.tensor_dtype_to_np_dtype(out_type) if out_type else scale.dtype)


def fold_weight_dequantize(model: onnx.ModelProto, *, source: str = "model") -> onnx.ModelProto:
    """``model`` with each DequantizeLinear of constants (a weight-only quantized model: int8 or int4
    weights, per tensor, per channel or per block, the activations in float, and no QuantizeLinear)
    replaced by the float initializer it computes (a copy; ``model`` itself when there is none or
    when the model also quantizes activations, which ``check_not_quantized`` refuses). Those
    weights are then quantized as any FP32 model's: per channel, for TensorRT."""
    nodes = model.graph.node
    if not any(n.op_type == "DequantizeLinear" for n in nodes) or \
            any(is_quantized_op(n.op_type) and n.op_type != "DequantizeLinear" for n in nodes):
        return model
    consts = initializer_arrays(model)
    folded: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op_type != "DequantizeLinear" or not all(i in consts for i in node.input if i):
            continue
        try:
            folded[node.output[0]] = _dequantize(node, [consts[i] for i in node.input if i])
        except (ValueError, TypeError, IndexError):  # a malformed node: left, and refused as quantized
            continue
    if not folded or len(folded) < sum(n.op_type == "DequantizeLinear" for n in nodes):
        return model  # a DequantizeLinear of an activation: a quantized model (refused next)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in out.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    read = {o.name for o in out.graph.output} | {i for g in all_graphs(out.graph) for n in g.node for i in n.input}
    inits = [i for i in out.graph.initializer if i.name in read]  # the integers and scales, read by nothing now
    gone = {i.name for i in out.graph.initializer} - {i.name for i in inits}
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    inputs = [v for v in out.graph.input if v.name not in gone]  # an initializer listed as an input too (IR < 4)
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in folded.items())
    log.info("%s: %d weight(s) stored as integers behind a DequantizeLinear (a weight-only quantized model) taken "
             "as the float values they dequantize to, and quantized again per channel", source, len(folded))
    return out


def check_not_quantized(model: onnx.ModelProto, *, source: str = "model") -> None:
    """Refuse a model that is already quantized (Q/DQ nodes, or integer ops such as ConvInteger,
    QLinearConv, DynamicQuantizeLSTM): calibrating it again would quantize twice.

    Raises:
        ModelError: naming the first quantized node.
    """
    consts = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    # the node to name: one that quantizes an activation, before a weight's DequantizeLinear
    node = next((n for n in model.graph.node if is_quantized_op(n.op_type) and not (
        n.op_type == "DequantizeLinear" and n.input and n.input[0] in consts)), None) or \
        next((n for n in model.graph.node if is_quantized_op(n.op_type)), None)
    if node is not None:
        count = sum(is_quantized_op(n.op_type) for n in model.graph.node)
        raise ModelError(
            f"{source} is already quantized: node {node.name or node.output[0]!r} is a {node.op_type} "
            f"({count} quantized node{'s' if count != 1 else ''} in all)",
            hint="calibrate the FP32 model it was made from instead",
        )


def float_input_specs(model: onnx.ModelProto, *, source: str = "model") -> list[TensorSpec]:
    """The model inputs, when the model has float activations to calibrate.

    Inputs need not be float: int64 token ids and bool masks feed float activations after an
    embedding (a float initializer). A model with neither float inputs nor float weights is
    refused.
    """
    fed = {s.name for s in input_specs(model)}
    odd = [(v.name, v.type.WhichOneof("value")) for v in model.graph.input if non_tensor_value(v) and v.name in fed]
    if odd:
        kinds = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                 "sparse_tensor_type": "a sparse tensor"}
        raise ModelError(f"{source}: input {odd[0][0]!r} is {kinds.get(odd[0][1], odd[0][1])}, not a tensor: quantkit "
                         "feeds tensor inputs (image batches, arrays from an .npz) only",
                         hint="export the model with a tensor input in its place")
    specs = input_specs(model)
    if not specs:
        inits = {i.name for i in model.graph.initializer}
        defaults = [v.name for v in model.graph.input if v.name in inits]
        if defaults:
            raise ModelError(f"{source} has no input to feed: its input(s) {defaults} have a default value (an "
                             "initializer of the same name), so ONNX Runtime runs them as constants and every "
                             "sample would give the same outputs",
                             hint="remove those initializers from the graph (keep the input declarations) and "
                                  "re-save the model, or re-export it without default values")
        raise ModelError(f"{source} has no inputs that its graph reads: its outputs are constants, and there is "
                         "nothing to calibrate", hint="give the model that reads the data")
    floats = any(np.issubdtype(s.dtype, np.floating) for s in specs)
    if not floats:
        floats = any(np.issubdtype(helper.tensor_dtype_to_np_dtype(i.data_type), np.floating)
                     for i in model.graph.initializer if i.data_type)
    if not floats:
        found = ", ".join(f"{s.name}: {s.dtype}" for s in specs) or "none"
        raise ModelError(
            f"{source} has no floating-point inputs ({found}) and no float weights; INT8 calibration "
            "needs float activations"
        )
    return specs


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs used only as the indices of Gathers over constant tables: name -> [0, rows).

    These are token ids (an embedding lookup): valid values run from 0 to the table's size
    along the gathered axis (the smallest one when several tables share the ids).
    """
    specs = {s.name: s for s in input_specs(model) if np.issubdtype(s.dtype, np.integer)}
    consts = {i.name: tuple(i.dims) for i in model.graph.initializer}
    rows: dict[str, int] = {}
    other: set[str] = set()
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            if name not in specs:
                continue
            if node.op_type == "Gather" and pos == 1 and node.input[0] in consts:
                axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
                dims = consts[node.input[0]]
                size = dims[axis] if -len(dims) <= axis < len(dims) else 0
                rows[name] = min(rows.get(name, size), size)
            else:
                other.add(name)
    return {n: (0, r) for n, r in rows.items() if n not in other and r > 0}


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name of ``model``'s graphs (subgraphs too)."""
    names: set[str] = set()
    for g in all_graphs(model.graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(i.name for i in g.initializer)
        for n in g.node:
            names.update((n.name, *n.input, *n.output))
    names.discard("")
    return names


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... the first not in ``taken``; added to ``taken``."""
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when every node of its main graph has a name, else a copy in which the
    unnamed ones are called ``<op type>_<index>`` (made unique against the names taken).

    Q/DQ placement addresses nodes by name; ONNX allows unnamed nodes and exporters leave them
    (PaddlePaddle's Constant weight nodes, onnx.helper graphs, old PyTorch exports).
    """
    if all(n.name for n in model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {n.name for n in named.graph.node if n.name}
    for i, node in enumerate(named.graph.node):
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{i}", taken)
    return named


def check_inference_mode(model: onnx.ModelProto, *, source: str = "model") -> None:
    """ModelError where ``model``'s main graph was exported in training mode: a BatchNormalization
    that normalizes with each batch's statistics (``training_mode=1``; before opset 14, the running
    statistics among its outputs) makes a sample's outputs depend on the other samples of its
    batch, and a Dropout told to train (a constant true ``training_mode``) drops values at
    random; TensorRT builds neither."""
    consts = constant_tensors(model)
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        training = False
        if n.op_type == "BatchNormalization":
            mode = next((a.i for a in n.attribute if a.name == "training_mode"), 0)
            training = bool(mode) or any(o for o in n.output[1:])
        elif n.op_type == "Dropout" and len(n.input) >= 3 and n.input[2] in consts:
            training = bool(onnx.numpy_helper.to_array(consts[n.input[2]]).any())
        if training:
            what = "normalizes with each batch's own statistics" if n.op_type == "BatchNormalization" else \
                "drops values at random (training_mode true)"
            raise ModelError(f"{source} was exported in training mode: its {n.op_type} {n.name or n.output[0]!r} "
                             f"{what}, so a sample's outputs depend on chance or on the rest of its batch",
                             hint="export it again from model.eval() with torch.onnx.export's default "
                                  "training=TrainingMode.EVAL")


def without_io_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its ``value_info`` names no graph input or output, else a copy
    without those entries. ONNX's ``value_info`` is for the values that are neither; ONNX
    Runtime's float16 converter (``keep_io_types``) lists an output there again without a
    shape, which graph rewriting then takes for the output's own declaration (a model the
    checker refuses)."""
    io = {v.name for v in (*model.graph.input, *model.graph.output)}
    if not any(v.name in io for v in model.graph.value_info):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [v for v in out.graph.value_info if v.name not in io]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


#: the oldest opset whose models quantkit upgrades (issue 13: opsets 7 to 21; older ones may convert)
OLDEST_CONVERTIBLE_OPSET = 7


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """Return the model at ``minimum`` opset or later (converted when lower)."""
    current = opset_version(model)
    if current >= minimum:
        return model
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, minimum)
        # the converter's shape inference names unknown dims ('unk__0') and records them for
        # every tensor (ONNX Runtime then reports them on the outputs): keep the model's own
        # input, output and intermediate types, so the Q/DQ model has the FP32 model's I/O
        original = {vi.name: vi.type for vi in (*model.graph.input, *model.graph.output)}
        for vi in (*converted.graph.input, *converted.graph.output):
            if vi.name in original:
                vi.type.CopyFrom(original[vi.name])
        del converted.graph.value_info[:]
        converted.graph.value_info.extend(model.graph.value_info)
        _drop_empty_resize_inputs(converted)
        onnx.checker.check_model(converted)
    except Exception as err:
        node = _blocking_node(model, minimum, str(err))
        if node is not None:
            what = f"its {node.op_type} node {node.name!r}" if node.name else f"its {node.op_type} node"
            reason = f"{what} has no opset-{minimum} form"
        elif current < OLDEST_CONVERTIBLE_OPSET:  # (onnx's own assertion text names no op)
            reason = (f"ONNX's version converter upgrades opset {OLDEST_CONVERTIBLE_OPSET} and later reliably, and "
                      f"stopped on this one ({type(err).__name__})")
        else:
            reason = " ".join(str(err).split()) or type(err).__name__
        raise ModelError(
            f"the model uses opset {current}; per-channel Q/DQ needs opset {minimum} or later, "
            f"and converting it failed: {reason}",
            hint=f"re-export the model with opset_version>={minimum}"
                 + (f", or replace the {node.op_type} op" if node is not None else ""),
        ) from err
    return converted


def _drop_empty_resize_inputs(model: onnx.ModelProto) -> None:
    """From opset 13 a Resize's ``roi`` and ``scales`` are optional: where they are statically
    empty (opset 11/12 exporters fill them with empty constants, and float16 converters put a
    Cast in between), leave them out. ONNX Runtime's shape inference accepts an empty ``scales``
    next to ``sizes`` only when it can see the emptiness, which a Cast hides: the converted model
    did not load though the original ran."""
    consts = {i.name: tuple(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def empty(name: str, hops: int = 0) -> bool:
        if name in consts:
            return 0 in consts[name]
        node = producer.get(name)
        if node is None or hops > 4:
            return False
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            return t is not None and 0 in tuple(t.dims)
        if node.op_type in ("Cast", "Identity", "Reshape", "CastLike") and node.input:
            return empty(node.input[0], hops + 1)
        return False

    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        for slot in (1, 2):
            if len(node.input) > slot and node.input[slot] and empty(node.input[slot]):
                node.input[slot] = ""
        while node.input and not node.input[-1]:
            node.input.pop()


def _blocking_node(model: onnx.ModelProto, target: int, message: str) -> onnx.NodeProto | None:
    """The first node that keeps ``model`` from converting to opset ``target``: an op of the
    default domain with no schema at ``target`` (removed, or experimental like ImageScaler), else
    the first node whose op type the converter's message names."""
    from onnx import defs

    default = [n for n in model.graph.node if n.domain in ("", "ai.onnx")]
    for node in default:
        try:
            schema = defs.get_schema(node.op_type, target, "")
        except Exception:  # SchemaError: no such op at that opset
            return node
        if schema.deprecated:
            return node
    return next((n for n in default if re.search(rf"\b{re.escape(n.op_type)}", message)), None)


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The main graph's initializers and Constant-node tensors, by name, as protos (no value read)."""
    out = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = node.attribute[0].t
    return out


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors, by name (weights live in either)."""
    return {k: onnx.numpy_helper.to_array(t) for k, t in constant_tensors(model).items()}


#: ops that only move a constant's values (tf2onnx's Transpose before a MatMul weight, Paddle's
#: Reshape before a Conv weight), and a Cast between float types (float16 weights cast to float):
#: folded, so the weight's Q/DQ feeds the weighted op directly
LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")
#: element-wise ops folded on float constants (``constant_arrays``): a weight stored compressed, as
#: integers cast to float and multiplied by a scale (minus a zero point), is a constant weight
_ARITHMETIC: dict[str, Any] = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}
_FLOAT_CASTS: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def _fold_layout(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    x = args[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if node.op_type == "Identity":
        return x
    if node.op_type == "Cast":  # to a float type: a float weight's, or an integer-stored one's (int8 x scale)
        to = _FLOAT_CASTS.get(int(attrs.get("to", 0)))
        if to is None or not (x.dtype in _FLOAT_CASTS.values() or np.issubdtype(x.dtype, np.integer)):
            return None
        return x.astype(to)
    if node.op_type in _ARITHMETIC and len(args) == 2:  # a weight stored as integers times a scale
        a, b = args
        if not all(v.dtype in _FLOAT_CASTS.values() for v in (a, b)) or np.broadcast_shapes(a.shape, b.shape) != a.shape \
                and np.broadcast_shapes(a.shape, b.shape) != b.shape:
            return None
        return _ARITHMETIC[node.op_type](a, b).astype(np.result_type(a, b))
    if node.op_type == "Flatten":
        axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if node.op_type == "Reshape" and len(args) == 2:
        shape = [int(d) for d in args[1]]
        if not attrs.get("allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    axes = [int(a) for a in (args[1] if len(args) == 2 else attrs.get("axes", []))]
    if node.op_type == "Unsqueeze":
        return np.expand_dims(x, tuple(a % (x.ndim + len(axes)) for a in axes))
    if node.op_type == "Squeeze":
        return np.squeeze(x, tuple(a % x.ndim for a in axes) if axes else None)
    return None


def constant_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``initializer_arrays`` plus the outputs of layout ops (Transpose, Reshape, Squeeze,
    Unsqueeze, Flatten, Identity, a Cast to float) and of float Mul/Div/Add/Sub (``_ARITHMETIC``:
    no broadcast past either operand's shape) computed from constants alone, folded here: a weight
    written as ``Cast(int8 initializer) * scale`` (tinyocr's PP-OCRv6 recogniser) is a weight."""
    out = initializer_arrays(model)
    for node in model.graph.node:
        if (node.op_type in LAYOUT_OPS or node.op_type in _ARITHMETIC) and node.domain in ("", "ai.onnx") \
                and len(node.output) == 1 and all(i in out for i in node.input if i):
            try:
                value = _fold_layout(node, [out[i] for i in node.input if i])
            except (ValueError, TypeError, IndexError):  # a malformed node: leave it to the runtime
                value = None
            if value is not None:
                out[node.output[0]] = value
    return out


def einsum_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each Einsum that is a matrix product written as the MatMul it is: the same
    function, and the op that quantkit quantizes and TensorRT runs in INT8 from Q/DQ (a copy;
    ``model`` itself when there is none). ``torch.einsum`` in a model's code exports as Einsum:

    - a product with a constant matrix over the last axis (``...k,kn->...n``, a Linear layer;
      ``...k,nk->...n`` behind a Transpose of the constant; either operand first);
    - a batched product of two tensors with the same leading batch letters (``bik,bjk->bij``,
      attention's Q.K^T; ``bij,bjd->bid``, its probabilities x V), an operand whose last two
      letters are the other way round behind a Transpose of them.

    Anything else (a reordered result, broadcast batch letters, repeated letters) stays Einsum."""
    if not any(n.op_type == "Einsum" for n in model.graph.node):
        return model
    consts = constant_arrays(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer}
    for node in out.graph.node:
        einsum = node.op_type == "Einsum" and node.domain in ("", "ai.onnx")
        form = (_matmul_form(node, consts) or _batched_form(node)) if einsum else None
        if form is None:
            nodes.append(node)
            continue
        operands = []
        for t, rank in form:
            if rank:  # its last two axes the other way round: a Transpose of them first
                name = unique_name(f"{t}_transposed", taken)
                perm = [*range(rank - 2), rank - 1, rank - 2]
                nodes.append(helper.make_node("Transpose", [t], [name], name=f"{node.name or name}_{name}", perm=perm))
                t = name
            operands.append(t)
        nodes.append(helper.make_node("MatMul", operands, list(node.output), name=node.name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


#: an Einsum rewritten as MatMul: its two operands, each with the rank of a Transpose of its
#: last two axes to put first (0: none)
_Operands = tuple[tuple[str, int], tuple[str, int]]


def _einsum_terms(node: onnx.NodeProto) -> tuple[list[str], str] | None:
    """The two input terms and the result of a two-input Einsum's explicit equation."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    eq = attrs.get("equation", b"")
    eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
    if len(node.input) != 2 or "->" not in eq:
        return None
    lhs, result = eq.split("->")
    terms = lhs.split(",")
    return (terms, result) if len(terms) == 2 else None


def _batched_form(node: onnx.NodeProto) -> _Operands | None:
    """The operands of an Einsum that is a batched matrix product: the same leading batch letters
    in both terms and the result, one contracted letter, one free letter per term, the result
    batch + free of the first + free of the second."""
    parsed = _einsum_terms(node)
    if parsed is None:
        return None
    (ta, tb), result = parsed
    if "." in ta + tb + result or len(ta) != len(tb) or len(ta) < 2 or len(set(ta)) != len(ta) or \
            len(set(tb)) != len(tb) or ta[:-2] != tb[:-2] or result[:-2] != ta[:-2] or len(result) != len(ta):
        return None
    a1, a2, b1, b2 = ta[-2], ta[-1], tb[-2], tb[-1]
    shared = {a1, a2} & {b1, b2}
    if len(shared) != 1 or set(ta[:-2]) & {a1, a2, b1, b2}:
        return None
    k = shared.pop()
    i, j = (a1 if a2 == k else a2), (b1 if b2 == k else b2)
    if result[-2:] != i + j or i == j:
        return None
    rank = len(ta)
    return (node.input[0], rank if a1 == k else 0), (node.input[1], rank if b2 == k else 0)


def _matmul_form(node: onnx.NodeProto, consts: Mapping[str, np.ndarray]) -> _Operands | None:
    """The operands when the Einsum ``node`` is ``x @ W`` (or ``x @ W.T``), W a constant matrix."""
    parsed = _einsum_terms(node)
    if parsed is None:
        return None
    terms, result = parsed
    for xi in (0, 1):
        x, w = node.input[xi], node.input[1 - xi]
        tx, tw = terms[xi], terms[1 - xi]
        arr = consts.get(w)
        if x in consts or arr is None or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            continue
        letters = tx.replace("...", "")
        if len(tw) != 2 or tw[0] == tw[1] or "." in tw or not tx or tx[-1] == "." or \
                len(set(letters)) != len(letters) or tx[-1] not in tw:
            continue
        k = tx[-1]
        n = tw[1] if tw[0] == k else tw[0]
        if n in tx or result != tx[:-1] + n:
            continue
        return (x, 0), (w, 2 if tw != k + n else 0)
    return None


def subgraph_node_count(graph: onnx.GraphProto) -> int:
    """Nodes inside the subgraphs (If branches, Loop and Scan bodies) of ``graph``'s nodes, nested
    ones included; the main graph's own nodes are not counted."""
    return sum(len(g.node) for g in all_graphs(graph)) - len(graph.node)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor that shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    except Exception:  # inference is a convenience here, never a requirement
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def concat_parts(model: onnx.ModelProto, names: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Graph output (or tensor of ``names``) -> the sizes along axis 1 of the inputs of the Concat
    that writes it along that axis (at least two non-empty ones, every size known to shape
    inference): an ultralytics YOLO output ``[N, 4 + classes (+ mask coefficients | angle),
    anchors]`` is boxes in pixels beside sigmoid scores, parts of different meaning and scale in
    one tensor."""
    producer = {out: node for node in model.graph.node for out in node.output if out}
    names = [o.name for o in model.graph.output] if names is None else list(names)
    wanted = {t: producer[t] for t in names if t in producer and producer[t].op_type == "Concat"}
    if not wanted:
        return {}
    bare = _without_weights(model)
    try:  # with the shapes' values carried through Shape/Gather/Reshape: a dynamic YOLO export's head
        # (a box branch reshaped by shapes computed at run time) has no known channel count without it
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(bare)
        except Exception:  # inference is a convenience here, never a requirement
            return {}
    g = inferred.graph
    shapes = {vi.name: vi.type.tensor_type.shape for vi in [*g.value_info, *g.input, *g.output]
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    for i in model.graph.initializer:
        shapes.setdefault(i.name, onnx.TensorShapeProto(dim=[onnx.TensorShapeProto.Dimension(dim_value=d)
                                                             for d in i.dims]))
    out: dict[str, list[int]] = {}
    for name, node in wanted.items():
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        sizes: list[int] = []
        for t in node.input:
            shape = shapes.get(t)
            if shape is None or not shape.dim or (axis + len(shape.dim)) % len(shape.dim) != 1 or \
                    not shape.dim[1].HasField("dim_value"):
                break
            sizes.append(int(shape.dim[1].dim_value))
        else:
            sizes = [s for s in sizes if s > 0]
            if len(sizes) >= 2:
                out[name] = sizes
    return out


#: float initializers with more values than this are weights, never a shape that inference reads
_WEIGHT_VALUES = 1024


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large float initializers keep their name, type and dims but no
    values: what shape inference needs to type every tensor. ``infer_shapes`` serializes and
    parses the model it is given, which on a 90 MB transformer took 0.35 s of 0.4."""

    def copy_fields(dst: Any, src: Any, skip: str) -> None:
        for fd, value in src.ListFields():
            if fd.name == skip:
                continue
            if hasattr(value, "extend"):  # repeated
                getattr(dst, fd.name).extend(value)
            elif hasattr(value, "CopyFrom"):  # a message
                getattr(dst, fd.name).CopyFrom(value)
            else:
                setattr(dst, fd.name, value)

    light = onnx.ModelProto()
    copy_fields(light, model, "graph")
    copy_fields(light.graph, model.graph, "initializer")
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES and int(np.prod(init.dims, dtype=np.int64)) > _WEIGHT_VALUES:
            light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        else:
            light.graph.initializer.append(init)
    return light


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Every float tensor computed by a node (for caches that cover the whole network)."""
    types = tensor_types(model)
    seen: list[str] = [s.name for s in input_specs(model) if np.issubdtype(s.dtype, np.floating)]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        seen += [o for o in node.output if o and types.get(o, TensorProto.FLOAT) in FLOAT_TYPES]
    return list(dict.fromkeys(seen))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (existing outputs are kept).

    The new outputs carry a name only: ONNX Runtime types them while resolving the graph, which
    saves a shape-inference pass over the whole model.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.add().name = name
    return out


def with_outputs_bytes(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """``model`` serialized with ``names`` appended to its graph outputs (as ``with_outputs``
    makes them: a name only), without copying the ModelProto: parsing concatenated messages
    merges them, and a repeated field (graph.output) is appended to."""
    present = {o.name for o in model.graph.output}
    extra = onnx.ModelProto()
    for name in names:
        if name not in present:
            extra.graph.output.add().name = name
    return model.SerializeToString() + extra.SerializeToString()


#: a model whose tensors hold more bytes than this is saved with external data: protobuf cannot
#: serialize a message of 2 GiB or more (SerializeToString raises), so one file cannot hold it
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in the model's tensors (initializers, Constant nodes, subgraphs)."""
    from onnx import external_data_helper

    return sum(len(t.raw_data) for t in external_data_helper._get_all_tensors(model))


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *,
               external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    """Save an ONNX model atomically (a temporary file beside it, renamed into place), with the
    permissions of the umask; see ``save_model_files`` for models past 2 GB. Returns its path."""
    return save_model_files(model, path, external_data_bytes=external_data_bytes)[-1]


def save_model_files(model: onnx.ModelProto, path: str | os.PathLike[str], *,
                     external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """``save_model``, returning every file written. A model whose tensors exceed
    ``external_data_bytes`` (protobuf's 2 GB limit) keeps its tensors of 1 KiB or more in
    ``<file name>.data`` beside it, written first; ``model`` itself is not changed. Returns the
    written files, the model last."""
    from onnx import external_data_helper

    from quantkit._io import write_bytes_atomic, write_chunks_atomic

    target = Path(path)
    if tensor_bytes(model) <= external_data_bytes:
        return [write_bytes_atomic(target, model.SerializeToString())]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    data_name = f"{target.name}.data"
    chunks: list[bytes] = []
    offset = 0
    for t in external_data_helper._get_all_tensors(out):
        raw = t.raw_data
        if len(raw) < 1024:
            continue
        pad = -offset % 4096  # page-aligned, so runtimes can map each tensor
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        chunks.append(raw)
        del t.external_data[:]
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        offset += len(raw)
    data = write_chunks_atomic(target.parent / data_name, chunks)
    return [data, write_bytes_atomic(target, out.SerializeToString())]


#: ops between a norm and the division by it (an epsilon added or clipped, broadcast shapes)
_NORM_GLUE = ("Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Sqrt", "Pow",
              "Reciprocal")


def named_axis_1(model: onnx.ModelProto, name: str) -> bool:
    """Whether the graph output ``name`` is declared 2-D with its axis 1 named, not numbered (a
    sequence's length, ``[B, T]``): not [N, classes], whose classes are a fixed number."""
    out = next((o for o in model.graph.output if o.name == name), None)
    t = out.type.tensor_type if out is not None else None
    return t is not None and t.HasField("shape") and len(t.shape.dim) == 2 and t.shape.dim[1].HasField("dim_param")


def last_axis_classes(model: onnx.ModelProto, name: str) -> bool:
    """Whether the graph output ``name`` of rank 3 or more holds classes on its last axis at each
    position (a CTC recogniser's ``[N, T, classes]``, a captcha reader's ``[N, chars, classes]``),
    whose top-1 agreement is per position: a Softmax (or LogSoftmax) over the last axis, or the
    logits of a linear layer (a MatMul or Gemm with a constant weight, then a constant bias or
    scale, or a Reshape that splits its features along the last axis), directly or through an
    Identity or a Cast. PyTorch recognisers export their logits: their SQNR reads as the large
    losing logits (a captcha reader at 51 dB changed 10% of its captchas). Not a detector's
    ``[N, 4 + classes, anchors]`` (a Concat), nor a transformer's hidden states (a LayerNorm)."""
    out = next((o for o in model.graph.output if o.name == name), None)
    t = out.type.tensor_type if out is not None else None
    if t is None or not t.HasField("shape") or len(t.shape.dim) < 3:
        return False
    rank = len(t.shape.dim)
    last = t.shape.dim[-1]
    if last.HasField("dim_value") and last.dim_value < 2:
        return False
    node, producer = _writer(model, name, through=("Identity", "Cast"))
    if node is None:
        return False
    if node.op_type in ("Softmax", "LogSoftmax"):
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset_version(model) >= 13 else 1)
        return axis % rank == rank - 1  # (before opset 13 axis 1 of a rank-3 input spans axes 1 and 2)
    return _linear_logits(node, producer, model)


def _writer(model: onnx.ModelProto, name: str, through: Sequence[str] = LAYOUT_OPS
            ) -> tuple[onnx.NodeProto | None, dict[str, onnx.NodeProto]]:
    """The node that computes ``name``, past the ``through`` ops that only move or retype it
    (None for a graph input or an initializer), and the graph's tensor -> producer map."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(name)
    while node is not None and node.op_type in through and node.input:
        node = producer.get(node.input[0])
    return node, producer


def _linear_logits(node: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto], model: onnx.ModelProto) -> bool:
    """Whether ``node`` writes a linear layer's output: a MatMul or Gemm of a constant weight,
    through a bias or scale by a constant, or one Reshape whose constant shape ends in 2 or more."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    def shape_of(t: str) -> np.ndarray:  # a Reshape's shape (small: read alone, not every weight)
        if t in inits:
            return onnx.numpy_helper.to_array(inits[t])
        return onnx.numpy_helper.to_array(next(n for n in model.graph.node if t in n.output).attribute[0].t)

    reshaped = False
    for _ in range(6):
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in consts:
            return True
        if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2 and any(i in consts for i in node.input):
            data = next(i for i in node.input if i not in consts) if not all(i in consts for i in node.input) else None
        elif node.op_type == "Reshape" and not reshaped and len(node.input) == 2 and node.input[1] in consts:
            try:
                shape = np.asarray(shape_of(node.input[1])).reshape(-1)
            except (IndexError, StopIteration, ValueError):  # a Constant of another kind
                return False
            if not shape.size or shape[-1] < 2:
                return False
            reshaped, data = True, node.input[0]
        elif node.op_type in ("Identity", "Cast") and node.input:
            data = node.input[0]
        else:
            return False
        nxt = producer.get(data) if data else None
        if nxt is None:
            return False
        node = nxt
    return False


#: fewer values a sample than this, and no Softmax: a regression head's figures, not classes
FEW_VALUES = 10


def few_regression_values(model: onnx.ModelProto, name: str) -> bool:
    """Whether the graph output ``name`` is ``[N, k]`` with a fixed k from 2 to ``FEW_VALUES`` - 1
    that no Softmax or LogSoftmax writes (through layout ops): a few figures a sample (speechmos's
    three MOS scores, a box's 4 coordinates), whose argmax means nothing, where the shape alone
    read them as classes (``compare``'s top-1, ``--max-drop``'s default metric). Logits of a
    two-class classifier without a Softmax read so too: their SQNR is measured instead."""
    out = next((o for o in model.graph.output if o.name == name), None)
    t = out.type.tensor_type if out is not None else None
    if t is None or not t.HasField("shape") or len(t.shape.dim) != 2 or not t.shape.dim[1].HasField("dim_value") \
            or not 2 <= t.shape.dim[1].dim_value < FEW_VALUES:
        return False
    node, _ = _writer(model, name, (*LAYOUT_OPS, "ReduceMean"))  # a mean of Softmaxes is one too (ICLabel's)
    return node is None or node.op_type not in ("Softmax", "LogSoftmax")


def l2_normalized(model: onnx.ModelProto, name: str) -> bool:
    """Whether the graph output ``name`` is an L2-normalized embedding, x / ||x||: an
    ``LpNormalization`` (p 2), or a Div (or a Mul by a Reciprocal) whose divisor comes from a
    ``ReduceL2``, a ``ReduceSumSquare`` or a ``ReduceSum`` under a Sqrt, through layout ops. A
    sentence or face embedding's argmax means nothing, and its shape [N, dims] does not tell it
    from a classifier's logits; its normalization does."""
    node, producer = _writer(model, name)
    if node is None:
        return False
    if node.op_type == "LpNormalization":
        return next((a.i for a in node.attribute if a.name == "p"), 2) == 2
    if node.op_type not in ("Div", "Mul") or len(node.input) < 2:
        return False

    def norm_of(t: str, depth: int = 0, under_sqrt: bool = False, inverted: bool = False) -> bool:
        n = producer.get(t)
        if n is None or depth > 8:
            return False
        if n.op_type in ("ReduceL2", "ReduceSumSquare") or (n.op_type == "ReduceSum" and under_sqrt):
            return node.op_type == "Div" or inverted
        if n.op_type in _NORM_GLUE and n.input:
            return norm_of(n.input[0], depth + 1, under_sqrt or n.op_type in ("Sqrt", "Pow"),
                           inverted or n.op_type == "Reciprocal")
        return False

    return any(norm_of(t) for t in (node.input[1:2] if node.op_type == "Div" else node.input[:2]))
