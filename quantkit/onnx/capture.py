"""Activation capture through ONNX Runtime, streaming into histogram collectors.

The requested tensors become extra graph outputs of a copy of the model; each batch updates
one collector per tensor and is dropped, so memory does not grow with the number of images.
Histogram updates for batch k run on a worker thread while ONNX Runtime (which releases the
GIL) computes batch k+1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantkit.backends.onnxruntime import create_session
from quantkit.calibrators.collectors import HistogramCollector
from quantkit.datasets.batching import Batch
from quantkit.errors import NonFiniteError
from quantkit.onnx.model import input_specs

log = logging.getLogger(__name__)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor that shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a convenience here, never a requirement
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Every float tensor computed by a node (for caches that cover the whole network)."""
    types = tensor_types(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    seen: list[str] = [s.name for s in input_specs(model) if np.issubdtype(s.dtype, np.floating)]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        seen += [o for o in node.output if o and types.get(o, TensorProto.FLOAT) in floats]
    return list(dict.fromkeys(seen))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (existing outputs are kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = tensor_types(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    return out


def capture_histograms(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[Batch],
    *,
    num_bins: int = 2048,
    threads: int | None = None,
    on_batch: Callable[[Batch], None] | None = None,
    overlap: bool = True,
) -> dict[str, HistogramCollector]:
    """Run every batch once and collect abs-max + |x| histograms for ``tensors``.

    Args:
        model: the FP32 model.
        tensors: activation tensor names (graph inputs allowed).
        batches: the calibration batches.
        num_bins: histogram bins per tensor.
        threads: ONNX Runtime intra-op threads (same default as plain inference).
        on_batch: called after each batch (progress bars).
        overlap: update histograms on a worker thread while the next batch runs.

    Raises:
        NonFiniteError: an activation has NaN or Inf values; the message names the tensor and
            the samples of the batch.
    """
    graph_inputs = {s.name for s in input_specs(model)}
    inner = [t for t in tensors if t not in graph_inputs]
    fed = [t for t in tensors if t in graph_inputs]
    session = create_session(with_outputs(model, inner), threads=threads)
    collectors = {t: HistogramCollector(num_bins, name=t) for t in tensors}

    def update(batch: Batch, arrays: list[np.ndarray]) -> None:
        try:
            for name, arr in zip(inner, arrays):
                collectors[name].update(arr[: batch.size])
            for name in fed:
                collectors[name].update(batch.feed[name][: batch.size])
        except NonFiniteError as err:
            first, last = batch.indices[0], batch.indices[-1]
            raise NonFiniteError(
                f"{err} in the batch of samples {first}..{last}",
                hint="check the model and the preprocessing (scale, mean/std) for this data",
            ) from err

    pending: Future[None] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="quantkit-hist") as pool:
        for batch in batches:
            arrays = session.run(inner, batch.feed) if inner else []
            if pending is not None:
                pending.result()
            if overlap:
                pending = pool.submit(update, batch, arrays)
            else:
                update(batch, arrays)
            if on_batch is not None:
                on_batch(batch)
        if pending is not None:
            pending.result()
    return collectors
