"""Bias correction: move the mean error that INT8 adds to a Conv's output into its bias.

Quantization changes the mean of a Conv's output, not only its noise. Two cases are common in
real exporters' graphs (PP-OCR's recogniser, measured in benchmarks/results/design_notes.md):

- a weight whose taps sum to ~0 (an edge detector: ``[-0.37, ..., 0.37]``, sum 6e-5) reads a
  tensor with a large per-channel offset (the background of a text line). Per-channel INT8
  rounding changes the sum of the taps by up to a step per tap, and the offset times that change
  is a constant error over the whole image;
- a tensor that is constant over most of the image (a flat background after hard-swish) is
  rounded to the same grid point everywhere: the rounding error is a per-channel constant, not
  noise, and the next Conv's weights turn it into a constant error of each output channel.

The layers after such a Conv carry the shift on and add their own: on the recogniser the
largest per-channel shift grows from 0.03 of the tensor's spread at the first Conv to 1.3 at
the ninth. Correcting each layer on its own FP32 input (Nagel et al., 2019, the analytic
form) leaves that interplay out, and on that model it made the result swing by tens of points
between calibration subsets; correcting all layers at once from one measurement
over-corrects (each layer's shift also holds the shifts of the layers before it) and
diverges. So the correction here is **empirical and sequential**, as AIMET's empirical bias
correction: Convs in order of depth, each one's shift measured on the Q/DQ model with every
earlier Conv already corrected,

    shift[o] = median over positions of (INT8 model's Conv output - FP32 model's)[o]

(positions: the batch and every axis after the channel, a strided sample of them), and
``bias -= shift``. The median, not the mean: a shift that rounding adds to a flat background
moves almost every position and the two agree, but clipping a sparse tail moves a few positions
a lot, and its mean would move every position to make up for those few (ddddocr's CRNN with
``percentile``: output SQNR 22.8 dB uncorrected, 12.3 with the mean, 26.1 with the median).
Convs of one depth (no Conv path between them) are measured in one pass. The bias is a float
input of the Conv that TensorRT fuses as it is: a corrected model builds exactly like an
uncorrected one.

Cost: one ONNX Runtime pass of the FP32 model and one of the Q/DQ model over the correction
samples, the latter in segments (one session per depth, fed the tensors the segments before it
computed, with the Convs' outputs corrected), holding the tensors that cross a segment boundary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.onnx.model import constant_arrays, node_reads, with_outputs_bytes

log = logging.getLogger(__name__)

#: a batch of the correction samples: (feed, real rows; rows past it are padding)
Feed = tuple[Mapping[str, np.ndarray], int]


def conv_levels(model: onnx.ModelProto) -> list[list[onnx.NodeProto]]:
    """The Convs of ``model`` (topologically sorted, as ONNX requires) grouped by depth: the
    number of Convs on the longest path before each. Convs of one depth do not read each
    other's outputs, so their shifts can be measured in one pass."""
    depth: dict[str, int] = {}
    levels: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in node_reads(node)), default=0)
        if node.op_type == "Conv":
            levels.setdefault(d, []).append(node)
            d += 1
        for out in node.output:
            depth[out] = d
    return [levels[k] for k in sorted(levels)]


#: positions per channel and batch kept to estimate a Conv's shift (a strided sample), and at most
#: ``SAMPLE_POSITIONS_TOTAL`` over all the correction batches: a fixed-batch model's 32
#: one-sample feeds took 2048 each, and their per-channel medians were a third of the layout
#: detector's correction (7.5 of 22 s); up to 4 batches (32 samples in batches of 8 or more)
#: are sampled as before
SAMPLE_POSITIONS = 2048
SAMPLE_POSITIONS_TOTAL = 4 * SAMPLE_POSITIONS


#: row_medians splits arrays of at least this many values over threads (np.partition releases the
#: GIL: 1.5x on 2 cores for [256, 8192] float32), one block of rows each
MEDIAN_THREADS_FROM = 1 << 18


def row_medians(a: np.ndarray) -> np.ndarray:
    """``np.median(a, axis=1)`` of a 2-D array that is the caller's to reorder, partitioned in
    place instead of a copy, blocks of rows side by side in threads on large arrays (the
    partition is most of the cost); the same values, NaN-free input assumed."""
    k = a.shape[1]
    if k == 0:
        return np.median(a, axis=1)
    a = np.ascontiguousarray(a)  # rows in place (a difference of channel_samples' [C, K] comes column-major)
    half = k // 2
    kth = [half] if k % 2 else [half - 1, half]
    workers = min(8, os.cpu_count() or 1, a.shape[0])
    if workers > 1 and a.size >= MEDIAN_THREADS_FROM:
        from concurrent.futures import ThreadPoolExecutor

        blocks = np.array_split(np.arange(a.shape[0]), workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="quantkit-median") as pool:
            list(pool.map(lambda b: a[b[0]:b[-1] + 1].partition(kth, axis=1), [b for b in blocks if b.size]))
    else:
        a.partition(kth, axis=1)
    if k % 2:
        return a[:, half].copy()
    return (a[:, half - 1] + a[:, half]) / a.dtype.type(2)


def feed_positions(feeds: int) -> int:
    """Positions per channel to sample from each of ``feeds`` batches."""
    return max(1, min(SAMPLE_POSITIONS, SAMPLE_POSITIONS_TOTAL // max(1, feeds)))


def channel_samples(x: np.ndarray, n: int, positions: int = SAMPLE_POSITIONS) -> np.ndarray:
    """[C, K]: a strided sample of ``x``'s first ``n`` rows' values per channel (axis 1), the same
    positions for any tensor of the same shape: every ``step``-th of the positions (row, then
    the axes after the channel, in order; about ``positions`` of them), gathered without
    copying the tensor first."""
    x = np.asarray(x)[:n]
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    total = x3.shape[0] * x3.shape[2]
    rows, at = np.divmod(np.arange(0, total, max(1, total // positions)), x3.shape[2])
    return x3[rows, :, at].T.astype(np.float32)


@dataclass
class Reference:
    """The FP32 model's side of the correction, measured once and shared by every Q/DQ model
    corrected on the same samples (each method's, each mixed-precision variant of the fallback):
    per Conv output, the strided samples of each feed (``channel_samples``), its rank and type."""

    samples: dict[str, list[np.ndarray]]
    rank: dict[str, int]
    dtype: dict[str, np.dtype]


def reference(fp32: onnx.ModelProto, convs: Sequence[str], feeds: Sequence[Feed],
              session: Callable[[bytes], Any]) -> Reference:
    """The FP32 side of the correction: ``fp32``'s Conv outputs named ``convs`` on ``feeds``."""
    names = list(convs)
    sess = session(with_outputs_bytes(fp32, names))
    ref = Reference({t: [] for t in names}, {}, {})
    for feed, n in feeds:
        for t, x in zip(names, sess.run(names, dict(feed))):
            ref.samples[t].append(channel_samples(x, n, feed_positions(len(feeds))))
            ref.rank[t], ref.dtype[t] = np.ndim(x), np.asarray(x).dtype
    return ref


def correctable(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Convs of the Q/DQ model whose output is also a tensor of the FP32 model."""
    produced = {out for node in fp32.graph.node for out in node.output}
    return [n for n in qdq.graph.node if n.op_type == "Conv" and n.output[0] in produced]


def sequential_correction(qdq: onnx.ModelProto, fp32: onnx.ModelProto, feeds: Sequence[Feed],
                          session: Callable[[bytes], Any], *,
                          reference_session: Callable[[bytes], Any] | None = None,
                          cache: dict[tuple[str, ...], Reference] | None = None,
                          ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``qdq`` (a Q/DQ model made from ``fp32``) with corrected Conv biases (a copy; ``qdq`` itself
    when there is nothing to correct), and per corrected Conv node the shift subtracted from its
    bias: each Conv's output's per-channel median error against the FP32 model on ``feeds`` is 0,
    with the Convs before it corrected first (see the module docstring). A corrected Conv reads
    the new initializer ``<node>_bias_corrected`` (of the bias's type; the Conv's where it had none).

    Args:
        session: makes an inference session from a serialized model (``run(names, feed)``); runs
            the Q/DQ model's segments.
        reference_session: the same for the FP32 model's run (default ``session``).
        cache: FP32 references by the Conv outputs they hold, filled and reused: one FP32 run for
            every Q/DQ model corrected on the same ``feeds`` (pass the same dict each time).
    """
    convs = correctable(qdq, fp32)
    if not convs:
        return qdq, {}
    names = tuple(n.output[0] for n in convs)
    ref = None if cache is None else cache.get(names)
    if ref is None:
        ref = reference(fp32, names, feeds, reference_session or session)
        if cache is not None:
            cache[names] = ref
    rank, dtype = ref.rank, ref.dtype

    # 2-D Convs only: on a 1-D audio front end (silero-vad's STFT as a Conv over time, whose
    # signed outputs go into magnitudes) the correction cost 1.5 points of frame accuracy
    wanted = {n.name for n in convs if rank.get(n.output[0]) == 4}
    if not wanted:
        return qdq, {}
    work = onnx.ModelProto()
    work.CopyFrom(qdq)
    consts = constant_arrays(qdq)
    biases: dict[str, np.ndarray] = {}
    slots: dict[str, onnx.TensorProto] = {}
    for node in work.graph.node:
        if node.op_type != "Conv" or node.name not in wanted:
            continue
        channels = ref.samples[node.output[0]][0].shape[0]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = consts[node.input[2]] if has_bias else np.zeros(channels, dtype[node.output[0]])
        name = f"{node.name}_bias_corrected"
        biases[node.name] = bias
        work.graph.initializer.append(numpy_helper.from_array(bias, name))
        slots[node.name] = work.graph.initializer[-1]
        if has_bias:
            node.input[2] = name
        else:
            node.input.append(name)

    # the levels run as segments: each from the tensors the earlier segments computed (a Conv's
    # output already corrected: its bias is additive per channel) up to its own Convs' outputs
    consumers: dict[str, list[int]] = {}
    reads = [node_reads(node) for node in work.graph.node]
    for i, r in enumerate(reads):
        for t in r:
            consumers.setdefault(t, []).append(i)
    producer = {out: i for i, node in enumerate(work.graph.node) for out in node.output}
    inits = {i.name: i for i in work.graph.initializer}
    known: list[dict[str, np.ndarray]] = [dict(f) for f, _ in feeds]
    done: set[int] = set()
    shifts: dict[str, np.ndarray] = {}
    for level in conv_levels(work):
        level = [n for n in level if n.name in slots]
        if not level:
            continue
        outs = [n.output[0] for n in level]
        segment = _segment(reads, outs, producer, set(known[0]), done)
        done |= set(segment)
        produced = [t for i in segment for t in work.graph.node[i].output if t]
        keep = [t for t in produced if t in outs or any(c not in done for c in consumers.get(t, ()))]
        seg_model = _segment_model(work, segment, reads, keep, known[0], inits)
        sess = session(seg_model.SerializeToString())
        feeds_in = [i.name for i in seg_model.graph.input]
        for k, (_, n) in enumerate(feeds):
            known[k].update(zip(keep, sess.run(keep, {t: known[k][t] for t in feeds_in})))
        for node in level:
            t = node.output[0]
            diff = np.concatenate([channel_samples(kn[t], n, feed_positions(len(feeds))) - r
                                   for kn, (_, n), r in zip(known, feeds, ref.samples[t])],
                                  axis=1)
            shift = row_medians(diff).astype(np.float64)
            shifts[node.name] = shift
            bias = biases[node.name]
            slots[node.name].CopyFrom(numpy_helper.from_array((bias.astype(np.float64) - shift).astype(bias.dtype),
                                                              slots[node.name].name))
            for kn in known:  # in place: ONNX Runtime's outputs are the segment's own arrays
                x = kn[t]
                step = shift.reshape((1, -1) + (1,) * (x.ndim - 2))
                if x.flags.writeable:
                    np.subtract(x, step.astype(x.dtype), out=x)
                else:
                    kn[t] = (x - step).astype(x.dtype)
        for kn in known:  # drop what no node left to run reads
            for t in [t for t in kn if t not in outs and all(c in done for c in consumers.get(t, ()))]:
                del kn[t]
    log.debug("bias correction: %d Conv(s)", len(shifts))
    return work, shifts


def _segment(reads: Sequence[Sequence[str]], outputs: Sequence[str], producer: Mapping[str, int],
             known: set[str], done: set[int]) -> list[int]:
    """Indices (in graph order) of the nodes not yet run that compute ``outputs`` from ``known``
    tensors, initializers and Constants."""
    need: set[int] = set()
    stack = [t for t in outputs if t not in known]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t in known:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None or i in done or i in need:
            continue
        need.add(i)
        stack.extend(reads[i])
    return sorted(need)


def _segment_model(model: onnx.ModelProto, segment: Sequence[int], reads: Sequence[Sequence[str]],
                   outputs: Sequence[str], known: Mapping[str, np.ndarray],
                   inits: Mapping[str, onnx.TensorProto]) -> onnx.ModelProto:
    """A model of the ``segment`` nodes: known tensors they read are its inputs."""
    from onnx import helper

    nodes = [model.graph.node[i] for i in segment]
    read = list(dict.fromkeys(t for i in segment for t in reads[i]))
    graph = onnx.GraphProto(name="segment")
    graph.node.extend(nodes)
    graph.initializer.extend(inits[t] for t in read if t in inits)
    graph.input.extend(helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(known[t].dtype), None)
                       for t in read if t in known and t not in inits)
    graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.graph.CopyFrom(graph)
    return out
