"""Which quantization groups cost the most accuracy: the sensitivity ranking.

A quantization group is the unit that goes back to float as a whole: one op's Q/DQ pairs (its
activation inputs and its weight), merged with every op that shares a shared-scale group with
it (``QdqPlan.groups``). Returning a group to float is ``exclude_from_plan(names=group.nodes,
follow_fusions=False)``.

The ranking, for every group, on a ranking subset (the samples with the largest FP32-vs-INT8
error of one side-by-side pass, as NNCF picks them):

    only_float_error       output error of the INT8 model with only this group in float
    only_quantized_error   output error of the FP32 model with only this group quantized
    best_method            (for the ``method_groups`` most sensitive groups) the range method
                           whose scales, on this group's tensors alone, give the INT8 model the
                           lowest output error; best_method_error is that error

Output error = noise / signal power of the error output (the first float graph output not
ordered by a TopK: ``onnx.model.error_output``) against FP32 over the subset
(100 x it is the ``sqnr`` drop metric's points; 0.01 is 20 dB).

Cost. A group's variants differ from the FP32 or INT8 model only from the group's first node
on, so the tensors that cross that cut are captured once (one FP32 and one INT8 pass over the
subset) and each variant runs only the part of the network after its cut:

    subset --FP32--> cut tensors C_k (all cuts, one pass) --suffix_k + group variant--> output
    subset --INT8--> cut tensors C_k (all cuts, one pass) --suffix_k - group variant--> output

No model is built per variant: every variant is a feed of one switchable model
(``quantkit.debug.switchable``: each group behind an input, activation scales as inputs,
weights fake-quantized once), and one ONNX Runtime session serves every cut (the cut's tensors
are fed to the nodes after it, the nodes before it run on empty tensors); where a model does
not allow that, neighbouring cuts share suffix sessions. The switchable model computes Q/DQ
as ONNX defines it (float fake quantization); ONNX Runtime's optimized Q/DQ model runs some
pairs as integer kernels that round differently (errors within ~2% of these).

Runs: each group one only-float and (``quantized=True``) one only-quantized suffix run, the
later the group the cheaper; the best-method search one run per distinct set of scales on the
group's tensors, for the ``method_groups`` worst groups only; nothing else is skipped. So the
exact ranking costs about the sum of the suffix fractions per kind, ~G/2 FP32 passes for a
chain of G groups, times the switchable model's overhead (~1.5x an FP32 run on ONNX Runtime's
CPU provider: Split/Concat around each switched node breaks its NCHWc chains).
``SensitivityReport.cost_fp32_passes`` is the measured wall time of all of it over the time
of one FP32 pass over the subset (timed in the side-by-side pass); ``counts`` has the sessions
and runs. Memory: the cut tensors of the subset (subset x the activations that cross any cut).

``estimator="gradient"`` (``quantkit.debug.gradient``, needs torch) estimates every group's
only-float and only-quantized errors to first order from one forward and one backward pass in
torch over the subset instead of the suffix runs (ResNet-18: ~4-6 FP32 passes instead of ~20 a
kind); the best-method trials stay exact. A graph torch cannot run is ranked exactly (logged).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper

from quantkit._values import comparable
from quantkit.backends.base import real_rows
from quantkit.errors import InputError, MissingDependencyError, ModelError
from quantkit.onnx.model import error_output, node_reads
from quantkit.onnx.qdq import RECURRENT_OPS, QdqPlan, exclude_from_plan, insert_qdq
from quantkit.onnx.torch_exec import UnsupportedOpError

if TYPE_CHECKING:
    from quantkit.datasets.sources import Source
    from quantkit.onnx.model import TensorSpec
    from quantkit.ptq import Calibration, RunConfig

log = logging.getLogger(__name__)

#: the suffix sessions (one per cut, kept for the ranking's life) run without ONNX Runtime's CPU
#: memory arena, which keeps each session's largest run's activations: PP-OCRv3's 2.4 MB text
#: detector at 320x320, `--max-drop` over 48 images, peaked at 15.3 GB with arenas and 3.6 GB
#: without (142.8 s against 189.1 s; benchmarks/results/heldout_sweep.md, fifteenth session)
SESSION_ARENA = False


# ------------------------------------------------------------------ groups
@dataclass(frozen=True)
class QuantGroup:
    """Q/DQ pairs that return to float together.

    Attributes:
        name: stable name: the group's first node (graph order).
        nodes: the nodes whose inputs lose their Q/DQ (``exclude_from_plan(names=nodes)``).
        activations: activation tensors whose Q/DQ pair feeds these nodes.
        weights: weight Q/DQ names (``QdqPlan.weights`` keys) that feed these nodes.
    """

    name: str
    nodes: tuple[str, ...]
    activations: tuple[str, ...]
    weights: tuple[str, ...]


def quant_groups(model: onnx.ModelProto, plan: QdqPlan) -> list[QuantGroup]:
    """The quantization groups of ``plan`` on ``model``, in graph order of their first node.

    Every node with a quantized input is in exactly one group; nodes that read tensors of one
    shared-scale group are in the same group (exclude_from_plan drops such a group whole, so
    returning one of those nodes to float changes the others too).
    """
    order = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
    consumers: set[str] = {c for cs in plan.activations.values() for c in cs}
    consumers |= {c for _, cs in plan.weights.values() for c in cs}
    parent = {c: c for c in consumers}

    def root(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for shared in plan.groups:
        members = [c for t in shared for c in plan.activations.get(t, ())]
        for c in members[1:]:
            parent[root(c)] = root(members[0])
    by_root: dict[str, list[str]] = {}
    for c in sorted(consumers, key=lambda c: (order.get(c, len(order)), c)):
        by_root.setdefault(root(c), []).append(c)
    groups = []
    for nodes in by_root.values():
        ns = set(nodes)
        acts = tuple(t for t, cs in plan.activations.items() if ns & set(cs))
        weights = tuple(w for w, (_, cs) in plan.weights.items() if ns & set(cs))
        groups.append(QuantGroup(nodes[0], tuple(nodes), acts, weights))
    return sorted(groups, key=lambda g: (order.get(g.name, len(order)), g.name))


def plan_without(model: onnx.ModelProto, plan: QdqPlan, groups: Sequence[QuantGroup]) -> QdqPlan:
    """``plan`` with ``groups`` in float: ``exclude_from_plan`` of their nodes (exact names)."""
    names = [re.escape(n) for g in groups for n in g.nodes]
    return exclude_from_plan(model, plan, names=names, follow_fusions=False)[0] if names else plan


def plan_only(plan: QdqPlan, group: QuantGroup) -> QdqPlan:
    """Only ``group``'s Q/DQ pairs of ``plan`` (everything else in float)."""
    ns = set(group.nodes)
    acts = {t: tuple(c for c in cs if c in ns) for t, cs in plan.activations.items()}
    weights = {w: (ax, tuple(c for c in cs if c in ns)) for w, (ax, cs) in plan.weights.items()}
    acts = {t: cs for t, cs in acts.items() if cs}
    weights = {w: v for w, v in weights.items() if v[1]}
    return QdqPlan(acts, weights, groups=tuple(g for g in plan.groups if all(t in acts for t in g)),
                   weight_sources={w: s for w, s in plan.weight_sources.items() if w in weights})


# ------------------------------------------------------------------ scales of a mixed state
@dataclass
class QdqScales:
    """What a mixed-precision variant is built from: the FP32 model, its full Q/DQ plan and,
    per quantized activation, the amax of every available method.

    Attributes:
        method: the method of the plain INT8 model.
        ranges: tensor -> {method: amax}.
    """

    model: onnx.ModelProto
    specs: "list[TensorSpec]"
    plan: QdqPlan
    ranges: dict[str, dict[str, float]]
    method: str
    run: "RunConfig"
    groups: list[QuantGroup] = field(default_factory=list)
    plain: onnx.ModelProto | None = None  # the plain INT8 model, when already made
    #: bias correction of a variant (``Calibration.bias_corrected``), when the calibration has it
    correct: "Callable[[onnx.ModelProto], onnx.ModelProto] | None" = None
    #: the plain model's bias correction (Conv node -> shift), for the ranking's switchable model
    bias_shifts: "Mapping[str, Any] | None" = None
    #: the graph output whose error is measured (``error_output``; None: its default)
    output: str | None = None

    @property
    def measured_output(self) -> str:
        return error_output(self.model, self.output)

    @property
    def measured_parts(self) -> list[int]:
        """The part sizes (axis 1) of the measured output where a Concat writes it
        (``concat_parts``: a YOLO output's boxes, class scores, mask coefficients), else []."""
        if not hasattr(self, "_measured_parts"):
            from quantkit.onnx.model import concat_parts

            self._measured_parts = list(concat_parts(self.model).get(self.measured_output, []))
        return self._measured_parts

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = quant_groups(self.model, self.plan)
        self._by_name = {g.name: g for g in self.groups}

    @classmethod
    def from_calibration(cls, cal: "Calibration") -> "QdqScales":
        ranges = {t: dict(cal.ranges[t].amax) for t in cal.plan.activations}
        return cls(cal.model, cal.specs, cal.plan, ranges, cal.config.method, cal.config.run,
                   plain=cal.int8_model(cal.config.method),
                   correct=cal.bias_corrected if cal.correction_feeds is not None else None,
                   bias_shifts=cal.bias_shifts.get(cal.config.method) or None)

    @classmethod
    def from_qdq_model(cls, fp32: onnx.ModelProto, int8: onnx.ModelProto, run: "RunConfig") -> "QdqScales":
        """The plan and scales of a symmetric INT8 Q/DQ model made from ``fp32`` (quantkit's, or
        any with zero points 0): its activation pairs are matched to quantkit's TensorRT plan."""
        from quantkit.debug.layerwise import qdq_points
        from quantkit.onnx.equalize import equalizations_of, equalize_depthwise
        from quantkit.onnx.model import fold_weight_dequantize
        from quantkit.ptq import normalized_graph, prepare

        fp32 = fold_weight_dequantize(fp32, source="the FP32 model")  # a weight-only model: as prepare takes it
        recorded = equalizations_of(int8)
        if recorded and not equalizations_of(fp32):  # the user's model: equalize it as the INT8 model was,
            # its nodes named as calibrate named them (the equalizations address them by those names)
            fp32 = normalized_graph(fp32, warn=False)
            fp32, _ = equalize_depthwise(fp32, {e.tensor: (e.consumers, e.scales) for e in recorded})
        prepared = prepare(fp32, name="the FP32 model")
        points = {p.tensor: p for p in qdq_points(int8) if p.kind == "activation"}
        if set(points) - set(prepared.plan.activations):  # attention's probabilities, or every activation?
            for other in (prepare(fp32, name="the FP32 model", quantize_attention_probs=True),
                          prepare(fp32, name="the FP32 model", target="onnxruntime")):
                if len(set(points) & set(other.plan.activations)) > len(set(points) & set(prepared.plan.activations)):
                    prepared = other
        amax: dict[str, dict[str, float]] = {}
        for t in prepared.plan.activations:
            p = points.get(t)
            if p is None:
                continue
            how = ("as unsigned 8-bit (uint8)" if p.qmin != -128 else "with a zero point" if np.any(p.zero_point != 0)
                   else "with a per-channel scale" if np.asarray(p.scale).size != 1 else "")
            if how:  # NNCF's default writes uint8 for non-negative tensors, ONNX Runtime's uint8 with zero points
                raise ModelError(f"the INT8 model quantizes {t!r} {how}: ranking needs the symmetric per-tensor int8 "
                                 "activations TensorRT builds", hint="rank a Q/DQ model written by quantkit calibrate "
                                 "(`quantkit debug` without --rank reads this one)")
            amax[t] = {"model": float(np.asarray(p.scale).reshape(())) * 127.0}
        if not amax:
            raise ModelError("the INT8 model quantizes none of the activations quantkit would quantize in this FP32 "
                             "model", hint="give the FP32 model the Q/DQ model was made from")
        plan = prepared.plan
        acts = {t: cs for t, cs in plan.activations.items() if t in amax}
        # groups whose members are not all quantized in the INT8 model: their pairs go
        ns = {c for cs in acts.values() for c in cs}
        weights = {w: v for w, v in plan.weights.items() if set(v[1]) & ns}
        plan = QdqPlan(acts, weights, groups=tuple(g for g in plan.groups if all(t in acts for t in g)),
                       weight_sources={w: s for w, s in plan.weight_sources.items() if w in weights})
        return cls(prepared.model, prepared.specs, plan, amax, "model", run)

    @property
    def methods(self) -> list[str]:
        """Methods with an amax for every quantized activation."""
        common = None
        for r in self.ranges.values():
            common = set(r) if common is None else common & set(r)
        return [m for m in next(iter(self.ranges.values()), {}) if m in (common or set())]

    def group(self, name: str) -> QuantGroup:
        try:
            return self._by_name[name]
        except KeyError:
            raise InputError(f"no quantization group {name!r}",
                             hint=f"groups: {', '.join(list(self._by_name)[:8])}...") from None

    def plan_for(self, float_groups: Sequence[str]) -> QdqPlan:
        return plan_without(self.model, self.plan, [self.group(g) for g in float_groups])

    def amax_for(self, plan: QdqPlan, overrides: Mapping[str, str]) -> dict[str, float]:
        """Every activation of ``plan`` on the plain method, the tensors of overridden groups on
        theirs (later overrides win on a tensor two groups share: one pair per tensor)."""
        amax = {t: self.ranges[t][self.method] for t in plan.activations}
        for g, m in overrides.items():
            for t in self.group(g).activations:
                if t in amax:
                    amax[t] = self.ranges[t][m]
        return amax

    def int8_model(self, float_groups: Sequence[str] = (), overrides: Mapping[str, str] | None = None,
                   ) -> onnx.ModelProto:
        """The Q/DQ model with ``float_groups`` in float and ``overrides`` (group -> method)."""
        if not float_groups and not overrides and self.plain is not None:
            return self.plain
        plan = self.plan_for(float_groups)
        if not plan.activations and not plan.weights:
            return self.model
        model = insert_qdq(self.model, plan, self.amax_for(plan, overrides or {}))
        return self.correct(model) if self.correct is not None else model


# ------------------------------------------------------------------ the report
@dataclass(frozen=True)
class SensitivityRow:
    """One group's sensitivity (errors: noise/signal of the first output against FP32)."""

    name: str
    nodes: tuple[str, ...]
    activations: tuple[str, ...]
    weights: tuple[str, ...]
    only_float_error: float
    only_quantized_error: float | None
    best_method: str | None = None
    best_method_error: float | None = None


@dataclass
class SensitivityReport:
    """The ranking: rows most sensitive first (lowest ``only_float_error``).

    Attributes:
        rows: per group.
        subset_indices: the ranking subset (indices into the source).
        int8_error, int8_error_all: the INT8 model's error on the subset, on all given samples.
        cost_fp32_passes: wall time of the ranking (model building, captures, suffix runs, method trials) over
            the time of one FP32 pass over the subset; the side-by-side pass is not counted.
        costs: seconds per phase, and the FP32 pass time the cost is measured against.
        counts: ONNX Runtime sessions made, suffix runs, and the seconds spent making the
            sessions (part of the phases' seconds).
        ranker: the ``_Ranker`` that made it (the subset's cached cut tensors and the one
            switchable session), for the fallback to check a step on the subset before it
            validates it; not serialized.
    """

    rows: list[SensitivityRow]
    subset_indices: list[int]
    int8_error: float
    int8_error_all: float
    method: str
    cost_fp32_passes: float
    seconds: float
    costs: dict[str, float] = field(default_factory=dict)
    metric: str = "noise/signal power of the error output (first float, not TopK-ordered) against FP32"
    counts: dict[str, float] = field(default_factory=dict)
    ranker: Any = field(default=None, repr=False, compare=False)
    estimator: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "method": self.method, "estimator": self.estimator, "num_groups": len(self.rows),
                "subset_indices": list(self.subset_indices), "int8_error": self.int8_error,
                "int8_error_all": self.int8_error_all, "cost_fp32_passes": self.cost_fp32_passes,
                "seconds": self.seconds, "costs": self.costs, "counts": self.counts,
                "rows": [{"rank": i + 1, **asdict(r)} for i, r in enumerate(self.rows)]}

    def table(self, rows: int = 10) -> str:
        how = "" if self.estimator == "exact" else f", {self.estimator} estimate"
        uncorrected = " as the estimate models it (fake quantization, no bias correction)" \
            if self.estimator == "gradient" else ""
        lines = [f"sensitivity of {len(self.rows)} groups on {len(self.subset_indices)} samples{how} (those of the "
                 f"largest error), {self.metric} (INT8 error{uncorrected} {self.int8_error:.4g} on them, "
                 f"{self.int8_error_all:.4g} on every sample given; cost {self.cost_fp32_passes:.1f} FP32 passes, "
                 f"{self.seconds:.1f} s)",
                 f"  {'rank':>4} {'group':<32} {'only float':>11} {'only int8':>11}"]
        methods = any(r.best_method for r in self.rows)  # not from a Q/DQ model's one set of scales (`debug`)
        if methods:
            lines[-1] += f" {'best method':>16}"
        for i, r in enumerate(self.rows[:rows]):
            best = f"{r.best_method} {r.best_method_error:.3g}" if r.best_method else "-"
            oq = f"{r.only_quantized_error:.4g}" if r.only_quantized_error is not None else "-"
            lines.append(f"  {i + 1:>4} {r.name[-32:]:<32} {r.only_float_error:>11.4g} {oq:>11}"
                         + (f" {best:>16}" if methods else ""))
        return "\n".join(lines)


def ranking_from_file(path: str) -> list[dict[str, Any]]:
    """The rows of a ranking saved earlier: ``sensitivity.json`` (calibrate --max-drop),
    ``debug.json`` of ``quantkit debug --rank``, or a report.json holding either.

    Raises:
        InputError: the file cannot be read or holds no ranking.
    """
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except RecursionError:
        raise InputError(f"--exclude-from {str(path)!r}: its JSON is nested too deeply to be a ranking") from None
    except (OSError, ValueError) as err:
        raise InputError(f"--exclude-from {str(path)!r}: cannot read it as JSON ({err})") from None
    for candidate in (doc, doc.get("sensitivity") if isinstance(doc, dict) else None,
                      (doc.get("fallback") or {}).get("sensitivity") if isinstance(doc, dict) else None):
        if isinstance(candidate, dict) and isinstance(candidate.get("rows"), list) and candidate["rows"]:
            rows = candidate["rows"]
            if all(isinstance(r, dict) and isinstance(r.get("nodes"), list)
                   and all(isinstance(n, str) for n in r["nodes"]) for r in rows):
                return rows
    raise InputError(f"--exclude-from {str(path)!r} holds no sensitivity ranking",
                     hint="use the sensitivity.json of `quantkit calibrate --max-drop` or the debug.json of "
                          "`quantkit debug --rank`")


# ------------------------------------------------------------------ running parts of the network
def _noise_signal(ref: np.ndarray, test: np.ndarray, parts: Sequence[int] = (),
                  energy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (noise power, signal power), float64. With ``parts`` (the sizes along axis 1
    of the Concat that writes the output) and ``energy`` (each part's FP32 signal power over the
    data, ``part_energy``), each part's powers divided by its energy: the noise/signal of a
    batch or of all the data is then the sum over the parts of each part's noise/signal, over
    the number of parts, so that a YOLO output's class scores count as much as its box pixels.

    Raises:
        InputError: the two have different shapes: a first output whose shape depends on the
            values (the boxes NonMaxSuppression keeps), which cannot be compared sample by sample.
    """
    n, s, _ = noise_signal_by_part(ref, test, parts, energy)
    return n, s


def _sample_shape(x: Any) -> list[int]:
    """``x``'s shape, a batch of one shown as its sample (the axis quantkit adds to a model without
    one is not the model's)."""
    k = 1 if np.ndim(x) and np.shape(x)[0] == 1 else 0
    return list(np.shape(x))[k:]


def data_dependent_shape_error(shapes: str) -> InputError:
    """The error for an error output whose shape follows the values (``shapes``: the two shapes seen)."""
    return InputError(f"the model's error output has a data-dependent shape ({shapes}: e.g. the boxes "
                      "NonMaxSuppression keeps, or a generated waveform's length); the sensitivity ranking and "
                      "--max-drop compare that output sample by sample",
                      hint="make an output of fixed shape the first one, or name one with --error-output (a "
                           "detector's raw boxes and scores before NMS); where every output's length follows the data "
                           "(speech, text generation), keep the layers `quantkit debug` shows the error entering in "
                           "float with --exclude")


def noise_signal_by_part(ref: np.ndarray, test: np.ndarray, parts: Sequence[int] = (),
                         energy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``_noise_signal`` and, where it weighs ``parts``, each sample's noise power per part
    ([N, parts]; None otherwise): the fallback's sqnr budget holds each part to it."""
    if np.shape(ref) != np.shape(test):
        raise data_dependent_shape_error(f"FP32 {_sample_shape(ref)}, INT8 {_sample_shape(test)}")
    if energy is not None and len(parts) >= 2:
        noise, signal = _part_noise_signal(ref, test, parts)
        weights = part_weights(energy)
        return noise @ weights, signal @ weights, noise
    r, t = comparable(ref.reshape(ref.shape[0], -1), test.reshape(test.shape[0], -1))
    d = r - t
    return (d * d).sum(axis=1), (r * r).sum(axis=1), None


def _part_noise_signal(ref: np.ndarray, test: np.ndarray, parts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and part (axis 1, ``parts`` its sizes): noise and signal power, [N, parts]."""
    r, t = comparable(ref.reshape(ref.shape[0], ref.shape[1], -1), test.reshape(ref.shape[0], ref.shape[1], -1))
    d = r - t
    edges = np.cumsum([0, *parts])[:-1]
    return (np.add.reduceat((d * d).sum(axis=2), edges, axis=1),
            np.add.reduceat((r * r).sum(axis=2), edges, axis=1))


def part_energy(refs: Sequence[np.ndarray], parts: Sequence[int]) -> np.ndarray | None:
    """Each part's FP32 signal power over ``refs`` (batches of the output; ``parts`` its Concat's
    sizes along axis 1); None for an output of one part or whose axis 1 is not the parts'."""
    if len(parts) < 2 or not refs or any(r.ndim < 2 or r.shape[1] != sum(parts) for r in refs):
        return None
    return np.sum([_part_noise_signal(r, r, parts)[1].sum(axis=0) for r in refs], axis=0)


def part_weights(energy: np.ndarray) -> np.ndarray:
    """Each part's weight: 1 / its FP32 energy (0 for a part that is 0 in FP32)."""
    return np.where(energy > 0, 1.0 / np.where(energy > 0, energy, 1.0), 0.0)


def _ratio(noise: float, signal: float) -> float:
    if noise == 0.0:
        return 0.0
    return noise / signal if signal > 0 else math.inf


def _constant_names(model: onnx.ModelProto) -> set[str]:
    out = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if all(not t or t in out for t in node.input):
            out.update(o for o in node.output if o)
    return out


def suffix_model(model: onnx.ModelProto, cut: Sequence[str], types: Mapping[str, int],
                 ranks: Mapping[str, int], keep_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """The part of ``model`` that computes its outputs from the tensors ``cut`` (fed as inputs
    of rank ``ranks[t]`` with symbolic dims; ONNX Runtime takes the sizes from the feed), and
    from those graph inputs of ``keep_inputs`` that it reads."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    cut_set, need, keep = set(cut), set(), set()
    stack = [o.name for o in g.output]
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        i = producer.get(t)
        if t in cut_set or i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(node_reads(g.node[i]))  # outer-scope names read inside If/Loop/Scan bodies too
    inputs = [helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT),
                                            [f"{t}_d{i}" for i in range(ranks[t])]) for t in cut if t in need]
    inputs += [i for i in g.input if i.name in set(keep_inputs) and i.name in need and i.name not in cut_set]
    graph = helper.make_graph([g.node[i] for i in sorted(keep)], f"{g.name}_suffix", inputs, list(g.output),
                              [x for x in g.initializer if x.name in need and x.name not in cut_set])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


class _Cuts:
    """Per group, the tensors that cross the cut before its first node (graph order)."""

    def __init__(self, model: onnx.ModelProto, groups: Sequence[QuantGroup]):
        nodes = model.graph.node
        consts = _constant_names(model)
        end = len(nodes)
        made = {i.name: -1 for i in model.graph.input}
        last = {}
        for i, n in enumerate(nodes):
            for o in n.output:
                made.setdefault(o, i)
            for t in n.input:
                last[t] = i
        for o in model.graph.output:
            last[o.name] = end
        pos = {n.name: i for i, n in enumerate(nodes) if n.name}
        self.position = {g.name: min(pos.get(n, 0) for n in g.nodes) for g in groups}  # a nameless node: cut at 0
        self.tensors: dict[int, list[str]] = {}
        for k in sorted(set(self.position.values())):
            self.tensors[k] = [t for t, p in made.items() if p < k <= last.get(t, -2) and t not in consts]
        self.all = list(dict.fromkeys(t for ts in self.tensors.values() for t in ts))
        self.nodes_after = {k: {n.name for n in nodes[k:] if n.name} for k in self.tensors}
        self.fraction = {k: 1.0 - k / max(end, 1) for k in self.tensors}


class _Ranker:
    """The ranking subset's cached cut tensors and the suffix runs (reused by the fallback for
    re-ranking: the FP32 side is captured once, the INT8 side once per state).

    Every variant runs on one switchable model (``quantkit.debug.switchable``): a variant is a
    feed (which groups are quantized, every activation's scale), so no model is built per
    variant; one multi-start session, made when first used, serves every cut and every variant
    (only-float, only-quantized, each method, each fallback state). Where the model does not
    allow multi-start runs, one session per run of neighbouring cuts (``_plan_starts``).
    """

    def __init__(self, scales: QdqScales, source: "Source", subset: Sequence[int],
                 groups: Sequence[QuantGroup] | None = None, fp32: tuple[list[np.ndarray], float] | None = None):
        from quantkit.debug.switchable import switchable_model
        from quantkit.onnx.model import tensor_types
        from quantkit.ptq import evaluation_batches

        self.scales = scales
        # only the cuts of ``groups`` (default all): fewer tensors to capture; runs for other groups fail
        self.covers_all = groups is None
        self.cuts = _Cuts(scales.model, scales.groups if groups is None else groups)
        self.batches = list(evaluation_batches(source, scales.specs, list(subset), scales.run))
        self.types = tensor_types(scales.model)
        self.output = scales.measured_output
        t0 = time.perf_counter()
        self.switch = switchable_model(scales.model, scales.plan, scales.groups, scales.bias_shifts)
        self.build_seconds = time.perf_counter() - t0  # the switchable and multi-start models
        self._switch_inputs = [i.name for i in self.switch.model.graph.input]
        self._sessions: dict[int, Any] = {}
        self._plain_amax = scales.amax_for(scales.plan, {})
        self._starts: dict[int, int] | None = None
        t0 = time.perf_counter()
        if fp32 is None:
            self.fp32_cut, self.fp32_out = self._capture(scales.model, {})
            self.fp32_seconds = time.perf_counter() - t0
        else:  # ``fp32``: the subset's FP32 outputs per batch and the seconds of a pass, known already;
            # no FP32 cut tensors, so only INT8-side runs (only_float, with_method), no only_quantized
            self.fp32_cut, self.fp32_out, self.fp32_seconds = [], list(fp32[0]), fp32[1]
        self.parts = scales.measured_parts
        self.energy = part_energy(self.fp32_out, self.parts)
        t0 = time.perf_counter()
        self.multi: Any = self._multi_start() if self.fp32_cut else None
        self._multi_pending = not self.fp32_cut  # made from the first INT8 capture instead
        self.build_seconds += time.perf_counter() - t0
        self._multi_checked = False
        self._int8_key: Any = None
        self.int8_cut: list[dict[str, np.ndarray]] = []
        self.counts = {"sessions": 0, "suffix_runs": 0}
        self.session_seconds = 0.0  # suffix extraction + session creation

    def _capture(self, model: onnx.ModelProto, switch: Mapping[str, np.ndarray],
                 ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
        from quantkit.backends.onnxruntime import OrtRunner

        cut, out = [], []
        with OrtRunner(model, threads=self.scales.run.threads, capture=self.cuts.all) as r:
            for b in self.batches:
                o, c = r.infer_captured({**b.feed, **switch})
                cut.append(c)
                out.append(real_rows(o[self.output], b.size, b.num_rows))
        return cut, out

    def _state(self, float_groups: Sequence[str], overrides: Mapping[str, str]) -> tuple[set[str], dict[str, float]]:
        """The quantized groups and the activation amax of a state (amax_for's rule)."""
        on = {g.name for g in self.scales.groups} - set(float_groups)
        return on, self.scales.amax_for(self.scales.plan, overrides)

    def use_state(self, float_groups: Sequence[str], overrides: Mapping[str, str]) -> float:
        """Capture the cut tensors of the INT8 model in this state; its error on the subset."""
        key = (tuple(sorted(float_groups)), tuple(sorted(overrides.items())))
        self.state = (list(float_groups), dict(overrides))
        if key != self._int8_key:
            on, amax = self._state(float_groups, overrides)
            self.int8_cut, outs = self._capture(self.switch.model, self.switch.feed(on, amax))
            self.state_error = self._error(outs)
            self._int8_key = key
            if self._multi_pending:
                self._multi_pending = False
                t0 = time.perf_counter()
                self.multi = self._multi_start()
                self.build_seconds += time.perf_counter() - t0
        return self.state_error

    def _error(self, outs: Sequence[np.ndarray]) -> float:
        noise = signal = 0.0
        for ref, test in zip(self.fp32_out, outs):
            n, s = _noise_signal(ref, test, self.parts, self.energy)
            noise, signal = noise + float(n.sum()), signal + float(s.sum())
        return _ratio(noise, signal)

    def _session(self, k: int) -> Any:
        from quantkit.backends.onnxruntime import create_session

        if k not in self._sessions:
            ranks = {t: a.ndim for t, a in (self.fp32_cut or self.int8_cut)[0].items()}
            suffix = suffix_model(self.switch.model, self.cuts.tensors[k], self.types, ranks, self._switch_inputs)
            t0 = time.perf_counter()
            self._sessions[k] = create_session(suffix, threads=self.scales.run.threads, arena=SESSION_ARENA)
            self.counts["sessions"] += 1
            self.session_seconds += time.perf_counter() - t0
        return self._sessions[k]

    def _multi_start(self) -> Any:
        """One session for every cut (``MultiStart``), when the model allows it: a dynamic
        batch, and every cut tensor with the batch's rows on axis 0; else None (a session per
        run of neighbouring cuts, ``_plan_starts``)."""
        from quantkit.debug.switchable import multi_start_model

        cut = self.fp32_cut or self.int8_cut
        if self.scales.specs[0].static_batch or not cut:
            return None
        from quantkit.onnx.model import all_graphs

        if any(n.op_type in ABORTS_ON_EMPTY for g in all_graphs(self.scales.model.graph) for n in g.node):
            return None  # a run from a later cut feeds the nodes before it 0 rows, and these end the process
        rows = self.batches[0].feed[self.scales.specs[0].name].shape[0]
        first = cut[0]
        if rows < 2 or any(a.ndim < 1 or a.shape[0] != rows for a in first.values()):
            return None
        return multi_start_model(self.switch, list(self.cuts.tensors), first, _constant_names(self.switch.model),
                                 self.output)

    def _run_multi(self, k: int, switch: Mapping[str, np.ndarray], cut: Sequence[dict]) -> list[np.ndarray] | None:
        """The outputs of a run from cut ``k`` on the one multi-start session; None (and no
        multi-start from then on) when ONNX Runtime cannot run the nodes before k on empty
        tensors (a Reshape to -1, say)."""
        from quantkit.backends.onnxruntime import create_session

        try:
            if -1 not in self._sessions:
                t0 = time.perf_counter()
                self._sessions[-1] = create_session(self.multi.model, threads=self.scales.run.threads,
                                                    arena=SESSION_ARENA)
                self.counts["sessions"] += 1
                self.session_seconds += time.perf_counter() - t0
            session = self._sessions[-1]
            outs = []
            for c, b in zip(cut, self.batches):
                feed = {**{n: b.feed[n][:0] for n in self.multi.empty}, **self.multi.feed(k, c), **switch}
                outs.append(real_rows(session.run([self.output], feed)[0], b.size, b.num_rows))
            self._multi_checked = True
            return outs
        except Exception as err:  # ORT raises its own types (Fail, InvalidArgument), derived from Exception
            if self._multi_checked:
                raise
            log.info("ranking: the nodes before a cut cannot run on empty tensors here (%s); one session per "
                     "run of cuts instead", err)
            self.multi = None
            return None

    def _start(self, k: int) -> int:
        """The cut whose session runs the variants of the group cut at ``k`` (``_plan_starts``)."""
        if self._starts is None:
            self._starts = self._plan_starts()
        return self._starts[k]

    def _plan_starts(self, runs_per_group: float = 2.0) -> dict[int, int]:
        """Share sessions between neighbouring cuts: a session made at cut s also runs the
        variants of a group cut at k > s, from the tensors captured at s (the nodes in between
        belong to other groups, so they compute what the capture computed). Each session costs
        its creation, each sharing group the nodes between s and k per run: the cuts are split
        into runs of neighbours so that the sum of both is least (dynamic programming over the
        cuts in graph order; costs proportional to the share of the graph's nodes after a cut,
        the creation measured on the first session, a run measured by the FP32 capture).
        """
        cuts = sorted(self.cuts.tensors)
        frac = [self.cuts.fraction[k] for k in cuts]
        t0 = time.perf_counter()
        self._session(cuts[0])
        create = (time.perf_counter() - t0) / max(frac[0], 1e-9)  # seconds for a whole-graph session
        run = runs_per_group * self.fp32_seconds
        prefix = np.concatenate([[0.0], np.cumsum(frac)])
        best = [0.0] + [math.inf] * len(cuts)
        start = [0] * (len(cuts) + 1)
        for b in range(1, len(cuts) + 1):  # best[b]: cuts[:b] covered, cuts[a:b] served by a session at a
            for a in range(b):
                cost = best[a] + (create * frac[a] if a else 0.0) + run * ((b - a) * frac[a] - (prefix[b] - prefix[a]))
                if cost < best[b]:
                    best[b], start[b] = cost, a
        starts: dict[int, int] = {}
        b = len(cuts)
        while b > 0:
            a = start[b]
            starts.update({cuts[i]: cuts[a] for i in range(a, b)})
            b = a
        return starts

    def _run(self, group: QuantGroup, on: set[str], amax: Mapping[str, float], cut: Sequence[dict]) -> float:
        switch = self.switch.feed(on, amax)
        k = self.cuts.position[group.name]
        if self.multi is not None:
            multi = self._run_multi(k, switch, cut)
            if multi is not None:
                self.counts["suffix_runs"] += 1
                return self._error(multi)
        session = self._session(self._start(k))
        names = [i.name for i in session.get_inputs()]
        outs = []
        for c, b in zip(cut, self.batches):
            outs.append(real_rows(session.run([self.output], {n: c[n] if n in c else switch[n] for n in names})[0],
                                  b.size, b.num_rows))
        self.counts["suffix_runs"] += 1
        return self._error(outs)

    def only_float(self, group: QuantGroup) -> float:
        """INT8 model of the current state with ``group`` also in float."""
        on, amax = self._state(*self.state)
        return self._run(group, on - {group.name}, amax, self.int8_cut)

    def only_quantized(self, group: QuantGroup) -> float:
        """FP32 model with only ``group`` quantized (plain method)."""
        return self._run(group, {group.name}, self._plain_amax, self.fp32_cut)

    def amax_with(self, group: QuantGroup, method: str | None) -> dict[str, float]:
        """Every activation's amax in the current state with ``group`` on ``method`` (None: as is)."""
        floats, overrides = self.state
        return self._state(floats, overrides if method is None else {**overrides, group.name: method})[1]

    def with_method(self, group: QuantGroup, method: str) -> float:
        """INT8 model of the current state with ``group``'s tensors on ``method``."""
        on = self._state(*self.state)[0]
        return self._run(group, on, self.amax_with(group, method), self.int8_cut)


def per_sample_errors(scales: QdqScales, source: "Source", indices: Sequence[int],
                      int8: onnx.ModelProto | None = None, *, outputs: dict[int, np.ndarray] | None = None,
                      keep: int = 0) -> tuple[dict[int, float], float, float]:
    """One side-by-side pass: per sample the noise/signal of the first output; the error over
    all samples; the seconds the FP32 model took per sample. ``outputs``, when given, gets the
    FP32 first-output rows of the ``keep`` samples with the largest error (``pick_subset``'s
    choice; what the gradient estimator needs, so that it does not run the FP32 model again).
    The FP32 time per sample leaves out the first batch when there are more (ONNX Runtime's first
    run plans its memory and is slower: it made the ranking's cost look 1.6x smaller than against a
    steady pass on 16 cores)."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.ptq import evaluation_batches

    errors: dict[int, float] = {}
    count = 0
    timed: list[tuple[float, int]] = []  # (FP32 seconds, samples) per batch
    out = scales.measured_output
    parts = scales.measured_parts
    # per sample and part (one part unless a Concat writes the output): combined with the parts'
    # FP32 energies so far (the pruning of ``outputs``), and at the end with all the data's
    powers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    energy: np.ndarray | None = None

    def combined(i: int) -> tuple[float, float]:
        n, s = powers[i]
        if energy is None or n.size < 2:
            return float(n.sum()), float(s.sum())
        w = part_weights(energy)
        return float(n @ w), float(s @ w)

    batches = evaluation_batches(source, scales.specs, list(indices), scales.run)
    int8 = int8 if int8 is not None else scales.int8_model()
    with OrtRunner(scales.model, threads=scales.run.threads) as ref, OrtRunner(int8, threads=scales.run.threads) as test:
        for b in batches:
            t0 = time.perf_counter()
            r = real_rows(ref.infer(b.feed, b.batch_axes)[out], b.size, b.num_rows)
            timed.append((time.perf_counter() - t0, b.size))
            t = real_rows(test.infer(b.feed, b.batch_axes)[out], b.size, b.num_rows)
            if len(parts) >= 2 and r.ndim >= 2 and r.shape[1] == sum(parts) and np.shape(r) == np.shape(t):
                n, s = _part_noise_signal(r, t, parts)
                energy = s.sum(axis=0) if energy is None else energy + s.sum(axis=0)
            else:
                n, s = (a[:, None] for a in _noise_signal(r, t))
            powers.update({i: (ni, si) for i, ni, si in zip(b.indices, n, s)})
            count += b.size
            if outputs is not None and keep > 0:
                outputs.update({i: row.copy() for i, row in zip(b.indices, r)})
                now = {i: _ratio(*combined(i)) for i in outputs}
                worst = set(pick_subset(now, keep))
                for i in [i for i in outputs if i not in worst]:
                    del outputs[i]
    noise = signal = 0.0
    for i in powers:
        noise_i, signal_i = combined(i)
        errors[i] = _ratio(noise_i, signal_i)
        noise, signal = noise + noise_i, signal + signal_i
    steady = timed[1:] if len(timed) > 1 else timed
    return errors, _ratio(noise, signal), sum(t for t, _ in steady) / max(sum(n for _, n in steady), 1)


def pick_subset(errors: Mapping[int, float], subset: int) -> list[int]:
    """The ``subset`` samples with the largest error (ties: the earlier sample), in data order."""
    worst = sorted(errors, key=lambda i: (-errors[i], i))[:subset]
    return sorted(worst)


def rank_groups(ranker: _Ranker, groups: Sequence[QuantGroup], *, quantized: bool = True, method_groups: int = 3,
                on_step: Callable[[str, int, int], None] | None = None) -> tuple[list[SensitivityRow], dict[str, float]]:
    """Rows for ``groups`` in the ranker's current state, most sensitive first; seconds per phase."""
    costs = {"only_float_s": 0.0, "only_quantized_s": 0.0, "methods_s": 0.0}
    base = ranker.state_error
    rows = []
    for i, g in enumerate(groups):
        t0 = time.perf_counter()
        of = ranker.only_float(g)
        t1 = time.perf_counter()
        oq = ranker.only_quantized(g) if quantized else None
        costs["only_float_s"] += t1 - t0
        costs["only_quantized_s"] += time.perf_counter() - t1
        rows.append(SensitivityRow(g.name, g.nodes, g.activations, g.weights, of, oq))
        if on_step is not None:
            on_step("group", i + 1, len(groups))
    rows.sort(key=lambda r: (r.only_float_error, -(r.only_quantized_error or 0.0)))
    t0 = time.perf_counter()
    rows = best_methods(ranker, rows, method_groups, base)
    costs["methods_s"] = time.perf_counter() - t0
    return rows, costs


def best_methods(ranker: _Ranker, rows: list[SensitivityRow], method_groups: int, base: float,
                 ) -> list[SensitivityRow]:
    """``rows`` with the best method of the first ``method_groups`` (exact suffix runs;
    ``base``: the ranker's state error)."""
    rows = list(rows)
    methods = [m for m in ranker.scales.methods if m != ranker.scales.method]
    for i, r in enumerate(rows[:method_groups] if methods else []):
        g = ranker.scales.group(r.name)
        if not g.activations:
            continue
        # a method whose amax equals, on every tensor of the group, the current one's or an
        # already tried method's gives the same model: no run for it
        current = ranker.amax_with(g, None)
        seen = {tuple(current[t] for t in g.activations): base}
        trials = {ranker.scales.method: base}
        for m in methods:
            amax = ranker.amax_with(g, m)
            key = tuple(amax[t] for t in g.activations)
            if key not in seen:
                seen[key] = ranker.with_method(g, m)
            trials[m] = seen[key]
        best = min(trials, key=lambda m: (trials[m], m != ranker.scales.method))
        rows[i] = SensitivityRow(**{**asdict(r), "best_method": best, "best_method_error": trials[best]})
    return rows


def rank_sensitivity(cal: "Calibration | QdqScales", source: "Source", indices: Sequence[int] | None = None,
                     subset: int = 32, method: str | None = None, on_step: Callable[[str, int, int], None] | None = None,
                     *, method_groups: int = 3, quantized: bool = True, estimator: str = "exact",
                     output: str | None = None, _errors: tuple[dict[int, float], float, float] | None = None,
                     _fp32_outputs: Mapping[int, np.ndarray] | None = None) -> SensitivityReport:
    """Rank every quantization group of ``cal`` on the ``subset`` samples of ``source``
    (``indices``, default all) where INT8 and FP32 differ most.

    Args:
        cal: the calibration (or ``QdqScales.from_qdq_model`` for a Q/DQ model made elsewhere).
        method: the plain INT8 model's method (default: the calibration's).
        on_step: progress, ``on_step(phase, done, total)``.
        method_groups: how many of the most sensitive groups get the best-method search.
        quantized: also measure each group's ``only_quantized_error``; False skips those G
            suffix runs (about half the cost; the order, by ``only_float_error``, is the same
            but for exact ties) and leaves the field None. The fallback passes False: it
            only reads the order and the best methods.
        estimator: "exact" (suffix runs, above) or "gradient": every group's only-float error
            to first order from one torch forward + backward pass over the subset
            (``quantkit.debug.gradient``: only-float L - dL/da_g / 2, only-quantized
            dL/da_g / 2, both exact when a group's output error is uncorrelated with the
            others'; estimates, not measurements; the best-method search
            of the ``method_groups`` first groups stays exact, its cost counted). Falls back
            to "exact" (logged) when torch is missing or cannot run an op of the model.
        output: the graph output whose error is measured (``error_output``; None: its default).

    Returns:
        The ranking; its ``cost_fp32_passes`` is measured (see the module docstring).
    """
    from dataclasses import replace

    start = time.perf_counter()
    scales = cal if isinstance(cal, QdqScales) else QdqScales.from_calibration(cal)
    if output is not None:
        scales = replace(scales, output=output)
    if method is not None:
        if method not in scales.methods:
            raise InputError(f"method {method!r} has no ranges here; available: {scales.methods}")
        scales = replace(scales, method=method, groups=scales.groups, plain=None, bias_shifts=None)
    if subset <= 0:
        raise InputError(f"the ranking subset must have at least one sample, got {subset}")
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown sensitivity estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    from quantkit.ptq import check_source

    idx = check_source(source, indices)
    kept: dict[int, np.ndarray] = {}
    errors, all_error, fp32_per_sample = _errors if _errors is not None else per_sample_errors(
        scales, source, idx, outputs=kept, keep=subset if estimator == "gradient" else 0)
    if not errors:
        raise InputError("no samples to rank on", hint="give ranking data")
    if estimator != "gradient":
        subset = _subset_within_memory(scales, source, next(iter(errors)), subset)
    chosen = pick_subset(errors, subset)
    if estimator == "gradient":
        try:
            return _rank_by_gradient(scales, source, chosen, errors, all_error, fp32_per_sample * len(chosen), start,
                                     method_groups, quantized, _fp32_outputs if _errors is not None else kept)
        except (UnsupportedOpError, MissingDependencyError) as err:
            log.warning("sensitivity: the gradient estimator cannot run here (%s); exact ranking instead", err)
    t0 = time.perf_counter()
    ranker = _Ranker(scales, source, chosen)
    t1 = time.perf_counter()
    ranker.use_state([], {})
    t2 = time.perf_counter()
    rows, costs = rank_groups(ranker, scales.groups, quantized=quantized, method_groups=method_groups, on_step=on_step)
    fp32_pass = fp32_per_sample * len(chosen)
    costs = {"build_s": ranker.build_seconds, "fp32_capture_s": t1 - t0 - ranker.build_seconds,
             "int8_capture_s": t2 - t1, **costs, "fp32_pass_s": fp32_pass}
    work = sum(v for k, v in costs.items() if k != "fp32_pass_s")
    cost = work / fp32_pass if fp32_pass > 0 else math.inf
    counts = {**ranker.counts, "session_s": ranker.session_seconds}
    return SensitivityReport(rows, chosen, ranker.state_error, all_error, scales.method, cost,
                             time.perf_counter() - start, costs, counts=counts, ranker=ranker,
                             metric=_metric_text(scales))


def ranking_memory_budget() -> int:
    """Bytes the exact ranking may hold in cut tensors: a quarter of the machine's memory, at most 4 GiB."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return int(min(4 * 2**30, ram // 4))


def _subset_within_memory(scales: QdqScales, source: "Source", sample: int, subset: int) -> int:
    """``subset``, or fewer samples (with a warning) when the exact ranking's memory (its cut
    tensors, measured on one sample, and the runs' working memory) would pass
    ``ranking_memory_budget``: a 1-D signal model with [N, 256, 7500] activations held ~0.5-1 GB a
    sample and was killed at 24 GB."""
    if subset <= 1:
        return subset
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.ptq import evaluation_batches

    cuts = _Cuts(scales.model, scales.groups)
    batch = next(iter(evaluation_batches(source, scales.specs, [sample], scales.run)))
    with OrtRunner(scales.model, threads=scales.run.threads, capture=cuts.all) as r:
        try:
            _, captured = r.infer_captured(batch.feed)
        except InputError as err:  # ICLabel averages each component's four rows: no sample runs alone
            raise InputError(f"the sensitivity ranking runs single samples (those of the largest error), and the "
                             f"model does not run one sample alone: {err}",
                             hint="`quantkit debug` without --rank compares whole batches; a model that combines "
                                  "the rows of a batch cannot be ranked sample by sample") from err
    # the cut tensors of both sides, and ONNX Runtime's working memory for the switchable model's runs
    # (both branches of every switched node): ~6x one side's cuts (16.7 GB at 18 samples of 109 MB)
    per_sample = 6 * max(1, sum(np.asarray(a).nbytes for a in captured.values()))
    fits = max(1, ranking_memory_budget() // per_sample)
    if fits < subset:
        log.warning("sensitivity: the ranking subset is %d samples, not %d: the ranking takes ~%.0f MB a sample "
                    "(budget %.1f GB)", fits, subset, per_sample / 2**20, ranking_memory_budget() / 2**30)
        return int(fits)
    return subset


#: ops ONNX Runtime (1.32) ends the process on, where fed 0 rows (``std::terminate``, exit 134, no
#: exception to catch): a GRU or LSTM (g2p-en's encoder-decoder, the fifteenth probe), and loops,
#: whose bodies may hold them. The one multi-start session feeds the nodes before a cut 0 rows: not
#: made for a model that has them (a session per run of cuts instead)
ABORTS_ON_EMPTY = frozenset({*RECURRENT_OPS, "Loop", "Scan"})



ESTIMATORS = ("exact", "gradient")
#: the gradient estimator runs its products in bfloat16 (where the CPU has it) only above this INT8 error
BFLOAT16_MIN_ERROR = 1e-3


def _rank_by_gradient(scales: QdqScales, source: "Source", chosen: list[int], errors: Mapping[int, float],
                      all_error: float, fp32_pass: float,
                      start: float, method_groups: int, quantized: bool, fp32_outputs: Mapping[int, np.ndarray] | None,
                      ) -> SensitivityReport:
    """``rank_sensitivity`` with the gradient estimator (``quantkit.debug.gradient``)."""
    from quantkit.debug.gradient import fp32_rows, gradient_estimate
    from quantkit.ptq import evaluation_batches

    batches = list(evaluation_batches(source, scales.specs, chosen, scales.run))
    ref = fp32_rows(fp32_outputs, batches) if fp32_outputs else None
    # bfloat16 products add their own rounding noise, ~1e-5 to 3e-5 of the signal on the models
    # measured: only where the INT8 error is well above it (the subset's mean per-sample error)
    subset_error = float(np.mean([errors[i] for i in chosen]))
    precision = "auto" if subset_error >= BFLOAT16_MIN_ERROR else "float32"
    est = gradient_estimate(scales, batches, ref, threads=scales.run.threads, precision=precision)
    rows = [SensitivityRow(g.name, g.nodes, g.activations, g.weights, est.only_float[g.name],
                           est.only_quantized[g.name] if quantized else None) for g in scales.groups]
    rows.sort(key=lambda r: (r.only_float_error, -(r.only_quantized_error or 0.0)))
    costs = {**est.costs, "methods_s": 0.0}
    ranker = None
    t0 = time.perf_counter()
    others = [m for m in scales.methods if m != scales.method]
    trial = [scales.group(r.name) for r in rows[:method_groups]]
    if others and any(g.activations for g in trial):
        # exact trials: the captures (of these groups' cuts only) are part of their cost
        ranker = _Ranker(scales, source, chosen, groups=trial,
                         fp32=(ref, fp32_pass) if ref is not None else None)
        base = ranker.use_state([], {})
        rows = best_methods(ranker, rows, method_groups, base)
    costs["methods_s"] = time.perf_counter() - t0
    costs["fp32_pass_s"] = fp32_pass
    work = sum(v for k, v in costs.items() if k != "fp32_pass_s")
    cost = work / fp32_pass if fp32_pass > 0 else math.inf
    counts: dict[str, float] = {"forward_passes": 1.0, "backward_passes": 1.0}
    if ranker is not None:
        counts.update({**ranker.counts, "session_s": ranker.session_seconds})
    return SensitivityReport(rows, chosen, est.error, all_error, scales.method, cost, time.perf_counter() - start,
                             costs, counts=counts, ranker=ranker, estimator="gradient", metric=_metric_text(scales))


def _metric_text(scales: QdqScales) -> str:
    how = "given by --error-output" if scales.output else "the first float output not TopK-ordered"
    parts = scales.measured_parts
    each = f"; the mean over its {len(parts)} Concat parts (axis 1) of each part's" if len(parts) >= 2 else ""
    return f"noise/signal power of output {scales.measured_output!r} ({how}{each}) against FP32"
