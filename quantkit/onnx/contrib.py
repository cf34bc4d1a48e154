"""ONNX Runtime's fused ops (domain ``com.microsoft``) written back as the standard ops they fuse.

A model saved after ONNX Runtime's graph optimizations (``SessionOptions.optimized_model_filepath``,
``onnxruntime.transformers``' optimizer) holds ``FusedConv`` (a Conv, an optional sum input and an
activation), ``FusedGemm`` (a Gemm and an activation) and ``FusedMatMul`` (a MatMul with transposes
and a scale) in ONNX Runtime's own domain. quantkit quantizes Conv, Gemm and MatMul, and TensorRT's
ONNX parser reads only the standard domain: left as they are, those layers stayed in float without
a word, and the written model held ops TensorRT cannot parse. ``standard_ops`` writes them as the
standard ops they compute (the same function), so they are quantized like any other; the other ops
of that domain are named in one warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantkit.errors import ModelError
from quantkit.onnx.model import all_graphs, all_names, unique_name

log = logging.getLogger(__name__)

CONTRIB = "com.microsoft"
#: the fused ops ``standard_ops`` writes as standard ones (each holds a Conv, a Gemm or a MatMul)
FUSED_LAYER_OPS = ("FusedConv", "FusedGemm", "FusedMatMul")
#: FusedConv's and FusedGemm's ``activation`` -> the standard op and how its parameters map
#: (``activation_params`` for FusedConv; ``activation_alpha``/``_beta`` for FusedGemm)
_ACTIVATIONS = {"Relu": (), "Tanh": (), "Sigmoid": (), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta"),
                "Clip": ("min", "max"), "Elu": ("alpha",)}
_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def contrib_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``model``'s nodes of the ``com.microsoft`` domain, subgraphs' too."""
    return [n for g in all_graphs(model.graph) for n in g.node if n.domain == CONTRIB]


#: ONNX Runtime's CPU layout ops (``ORT_ENABLE_ALL``'s NCHWc transformer): a Conv of this domain
#: holds its weight in ONNX Runtime's blocked order under the ONNX dims, which no other runtime reads
LAYOUT_DOMAIN = "com.microsoft.nchwc"


def check_no_layout_ops(model: onnx.ModelProto, *, source: str = "model") -> None:
    """ModelError where ``model`` holds ONNX Runtime's CPU layout ops (``LAYOUT_DOMAIN``): a model
    saved by ONNX Runtime at ``ORT_ENABLE_ALL`` is for that machine's ONNX Runtime alone (its own
    log says so), and its Convs' weights are not in ONNX's order (per-channel scales along their
    first axis would be another tensor's rows)."""
    found = [n for g in all_graphs(model.graph) for n in g.node if n.domain == LAYOUT_DOMAIN]
    if found:
        ops = sorted({n.op_type for n in found})
        raise ModelError(f"{source} holds {len(found)} node(s) of ONNX Runtime's CPU layout domain ({LAYOUT_DOMAIN}: "
                         f"{', '.join(ops)}), which only ONNX Runtime on the machine that saved it reads (the model was "
                         "saved with ORT_ENABLE_ALL optimizations)",
                         hint="quantize the exported model itself, or one saved with graph_optimization_level "
                              "ORT_ENABLE_EXTENDED or lower")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def standard_ops(model: onnx.ModelProto, *, warn: bool = True, name: str = "model") -> onnx.ModelProto:
    """``model`` with each ``com.microsoft`` FusedConv, FusedGemm and FusedMatMul written as the
    standard ops it fuses, in the main graph (a copy; ``model`` itself when it has none). A
    FusedMatMul that transposes its batch axes (``transBatchA``/``transBatchB``), an activation
    this module does not know, a transpose of an operand of unknown rank (ONNX's shape inference
    first, ONNX Runtime's where that gives none), and any op inside an If/Loop/Scan body (left in
    float as the rest of it) stay as they are. With ``warn``, the ``com.microsoft`` ops left are
    named in one warning (TensorRT's parser does not read them)."""
    if not contrib_nodes(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = all_names(out)
    ranks = _ranks(out)
    transposed = {t for n in out.graph.node if n.domain == CONTRIB and n.op_type == "FusedMatMul"
                  for t, flag in zip(n.input[:2], ("transA", "transB")) if _attrs(n).get(flag, 0)}
    if transposed - set(ranks):  # an operand another com.microsoft op makes (an optimized attention's scores):
        ranks.update({k: v for k, v in _contrib_ranks(out).items() if k not in ranks})  # its ranks by ORT's rules
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    rewritten = 0
    for node in out.graph.node:
        made = None
        if node.domain == CONTRIB and node.op_type in ("FusedConv", "FusedGemm"):
            made = _fused_layer(node, taken, inits)
        elif node.domain == CONTRIB and node.op_type == "FusedMatMul":
            made = _fused_matmul(node, taken, inits, ranks)
        if made is None:
            nodes.append(node)
        else:
            nodes.extend(made)
            rewritten += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    if rewritten:
        log.info("%s: %d fused op(s) of ONNX Runtime's own domain (com.microsoft FusedConv/FusedGemm/FusedMatMul) "
                 "written as the standard ops they fuse, to be quantized and parsed by TensorRT", name, rewritten)
    left_nodes = contrib_nodes(out)
    left = sorted({n.op_type for n in left_nodes})
    if left and warn:
        count = len(left_nodes)
        log.warning("%s: %d node(s) of ONNX Runtime's own domain (com.microsoft: %s) stay as they are, in float: "
                    "TensorRT's ONNX parser does not read them; export the model without ONNX Runtime's graph "
                    "optimizations (it applies them again when it loads the model)", name, count, ", ".join(left))
    if not left_nodes:  # (an op of the domain in a subgraph keeps its opset import)
        kept = [o for o in out.opset_import if o.domain != CONTRIB]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out


def _constant(value: float, name: str, taken: set[str], inits: list[onnx.TensorProto]) -> str:
    name = unique_name(name, taken)
    inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    return name


def _activation(node: onnx.NodeProto, x: str, y: str, taken: set[str],
                inits: list[onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """The standard node computing ``node``'s activation of ``x`` into ``y`` ([] without one;
    None for an activation not in ``_ACTIVATIONS``)."""
    attrs = _attrs(node)
    act = attrs.get("activation")
    if act is None:
        return []
    act = act.decode() if isinstance(act, bytes) else str(act)
    if act not in _ACTIVATIONS:
        return None
    if node.op_type == "FusedConv":
        params = [float(v) for v in attrs.get("activation_params", [])]
    else:
        params = [float(attrs[k]) for k in ("activation_alpha", "activation_beta") if k in attrs]
    names = _ACTIVATIONS[act]
    name = unique_name(f"{node.name or y}_{act.lower()}", taken)
    if act == "Clip":  # min and max are inputs since opset 11
        lo, hi = (params + [-np.inf, np.inf][len(params):])[:2]
        return [helper.make_node("Clip", [x, _constant(lo, f"{name}_min", taken, inits),
                                          _constant(hi, f"{name}_max", taken, inits)], [y], name=name)]
    extra: dict[str, Any] = dict(zip(names, params))
    return [helper.make_node(act, [x], [y], name=name, **extra)]


def _fused_layer(node: onnx.NodeProto, taken: set[str], inits: list[onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """FusedConv (Conv, + Z, activation) or FusedGemm (Gemm, activation) as standard nodes."""
    attrs = _attrs(node)
    y = node.output[0]
    pre = unique_name(f"{y}_preact", taken) if attrs.get("activation") is not None else y
    act = _activation(node, pre, y, taken, inits)
    if act is None:
        return None
    if node.op_type == "FusedConv":
        inputs = list(node.input[:3])
        while inputs and not inputs[-1]:  # an empty bias slot (a sum input without a bias): no bias
            inputs.pop()
        z = node.input[3] if len(node.input) > 3 and node.input[3] else None  # a sum input, added before the activation
        layer_out = pre if z is None else unique_name(f"{y}_conv", taken)
        made = [helper.make_node("Conv", inputs, [layer_out], name=node.name,
                                 **{k: v for k, v in attrs.items() if k in _CONV_ATTRS})]
        if z is not None:
            made.append(helper.make_node("Add", [layer_out, z], [pre], name=unique_name(f"{node.name or y}_sum", taken)))
    else:
        gemm = {k: v for k, v in attrs.items() if k in ("alpha", "beta", "transA", "transB")}
        made = [helper.make_node("Gemm", list(node.input), [pre], name=node.name, **gemm)]
    return made + act


def _fused_matmul(node: onnx.NodeProto, taken: set[str], inits: list[onnx.TensorProto],
                  ranks: dict[str, int]) -> list[onnx.NodeProto] | None:
    """FusedMatMul (alpha * op(A) @ op(B), op a transpose of the last two axes) as standard nodes."""
    attrs = _attrs(node)
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        return None
    made: list[onnx.NodeProto] = []
    operands = []
    for t, flag in zip(node.input[:2], ("transA", "transB")):
        if attrs.get(flag, 0):
            rank = ranks.get(t)
            if rank is None or rank < 2:
                return None
            name = unique_name(f"{t}_transposed", taken)
            made.append(helper.make_node("Transpose", [t], [name], name=unique_name(f"{node.name or name}_{flag}", taken),
                                         perm=[*range(rank - 2), rank - 1, rank - 2]))
            t = name
        operands.append(t)
    alpha = float(attrs.get("alpha", 1.0))
    y = node.output[0]
    product = y if alpha == 1.0 else unique_name(f"{y}_unscaled", taken)
    made.append(helper.make_node("MatMul", operands, [product], name=node.name))
    if alpha != 1.0:
        made.append(helper.make_node("Mul", [product, _constant(alpha, f"{node.name or y}_alpha", taken, inits)],
                                     [y], name=unique_name(f"{node.name or y}_scale", taken)))
    return made


def _contrib_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks from ONNX Runtime's symbolic shape inference, which knows its com.microsoft ops
    (ONNX's does not); {} where it cannot run."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # its infer_shapes() writes "sym_shape_infer_temp.onnx" into the working directory when some shape
        # stays unknown, and raises: its loop here instead, partial results kept, nothing written
        inference = SymbolicShapeInference(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        g = inference.out_mp_.graph
    except Exception:  # noqa: BLE001 (a convenience: without it the FusedMatMul stays, named in the warning)
        return {}
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*g.value_info, *g.input, *g.output]
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor shape inference (or an initializer) gives one."""
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    try:
        from quantkit.onnx.model import _without_weights

        g = onnx.shape_inference.infer_shapes(_without_weights(model)).graph
    except Exception:  # inference is a convenience here
        return ranks
    for vi in [*g.value_info, *g.input, *g.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            ranks.setdefault(vi.name, len(t.shape.dim))
    return ranks
