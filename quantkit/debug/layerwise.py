"""Where INT8 error enters and how it grows: the FP32 model and its Q/DQ model side by side.

For every Q/DQ pair of the INT8 model (found by reading its graph, so Q/DQ models written by
ONNX Runtime, Model Optimizer or NNCF work as well as quantkit's):

    activation x (a tensor of the FP32 model, matched by following the DequantizeLinear back to
    the QuantizeLinear and the float tensor it reads)
      local error        x_fp32 against fakequant(x_fp32) with the INT8 model's scale:
                         the error this pair adds on its own, split into clipping (values
                         beyond the range) and rounding, with the share of values clipped
      accumulated error  x_fp32 against the INT8 model's dequantized x (the DequantizeLinear's
                         output): this pair's error and everything upstream; read at the DQ
                         output, so tools that fold a ReLU into the QuantizeLinear compare alike
    weight w
      per output channel, w_fp32 against the weight the INT8 model computes with

Everything is streamed: per pair a handful of sums, so memory does not depend on the number of
images.

A Q/DQ model made with depthwise equalization (``quantkit.onnx.equalize``) quantizes tensors and
weights that the user's FP32 model does not have: an activation ``Mul(x, s)`` with a constant
``s`` is matched to the FP32 tensor ``x`` times ``s`` (any tool's graph of that form), and a
weight recorded in the model's equalization metadata to the original weight divided by ``s``
per output channel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from quantkit.backends.base import output_batch_axes, real_rows, samples_first
from quantkit.calibrators.collectors import batch_rows
from quantkit.datasets.batching import Batch, take_rows
from quantkit.errors import InputError, ModelError
from quantkit.onnx.equalize import equalizations_of
from quantkit.onnx.model import (as_model, constant_arrays, einsum_as_matmul, fold_weight_dequantize,
                                 initializer_arrays)


@dataclass(frozen=True)
class QdqPoint:
    """One quantized tensor of a Q/DQ model.

    Attributes:
        tensor: the float tensor that is quantized (its name in the FP32 model).
        kind: ``activation`` or ``weight``.
        scale, zero_point: as the model stores them (per tensor, or per channel along ``axis``).
        qmin, qmax: the integer range (-128..127 for int8, 0..255 for uint8).
        depth: position of the pair in the graph (topological order of its DequantizeLinear).
        consumers: the nodes that read the dequantized tensor.
        stored: for weights kept as integers in the model (ONNX Runtime's QDQ format): the
            integer initializer; None when the model stores float weights behind a Q/DQ pair.
        dq_output: the DequantizeLinear's output (some tools give it the original tensor's
            name and rename the tensor the QuantizeLinear reads, e.g. ONNX Runtime on outputs).
    """

    tensor: str
    kind: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    qmin: int
    qmax: int
    depth: int
    consumers: tuple[str, ...]
    stored: str | None = None
    dq_output: str = ""
    #: the axis of the input channels its readers reduce over (Conv: 1; MatMul/Gemm: the
    #: contraction axis), None when they differ or are other ops: per-channel local error there
    channel_axis: int | None = None

    def fake_quant(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fakequant(x), mask of the values clipped), in float64."""
        s, z = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        q = np.rint(x / s) + z
        clipped = (q < self.qmin) | (q > self.qmax)
        return (np.clip(q, self.qmin, self.qmax) - z) * s, clipped

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """The float values of stored integers ``q`` (float64)."""
        q = q.astype(np.float64)
        return (q - self._broadcast(self.zero_point, q)) * self._broadcast(self.scale, q)

    def _broadcast(self, v: np.ndarray, x: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 0 or self.axis is None:
            return v.reshape(())
        shape = [1] * x.ndim
        shape[self.axis % x.ndim] = v.size
        return v.reshape(shape)


def qdq_points(model: onnx.ModelProto) -> list[QdqPoint]:
    """Every DequantizeLinear of ``model`` traced back to the float tensor it stands for."""
    consts = initializer_arrays(model)
    # scales and zero points through layout ops too: torch's exporter writes one int8 zero point and
    # hands it to every other Q/DQ pair through an Identity (a QAT export read as uint8 without this)
    values = constant_arrays(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    axes: dict[str, set[int | None]] = {}  # tensor -> the input-channel axis of each read
    for n in model.graph.node:
        for slot, i in enumerate(n.input):
            readers.setdefault(i, []).append(n.name or n.op_type)
            axes.setdefault(i, set()).add(_input_channel_axis(n, slot))
    points = []
    for depth, node in enumerate(model.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        scale = values.get(node.input[1]) if len(node.input) > 1 else None
        zp = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            continue  # a computed scale (dynamic quantization): nothing to check against
        # one scale in a [1]-shaped array (ONNX Runtime's bias DQs) is per tensor too
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if np.asarray(scale).size > 1 else None
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            tensor, stored = q.input[0], None
            if zp is None and len(q.input) > 2 and q.input[2]:
                zp = values.get(q.input[2])
            kind = "weight" if tensor in consts else "activation"
        elif src in consts:
            tensor, stored, kind = src, src, "weight"
        else:
            continue  # a DQ of something else (e.g. a computed integer tensor)
        zp_arr = np.zeros_like(np.asarray(scale, dtype=np.float64)) if zp is None else np.asarray(zp)
        signed = zp is None and stored is not None and consts[stored].dtype == np.int8 or \
            zp is not None and np.asarray(zp).dtype == np.int8
        qmin, qmax = (-128, 127) if signed else (0, 255)
        read_axes = axes.get(node.output[0], {None})
        points.append(QdqPoint(tensor, kind, np.asarray(scale, np.float64), zp_arr.astype(np.float64), axis,
                               qmin, qmax, depth, tuple(readers.get(node.output[0], ())), stored, node.output[0],
                               next(iter(read_axes)) if len(read_axes) == 1 else None))
    return points


def _input_channel_axis(node: onnx.NodeProto, slot: int) -> int | None:
    """The axis of input ``slot`` that ``node`` sums over with one weight per index (its input
    channels), or None."""
    if node.op_type in ("Conv", "ConvTranspose") and slot == 0:
        return 1
    if node.op_type == "MatMul" and slot in (0, 1):
        return -1 if slot == 0 else -2
    if node.op_type == "Gemm" and slot in (0, 1):
        transposed = next((a.i for a in node.attribute if a.name == ("transA" if slot == 0 else "transB")), 0)
        return (-2 if transposed else -1) if slot == 0 else (-1 if transposed else -2)
    return None


# ------------------------------------------------------------------ streamed statistics
@dataclass
class _PointStats:
    sig: float = 0.0
    local_noise: float = 0.0
    clip_noise: float = 0.0
    clipped: int = 0
    values: int = 0
    acc_noise: float = 0.0
    acc_sig: float = 0.0
    acc_skipped: int = 0  # batches whose INT8 tensor had another number of rows (a data-dependent shape)
    #: per input channel (``QdqPoint.channel_axis``): signal and local noise; None without channels
    channel_sig: np.ndarray | None = None
    channel_noise: np.ndarray | None = None

    def update(self, point: QdqPoint, ref: np.ndarray, test: np.ndarray) -> None:
        x = ref.astype(np.float64)
        fq, clipped = point.fake_quant(x)
        err = (fq - x) ** 2
        ax = point.channel_axis
        if ax is not None and x.ndim >= 2 and -x.ndim <= ax < x.ndim:
            others = tuple(i for i in range(x.ndim) if i != ax % x.ndim)
            sig_c, noise_c = (x * x).sum(axis=others), err.sum(axis=others)
            if self.channel_sig is None:
                self.channel_sig, self.channel_noise = sig_c, noise_c
            elif self.channel_sig.shape == sig_c.shape and self.channel_noise is not None:
                self.channel_sig, self.channel_noise = self.channel_sig + sig_c, self.channel_noise + noise_c
        self.sig += float((x * x).sum())
        self.local_noise += float(err.sum())
        self.clip_noise += float(err[clipped].sum())
        self.clipped += int(clipped.sum())
        self.values += x.size
        if test.shape != x.shape:  # e.g. the boxes NonMaxSuppression kept: the local error only
            self.acc_skipped += 1
            return
        d = test.astype(np.float64) - x
        self.acc_noise += float((d * d).sum())
        self.acc_sig += float((x * x).sum())


#: a weight's output channel whose power is at most this share of its strongest channel's is dead
#: (pruned): left out of the worst channels (``WeightError.dead_channels``)
DEAD_CHANNEL_POWER = 1e-20


def _db(sig: float, noise: float) -> float:
    """10 log10(sig / noise): inf without noise, -inf without signal or with infinite noise (an
    attention mask's -inf where the INT8 model has a finite value: ONNX Runtime's MiniLM), NaN
    where both are infinite."""
    if noise == 0.0:
        return math.inf
    ratio = sig / noise
    if math.isnan(ratio):
        return math.nan
    return -math.inf if ratio == 0.0 else math.inf if math.isinf(ratio) else 10.0 * math.log10(ratio)


@dataclass(frozen=True)
class PointError:
    """Error at one quantized activation (dB: higher is closer to FP32)."""

    tensor: str
    depth: int
    local_sqnr_db: float
    accumulated_sqnr_db: float
    clipped_share: float
    clipping_share_of_error: float
    consumers: tuple[str, ...]
    #: the local error as the readers' weights see it (each input channel's error weighted by the
    #: energy of the weights that read it: ``channel_weights``), the input channel with the largest
    #: share of that error, and the share; None where the readers are not Conv/MatMul/Gemm
    weighted_local_sqnr_db: float | None = None
    worst_channel: int | None = None
    worst_channel_share: float | None = None


def _channel_figures(s: "_PointStats", weights: np.ndarray | None) -> tuple[float | None, int | None, float | None]:
    """(weighted local SQNR, worst input channel, its share of the weighted error)."""
    if s.channel_sig is None or s.channel_noise is None or s.channel_sig.size < 2:
        return None, None, None
    w = np.ones_like(s.channel_sig) if weights is None or weights.shape != s.channel_sig.shape else weights
    noise = w * s.channel_noise
    total = float(noise.sum())
    if total == 0.0:
        return math.inf, None, None
    c = int(np.argmax(noise))
    return _db(float((w * s.channel_sig).sum()), total), c, float(noise[c]) / total


@dataclass(frozen=True)
class WeightError:
    """Error of one quantized weight: over all of it and per output channel."""

    tensor: str
    depth: int
    sqnr_db: float
    worst_channel_sqnr_db: float
    worst_channels: list[int]
    consumers: tuple[str, ...]
    #: "weight", or "bias" for a bias stored as int32 (ONNX Runtime's: its scale the input's times
    #: the weight's, a few channels far below the rest whenever the input scale is coarse)
    kind: str = "weight"
    #: output channels left out of the worst ones: their power is under ``DEAD_CHANNEL_POWER`` of
    #: the weight's strongest channel (pruned channels, exported as denormals or zeros)
    dead_channels: int = 0


@dataclass(frozen=True)
class DebugReport:
    """Layer-wise error of a Q/DQ model against its FP32 model on one data set."""

    reference: str
    test: str
    num_samples: int
    activations: list[PointError]
    weights: list[WeightError]
    outputs: list[Any] = field(default_factory=list)
    #: a model declares a dynamic batch but runs one sample at a time only (``OrtRunner.one_at_a_time``)
    one_at_a_time: bool = False

    def worst_first(self) -> list[PointError]:
        """Activations by the error they add on their own as their readers see it, lowest first:
        the local SQNR weighted by the readers' weights where it was computed and lower (a quiet
        channel the weights amplify), else the local SQNR."""
        return sorted(self.activations, key=lambda p: (self.seen_sqnr_db(p), p.depth))

    @staticmethod
    def seen_sqnr_db(p: PointError) -> float:
        """``p``'s local SQNR, or its weighted one where that is lower."""
        w = p.weighted_local_sqnr_db
        return p.local_sqnr_db if w is None or not math.isfinite(w) else min(p.local_sqnr_db, w)

    def quiet_channels(self) -> list[PointError]:
        """Activations where one input channel dominates the error the readers' weights see and
        that weighted error is well above the unweighted one, worst first."""
        out = [p for p in self.activations if p.weighted_local_sqnr_db is not None and p.worst_channel_share
               and p.worst_channel_share >= QUIET_CHANNEL_SHARE
               and p.weighted_local_sqnr_db < p.local_sqnr_db - QUIET_CHANNEL_GAP_DB]
        return sorted(out, key=lambda p: p.weighted_local_sqnr_db or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"layerwise": {"reference": self.reference, "test": self.test, "num_samples": self.num_samples,
                              "activations": [asdict(p) for p in self.activations],
                              "weights": [asdict(w) for w in self.weights],
                              "outputs": [asdict(o) for o in self.outputs]}}

    def table(self, rows: int = 15) -> str:
        lines = [f"{self.test} vs {self.reference} on {self.num_samples} samples: {len(self.activations)} quantized "
                 f"activations, {len(self.weights)} weights; worst first (the lower of local and weighted dB)",
                 f"  {'tensor':<36} {'depth':>5} {'local dB':>9} {'clipped':>8} {'clip/err':>8} {'accum dB':>9} "
                 f"{'weighted dB, worst channel':>26}"]
        for p in self.worst_first()[:rows]:
            worst = "" if p.weighted_local_sqnr_db is None else (
                f"{p.weighted_local_sqnr_db:.2f}" + (f" #{p.worst_channel} {100 * (p.worst_channel_share or 0):.0f}%"
                                                     if p.worst_channel is not None else ""))
            lines.append(f"  {short_name(p.tensor):<36} {p.depth:>5} {p.local_sqnr_db:>9.2f} {100 * p.clipped_share:>7.3f}% "
                         f"{100 * p.clipping_share_of_error:>7.1f}% {p.accumulated_sqnr_db:>9.2f} {worst:>26}")
        for p in self.quiet_channels()[:3]:
            lines.append(f"  quiet channel: {short_name(p.tensor)} input channel {p.worst_channel} carries "
                         f"{100 * (p.worst_channel_share or 0):.0f}% of its error as the readers' weights see it "
                         f"({p.weighted_local_sqnr_db:.2f} dB against {p.local_sqnr_db:.2f} dB unweighted): a channel "
                         "the per-tensor scale leaves few INT8 levels that the weights amplify (`calibrate --max-drop` "
                         "ranks it; `--exclude` its readers)")
        worst_w = sorted(self.weights, key=lambda w: (w.worst_channel_sqnr_db, w.sqnr_db))[:3]
        for w in worst_w:
            dead = (f"; {w.dead_channels} dead channel(s) left out, their weights ~0" if w.dead_channels else "")
            lines.append(f"  {w.kind} {short_name(w.tensor)}: {w.sqnr_db:.2f} dB, worst channel {w.worst_channel_sqnr_db:.2f} dB "
                         f"(channels {w.worst_channels}{dead})")
        for o in self.outputs:
            differs = getattr(o, "shape_differs", 0)
            if differs and differs == getattr(o, "batches", 0):
                lines.append(f"  output {o.name}: a data-dependent shape that differs from FP32's on every batch "
                             "(no figures)")
                continue
            if getattr(o, "match", None) is not None:
                lines.append(f"  output {o.name}: integers or flags, {o.match:.4f} of the elements equal FP32's")
                continue
            lines.append(f"  output {o.name}: SQNR {o.sqnr_db:.2f} dB"
                         + ("" if math.isnan(o.cosine_mean) else f", cosine {o.cosine_mean:.5f}")
                         + (f" ({differs} of {o.batches} batches left out: their shapes differ)" if differs else "")
                         + (" (through a TopK: rows pair up by rank, near ties reorder them)"
                            if getattr(o, "value_ordered", False) else "")
                         + _worst_part(o))
        return "\n".join(lines)


#: the table names a tensor's worst input channel when it carries at least this share of the
#: error its readers' weights see, and that weighted local SQNR is this much below the unweighted
QUIET_CHANNEL_SHARE = 0.3
QUIET_CHANNEL_GAP_DB = 6.0


def short_name(name: str, width: int = 36) -> str:
    """``name`` in at most ``width`` characters for a table: its start and its end around "...".
    Exporters' names differ in the middle as often as at the end (tf2onnx's
    ``model/block_3/conv/Conv2D:0_equalized``), so the tail alone read alike on several rows."""
    if len(name) <= width:
        return name
    head = (width - 3) // 2
    return name[:head] + "..." + name[len(name) - (width - 3 - head):]


def _tensors_of(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {i.name for i in g.input} | {o for n in g.node for o in n.output} | {i.name for i in g.initializer}


#: layout ops an exporter puts between a weight's DequantizeLinear and its reader (and folds into a
#: constant on the float side)
_WEIGHT_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _fp32_weight(fp32: onnx.ModelProto, int8: onnx.ModelProto, point: QdqPoint,
                 consts: dict[str, np.ndarray], shape: tuple[int, ...] | None = None) -> tuple[str, np.ndarray]:
    """The FP32 model's weight that ``point`` quantizes: the same name, or (for weights stored
    as integers under a new name) the same input of the same consumer node, or the constant a
    layout op after the DequantizeLinear was folded into (laid out back to ``shape``, the INT8
    model's weight's)."""
    if point.stored is None and point.tensor in consts:
        return point.tensor, consts[point.tensor]
    dq_out = point.dq_output or next((n.output[0] for n in int8.graph.node
                                      if n.op_type == "DequantizeLinear" and n.input[0] == point.tensor), None)
    for node in int8.graph.node if dq_out else ():
        if dq_out in node.input:
            slot = list(node.input).index(dq_out)
            twin = next((n for n in fp32.graph.node if n.name and n.name == node.name), None)
            if twin is not None and slot < len(twin.input) and twin.input[slot] in consts:
                return twin.input[slot], consts[twin.input[slot]]
    # behind layout ops on the INT8 side that the FP32 export folded into its constant (torch's
    # Linear on a 3-D input: DQ -> Transpose -> MatMul beside MatMul(x, W^T)): the reader's twin's
    # constant, laid out back as the weight is
    chain, t = [], dq_out
    while t:
        readers = [n for n in int8.graph.node if t in n.input]
        if len(readers) != 1 or readers[0].op_type not in _WEIGHT_LAYOUT_OPS or readers[0].input[0] != t:
            break
        chain.append(readers[0])
        t = readers[0].output[0]
    if chain and t:
        reader = next((n for n in int8.graph.node if t in n.input), None)
        twin = None if reader is None or not reader.name else \
            next((n for n in fp32.graph.node if n.name == reader.name), None)
        slot = list(reader.input).index(t) if reader is not None else -1
        if twin is not None and slot < len(twin.input) and twin.input[slot] in consts:
            w = consts[twin.input[slot]]
            for node in reversed(chain):  # undo each layout op, the last first
                if node.op_type == "Transpose":
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    w = np.transpose(w, np.argsort(perm)) if perm else w.T
                else:
                    w = w.reshape(shape) if shape is not None and node is chain[0] else w
            if shape is None or tuple(w.shape) == tuple(shape):
                return twin.input[slot], w
    raise ModelError(f"the INT8 model's weight {point.tensor!r} has no counterpart in the FP32 model",
                     hint="give the FP32 model the Q/DQ model was made from")


def _equalized_weights(fp32_consts: dict[str, np.ndarray], int8: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Equalized weights of ``int8`` (its metadata) -> the FP32 model's equivalent: the original
    weight divided by the equalization factor of each output channel's input channel (depthwise)
    or of each input channel (group-1 Convs, MatMul/Gemm)."""
    out = {}
    for e in equalizations_of(int8):
        for new, orig in e.weights.items():
            w = fp32_consts.get(orig)
            if w is None or w.ndim <= e.divided_axis(new) or w.shape[e.divided_axis(new)] % e.scales.size:
                continue
            out[new] = e.original_weight(new, w.astype(np.float64))
    return out


#: a Q/DQ model's float weight is its FP32 model's (up to positive per-channel factors) when the
#: signs of at least this share of their values agree: another training of the same graph agrees
#: on about half
SIGN_AGREEMENT = 0.9


#: stored integers are a FP32 weight's, quantized with their scales, when at least this share of
#: them is within one step of it (rounding, AdaRound's choices and saturation aside)
STEP_AGREEMENT = 0.9
#: ... or, for weights a tool rescaled before storing them, when they are within this SQNR (dB)
STORED_MIN_DB = 10.0


def _check_stored(p: QdqPoint, deq: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
    """The weight the stored integers (``deq``: their values, ``QdqPoint.dequantize``) quantize:
    the FP32 weight ``w``, or ``w`` times positive factors along one axis (NNCF's SmoothQuant scales
    a MatMul's weight per input channel before storing it, as equalization does); refused when
    neither is: at least ``STEP_AGREEMENT`` of them within one step of ``p.fake_quant`` of it and
    the nonzero ones of its sign, or the values within ``STORED_MIN_DB`` of it. A coarse but
    faithful quantization (a per-tensor scale over channels of different ranges) passes however
    low its SQNR."""
    step = p._broadcast(p.scale, deq)

    def faithful(ref: np.ndarray) -> tuple[bool, float, float]:
        close = float((np.abs(deq - p.fake_quant(ref)[0]) <= 1.5 * step).mean()) if deq.size else 1.0  # one step
        nonzero = (deq != 0) & (ref != 0)
        agree = float((np.sign(deq) == np.sign(ref))[nonzero].mean()) if nonzero.any() else 1.0
        db = _db(float((ref * ref).sum()), float(((deq - ref) ** 2).sum()))
        return (close >= STEP_AGREEMENT and agree >= SIGN_AGREEMENT) or db >= STORED_MIN_DB, close, db

    ok, close, db = faithful(w)
    if ok:
        return w
    for axis in range(w.ndim if w.ndim >= 2 else 0):  # positive factors along one axis, fitted by least squares
        rest = tuple(a for a in range(w.ndim) if a != axis)
        den = (w * w).sum(axis=rest, keepdims=True)
        factors = np.where(den > 0, (deq * w).sum(axis=rest, keepdims=True) / np.where(den > 0, den, 1.0), 1.0)
        if (factors > 0).all() and faithful(w * factors)[0]:
            return w * factors
    raise ModelError(f"weight {name!r} differs from the FP32 model's ({db:.1f} dB; {100 * (1 - close):.0f}% of its "
                     "stored integers more than one step from the FP32 weight quantized with its scales): the Q/DQ "
                     "model is not derived from this FP32 model", hint="give the FP32 model the Q/DQ model was made from "
                     "(where it was, this weight or its scale was changed in the Q/DQ model afterwards)")


#: an INT8 model's own float weight is the FP32 weight times positive factors along its output and
#: input channels (equalization, SmoothQuant) to float32's precision: a larger relative difference
#: is another weight (a fine-tuned checkpoint of the same graph had kept every sign)
SCALED_WEIGHT_TOLERANCE = 1e-3


def _unscaled_difference(own: np.ndarray, w: np.ndarray, dtype: Any = np.float32) -> float:
    """How far ``own`` is from ``w`` times positive factors along its first two axes: the largest
    relative difference left after the best such factors (log-domain least squares over the
    values that are not tiny), 0.0 where it is exactly such a product. ``dtype``: what ``own``
    was stored in; its values near the smallest normal (float16's subnormals round to a few bits)
    are left out."""
    if own.shape != w.shape or own.ndim < 1 or not own.size:
        return 0.0
    tiny = 64 * float(np.finfo(dtype).tiny) if np.issubdtype(np.dtype(dtype), np.floating) else 0.0
    big = (np.abs(w) > 1e-3 * float(np.abs(w).max() or 1.0)) & (np.abs(own) > tiny)
    ratio = np.where(big, own / np.where(big, w, 1.0), 1.0)
    if (ratio[big] <= 0).any():
        return 1.0  # a sign flipped: no positive factor makes it
    rows = own.shape[1] if own.ndim >= 2 else 1
    cols = np.where(big, np.log(np.where(big, ratio, 1.0)), 0.0).reshape(own.shape[0], rows, -1)
    m3 = big.reshape(cols.shape)
    a = np.zeros((cols.shape[0], 1, 1))
    b = np.zeros((1, cols.shape[1], 1))
    n_a = np.maximum(m3.sum(axis=(1, 2), keepdims=True), 1)
    n_b = np.maximum(m3.sum(axis=(0, 2), keepdims=True), 1)
    for _ in range(100):  # alternate: each axis's mean log factor given the other's (sparse weights converge slower)
        a_new = ((cols - b) * m3).sum(axis=(1, 2), keepdims=True) / n_a
        b_new = ((cols - a_new) * m3).sum(axis=(0, 2), keepdims=True) / n_b
        moved = max(float(np.abs(a_new - a).max()), float(np.abs(b_new - b).max()))
        a, b = a_new, b_new
        if moved < 1e-9:
            break
    left = np.abs(cols - a - b)[m3]
    return float(np.expm1(left.max())) if left.size else 0.0


def weight_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto, points: Iterable[QdqPoint]) -> list[WeightError]:
    """Per-channel error of every quantized weight; refuses weights that are not the FP32 model's."""
    # the FP32 side with layout ops on constants folded: a weight behind a Transpose (an Einsum's
    # [n, k] matrix, tf2onnx's MatMul weights) is what the INT8 model quantizes
    fconsts, iconsts = constant_arrays(fp32), initializer_arrays(int8)
    equalized = _equalized_weights(fconsts, int8)
    nodes = {n.name: n for n in int8.graph.node}
    out = []
    for p in points:
        if p.stored is None and p.tensor in equalized and p.tensor not in fconsts:
            name, w = p.tensor, equalized[p.tensor]
        else:
            own_w = iconsts.get(p.tensor if p.stored is None else p.stored)
            name, w = _fp32_weight(fp32, int8, p, fconsts, None if own_w is None else tuple(own_w.shape))
        w = w.astype(np.float64)
        own = iconsts.get(p.tensor) if p.stored is None else None
        if p.stored is not None:
            deq = p.dequantize(iconsts[p.stored])
            if deq.shape == w.shape:
                w = _check_stored(p, deq, w, name)  # (rescaled per channel, where the tool rescaled it)
        elif own is not None and own.shape == w.shape:
            # the INT8 model's own float weight: it may be the FP32 model's times positive per-channel
            # factors (equalization, SmoothQuant), never other values (another training of the graph)
            stored_as, own = own.dtype, own.astype(np.float64)
            nonzero = (own != 0) & (w != 0)
            agree = float((np.sign(own) == np.sign(w))[nonzero].mean()) if nonzero.any() else 1.0
            if agree < SIGN_AGREEMENT:
                raise ModelError(f"weight {p.tensor!r} is not the FP32 model's {name!r} (the signs of "
                                 f"{100 * (1 - agree):.0f}% of its values differ): the Q/DQ model is not derived from "
                                 "this FP32 model", hint="give the FP32 model the Q/DQ model was made from")
            off = _unscaled_difference(own, w, stored_as)
            # float32 products are exact to 1e-7; a float16 weight's rounding is 2^-11 of each value
            if off > max(SCALED_WEIGHT_TOLERANCE, 8 * float(np.finfo(stored_as).eps)):
                theirs = "the FP32 model's weight" if name == p.tensor else f"the FP32 model's {name!r}"
                raise ModelError(f"weight {p.tensor!r} is not {theirs} times positive factors per channel (its "
                                 f"values differ from that by up to {100 * off:.2g}%): the Q/DQ model is not derived "
                                 "from this FP32 model (another checkpoint of the same graph?)",
                                 hint="give the FP32 model the Q/DQ model was made from")
            # its error is its own quantization's, however coarse (NNCF quantizes a weight that a
            # Constant node holds per tensor: 9.4 dB on PP-OCRv4's recogniser, and still its weight)
            w, deq = own, p.fake_quant(own)[0]
        elif own is not None:  # another shape: another network's weight of that name (refused below)
            deq = own
        else:
            try:
                deq = p.fake_quant(w)[0]
            except ValueError as err:  # its scales have another channel count
                raise ModelError(f"weight {name!r}: its scales in the INT8 model do not fit the FP32 model's weight "
                                 f"of shape {list(w.shape)}: the Q/DQ model is not derived from this FP32 model",
                                 hint="give the FP32 model the Q/DQ model was made from") from err
        if deq.shape != w.shape:
            raise ModelError(f"weight {name!r}: shape {list(deq.shape)} in the INT8 model, {list(w.shape)} in the "
                             "FP32 model: the Q/DQ model is not derived from this FP32 model",
                             hint="give the FP32 model the Q/DQ model was made from")
        total = _db(float((w * w).sum()), float(((deq - w) ** 2).sum()))
        if w.ndim == 0:  # a quantized scalar constant (ONNX Runtime's shared 2.0 of a normalization): one channel
            w, deq = w.reshape(1), deq.reshape(1)
        axis = p.axis if p.axis is not None else _output_channel_axis([nodes.get(c) for c in p.consumers], w.ndim)
        wc, dc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), np.moveaxis(deq, axis, 0).reshape(w.shape[axis], -1)
        power = (wc * wc).sum(axis=1)
        per = np.array([_db(float(s), float(((b - a) ** 2).sum())) for s, a, b in zip(power, wc, dc)])
        # a pruned channel (Paddle writes its weights as denormals, 1e-40) rounds to 0 at any scale: its
        # SQNR is 0 dB, and its output is 0 either way; the worst channels are those that carry signal
        dead = power <= DEAD_CHANNEL_POWER * power.max() if power.max() > 0 else np.zeros(len(power), bool)
        live = np.flatnonzero(~dead) if not dead.all() else np.arange(len(per))
        order = live[np.argsort(per[live], kind="stable")[:3]]
        bias = p.stored is not None and iconsts[p.stored].dtype == np.int32
        out.append(WeightError(name, p.depth, total, float(per[live].min()), [int(i) for i in order], p.consumers,
                               "bias" if bias else "weight", int(dead.sum()) if len(live) < len(per) else 0))
    return out


def _output_channel_axis(readers: Sequence[onnx.NodeProto | None], ndim: int) -> int:
    """A per-tensor weight's output channels, the axis its channels are reported along: a MatMul's
    [K, N] weight's N (a [K, 1] regression head has one channel, not K), a Gemm's per transB, a
    ConvTranspose's axis 1, else 0 (a Conv's)."""
    ops = {(n.op_type, next((a.i for a in n.attribute if a.name == "transB"), 0)) for n in readers if n is not None}
    if len(ops) != 1 or ndim < 2:
        return 0
    op, trans_b = ops.pop()
    return {"MatMul": ndim - 1, "Gemm": 0 if trans_b else 1, "ConvTranspose": 1}.get(op, 0)


def _batches(batches: Iterable[Any]) -> Iterator[Batch]:
    """``batches`` as Batch objects: a dict (input name -> array, samples on axis 0) is one batch
    of all its rows."""
    if isinstance(batches, (str, bytes, Mapping)) or not hasattr(batches, "__iter__"):
        raise InputError(f"batches must be an iterable of batches, got {type(batches).__name__}",
                         hint="quantkit.datasets.Batcher(source, input_names, batch_size), or dicts of input name -> array")
    for b in batches:
        if isinstance(b, Batch):
            yield b
        elif isinstance(b, Mapping) and b and all(isinstance(k, str) for k in b):
            feed = {k: np.asarray(v) for k, v in b.items()}
            rows = {len(v) if v.ndim else 0 for v in feed.values()}
            if len(rows) != 1 or 0 in rows:
                raise InputError(f"a batch's arrays must have the same number of samples on axis 0, got "
                                 f"{ {k: list(v.shape) for k, v in feed.items()} }")
            n = rows.pop()
            yield Batch(feed, None, tuple(range(n)), n)
        else:
            raise InputError(f"each batch must be a quantkit Batch or a dict of input name -> array, got "
                             f"{type(b).__name__}")


def _worst_part(o: Any) -> str:
    """For an output a Concat writes along axis 1 (a detector's boxes beside its scores): its worst
    part, where it reads lower than the whole output (``OutputMetrics.worst_part``)."""
    worst = getattr(o, "worst_part", None)
    return "" if worst is None else f"; its worst part, channels {worst[0]}-{worst[1]} of axis 1, {worst[2]:.2f} dB"


def derivation_error(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> str | None:
    """Why the Q/DQ model ``int8``'s quantized weights are not ``fp32``'s (``weight_errors``'
    refusal, the first weight named), or None where they are (or where nothing tells: no weight
    pairs). ``compare`` notes it: its figures then measure another model's weights too (another
    checkpoint, a fine-tuning), not INT8's error alone."""
    from quantkit.onnx.contrib import standard_ops

    points = [p for p in qdq_points(int8) if p.kind == "weight"]
    if not points:
        return None
    try:
        fp32 = einsum_as_matmul(standard_ops(fold_weight_dequantize(fp32, source="fp32"), warn=False))
        weight_errors(fp32, int8, points)
    except ModelError as err:
        return str(err)
    return None


def layerwise_error(fp32: onnx.ModelProto | str | os.PathLike[str], int8: onnx.ModelProto | str | os.PathLike[str],
                    batches: Iterable[Any], *, threads: int | None = None, reference_name: str = "fp32",
                    test_name: str = "int8", on_batch: Callable[[int], None] | None = None) -> DebugReport:
    """Run both models side by side on ``batches`` (``quantkit.datasets.Batch`` objects, or dicts
    of input name -> array with the samples on axis 0) and measure the error at every Q/DQ pair.

    Raises:
        ModelError: the INT8 model has no Q/DQ pairs, or is not derived from ``fp32`` (the
            message names the first tensor that does not match).
        InputError: a model or a batch of another kind.
    """
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.compare import _OutputStats
    from quantkit.onnx.contrib import standard_ops

    fp32, int8 = as_model(fp32, f"{reference_name} must be"), as_model(int8, f"{test_name} must be")
    batches = _batches(batches)
    fp32 = fold_weight_dequantize(fp32, source=reference_name)  # a weight-only model: its float weights
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in fp32.graph.node):
        raise ModelError(f"{reference_name}, given as the FP32 reference, has QuantizeLinear/DequantizeLinear "
                         "nodes", hint="the order is `quantkit debug FP32.onnx INT8.onnx`, the FP32 model first")
    # as quantkit prepares it: ONNX Runtime's fused ops as standard ones, its MatMul twins reading the same weights
    fp32 = einsum_as_matmul(standard_ops(fp32, warn=False))
    points = qdq_points(int8)
    if not points:
        qop = sorted({n.op_type for n in int8.graph.node if n.op_type.startswith("QLinear")
                      or n.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")})
        if qop:  # ONNX Runtime's operator-oriented format: integer ops, no tensor left to compare
            raise ModelError(f"{test_name} is in the operator-oriented (QOperator) format ({', '.join(qop[:3])}): "
                             "debug reads the Q/DQ format, where each quantized tensor keeps a float twin to compare",
                             hint="quantize_static(..., quant_format=QuantFormat.QDQ), or quantkit calibrate")
        raise ModelError(f"{test_name} has no QuantizeLinear/DequantizeLinear pairs with constant scales",
                         hint="give a Q/DQ model (quantkit calibrate writes one)")
    known = _tensors_of(fp32)
    # the FP32 tensor each activation pair stands for, and where the INT8 model keeps its own
    # unquantized value: the QuantizeLinear's input, whatever a tool renamed
    fp32_name: dict[str, str] = {}
    factor: dict[str, np.ndarray] = {}  # equalized tensors: the FP32 tensor times this
    scaled = _scaled_tensors(int8, known)
    for p in (p for p in points if p.kind == "activation"):
        match = p.tensor if p.tensor in known else p.dq_output if p.dq_output in known else None
        if match is None and p.tensor in scaled:
            match, factor[p.tensor] = scaled[p.tensor]
        if match is None:
            raise ModelError(f"the INT8 model quantizes {p.tensor!r}, which the FP32 model does not have: the Q/DQ "
                             "model is not derived from this FP32 model",
                             hint="give the FP32 model the Q/DQ model was made from (for a QAT export, "
                             "quantkit.qat.export_onnx(..., quantized=False) writes it)")
        fp32_name.setdefault(p.tensor, match)
    weights = weight_errors(fp32, int8, [p for p in points if p.kind == "weight"])
    names = list(fp32_name)  # INT8 model's names
    channel_w = channel_weights(int8, points)
    stats = {n: _PointStats() for n in names}
    by_name = {p.tensor: p for p in points if p.kind == "activation"}
    samples = 0
    with OrtRunner(fp32, threads=threads, capture=[fp32_name[n] for n in names], name=reference_name) as ref, \
            OrtRunner(int8, threads=threads, capture=[by_name[n].dq_output for n in names], name=test_name) as test:
        if ref.output_names != test.output_names:
            raise ModelError(f"the models have different outputs: {ref.output_names} vs {test.output_names}",
                             hint="give the FP32 model the Q/DQ model was made from")
        outs = {n: _OutputStats(n) for n in ref.output_names}
        fixed = ref.input_specs[0].static_batch is not None if ref.input_specs else True
        chunk: int | None = None
        whole = False  # batches as given: the model does not run one sample alone
        for batch in batches:
            n_batch, padded_batch = batch.size, getattr(batch, "num_rows", batch.size)
            axes = getattr(batch, "batch_axes", {})
            if chunk is None and not (fixed or whole or n_batch <= 1):
                try:
                    _, one = ref.infer_captured(take_rows(batch.feed, axes, 0, 1), axes)
                except InputError:  # a model of whole groups of rows (ICLabel averages each component's
                    whole = True  # four): the batches unsplit (a batch that does not run either says why)
                else:
                    per_sample = 2 * max(1, sum(np.asarray(a).nbytes for a in one.values()))
                    chunk = int(max(1, min(n_batch, CAPTURE_BUDGET_BYTES // per_sample)))
            if fixed or whole or n_batch <= 1:
                parts = [(batch.feed, n_batch, padded_batch)]
            else:  # parts whose captured tensors (both models) fit CAPTURE_BUDGET_BYTES: memory flat in the batch
                assert chunk is not None
                parts = [(take_rows(batch.feed, axes, s, s + chunk), min(chunk, n_batch - s), min(chunk, n_batch - s))
                         for s in range(0, n_batch, chunk)]
            for feed, n, padded in parts:
                samples += _compare_part(ref, test, feed, axes, n, padded, names, fp32_name, by_name, factor, stats,
                                         outs)
            if on_batch is not None:
                on_batch(n_batch)
    if not samples:  # a report of no sample read as a perfect model (inf dB everywhere)
        raise InputError("the batches hold no sample to compare the models on", hint="give at least one batch")
    errors = []
    for name in names:
        s, p = stats[name], by_name[name]
        errors.append(PointError(name if name in factor else fp32_name[name], p.depth, _db(s.sig, s.local_noise),
                                 _db(s.acc_sig, s.acc_noise) if s.acc_sig or s.acc_noise else math.nan,
                                 s.clipped / max(s.values, 1), s.clip_noise / s.local_noise if s.local_noise else 0.0,
                                 p.consumers, *_channel_figures(s, channel_w.get(name))))
    concat = dict(getattr(ref, "concat_parts", {}))  # (``parts`` above: a batch's pieces)
    outputs = [st.result(st.name in getattr(ref, "value_ordered", ()), parts=concat.get(st.name, ()))
               for st in outs.values()]
    return DebugReport(reference_name, test_name, samples, errors, weights, outputs,
                       ref.one_at_a_time or test.one_at_a_time)


def channel_weights(model: onnx.ModelProto, points: Sequence[QdqPoint]) -> dict[str, np.ndarray]:
    """Activation of ``points`` (``qdq_points(model)``) -> per input channel, the energy of the
    weights its readers multiply that channel by (the sum over readers of the squared weights of that input channel; a Conv whose
    output only feeds a BatchNormalization has its output channels scaled by the normalization's
    gain first, since an unfolded BN multiplies the channel after the Conv). Left out where a
    reader's other operand is not a constant (attention) or the shapes do not fit."""
    from quantkit.onnx.model import constant_arrays

    consts = constant_arrays(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(n.input):
            readers.setdefault(i, []).append(n)
    weight_of = {p.dq_output: p for p in points if p.kind == "weight"}  # a DequantizeLinear's output -> its pair

    def value(name: str) -> np.ndarray | None:
        """A weight's float values: a constant, or the weight behind a DequantizeLinear (its float
        original, or the integers it stores, dequantized)."""
        if name in consts:
            return consts[name].astype(np.float64)
        p = weight_of.get(name)
        if p is None:
            return None
        if p.stored is None:
            return consts[p.tensor].astype(np.float64) if p.tensor in consts else None
        return p.dequantize(consts[p.stored])

    def bn_gain(conv: onnx.NodeProto) -> np.ndarray | None:
        users = readers.get(conv.output[0], [])
        if len(users) != 1 or users[0].op_type != "BatchNormalization" or users[0].input[0] != conv.output[0]:
            return None
        bn = users[0]
        if not all(i in consts for i in (bn.input[1], bn.input[4])):
            return None
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        return consts[bn.input[1]].astype(np.float64) / np.sqrt(consts[bn.input[4]].astype(np.float64) + eps)

    def energy(node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        other = 1 if slot == 0 else 0
        if len(node.input) <= other or not node.input[other]:
            return None
        w = value(node.input[other])
        if w is None:
            return None
        if node.op_type == "Conv" and w.ndim >= 3:
            gain = bn_gain(node)
            if gain is not None and gain.shape == (w.shape[0],):
                w = w * gain.reshape([-1] + [1] * (w.ndim - 1))
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            per_group_out = w.shape[0] // max(groups, 1)
            e = (w * w).reshape(groups, per_group_out, w.shape[1], -1).sum(axis=(1, 3))  # [groups, in per group]
            return e.reshape(-1)
        if node.op_type == "ConvTranspose" and w.ndim >= 3:
            return (w * w).reshape(w.shape[0], -1).sum(axis=1)  # [C_in, C_out/g, ...]
        if node.op_type in ("MatMul", "Gemm") and w.ndim == 2:
            attrs = {a.name: a.i for a in node.attribute}
            transposed = attrs.get("transB" if slot == 0 else "transA", 0) if node.op_type == "Gemm" else 0
            # slot 0: rows of B are the input channels; slot 1: columns of A
            axis = (1 if transposed else 0) if slot == 0 else (0 if transposed else 1)
            return (w * w).sum(axis=1 - axis)
        return None

    out: dict[str, np.ndarray] = {}
    for p in points:
        if p.kind != "activation" or p.channel_axis is None:
            continue
        total: np.ndarray | None = None
        for node in readers.get(p.dq_output, []):
            slots = [k for k, i in enumerate(node.input) if i == p.dq_output]
            e = energy(node, slots[0]) if len(slots) == 1 else None
            if e is None or (total is not None and total.shape != e.shape):
                total = None
                break
            total = e if total is None else total + e
        if total is not None and float(total.mean()) > 0:
            out[p.tensor] = total / float(total.mean())
    return out


def _scaled_tensors(int8: onnx.ModelProto, known: set[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Tensors of ``int8`` computed as ``Mul(x, c)`` (either order) from a tensor ``x`` of the
    FP32 model and a constant ``c`` (an equalization): name -> (x, c)."""
    consts = initializer_arrays(int8)
    out = {}
    for node in int8.graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        a, b = node.input
        if a in consts and b not in consts:
            a, b = b, a
        if a in known and b in consts and np.issubdtype(consts[b].dtype, np.floating):
            out[node.output[0]] = (a, consts[b].astype(np.float64))
    return out


#: captured tensors of both models for one part of a batch in ``layerwise_error`` stay within this
#: (a 1-D signal model with [N, 256, 7500] activations took 7.7 GB at batch 32)
CAPTURE_BUDGET_BYTES = 512 * 2**20


def _compare_part(ref: Any, test: Any, feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None], n: int,
                  padded: int, names: Sequence[str],
                  fp32_name: Mapping[str, str], by_name: Mapping[str, Any], factor: Mapping[str, np.ndarray],
                  stats: Mapping[str, Any], outs: Mapping[str, Any]) -> int:
    """Both models on one part of a batch: the statistics updated; the real samples in it."""
    ref_out, ref_cap = ref.infer_captured(dict(feed), axes)
    test_out, test_cap = test.infer_captured(dict(feed), axes)
    for name in names:
        a, b = batch_rows(ref_cap[fp32_name[name]], n, padded), batch_rows(test_cap[by_name[name].dq_output], n, padded)
        if name in factor:
            a = a * factor[name]
        if a.shape != b.shape and (a.ndim != b.ndim or sum(x != y for x, y in zip(a.shape, b.shape)) > 1):
            # (one axis apart: a data-dependent shape, the rows NonMaxSuppression kept; local error only)
            raise ModelError(f"tensor {name!r} has shape {list(a.shape)} in the FP32 model and "
                             f"{list(b.shape)} in the INT8 model: not derived from this FP32 model")
        stats[name].update(by_name[name], a, b)
    axes = output_batch_axes(ref)
    ref_out, test_out = samples_first(ref_out, axes), samples_first(test_out, axes)
    for o, st in outs.items():
        st.update(real_rows(ref_out[o], n, padded), real_rows(test_out[o], n, padded))
    return n
