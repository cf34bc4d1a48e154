"""The gradient (first-order) sensitivity estimator: every group's only-float error from one
forward and one backward pass over the ranking subset (needs torch).

The exact ranking (``quantkit.debug.sensitivity``) runs, per group, the network after the
group's first node: ~G/2 FP32 passes for a chain of G groups. Here every group g is gated in
one torch evaluation of the FP32 graph (``quantkit.onnx.torch_exec``):

    activation x read by g's nodes:   x_g = FQ(x) + (a_g - 1) * (FQ(x) - x)       (FQ(x) - x detached)
    weighted node of g (W per channel): y = op(x_g, Wq) + (a_g - 1) * op(x_g, Wq - W)   (the second term detached)

with FQ exactly the pairs the INT8 model has (``torch.fake_quantize_per_tensor_affine``: the
scale amax/127 of the plain method, round half to even, int8 saturation; its gradient is the
straight-through estimate inside the range, 0 where it clips), Wq per output channel as
``insert_qdq`` writes it. At a = 1 this is the INT8 model (float fake quantization, as the
switchable model of the exact ranking computes it). With r = y - y_fp32 over the subset and
L = ||r||^2, one backward pass gives d_g = dL/da_g for every g. With e_g the output error group g
adds, L(a_g = 0) = L - d_g + ||e_g||^2 to first order in the network, and d_g = 2<r, e_g> =
2||e_g||^2 when e_g is uncorrelated with the other groups' errors, so:

    only_float_error(g)     ~= (L - d_g / 2) / ||y_fp32||^2     (group g back to float)
    only_quantized_error(g) ~= (d_g / 2) / ||y_fp32||^2         (only group g quantized)

Estimates, not measurements: exact for a model of one group (up to the product of its
activation and weight errors), and on ResNet-18 within ~3% of the exact only-float errors with
the same top 5 (benchmarks/results/design_notes.md); where that assumption fails the order can
move (ResNet-18's `/layer3/layer3.1/Add`: exact rank 9, gradient 23-29).

Cost: one torch forward with autograd and one backward over the subset; the FP32 outputs of
the subset come from the side-by-side pass when the caller has them (else one torch forward
without autograd). The gate and the 2-D convolutions are torch autograd functions
(``_autograd_functions``): the input gradient of a convolution runs as a transposed convolution
and its weight term as a forward product (torch's CPU convolution backward has no fast
bfloat16 path, and the weights need no gradient); ``precision`` picks bfloat16 products where
oneDNN has them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import numpy_helper

from quantkit._deps import require

if TYPE_CHECKING:
    from quantkit.datasets.batching import Batch
    from quantkit.debug.sensitivity import QdqScales

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed", "bfloat16")


@dataclass
class GradientEstimate:
    """What one forward + backward pass over the subset gives.

    Attributes:
        only_float: group name -> estimated output error (noise/signal) with that group in float.
        only_quantized: group name -> estimated output error of the FP32 model with only that
            group quantized.
        derivative: group name -> dL/da_g (L: the summed squared output error).
        noise, signal: L and ||y_fp32||^2 over the subset (float64).
        costs: seconds: ``import_s`` (importing torch), ``build_s`` (the torch graph), ``fp32_s`` (reference outputs, 0 when
            given), ``forward_s``, ``backward_s``.
    """

    only_float: dict[str, float]
    only_quantized: dict[str, float]
    derivative: dict[str, float]
    noise: float
    signal: float
    costs: dict[str, float]

    @property
    def error(self) -> float:
        return self.noise / self.signal if self.signal > 0 else float("inf")


def gradient_estimate(scales: "QdqScales", batches: Sequence["Batch"],
                      fp32_outputs: Sequence[np.ndarray] | None = None, *, threads: int | None = None,
                      precision: str = "auto") -> GradientEstimate:
    """Every group's first-order only-float error on ``batches`` (see the module docstring).

    Args:
        scales: the FP32 model, plan, groups and plain-method amax (``QdqScales``).
        batches: the ranking subset's batches (``evaluation_batches``).
        fp32_outputs: per batch, the FP32 model's first output rows (``b.size`` rows); None:
            computed here in torch.
        threads: torch intra-op threads for this call (None: torch's default).
        precision: "float32": every product float32; "mixed": the 2-D convolutions' products
            (forward and backward) in bfloat16, float32 out, the element-wise ops, the fake
            quantization and the output error float32; "bfloat16": every tensor bfloat16 but
            the output error (on ResNet-18 it adds ~2% to the INT8 error, and ranks as well as
            float32: benchmarks/results/design_notes.md); "auto": "bfloat16" where oneDNN has
            native bfloat16 (AVX-512 BF16 / AMX: 2-3x faster convolutions), else "float32".

    Raises:
        UnsupportedOpError: an op the torch executor cannot run (the caller falls back).
        MissingDependencyError: torch is not installed.
    """
    t0 = time.perf_counter()
    torch = require("torch", extra="torch")
    import_s = time.perf_counter() - t0  # the first import in a process: ~1 s
    from quantkit.onnx.qdq import _constant_weights_to_initializers
    from quantkit.onnx.torch_exec import TorchGraph

    t0 = time.perf_counter()
    plan = scales.plan
    model = _constant_weights_to_initializers(scales.model, {plan.weight_tensor(k) for k in plan.weights})
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if _fast_bfloat16(torch) else "float32"
    low = torch.float32 if precision == "float32" else torch.bfloat16
    low_forward = precision != "float32"
    graph = TorchGraph(model, dtype=low if precision == "bfloat16" else None)
    output = scales.measured_output
    group_of = {n: g.name for g in scales.groups for n in g.nodes}
    gates = {g.name: torch.ones((), dtype=torch.float64, requires_grad=True) for g in scales.groups}
    amax = scales.amax_for(plan, {})
    index = {n.name: i for i, n in enumerate(graph.nodes) if n.name}

    def slots(t: str, consumers: Sequence[str]) -> list[tuple[int, int]]:
        """(node index, input slot) where ``consumers`` read ``t``."""
        return [(i, k) for i in (index.get(c) for c in consumers) if i is not None
                for k, x in enumerate(graph.nodes[i].inputs) if x == t]

    # node index -> {slot: activation tensor} and {slot: weight Q/DQ name}
    act_slots: dict[int, dict[int, str]] = {}
    for t, consumers in plan.activations.items():
        for i, k in slots(t, consumers):
            act_slots.setdefault(i, {})[k] = t
    weight_slots: dict[int, dict[int, str]] = {}
    quantized: dict[str, tuple[Any, Any]] = {}  # weight Q/DQ name -> (Wq, Wq - W)
    for name, (axis, consumers) in plan.weights.items():
        w = plan.weight_tensor(name)
        values = np.array(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == w)), copy=True)
        wq_t = _fake_quantized_weight(torch, values, axis)
        dtype = graph.consts[w].dtype
        quantized[name] = (wq_t.to(dtype), (wq_t - torch.from_numpy(values)).to(dtype))
        for i, k in slots(w, consumers):
            weight_slots.setdefault(i, {})[k] = name
    fns = _autograd_functions(torch)
    cl = torch.channels_last
    convs: dict[int, tuple[Any, Any, Any]] = {}  # 2-D Conv with a quantized weight: (Wq, Wq low, dW low)
    for i, ws in weight_slots.items():
        node = graph.nodes[i]
        if node.op == "Conv" and set(ws) == {1} and quantized[ws[1]][0].dim() == 4:
            wq, dw = quantized[ws[1]]
            convs[i] = (wq.contiguous(memory_format=cl), wq.to(low).contiguous(memory_format=cl),
                        dw.to(low).contiguous(memory_format=cl))
    build = time.perf_counter() - t0

    def replace(i: int, xs: list[Any]) -> list[Any]:
        acts, ws = act_slots.get(i), weight_slots.get(i)
        if not acts and not ws:
            return xs
        xs = list(xs)
        gate = gates[group_of[graph.nodes[i].name]]
        for k, t in (acts or {}).items():
            xs[k] = gated(t, gate, xs[k])
        for k, name in (ws or {}).items():
            xs[k] = quantized[name][0]
        return xs

    cache: dict[tuple[str, int], Any] = {}  # one gated tensor per (activation, gate) and batch

    def gated(t: str, gate: Any, x: Any) -> Any:
        key = (t, id(gate))
        if key not in cache:
            scale = float(np.float32(amax[t]) / np.float32(127.0))
            cache[key] = fns.gate(x, gate, max(scale, 1e-30))
        return cache[key]

    def compute(i: int, xs: list[Any]) -> list[Any] | None:
        if i not in convs:
            return None
        from quantkit.onnx.torch_exec import _spatial_pads, _sym, _torch_pad

        node = graph.nodes[i]
        x = xs[0]
        strides = list(node.attrs.get("strides", [1, 1]))
        dil = list(node.attrs.get("dilations", [1, 1]))
        wq, wq_low, dw_low = convs[i]
        pads = _spatial_pads(node, x, list(wq.shape[2:]), strides, dil)
        sym = _sym(pads)
        if sym is None:
            x, sym = torch.nn.functional.pad(x, _torch_pad(pads)), [0, 0]
        bias = xs[2] if len(xs) > 2 else None
        gate = gates[group_of[node.name]]
        return [fns.conv(x, gate, wq, wq_low, dw_low, bias,
                         (strides, sym, dil, int(node.attrs.get("group", 1)), low_forward))]

    def after(i: int, xs: list[Any], ys: list[Any]) -> list[Any]:
        ws = weight_slots.get(i)
        if not ws or i in convs:
            return ys
        gate = gates[group_of[graph.nodes[i].name]]
        delta = list(xs)
        for k, name in ws.items():
            delta[k] = quantized[name][1]
        if len(delta) > 2 and graph.nodes[i].op in ("Conv", "ConvTranspose", "Gemm"):
            delta[2] = None  # the bias is not quantized
        with torch.no_grad():
            term = graph.call(i, [d.detach() if d is not None else None for d in delta])[0]
        return [ys[0] + (gate - 1).to(ys[0].dtype) * term, *ys[1:]]

    # a Concat-written output (YOLO: boxes beside class scores): each part's powers over its FP32
    # energy, as the exact ranking weighs them (``sensitivity._noise_signal``); known only from
    # the FP32 rows given
    from quantkit.debug.sensitivity import part_energy, part_weights

    parts = scales.measured_parts
    energy = part_energy([np.asarray(o) for o in fp32_outputs], parts) if fp32_outputs is not None else None
    weight = None if energy is None else torch.from_numpy(np.repeat(part_weights(energy), parts))

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    noise = signal = 0.0
    fp32_s = forward_s = backward_s = 0.0
    try:
        for j, b in enumerate(batches):
            feed = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in b.feed.items() if n in graph.inputs}
            feed = {n: (v.to(low) if precision == "bfloat16" and v.is_floating_point() else v) for n, v in feed.items()}
            feed = {n: v.contiguous(memory_format=cl) if v.dim() == 4 else v for n, v in feed.items()}
            t0 = time.perf_counter()
            if fp32_outputs is None:
                with torch.no_grad():
                    ref = graph.run(feed, [output])[output][: b.size].to(torch.float64)
            else:
                ref = torch.from_numpy(np.asarray(fp32_outputs[j], dtype=np.float64))
            t1 = time.perf_counter()
            cache.clear()
            y = graph.run(feed, [output], replace=replace, after=after, compute=compute)[output][: b.size]
            r = y.to(torch.float64) - ref
            part_w: Any = 1.0 if weight is None else weight.reshape((1, -1) + (1,) * (ref.dim() - 2))
            loss = (r * r * part_w).sum()
            t2 = time.perf_counter()
            loss.backward()
            cache.clear()
            t3 = time.perf_counter()
            noise += float(loss.detach())
            signal += float((ref * ref * part_w).sum())
            fp32_s, forward_s, backward_s = fp32_s + t1 - t0, forward_s + t2 - t1, backward_s + t3 - t2
    finally:
        if threads:
            torch.set_num_threads(old_threads)
    derivative = {g: float(a.grad) if a.grad is not None else 0.0 for g, a in gates.items()}
    # L(a_g = 0) = ||r - e_g||^2 = L - dL/da_g + ||e_g||^2 to first order in the network, with e_g the
    # output error group g adds; when e_g is uncorrelated with the other groups' errors,
    # <r, e_g> = ||e_g||^2, so ||e_g||^2 ~= dL/da_g / 2 (the only-quantized error) and L - dL/da_g / 2
    # the only-float error
    only_float = {g: _ratio(noise - d / 2, signal) for g, d in derivative.items()}
    only_quantized = {g: _ratio(d / 2, signal) for g, d in derivative.items()}
    costs = {"import_s": import_s, "build_s": build, "fp32_s": fp32_s, "forward_s": forward_s, "backward_s": backward_s}
    return GradientEstimate(only_float, only_quantized, derivative, noise, signal, costs)


def _ratio(noise: float, signal: float) -> float:
    return noise / signal if signal > 0 else float("inf")


def fp32_rows(outputs: Mapping[int, np.ndarray], batches: Sequence["Batch"]) -> list[np.ndarray] | None:
    """Per batch, the FP32 output rows of its samples from ``outputs`` (sample index -> row);
    None when one is missing."""
    out = []
    for b in batches:
        rows = [outputs.get(i) for i in b.indices]
        if any(r is None for r in rows):
            return None
        out.append(np.stack([np.asarray(r) for r in rows]))
    return out


def _fast_bfloat16(torch: Any) -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fake_quantized_weight(torch: Any, values: np.ndarray, axis: int) -> Any:
    """``switchable.fake_quantized_weight`` (what ``insert_qdq``'s pair computes) as a torch
    tensor: the same float32 scales, round half to even of the same quotients (torch.round,
    np.rint), ~5x faster than numpy on ResNet-18's weights; float16 weights go through numpy."""
    from quantkit.calibrators.weights import per_channel_amax, scale_from_amax
    from quantkit.debug.switchable import fake_quantized_weight

    if values.dtype != np.float32:
        return torch.from_numpy(fake_quantized_weight(values, axis).copy())
    ax = axis % values.ndim
    shape = [1] * values.ndim
    shape[ax] = -1
    s = torch.from_numpy(scale_from_amax(per_channel_amax(values, ax)).reshape(shape))
    w = torch.from_numpy(values)
    return torch.round(w / s).clamp_(-128, 127).mul_(s)


_FUNCTIONS: dict[int, Any] = {}


def _autograd_functions(torch: Any) -> Any:
    """The gate and the quantized 2-D convolution as torch autograd functions (made once)."""
    if id(torch) in _FUNCTIONS:
        return _FUNCTIONS[id(torch)]
    F = torch.nn.functional
    cl = torch.channels_last

    class Gate(torch.autograd.Function):
        """FQ(x) forward; backward: the gradient inside the int8 range (0 where FQ clips) to
        x, and <grad, FQ(x) - x> to the gate. Keeps FQ(x) - x and the mask."""

        @staticmethod
        def forward(ctx: Any, x: Any, gate: Any, scale: float) -> Any:
            with torch.no_grad():  # one kernel: FQ(x) and the mask of the values it does not clip
                fq, inside = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, scale, 0, -128, 127)
                delta = fq - x
            ctx.save_for_backward(delta, inside)
            return fq

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            delta, inside = ctx.saved_tensors
            g_gate = _dot(torch, grad, delta) if ctx.needs_input_grad[1] else None
            g_x = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype)) if ctx.needs_input_grad[0] else None
            return g_x, g_gate, None

    class Conv(torch.autograd.Function):
        """conv2d(x, Wq) + bias forward (float32); backward: the input gradient as a transposed
        convolution and the gate's <grad, conv2d(x, Wq - W)>, both in the low dtype (forward
        kernels: torch's CPU convolution backward has no fast bfloat16 path)."""

        @staticmethod
        def forward(ctx: Any, x: Any, gate: Any, wq: Any, wq_low: Any, dw_low: Any, bias: Any,
                    params: tuple[list[int], list[int], list[int], int, bool]) -> Any:
            strides, pads, dil, groups, low_forward = params
            ctx.weights, ctx.params = (wq_low, dw_low), params
            if low_forward:  # float32 out: the element-wise ops and the fake quantization stay float32
                xl = x.to(wq_low.dtype)
                ctx.save_for_backward(xl)
                b = None if bias is None else bias.to(wq_low.dtype)
                return F.conv2d(xl, wq_low, b, strides, pads, dil, groups).to(x.dtype)
            ctx.save_for_backward(x)
            return F.conv2d(x, wq, bias, strides, pads, dil, groups)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (x,) = ctx.saved_tensors
            wq_low, dw_low = ctx.weights
            strides, pads, dil, groups, _ = ctx.params
            g = grad.to(wq_low.dtype).contiguous(memory_format=cl)
            g_gate = g_x = None
            if ctx.needs_input_grad[1]:
                term = F.conv2d(x.to(wq_low.dtype).contiguous(memory_format=cl), dw_low, None, strides, pads, dil,
                                groups)
                g_gate = _dot(torch, grad, term)
            if ctx.needs_input_grad[0]:
                k = wq_low.shape[2:]
                extra = [int(x.shape[2 + d]) - ((int(grad.shape[2 + d]) - 1) * strides[d] - 2 * pads[d]
                                                 + dil[d] * (int(k[d]) - 1) + 1) for d in range(2)]
                g_x = F.conv_transpose2d(g, wq_low, None, strides, pads, extra, groups, dil).to(grad.dtype)
            return g_x, g_gate, None, None, None, None, None

    class Functions:
        gate = staticmethod(Gate.apply)
        conv = staticmethod(Conv.apply)

    _FUNCTIONS[id(torch)] = Functions
    return Functions


def _dot(torch: Any, a: Any, b: Any) -> Any:
    """<a, b> as a float64 scalar tensor, in one pass: float32 ``torch.dot`` in the element order
    of ``a`` and ``b`` alike (NHWC for 4-D tensors: a view when they are channels-last); for
    bfloat16 a product and a sum (torch's CPU bfloat16 dot is ~8x slower; its sum accumulates in
    float32, the result is rounded to bfloat16, a relative 2^-9)."""
    if a.shape != b.shape:
        return (a.to(torch.float64) * b.to(torch.float64)).sum()
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return (a * b.to(a.dtype)).sum().to(torch.float64)

    def flat(t: Any) -> Any:
        return t.permute(0, 2, 3, 1).reshape(-1) if t.dim() == 4 else t.reshape(-1)

    return torch.dot(flat(a), flat(b)).to(torch.float64)
