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
L = ||r||^2, one backward pass gives dL/da_g for every g: the first-order change of L when
a_g goes from 1 to 0, i.e. group g back to float:

    only_float_error(g) ~= (L - dL/da_g) / ||y_fp32||^2        (first order; can go below 0)

Only-quantized errors need one forward-mode product per group (no cheaper estimate is honest),
so the gradient rows leave ``only_quantized_error`` None.

Cost: one torch forward with autograd and one backward over the subset (the FP32 outputs of
the subset come from the side-by-side pass when the caller has them, else one torch forward
without autograd). The convolutions' input gradients run as transposed convolutions in the
forward direction (``_ConvInputGrad``: torch's CPU convolution backward is slower, and the
weights need no gradient).
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


@dataclass
class GradientEstimate:
    """What one forward + backward pass over the subset gives.

    Attributes:
        only_float: group name -> first-order output error (noise/signal) with that group in float.
        derivative: group name -> dL/da_g (L: the summed squared output error).
        noise, signal: L and ||y_fp32||^2 over the subset (float64).
        costs: seconds: ``build_s`` (the torch graph), ``fp32_s`` (reference outputs, 0 when
            given), ``forward_s``, ``backward_s``.
    """

    only_float: dict[str, float]
    derivative: dict[str, float]
    noise: float
    signal: float
    costs: dict[str, float]

    @property
    def error(self) -> float:
        return self.noise / self.signal if self.signal > 0 else float("inf")


def gradient_estimate(scales: "QdqScales", batches: Sequence["Batch"],
                      fp32_outputs: Sequence[np.ndarray] | None = None, *, threads: int | None = None,
                      ) -> GradientEstimate:
    """Every group's first-order only-float error on ``batches`` (see the module docstring).

    Args:
        scales: the FP32 model, plan, groups and plain-method amax (``QdqScales``).
        batches: the ranking subset's batches (``evaluation_batches``).
        fp32_outputs: per batch, the FP32 model's first output rows (``b.size`` rows); None:
            computed here in torch.
        threads: torch intra-op threads for this call (None: torch's default).

    Raises:
        UnsupportedOpError: an op the torch executor cannot run (the caller falls back).
        MissingDependencyError: torch is not installed.
    """
    torch = require("torch", extra="torch")
    from quantkit.debug.switchable import fake_quantized_weight
    from quantkit.onnx.qdq import _constant_weights_to_initializers
    from quantkit.onnx.torch_exec import TorchGraph

    t0 = time.perf_counter()
    plan = scales.plan
    model = _constant_weights_to_initializers(scales.model, {plan.weight_tensor(k) for k in plan.weights})
    graph = TorchGraph(model)
    output = model.graph.output[0].name
    group_of = {n: g.name for g in scales.groups for n in g.nodes}
    gates = {g.name: torch.ones((), dtype=torch.float64, requires_grad=True) for g in scales.groups}
    amax = scales.amax_for(plan, {})
    index = {n.name: i for i, n in enumerate(graph.nodes) if n.name}
    # node index -> {slot: activation tensor} and {slot: weight Q/DQ name}
    act_slots: dict[int, dict[int, str]] = {}
    for t, consumers in plan.activations.items():
        for c in consumers:
            i = index.get(c)
            if i is not None:
                for k, x in enumerate(graph.nodes[i].inputs):
                    if x == t:
                        act_slots.setdefault(i, {})[k] = t
    weight_slots: dict[int, dict[int, str]] = {}
    quantized: dict[str, tuple[Any, Any]] = {}  # weight Q/DQ name -> (Wq, Wq - W)
    for name, (axis, consumers) in plan.weights.items():
        w = plan.weight_tensor(name)
        values = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == w))
        wq = fake_quantized_weight(values, axis)
        quantized[name] = (torch.from_numpy(wq.copy()).to(graph.consts[w].dtype),
                           torch.from_numpy((wq - values).copy()).to(graph.consts[w].dtype))
        for c in consumers:
            i = index.get(c)
            if i is not None:
                for k, x in enumerate(graph.nodes[i].inputs):
                    if x == w:
                        weight_slots.setdefault(i, {})[k] = name
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
            fq = torch.fake_quantize_per_tensor_affine(x, max(scale, 1e-30), 0, -128, 127)
            cache[key] = fq + (gate - 1).to(x.dtype) * (fq - x).detach()
        return cache[key]

    def after(i: int, xs: list[Any], ys: list[Any]) -> list[Any]:
        ws = weight_slots.get(i)
        if not ws:
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

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    noise = signal = 0.0
    fp32_s = forward_s = backward_s = 0.0
    try:
        for j, b in enumerate(batches):
            feed = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in b.feed.items() if n in graph.inputs}
            t0 = time.perf_counter()
            if fp32_outputs is None:
                with torch.no_grad():
                    ref = graph.run(feed, [output])[output][: b.size].to(torch.float64)
            else:
                ref = torch.from_numpy(np.asarray(fp32_outputs[j], dtype=np.float64))
            t1 = time.perf_counter()
            cache.clear()
            y = graph.run(feed, [output], replace=replace, after=after)[output][: b.size]
            r = y.to(torch.float64) - ref
            loss = (r * r).sum()
            t2 = time.perf_counter()
            loss.backward()
            cache.clear()
            t3 = time.perf_counter()
            noise += float(loss.detach())
            signal += float((ref * ref).sum())
            fp32_s, forward_s, backward_s = fp32_s + t1 - t0, forward_s + t2 - t1, backward_s + t3 - t2
    finally:
        if threads:
            torch.set_num_threads(old_threads)
    derivative = {g: float(a.grad) if a.grad is not None else 0.0 for g, a in gates.items()}
    only_float = {g: ((noise - d) / signal if signal > 0 else float("inf")) for g, d in derivative.items()}
    costs = {"build_s": build, "fp32_s": fp32_s, "forward_s": forward_s, "backward_s": backward_s}
    return GradientEstimate(only_float, derivative, noise, signal, costs)


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
