"""ONNX Runtime backend (the default; CPU unless other providers are asked for).

Capture (``OrtRunner(model, capture=names)``): the requested tensors become extra graph outputs
of a copy of the model, and each batch's captured tensors are handed to the sink and dropped,
so memory does not grow with the number of images. Two things keep the pass close to plain
inference:
- batches run in chunks small enough that all captured outputs of a chunk fit a memory budget
  (``default_capture_budget_mb``: larger on more cores; the sink gets them in the pieces of the
  smallest budget, so statistics do not depend on the machine);
- the outputs are written by ONNX Runtime into buffers bound once (IOBinding) and reused for
  every chunk of the same shape; two such buffer sets alternate, so the sink (histograms) works
  on one chunk in a worker thread while ONNX Runtime, which releases the GIL, runs the next.
  Fetching fresh arrays instead costs an allocation and page faults per batch
  (benchmarks/results/calibration.md has the figures).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit._deps import require
from quantkit.backends.base import Runner, TensorSink, check_feed
from quantkit.datasets.batching import feed_rows, take_rows
from quantkit.errors import InputError, ModelError
from quantkit.onnx.model import (TensorSpec, concat_parts, few_regression_values, input_specs, l2_normalized,
                                 last_axis_classes, load_model, named_axis_1, node_reads, output_specs,
                                 unused_input_zeros, value_ordered_outputs, with_outputs_bytes)


log = logging.getLogger(__name__)


def run_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime's ``run`` raises (its own; none derives from RuntimeError)."""
    state = require("onnxruntime").capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(t for t in (getattr(state, n, None) for n in names) if isinstance(t, type))


def run_error_text(err: BaseException) -> str:
    """ONNX Runtime's message on one line without its status prefix and C++ source locations."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:\S+::)*\S+\(.*?\) ", "", text)
    return text[:400]


def max_threads() -> int:
    """The most ONNX Runtime threads a session may start: 4 a core, at least 64 (each is a stack
    and a spinning worker: 20,000 took minutes and 1.7 GB, 100,000 crashed the process)."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(threads: int | None, what: str = "threads") -> None:
    """Raise InputError for a thread count below 1 or above ``max_threads()`` (None: one per core)."""
    if threads is not None and not 1 <= threads <= max_threads():
        raise InputError(f"{what} must be from 1 to {max_threads()} (4 a core on this machine, at least 64), "
                         f"got {threads}", hint="leave it out for one thread per core")


def session_options(threads: int | None = None, *, optimization: str = "all", spinning: bool = True,
                    arena: bool = True) -> Any:
    """The one place ONNX Runtime session options are made, so every pass uses the same.

    ``spinning=False``: ONNX Runtime's idle intra-op threads sleep instead of spinning, for a
    pass whose own worker thread needs the cores meanwhile (capture: histograms of one chunk
    while ONNX Runtime runs the next; on 2 cores the spinning threads took that thread's time,
    and the capture pass of rapidocr-det ran 1.5x longer, benchmarks/results/design_notes.md).

    ``arena=False``: no CPU memory arena (the arena keeps a run's peak activations for the
    session's life), for sessions that are many and kept (the ranking's suffix sessions)."""
    check_threads(threads)
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 4  # fatal only: a run's error comes back as an exception, said in one line
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not arena:
        so.enable_cpu_mem_arena = False
    return so


#: ONNX Runtime's graph transformer that fuses Q/DQ pairs into its integer kernels (QLinearConv,
#: MatMulIntegerToFloat, ...). On x86 CPUs without VNNI those multiply uint8 by int8 with
#: VPMADDUBSW, whose 16-bit pair sums saturate (ONNX Runtime's quantization docs say so): a
#: madmom beat tracker's Q/DQ model read 7.5 dB output SQNR through them on an AVX2 machine and
#: 27.5 dB as TensorRT computes it (int32 accumulation). Left out unless ``integer_kernels``.
QDQ_FUSION = "QDQSelectorActionTransformer"
#: ONNX Runtime's graph transformer that quantizes a float weight or bias of a Conv, Gemm or MatMul
#: that reads a DequantizeLinear (per tensor, to form a Q/DQ node unit). A check session's weights
#: are the model's own (float biases, folded weight pairs: ``fold_weight_qdq``), as TensorRT uses
#: them: left out with ``QDQ_FUSION``. With it, a ResNet-18 whose Conv weights were folded read
#: 21.8 dB against 31.5 (its weights re-quantized per tensor).
WEIGHT_QUANTIZATION = "WeightBiasQuantization"


#: ``fold_weight_qdq`` leaves a model whose tensors hold more than this alone (the folded copy is
#: serialized whole for its session)
FOLD_MAX_BYTES = 1 << 30


#: the ops whose weights ``fold_weight_qdq`` folds
FOLDED_READERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def fold_weight_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each constant weight's QuantizeLinear -> DequantizeLinear replaced by the
    float weight it computes, made once by ONNX Runtime's own Q/DQ kernels (the same values the
    pair gives on every run); ``model`` itself when it has no such pair. A Q/DQ model's session
    recomputed every weight's pair on every run: a batch-1 graphormer of 85 MB of weights
    (chython-rxnmap) ran its checks 3-5x slower than FP32, and no Conv or MatMul could pre-pack
    its weight. The activations' pairs stay; the file written is never this one. Sessions of the
    result must leave ``WEIGHT_QUANTIZATION`` out (``create_session`` does)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    index = {n.output[0]: k for k, n in enumerate(g.node) if n.output}
    standard = ("", "ai.onnx")

    def weight_dq(d: onnx.NodeProto) -> bool:  # a DequantizeLinear of constants that only weighted ops read
        readers = consumers.get(d.output[0], [])
        return d.op_type == "DequantizeLinear" and d.domain in standard and d.output[0] not in outputs and \
            all(t in inits for t in d.input[1:] if t) and bool(readers) and \
            all(r.op_type in FOLDED_READERS for r in readers)

    nodes: list[onnx.NodeProto] = []  # what goes: QuantizeLinear -> DequantizeLinear pairs of a float weight,
    names: list[str] = []  # and a DequantizeLinear of an int8 weight (ONNX Runtime's and NNCF's Q/DQ models)
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.domain in standard and n.input and n.output[0] not in outputs and \
                all(t in inits for t in n.input if t):
            dqs = consumers.get(n.output[0], [])
            if dqs and all(d.input[0] == n.output[0] and weight_dq(d) for d in dqs):
                nodes += [n, *dqs]
                names += [d.output[0] for d in dqs]
        elif n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits and weight_dq(n):
            nodes.append(n)
            names.append(n.output[0])
    if not nodes or sum(len(i.raw_data) for i in g.initializer) > FOLD_MAX_BYTES:
        return model
    needed = {t for n in nodes for t in n.input if t}
    sub = onnx.ModelProto()
    sub.ir_version = model.ir_version
    sub.opset_import.extend(model.opset_import)
    sub.graph.name = "fold"
    sub.graph.node.extend(nodes)
    sub.graph.initializer.extend(i for i in g.initializer if i.name in needed)
    for name in names:
        sub.graph.output.add().name = name
    values = create_session(sub, optimization="none").run(names, {})
    folded = {index[n.output[0]] for n in nodes}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(n for k, n in enumerate(g.node) if k not in folded)
    read = {t for n in out.graph.node for t in node_reads(n)} | outputs
    kept = [i for i in g.initializer if i.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in zip(names, values))
    return out


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8), from Linux's
    ``cpuinfo`` flags; None where that does not say (another system, another architecture)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None or "sse2" not in flags:  # no x86 flags line
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: os.fsdecode of bytes that are not UTF-8
        return False
    return True


def create_session(model: onnx.ModelProto | bytes | str | os.PathLike[str], *, threads: int | None = None,
                   providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True,
                   optimization: str = "all", integer_kernels: bool = False, arena: bool = True) -> Any:
    """An ONNX Runtime session of a ModelProto, a serialized model (bytes) or a model file
    (``optimization``: ``session_options``'s level).

    A Q/DQ model runs its quantized ops as TensorRT computes them: the QuantizeLinear's rounding
    and saturation, then the op in float on the dequantized values (int32 accumulation up to float
    rounding), whatever the CPU. ``integer_kernels``: as ONNX Runtime deploys it instead, with its
    integer kernels (``QDQ_FUSION``; the CPU's instructions decide their rounding)."""
    ort = require("onnxruntime")
    src = (model.SerializeToString() if isinstance(model, onnx.ModelProto)
           else model if isinstance(model, bytes) else str(model))
    if isinstance(src, str) and not _utf8(src):  # a file name of undecodable bytes: ONNX Runtime takes str only
        from quantkit.onnx.model import load_model

        src = load_model(src).SerializeToString()  # its external data read here, from its own folder
    try:
        return ort.InferenceSession(src, sess_options=session_options(threads, optimization=optimization,
                                                                      spinning=spinning, arena=arena),
                                    providers=list(providers),
                                    **({} if integer_kernels else {"disabled_optimizers": [QDQ_FUSION, WEIGHT_QUANTIZATION]}))
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"ONNX Runtime cannot load the model: {msg}") from err


#: a capture call's outputs per intra-op thread, and the bounds of the whole (MiB): see
#: ``default_capture_budget_mb``
CAPTURE_MB_PER_THREAD = 16
CAPTURE_MB_BOUNDS = (64, 512)
#: the sink's pieces (MiB of captured tensors): a call of a larger budget is handed over in the
#: pieces a call of this budget would have returned, so that the statistics (a histogram's first
#: range, its sampled values) are the same on any machine (``OrtRunner.capture``)
SINK_PIECE_MB = CAPTURE_MB_BOUNDS[0]


def default_capture_budget_mb(threads: int | None = None) -> float:
    """How many MiB of captured tensors one inference call of a capture pass may return:
    ``CAPTURE_MB_PER_THREAD`` per thread ONNX Runtime runs on (``threads``, default one per
    core), within ``CAPTURE_MB_BOUNDS``. A chunk of few samples leaves many threads idle: on 16
    cores, with 64 MiB, RapidOCR's recogniser ran in chunks of 2-3 text lines, and its capture
    pass took 7.3 s against a 2.4 s FP32 pass over the same 512 lines; with 256 MiB, 4.7 s
    (benchmarks/results/calibration_corpus.md). Two buffer sets of this size alternate."""
    lo, hi = CAPTURE_MB_BOUNDS
    return float(min(hi, max(lo, CAPTURE_MB_PER_THREAD * (threads or os.cpu_count() or 1))))


class OrtRunner(Runner):
    """Run an ONNX model with ONNX Runtime.

    Args:
        model: a path or a ModelProto.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).
        providers: execution providers, CPU by default.
        capture: tensors ``capture`` streams (activations or graph inputs).
        capture_budget_mb: captured outputs of one inference call stay within this; a batch is
            split into chunks to keep them there (never below one sample, never for a model
            with a fixed batch size). None: ``default_capture_budget_mb(threads)``.
        name: the model's name in messages (default: the file's name, or the graph's).
        integer_kernels: a Q/DQ model runs on ONNX Runtime's integer kernels, as ONNX Runtime
            deploys it (its speed; ``quantkit bench``), instead of as TensorRT computes it
            (``create_session``).
    """

    backend = "onnxruntime"

    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), capture: Sequence[str] = (),
                 capture_budget_mb: float | None = None, name: str | None = None, integer_kernels: bool = False):
        proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.name = name or (Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name)
        self._inputs = input_specs(proto)
        # inputs no node reads need no data, but ONNX Runtime wants every input fed: zeros
        self._unused = unused_input_zeros(proto)
        self._output_specs = output_specs(proto)
        #: graph outputs computed through a TopK (``compare`` says their rows pair up by rank)
        self.value_ordered = value_ordered_outputs(proto)
        #: graph outputs the graph L2-normalizes (embeddings: ``compare`` shows no top-1 for them)
        self.embeddings = [o.name for o in proto.graph.output if l2_normalized(proto, o.name)]
        #: 2-D outputs whose axis 1 is declared by a name (a sequence's length, ``[B, T]``): not
        #: [N, classes], whose classes are a fixed number (``compare`` shows no top-1 for them)
        self.named_axis_outputs = [o.name for o in proto.graph.output if named_axis_1(proto, o.name)]
        #: [N, k] outputs of a few values (k < 10) that no Softmax writes: figures or classes (``compare``
        #: notes that their top-1 means something for class scores only)
        self.regression_outputs = [o.name for o in proto.graph.output if few_regression_values(proto, o.name)]
        #: outputs of rank 3+ that are a Softmax over the last axis (``[N, T, classes]``): top-1 per position
        self.last_axis_classes = [o.name for o in proto.graph.output if last_axis_classes(proto, o.name)]
        # what ``concat_parts`` reads, on first use (only ``compare`` does: a shape inference that
        # the fallback's and the ranking's many runners need not pay); a model given by path, now
        self._parts: dict[str, list[int]] | None = None if model is proto else concat_parts(proto)
        self._parts_model: onnx.ModelProto | None = proto if model is proto else None
        self._outputs = [s.name for s in self._output_specs]
        #: graph outputs that are not tensors (a sequence, a map: skl2onnx's ZipMap): not compared
        self.non_tensor_outputs = [o.name for o in proto.graph.output if o.name not in self._outputs]
        self._captured = list(dict.fromkeys(capture))
        fed = {s.name for s in self._inputs}
        self._inner = [t for t in self._captured if t not in fed]
        self._budget_mb = default_capture_budget_mb(threads) if capture_budget_mb is None else capture_budget_mb
        #: the model has QuantizeLinear nodes (a Q/DQ model)
        self.quantized = any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
        # the weights' pairs once, not on every run (the same values)
        run = fold_weight_qdq(proto) if self.quantized and not integer_kernels else proto
        src: onnx.ModelProto | bytes | str | os.PathLike[str] = (
            with_outputs_bytes(run, self._inner) if self._inner
            else run if isinstance(model, onnx.ModelProto) or run is not proto else model)
        # a capture pass histograms on a worker thread beside ONNX Runtime: no spinning threads
        self.session = create_session(src, threads=threads, providers=providers, spinning=not self._captured,
                                      integer_kernels=integer_kernels)
        self.device = ",".join(p.replace("ExecutionProvider", "") for p in self.session.get_providers())
        #: the model declares a dynamic batch but runs one sample at a time only (an export that
        #: baked batch 1 into a Reshape): found on the first batch, then every batch runs row by row
        self.one_at_a_time = False
        self._ran = False  # a batch of several samples ran (a later failure is not about the batch size)

    @property
    def concat_parts(self) -> dict[str, list[int]]:
        """Graph outputs a Concat writes along axis 1 -> its parts' sizes (``compare`` scores each part)."""
        if self._parts is None:
            assert self._parts_model is not None
            self._parts, self._parts_model = concat_parts(self._parts_model), None
        return self._parts

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self._output_specs

    @property
    def captured_names(self) -> list[str]:
        return list(self._captured)

    def _infer_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
        outs = self._run(self._outputs, feed, axes or {})
        return dict(zip(self._outputs, outs))

    def _infer_captured_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None
                             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        names = [*self._outputs, *(t for t in self._inner if t not in self._outputs)]
        got = dict(zip(names, self._run(names, feed, axes or {})))
        return ({n: got[n] for n in self._outputs},
                {t: feed[t] if t not in got else got[t] for t in self._captured})

    def _run(self, names: Sequence[str], feed: dict[str, np.ndarray], axes: Mapping[str, int | None]) -> list[np.ndarray]:
        """``session.run`` (the unused inputs' zeros added), row by row for a model found to run
        one sample at a time (``axes``: each input's batch axis where it is not 0, None for one
        fed whole to every row: an RNN state)."""
        def run(part: dict[str, np.ndarray]) -> list[np.ndarray]:
            return list(self.session.run(list(names), {**self._unused, **part}))

        if not self.one_at_a_time:
            try:
                outs = run(feed)
                self._ran = self._ran or feed_rows(feed, axes) > 1  # a batch of several ran: batching works
                return outs
            except run_errors() as err:
                self._one_at_a_time_or_raise(err, run, feed, axes)
        rows = [run(take_rows(feed, axes, i, i + 1)) for i in range(feed_rows(feed, axes))]
        # each output's samples along its first axis (a 0-d one a sample: `x.squeeze()` of one sample)
        return [np.concatenate(parts, axis=0) if np.ndim(parts[0]) else np.stack(parts) for parts in zip(*rows)]

    def _one_at_a_time_or_raise(self, err: BaseException, run_one: Callable[[dict[str, np.ndarray]], Any],
                                feed: dict[str, np.ndarray], axes: Mapping[str, int | None]) -> None:
        """After ``err`` on a batch: when the model has a dynamic batch, this is its first batch,
        and one sample alone runs (``run_one``), it runs one sample at a time from now on (with a
        warning); otherwise one line naming the model and ONNX Runtime's reason (InputError)."""
        rows = feed_rows(feed, axes)
        fixed = self._inputs[0].static_batch if self._inputs else None
        if self._ran or fixed is not None or rows <= 1:
            raise self._cannot_run(err) from err
        try:
            run_one(take_rows(feed, axes, 0, 1))
        except run_errors() as one:
            raise self._cannot_run(one) from one
        self.one_at_a_time = True
        log.warning("%s declares a dynamic batch but fails on a batch of %d (%s) and runs one sample: it runs one "
                    "sample at a time from here on (slower; an export with a dynamic batch would be faster)",
                    self.name, rows, run_error_text(err))

    def _cannot_run(self, err: BaseException) -> InputError:
        return InputError(f"ONNX Runtime cannot run {self.name} on this data: {run_error_text(err)}",
                          hint="check that the data fits the model's inputs (shapes, layout, value ranges such as "
                          "token ids), e.g. by running the model on one sample yourself")

    def capture(self, batches: Iterable[Any], sink: TensorSink, *,
                on_batch: Callable[[int], None] | None = None) -> None:
        """Run every batch once; the sink gets each chunk's captured tensors on a worker thread
        while ONNX Runtime runs the next chunk (two buffer sets alternate).

        The sink's pieces do not depend on the machine: a chunk (its size follows the capture
        budget, so the cores) is handed over in the pieces of rows a ``SINK_PIECE_MB`` budget
        would have run, a tensor of the chunk's rows on its first axis sliced, any other one
        (no batch axis) with every piece, as those calls would have returned it. The same data
        then gives the same histograms, and so the same scales, on 2 cores and on 16 (with 64 and
        256 MiB chunks the sampled histograms and some entropy/mse ranges differed)."""
        fed = [t for t in self._captured if t not in self._inner]
        runners = [_BoundCapture(self.session, self._inner, self._unused),
                   _BoundCapture(self.session, self._inner, self._unused)]
        pending: list[Future[None] | None] = [None, None]
        fixed_batch = self._inputs[0].static_batch if self._inputs else None
        chunk: int | None = None
        piece = 1  # rows a sink call gets (``SINK_PIECE_MB``'s chunk)
        turn = 0

        def hand_over(batch: Any, part: dict[str, np.ndarray], arrays: list[np.ndarray], n: int, step: int,
                      axes: Mapping[str, int | None]) -> None:
            if step >= n:
                sink(batch, n, {**dict(zip(self._inner, arrays)), **{t: part[t] for t in fed}})
                return
            for start in range(0, n, step):  # inputs sliced on their batch axis, inner tensors on their first
                stop = min(n, start + step)
                rows = take_rows({t: part[t] for t in fed}, axes, start, stop)
                sink(batch, stop - start, {**{t: a[start:stop] if a.ndim and a.shape[0] == n else a
                                              for t, a in zip(self._inner, arrays)}, **rows})

        with ThreadPoolExecutor(1, thread_name_prefix="quantkit-capture") as pool:
            for batch in batches:
                axes = getattr(batch, "batch_axes", {})  # inputs not batched on axis 0 (an RNN state, a scalar)
                feed = take_rows(batch.feed, axes, 0, batch.size) if fixed_batch is None else batch.feed
                if chunk is None:
                    check_feed(feed, self.input_specs)  # a batch that does not fit: one clear error
                    rows = feed_rows(feed, axes)
                    if fixed_batch is not None or not self._inner:
                        chunk = piece = rows  # a fixed-batch model takes exactly this many (a padded tail too)
                    else:
                        try:
                            piece, chunk = _chunk_sizes(runners[0], feed, axes, self._budget_mb)
                        except run_errors() as err:  # one sample of the data does not run
                            raise self._cannot_run(err) from err
                    if self.one_at_a_time:
                        chunk = piece = 1
                start = 0
                while start < batch.size:
                    part = take_rows(feed, axes, start, start + chunk)
                    job = pending[turn]
                    if job is not None:
                        job.result()  # this buffer set is free again (and errors surface here)
                    try:
                        arrays = runners[turn].run(part)
                    except run_errors() as err:  # a model that runs one sample at a time only: chunks of 1
                        self._one_at_a_time_or_raise(err, runners[turn].run, part, axes)
                        chunk = piece = 1
                        continue
                    self._ran = self._ran or chunk > 1
                    pending[turn] = pool.submit(hand_over, batch, part, arrays, min(chunk, batch.size - start), piece,
                                                axes)
                    turn ^= 1
                    start += chunk
                if on_batch is not None:
                    on_batch(batch.size)
            for job in pending:
                if job is not None:
                    job.result()

    def close(self) -> None:
        self.session = None


def _chunk_sizes(runner: "_BoundCapture", feed: dict[str, np.ndarray], axes: Mapping[str, int | None],
                 budget_mb: float) -> tuple[int, int]:
    """(piece, chunk): samples per sink call and per inference call, measured on one sample
    (captured tensors scale with the batch). The piece: a batch in equal parts whose captured
    outputs fit ``SINK_PIECE_MB`` (or ``budget_mb`` when smaller); the chunk: the most whole
    pieces whose outputs fit ``budget_mb`` (at least one)."""
    size = feed_rows(feed, axes)
    try:
        one = runner.run(take_rows(feed, axes, 0, 1))
    except run_errors() as err:
        if size <= 1:
            raise
        # a model that runs only whole groups of rows (ICLabel's Reshape(4, -1) averages each
        # component's four rows): the batch as given, never split, or the one-sample error
        try:
            runner.run(feed)
        except run_errors():
            raise err from None
        log.info("the model does not run one sample alone, and runs the batch of %d: batches are not split", size)
        return size, size
    per_sample = max(1, sum(a.nbytes for a in one))

    def fitting(mb: float) -> int:
        return int(max(1, min(size, mb * 2**20 // per_sample)))

    parts = -(-size // fitting(min(SINK_PIECE_MB, budget_mb)))
    piece = -(-size // parts)  # equal parts: one binding serves every full batch
    return piece, piece * max(1, fitting(budget_mb) // piece)


class _BoundCapture:
    """One capture session whose extra outputs land in buffers bound once per input shape.

    The first call with a new input shape runs normally (ONNX Runtime allocates and reports
    the output shapes); later calls with that shape reuse buffers of those shapes. The arrays
    returned are overwritten by the next call.
    """

    def __init__(self, session: Any, outputs: Sequence[str], fixed: dict[str, np.ndarray] | None = None):
        self.session = session
        self.outputs = list(outputs)
        self._fixed = fixed or {}  # inputs fed the same array every call (unused inputs' zeros)
        self._key: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        self._binding: Any = None
        self._buffers: list[np.ndarray] = []
        self._unbound = False  # IOBinding refused (declared output shapes the data does not have)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.outputs:
            return []
        feed = {**self._fixed, **{k: np.ascontiguousarray(v) for k, v in feed.items()}}
        key = tuple((k, v.shape) for k, v in feed.items())
        if self._unbound:
            return self.session.run(self.outputs, feed)
        if key != self._key:
            arrays = self.session.run(self.outputs, feed)
            self._bind(key, arrays)
            return arrays
        for name, value in feed.items():
            self._binding.bind_cpu_input(name, value)
        try:
            self.session.run_with_iobinding(self._binding)
        except RuntimeError as err:
            # IOBinding checks bound buffers against the outputs' *declared* shapes; a model whose
            # declared shape has a traced constant (an output [batch, 54, 4] that is [batch, n, 4])
            # runs with session.run (a warning) but not bound: run unbound from here on
            log.debug("IOBinding failed (%s): capturing without bound buffers", " ".join(str(err).split()))
            self._binding, self._key, self._buffers, self._unbound = None, None, [], True
            return self.session.run(self.outputs, feed)
        return self._buffers

    def _bind(self, key: tuple[tuple[str, tuple[int, ...]], ...], arrays: list[np.ndarray]) -> None:
        self._binding = None  # release the old buffers before making new ones
        self._buffers = [np.empty_like(a) for a in arrays]
        binding = self.session.io_binding()
        for name, buf in zip(self.outputs, self._buffers):
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self._binding, self._key = binding, key
