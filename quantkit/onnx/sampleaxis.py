"""Models without a batch axis: a sample axis added for the run, removed from what is written.

An audio network on ``[frames, bins]``, a graph network on ``[nodes, features]``: the model's
first axis is part of one sample, so samples cannot be stacked on it. The data says so when an
input's array has one axis more than the input (``.npz`` ``[N, frames, bins]`` for ``[?, ?]``):
its axis 0 counts samples, and each sample is the model's whole input.

quantkit then runs a wrapper (``add_sample_axis``): each such input ``X`` becomes ``[1, *dims]``
and a Squeeze hands the model its sample (the tensor ``X__sample``); each graph output ``Y`` gets
an Unsqueeze, so outputs have the sample axis every report and metric counts on (named
``SAMPLE_DIM``). The run takes one sample a batch (the CLI sets ``--batch-size 1``), so everything
downstream (calibration, equalization, bias correction, compare, debug) feeds one sample a call,
as it does for a fixed-batch model; the model's other inputs are read as before. What is written (the Q/DQ model,
the cache, ranges.json) is the user's graph again (``remove_sample_axis``, ``original_names``):
the same inputs and outputs, the same tensor names.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import onnx
from onnx import helper

#: node names of the wrapper's Squeeze (``<mark>/in/<input>``) and Unsqueeze (``<mark>/out/<output>``)
MARK = "quantkit_sample_axis"
#: the wrapper's outputs declare their sample axis (axis 0) by this name, so that a batch symbol the
#: model's other inputs and its outputs share is not taken for it (``backends.base.output_batch_axes``)
SAMPLE_DIM = "quantkit_sample"
_AXES = f"{MARK}/axes"
_IN, _OUT = f"{MARK}/in/", f"{MARK}/out/"


def inner_name(name: str) -> str:
    """The wrapper's name for the tensor the model reads as input ``name`` (or writes as output)."""
    return f"{name}__sample"


def array_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each array's shape in an ``.npz`` (by key) or ``.npy`` (key ""), read from the headers only;
    {} when the file cannot be read that way (``NumpySource`` then says why)."""
    p = Path(path)

    def header(f: IO[bytes]) -> tuple[int, ...]:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(int(d) for d in read(f)[0])

    try:
        if p.suffix.lower() == ".npy":
            with open(p, "rb") as f:
                return {"": header(f)}
        with zipfile.ZipFile(p) as z:
            return {n.removesuffix(".npy"): header(z.open(n)) for n in z.namelist() if n.endswith(".npy")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return {}


def stacked_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]],
                   declared: Mapping[str, int | None] | None = None) -> list[str]:
    """The inputs whose data stacks samples of a model without a batch axis: each array (by input
    name; a lone ``.npy`` array, key "", feeds the only input) has either one axis more than its
    input (stacked: returned) or as many (read as before: batched on its batch axis, or fed as is),
    and at least one is stacked.
    [] otherwise, or when a batch axis is ``declared`` (``--batch-axis NAME=AXIS``; an input declared
    none is fed as is)."""
    from quantkit.onnx.model import input_specs

    declared = declared or {}
    specs = {s.name: s for s in input_specs(model)}
    named = {(next(iter(specs)) if k == "" and len(specs) == 1 else k): v for k, v in shapes.items()}
    fed = {k: v for k, v in named.items() if k in specs and not (k in declared and declared[k] is None)}
    if not fed or any(ax is not None for ax in declared.values()):
        return []
    ranks = {k: (len(v), len(specs[k].shape)) for k, v in fed.items()}
    if any(got not in (want, want + 1) for got, want in ranks.values()):
        return []
    return [k for k, (got, want) in ranks.items() if got == want + 1]


def add_sample_axis(model: onnx.ModelProto, inputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``inputs`` and every graph output have a leading axis of 1 (see the
    module's docstring). The model is at opset 13 or later (Squeeze's axes are an input)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    renames = {name: inner_name(name) for name in inputs}
    outputs = [o.name for o in g.output]
    renames.update({name: inner_name(name) for name in outputs if name not in renames})
    _rename(g, renames)
    g.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), _AXES))
    front = []
    for vi in g.input:
        if vi.name in inputs:
            _prepend_dim(vi)
            front.append(helper.make_node("Squeeze", [vi.name, _AXES], [renames[vi.name]], name=_IN + vi.name))
    for vi in g.output:
        g.node.append(helper.make_node("Unsqueeze", [renames[vi.name], _AXES], [vi.name], name=_OUT + vi.name))
        _prepend_dim(vi, SAMPLE_DIM)
    nodes = [*front, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    return out


def sample_axis_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the wrapper's Squeeze and Unsqueeze nodes (none for a model not wrapped)."""
    return [n.name for n in model.graph.node if n.name.startswith((_IN, _OUT))]


def has_sample_axis(model: onnx.ModelProto) -> bool:
    return any(n.name.startswith(_IN) for n in model.graph.node)


def original_names(model: onnx.ModelProto) -> dict[str, str]:
    """The wrapper's inner tensor names -> the user's names (empty for a model not wrapped)."""
    names = {}
    for n in model.graph.node:
        if n.name.startswith(_IN):
            names[n.output[0]] = n.input[0]
        elif n.name.startswith(_OUT):
            names[n.input[0]] = n.output[0]
    return names


def remove_sample_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (the wrapper, or a model derived from it: Q/DQ inserted, biases corrected)
    without the wrapper's nodes and axes: its inputs and outputs as in the user's model; a model
    not wrapped as it is."""
    if not has_sample_axis(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    renames = original_names(out)
    kept = [n for n in g.node if not n.name.startswith((_IN, _OUT))]
    del g.node[:]
    g.node.extend(kept)
    # names made from an inner name (a Q/DQ pair's "<tensor>_QuantizeLinear", "<tensor>_quantized") too
    taken = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.initializer}
    for inner, user in list(renames.items()):
        for t in sorted(taken):
            if t.startswith(inner + "_") and (made := user + t[len(inner):]) not in taken:
                renames[t] = made
        for n in g.node:
            if n.name.startswith(inner + "_"):
                n.name = user + n.name[len(inner):]
    for init in g.initializer:
        init.name = renames.get(init.name, init.name)
    _rename(g, renames)
    for vi in (*g.input, *g.output):
        if vi.name in renames.values():
            del vi.type.tensor_type.shape.dim[0]
    from quantkit.onnx.model import read_names

    if _AXES not in read_names(g):
        inits = [i for i in g.initializer if i.name != _AXES]
        del g.initializer[:]
        g.initializer.extend(inits)
    return out


def _prepend_dim(vi: onnx.ValueInfoProto, name: str | None = None) -> None:
    """A leading dim of 1 (named ``name`` instead, for an output)."""
    shape = vi.type.tensor_type.shape
    dims = [onnx.TensorShapeProto.Dimension() for _ in range(len(shape.dim) + 1)]
    if name:
        dims[0].dim_param = name
    else:
        dims[0].dim_value = 1
    for d, old in zip(dims[1:], shape.dim):
        d.CopyFrom(old)
    del shape.dim[:]
    shape.dim.extend(dims)


def _rename(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Every read and write of a tensor in ``renames`` renamed, in ``graph`` and the subgraphs that
    read it from the outer scope (a subgraph's own tensor of that name shadows it)."""
    from quantkit.onnx.model import subgraphs

    for node in graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]
        for sub in subgraphs(node):
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer} | \
                    {t for n in sub.node for t in n.output}
            _rename(sub, {k: v for k, v in renames.items() if k not in local})
    for vi in graph.value_info:
        vi.name = renames.get(vi.name, vi.name)
