"""Mixed precision to an accuracy budget: the fewest quantization groups back in float.

    fallback(cal, eval_source, eval_indices, FallbackConfig(max_drop=0.5))

1. Measure the INT8 model on the evaluation data (the FP32 outputs are computed once and
   cached). Within the budget: done, nothing changes.
2. Rank the groups (``rank_sensitivity``; by default on the evaluation data, reusing the
   side-by-side pass of step 1; without the only-quantized errors, which no step reads).
3. Method switches. First the whole model: every method's scales come from the one pass, so
   each other method (``WHOLE_MODEL_METHODS``) is tried on every group at once on the ranking
   subset, and the best, where it lowers the subset's output error by ``MIN_METHOD_GAIN``,
   is validated on the evaluation data and kept if it lowers the drop (TensorRT's own entropy
   calibration, ``entropy-trt``, lost 21.9 points on RapidOCR's orientation classifier; the
   per-group switches and float steps alone needed 3 of 54 groups in float and 2 switches).
   Then each of the worst groups whose best method beats the plain one is switched
   to it; a switch is kept only if it lowers the drop on the evaluation data. A switch is
   validated only when it lowers the ranking subset's output error by ``MIN_METHOD_GAIN``
   or more: in the ranking's state, and again in the current state once earlier switches
   changed it (the ranking's cached tensors, one suffix run). Smaller gains did not move
   the task metric in our runs (outlier CNN: 0.1-2% lower noise, the same accuracy) and a
   full validation costs one pass over the evaluation data.
4. Float steps: groups go back to float in sensitivity order, one per step, each step
   re-validated on the evaluation data, until the budget holds. A step that makes the drop
   worse triggers a re-ranking of the groups left, in the current state: groups interact (on
   RapidOCR's recogniser without bias correction, its first depthwise Conv's weight and the
   activation after it partly cancel: either alone in float made the drop worse, both fixed
   it), and a re-ranking in the new state puts the partner first. Re-rankings are allowed
   while they have taken no more time than the validations so far (or ``max_reranks``).
5. Put back: every group in float is tried in INT8 again, those whose step did not lower the
   drop first, then the others from the least sensitive, and stays there when the budget
   still holds (with a noisy task metric, a step that helped by a sample or two often is not
   needed once later groups are in float).

Drop metrics, in points (the budget's unit):
    accuracy        100 x (FP32 accuracy - INT8 accuracy), needs labels
    top1-agreement  100 - % of samples whose argmax agrees with FP32
    cosine          100 x (1 - mean cosine similarity of the error output)
    sqnr            100 x noise/signal power of the error output (1 point = SQNR 20 dB); of an
                    output a Concat writes along axis 1 (YOLO: boxes, class scores, mask
                    coefficients; an anchor-split detector's heads), its worst part's: every
                    part meets the budget, and so does the whole output (``compare``'s figure)
    task            FP32 metric - INT8 metric of the caller's ``task_metric`` (API only): per-sample
                    scores of a batch's first output (e.g. 100 for a text read right, 0 for not),
                    averaged over the evaluation data, so a detector's or a recogniser's own
                    decoding sets the budget

The error output: the first float graph output not ordered by a TopK (``onnx.model.error_output``).

Nothing is written here: the caller saves ``FallbackResult.int8_model`` at the end (an
interrupted run leaves no artifact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from quantkit._values import comparable
from quantkit.backends.base import real_rows
from quantkit.debug.sensitivity import (ESTIMATORS, QdqScales, SensitivityReport, _ratio, noise_signal_by_part,
                                        part_energy, rank_groups, rank_sensitivity)
from quantkit.errors import InputError, check_fields
from quantkit.onnx.model import error_output, few_regression_values, l2_normalized, last_axis_classes, named_axis_1

if TYPE_CHECKING:
    from quantkit.datasets.sources import Source
    from quantkit.ptq import Calibration

log = logging.getLogger(__name__)

DROP_METRICS = ("accuracy", "top1-agreement", "sqnr", "cosine")
#: a method switch is validated only if it lowers the ranking subset's noise/signal by this share
MIN_METHOD_GAIN = 0.05
#: the methods tried on the whole model (the first method switch), where the scales have them
WHOLE_MODEL_METHODS = ("entropy", "mse", "percentile", "minmax")

#: the evaluation batches are held in memory between steps up to this many bytes of inputs
HELD_EVAL_BYTES = 256 * 2**20

#: A task metric: ``(first output of a batch [n, ...], the batch's sample indices) -> per-sample
#: scores [n]`` in points, higher is better; the metric is their mean over the evaluation data.
TaskMetric = Callable[[np.ndarray, Sequence[int]], Any]


@dataclass(frozen=True)
class FallbackConfig:
    """The budget and how hard to work for it.

    Attributes:
        max_drop: the largest drop allowed, in points of ``drop_metric`` (>= 0).
        drop_metric: one of DROP_METRICS; None: accuracy when the data has labels, else
            top1-agreement (``resolve_drop_metric``).
        subset: samples in the ranking subset.
        method_groups: how many of the worst groups try other range methods.
        max_float_groups: at most this many groups in float (None: no limit); reaching it
            without meeting the budget ends the run with ``met=False``.
        max_reranks: re-rankings after steps that made the drop worse (None: while re-ranking
            has taken no more time than the validations so far).
        estimator: the sensitivity ranking's estimator ("exact" or "gradient":
            ``rank_sensitivity``); every step is validated exactly either way.
        output: the graph output whose error the metric reads (``error_output``; None: the first
            float output not ordered by value). A detector whose first output is its boxes
            measures its class scores with ``output="scores"``.
    """

    max_drop: float
    drop_metric: str | None = None
    subset: int = 32
    method_groups: int = 3
    max_float_groups: int | None = None
    max_reranks: int | None = None
    estimator: str = "exact"
    output: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, drop_metric=(str, type(None)), subset=(int,), method_groups=(int,),
                     max_float_groups=(int, type(None)), max_reranks=(int, type(None)), estimator=(str,),
                     output=(str, type(None)))
        if not (isinstance(self.max_drop, numbers.Real) and not isinstance(self.max_drop, bool)
                and math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise InputError(f"the accuracy budget (--max-drop) must be a finite number >= 0, got {self.max_drop!r}")
        object.__setattr__(self, "max_drop", float(self.max_drop))  # (numpy's float32 too)
        if self.drop_metric is not None and self.drop_metric not in (*DROP_METRICS, "task"):
            raise InputError(f"unknown drop metric {self.drop_metric!r}; choose one of {list(DROP_METRICS)}")
        if self.subset <= 0:
            raise InputError(f"the ranking subset must have at least one sample, got {self.subset}")
        if self.max_float_groups is not None and self.max_float_groups < 0:
            raise InputError(f"max_float_groups must be >= 0, got {self.max_float_groups}")
        if self.max_reranks is not None and self.max_reranks < 0:
            raise InputError(f"max_reranks must be >= 0, got {self.max_reranks}")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"unknown sensitivity estimator {self.estimator!r}; choose one of {list(ESTIMATORS)}")


def has_labels(source: "Source", indices: Sequence[int]) -> bool:
    """Whether every sample of ``indices`` has a label."""
    return bool(indices) and all(source.label(i) is not None for i in indices)


def resolve_drop_metric(metric: str | None, source: "Source", indices: Sequence[int], *,
                        output_rank: int | None = None, where: str = "the evaluation data",
                        output_values: int | None = None, embedding: bool = False,
                        named_axis: bool = False, per_position: bool = False, few_values: bool = False) -> str:
    """The drop metric to use: ``metric``, or accuracy when the data has labels, else
    top1-agreement (sqnr for an output that is not [N, classes] with two classes or more; cosine
    for an ``embedding``, ``l2_normalized``'s: its argmax means nothing).
    ``output_values``: the error output's values a sample, where its shape says (None: unknown).
    ``named_axis``: the output's axis 1 is declared with a name (a sequence's length, ``[B, T]``),
    not a number: classes are a fixed number, so it is not [N, classes] (rapidocrlite's
    recogniser's per-step confidence: top-1 agreement over time steps flipped with any rounding,
    and a 5-point budget returned 42 of 62 groups to float where the output was at 34.7 dB).
    ``few_values``: ``[N, k]`` with k < 10 that no Softmax writes (``few_regression_values``: three
    MOS scores, a box): figures, not classes, unless the data has labels (then its first output
    is the classes they label).
    ``per_position``: the output is a Softmax over the last axis of rank 3+ (``last_axis_classes``,
    a CTC recogniser's ``[N, T, classes]``): top1-agreement, asked for, is per position (the
    default stays sqnr; accuracy needs one label a sample of ``[N, classes]``).

    Raises:
        InputError: accuracy without labels, a class metric on an output that is not
            [N, classes], or cosine on an output of one value a sample (only its sign would
            count) — before any work.
    """
    labelled = has_labels(source, indices)
    classifier = output_rank in (None, 2) and output_values != 1  # [N, 1]: argmax agrees always
    if metric is None:
        if embedding and output_values != 1:
            return "cosine"
        if named_axis or few_values and not labelled:  # (asked for by name, a class metric runs: the name
            classifier = False                        # may be an exporter's, the figures a classifier's)
        return "accuracy" if labelled and classifier else "top1-agreement" if classifier else "sqnr"
    if metric not in DROP_METRICS:
        raise InputError(f"unknown drop metric {metric!r}; choose one of {list(DROP_METRICS)}")
    if metric == "accuracy" and not labelled:
        raise InputError(f"--drop-metric accuracy needs labels, and {where} has none",
                         hint="use an image folder with class subfolders (or an .npz with 'labels'), or "
                              "--drop-metric top1-agreement")
    if metric == "top1-agreement" and per_position:
        return metric
    if metric in ("accuracy", "top1-agreement") and not classifier:
        what = "one value a sample" if output_values == 1 else f"rank {output_rank}"
        raise InputError(f"--drop-metric {metric} needs a classifier output [N, classes]; the model's error output "
                         f"has {what}", hint="use --drop-metric sqnr" + ("" if output_values == 1 else " or cosine"))
    if metric == "cosine" and output_values == 1:
        raise InputError("--drop-metric cosine on an output of one value a sample would only count whether the "
                         "signs agree", hint="use --drop-metric sqnr")
    return metric


@dataclass
class FallbackResult:
    """The outcome. ``int8_model`` meets the budget when ``met`` (with ``float_groups`` in
    float and ``method_overrides`` applied); otherwise it is the best state reached, and
    ``message`` says why the budget was not met."""

    met: bool
    int8_model: onnx.ModelProto
    float_groups: list[str]
    method_overrides: dict[str, str]
    num_groups: int
    drop_metric: str
    max_drop: float
    fp32_metric: float | None
    int8_metric_before: float | None
    int8_metric_after: float | None
    drop_before: float
    drop_after: float
    steps: list[dict[str, Any]]
    seconds: float
    ranking: SensitivityReport | None = None
    message: str = ""
    float_nodes: list[str] = field(default_factory=list)
    output: str = ""  # the graph output the metric reads
    #: the sqnr of an output a Concat writes along axis 1: its parts, each held to the budget (0: one whole)
    output_parts: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON data (an infinite SQNR is written as "inf", as in every result file)."""
        return {"met": self.met, "message": self.message, "drop_metric": self.drop_metric, "output": self.output,
                **({"output_parts": self.output_parts} if self.output_parts else {}), "max_drop": self.max_drop,
                "num_groups": self.num_groups, "float_groups": list(self.float_groups),
                "float_nodes": list(self.float_nodes), "method_overrides": dict(self.method_overrides),
                "fp32_metric": self.fp32_metric, "int8_metric_before": self.int8_metric_before,
                "int8_metric_after": self.int8_metric_after, "drop_before": self.drop_before,
                "drop_after": self.drop_after, "seconds": self.seconds, "steps": [dict(s) for s in self.steps]}


@dataclass(frozen=True)
class _Measure:
    metric: float | None
    drop: float
    per_sample: dict[int, float]
    noise: float
    signal: float


class _Evaluator:
    """The evaluation data's FP32 outputs and labels, computed once; measures any variant."""

    def __init__(self, scales: QdqScales, source: "Source", indices: Sequence[int], metric: str,
                 task_metric: TaskMetric | None = None):
        from quantkit.backends.onnxruntime import OrtRunner
        from quantkit.ptq import evaluation_batches

        self.scales, self.metric, self.task_metric = scales, metric, task_metric
        batcher = evaluation_batches(source, scales.specs, list(indices), scales.run)
        # a task metric scores the first output, as its contract says; the other metrics the error output
        self.output = scales.model.graph.output[0].name if metric == "task" else scales.measured_output
        self.ref: list[np.ndarray] = []
        self.ref_indices: list[list[int]] = []
        self.labels: list[np.ndarray | None] = []
        self._timed: list[tuple[float, int]] = []  # the FP32 pass: (seconds, samples) per batch
        # every step measures on these batches: held after this pass when they are small, so a
        # step does not read and stack the samples again; else read again for each step
        held: list[Any] | None = []
        held_bytes = 0
        with OrtRunner(scales.model, threads=scales.run.threads) as r:
            for b in batcher:
                t0 = time.perf_counter()
                self.ref.append(real_rows(r.infer(b.feed, b.batch_axes)[self.output], b.size, b.num_rows))
                self._timed.append((time.perf_counter() - t0, b.size))
                self.ref_indices.append(list(b.indices))
                self.labels.append(b.labels)
                held_bytes += sum(a.nbytes for a in b.feed.values())
                if held is not None and held_bytes <= HELD_EVAL_BYTES:
                    held.append(b)
                else:
                    held = None
        self.batches: Sequence[Any] | Any = held if held is not None else batcher
        # a Concat-written output (YOLO's boxes beside class scores): each part one signal
        self.parts = scales.measured_parts if self.output == scales.measured_output else []
        self.energy = part_energy(self.ref, self.parts)
        self.count = sum(len(r) for r in self.ref)
        #: top1-agreement of a rank-3+ output that is a Softmax over its last axis: per position
        self.per_position = metric == "top1-agreement" and self.ref[0].ndim >= 3 if self.ref else False
        self.positions = sum(int(np.prod(r.shape[:-1])) for r in self.ref)
        if self.count == 0:
            raise InputError("no evaluation samples could be read", hint="check the evaluation data")
        self.fp32_metric: float | None
        if metric == "task":
            self.fp32_metric = sum(self._task(r, b.indices) for r, b in zip(self.ref, self.batches)) / self.count
        elif metric == "accuracy":
            if any(lab is None for lab in self.labels):
                raise InputError("--drop-metric accuracy needs labels, and the evaluation data has none",
                                 hint="use --drop-metric top1-agreement")
            self.fp32_metric = 100.0 * sum(
                int((r.argmax(1) == lab).sum()) for r, lab in zip(self.ref, self.labels)) / self.count
            classes = int(self.ref[0].shape[1]) if self.ref and self.ref[0].ndim >= 2 else 0
            if classes >= 2 and self.count >= 2 * classes and self.fp32_metric <= 100.0 / classes:
                # labels of other classes (folders named after another model's, or shifted by one)
                # make every drop look small: a budget "met" with FP32 at 0% said nothing
                raise InputError(f"the FP32 model scores {self.fp32_metric:.1f}% on the evaluation labels, no better "
                                 f"than chance (1 in {classes}): they do not look like the labels of this model's "
                                 "classes, and an accuracy budget on them means nothing",
                                 hint="check the class folders' names and order against the model's classes, or use "
                                      "--drop-metric top1-agreement (no labels needed)")
        else:
            self.fp32_metric = {"top1-agreement": 100.0, "cosine": 1.0, "sqnr": math.inf}[metric]

    @property
    def fp32_seconds_per_sample(self) -> float:
        """The FP32 pass per sample, the first batch left out when there are more (ONNX Runtime's
        first run plans its memory: ``per_sample_errors``)."""
        steady = self._timed[1:] if len(self._timed) > 1 else self._timed
        return sum(t for t, _ in steady) / max(sum(n for _, n in steady), 1)

    def _task(self, out: np.ndarray, indices: Sequence[int]) -> float:
        """The sum of the task metric's per-sample scores of one batch."""
        scores = np.asarray(self.task_metric(out, list(indices)), dtype=np.float64).reshape(-1)  # type: ignore[misc]
        if scores.size != len(out) or not np.isfinite(scores).all():
            raise InputError(f"the task metric returned {scores.size} score(s) for a batch of {len(out)} sample(s)"
                             + ("" if scores.size != len(out) else " with a value that is not finite"),
                             hint="return one finite score per sample of the batch")
        return float(scores.sum())

    def measure(self, model: onnx.ModelProto) -> _Measure:
        from quantkit.backends.onnxruntime import OrtRunner

        per: dict[int, float] = {}
        noise = signal = cos = task = 0.0
        agree = correct = 0
        parted = self.metric == "sqnr" and self.energy is not None and len(self.parts) >= 2
        part_noise = np.zeros(len(self.parts)) if parted else None  # each Concat part's noise power
        with OrtRunner(model, threads=self.scales.run.threads) as r:
            for b, ref, lab in zip(self.batches, self.ref, self.labels):
                out = real_rows(r.infer(b.feed, b.batch_axes)[self.output], b.size, b.num_rows)
                n, s, by_part = noise_signal_by_part(ref, out, self.parts, self.energy)
                for i, ni, si in zip(b.indices, n, s):
                    per[i] = _ratio(float(ni), float(si))
                noise, signal = noise + float(n.sum()), signal + float(s.sum())
                if part_noise is not None and by_part is not None:
                    part_noise += by_part.sum(axis=0)
                if self.metric == "task":
                    task += self._task(out, b.indices)
                elif self.metric == "cosine":
                    a, t = comparable(ref.reshape(len(ref), -1), out.reshape(len(out), -1))
                    na, nt = np.linalg.norm(a, axis=1), np.linalg.norm(t, axis=1)
                    c = np.where((na == 0) & (nt == 0), 1.0, (a * t).sum(1) / np.maximum(na * nt, 1e-300))
                    cos += float(c.sum())
                elif self.metric == "top1-agreement" and self.per_position:  # [N, T, classes]: each position
                    agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
                elif self.metric in ("accuracy", "top1-agreement"):
                    agree += int((ref.argmax(1) == out.argmax(1)).sum())
                    if lab is not None:
                        correct += int((out.argmax(1) == lab).sum())
        if self.metric == "task":
            value = task / self.count
            drop = self.fp32_metric - value  # type: ignore[operator]
        elif self.metric == "accuracy":
            value = 100.0 * correct / self.count
            drop = self.fp32_metric - value  # type: ignore[operator]
        elif self.metric == "top1-agreement":
            value = 100.0 * agree / (self.positions if self.per_position else self.count)
            drop = 100.0 - value
        elif self.metric == "cosine":
            value = cos / self.count
            drop = 100.0 * (1.0 - value)
        else:  # of a Concat-written output, its worst part's: every part meets the budget
            ratio = _ratio(noise, signal) if part_noise is None else \
                max((float(n) / float(e) for n, e in zip(part_noise, self.energy) if e > 0), default=0.0)  # type: ignore[arg-type]
            value = math.inf if ratio == 0 else -math.inf if math.isinf(ratio) else -10.0 * math.log10(ratio)
            drop = 100.0 * ratio
        return _Measure(value, float(drop), per, noise, signal)


def fallback(cal: "Calibration | QdqScales", eval_source: "Source", eval_indices: Sequence[int] | None,
             config: FallbackConfig, ranking_source: "Source | None" = None,
             ranking_indices: Sequence[int] | None = None,
             on_step: Callable[[dict[str, Any]], None] | None = None,
             task_metric: TaskMetric | None = None,
             on_rank: Callable[[str, int, int], None] | None = None) -> FallbackResult:
    """Meet ``config.max_drop`` on the evaluation data with the fewest groups in float (see
    the module docstring). ``on_step(step)`` gets every step's record as it is made;
    ``on_rank(phase, done, total)`` the rankings' progress (``rank_sensitivity``'s ``on_step``).
    ``task_metric`` (``TaskMetric``): the budget is in points of the caller's metric (drop
    metric "task"; ``config.drop_metric`` must then be None or "task").

    Raises:
        InputError: a bad budget or metric; accuracy on data without labels (before any work).
    """
    from quantkit.ptq import Calibration, check_source

    start = time.perf_counter()
    if not isinstance(config, FallbackConfig):
        raise InputError(f"config must be a FallbackConfig, got {type(config).__name__}")
    if not isinstance(cal, (Calibration, QdqScales)):
        raise InputError(f"fallback takes the Calibration that quantkit.quantize returns (or QdqScales), got "
                         f"{type(cal).__name__}", hint="cal = quantkit.quantize(model, source); fallback(cal, ...)")
    idx = check_source(eval_source, eval_indices)
    if ranking_source is not None:
        ranking_indices = check_source(ranking_source, ranking_indices)
    scales = cal if isinstance(cal, QdqScales) else QdqScales.from_calibration(cal)
    if config.output is not None:
        scales = dataclasses.replace(scales, output=config.output)
    if task_metric is not None:
        if config.drop_metric not in (None, "task"):
            raise InputError(f"a task metric was given, and the drop metric {config.drop_metric!r} too; "
                             "the budget is in points of one of them", hint="leave drop_metric unset")
        metric = "task"
    else:
        metric = drop_metric_for(scales.model, scales.measured_output, config.drop_metric, eval_source, idx)
    if metric in ("accuracy", "top1-agreement") and idx and 0 < config.max_drop < 100.0 / len(idx):
        log.warning("the budget of %.3g points is less than one evaluation sample (%.3g points of %d): no sample may "
                    "change, and on near ties the fallback may return many groups to float; use more evaluation "
                    "samples or a budget of at least %.3g", config.max_drop, 100.0 / len(idx), len(idx),
                    100.0 / len(idx))
    groups = scales.groups
    steps: list[dict[str, Any]] = []

    def record(action: str, names: Sequence[str], m: _Measure, t0: float, **extra: Any) -> dict[str, Any]:
        step = {"step": len(steps), "action": action, "groups": list(names), "metric": m.metric, "drop": m.drop,
                "seconds": time.perf_counter() - t0, "float_groups": len(floats), **extra}
        steps.append(step)
        log.info("fallback step %d: %s %s -> drop %.4g", step["step"], action, ",".join(names), m.drop)
        if on_step is not None:
            on_step(step)
        return step

    t0 = time.perf_counter()
    ev = _Evaluator(scales, eval_source, idx, metric, task_metric)
    floats: list[str] = []
    overrides: dict[str, str] = {}
    plain = scales.int8_model()
    before = ev.measure(plain)
    record("int8", [], before, t0)
    current, model = before, plain

    def result(met: bool, message: str = "", ranking: SensitivityReport | None = None) -> FallbackResult:
        nodes = [n for g in floats for n in scales.group(g).nodes]
        # a group in float has no method: its switch, made before it went to float, is not reported
        switched = {g: m for g, m in overrides.items() if g not in floats}
        return FallbackResult(met, model, list(floats), switched, len(groups), metric, config.max_drop,
                              ev.fp32_metric, before.metric, current.metric, before.drop, current.drop, steps,
                              time.perf_counter() - start, ranking, message, nodes, ev.output,
                              len(ev.parts) if metric == "sqnr" and ev.energy is not None else 0)

    if before.drop <= config.max_drop:
        return result(True, f"the INT8 model meets the budget: drop {before.drop:.3g} <= {config.max_drop:g}")

    # the ranking: on the evaluation data, the side-by-side pass above is the one it needs
    t0 = time.perf_counter()
    if ranking_source is None:
        errors = (before.per_sample, _ratio(before.noise, before.signal), ev.fp32_seconds_per_sample)
        outputs = {i: row for ix, ref in zip(ev.ref_indices, ev.ref) for i, row in zip(ix, ref)}
        ranking = rank_sensitivity(scales, eval_source, idx, subset=config.subset, method_groups=config.method_groups,
                                   quantized=False, estimator=config.estimator, _errors=errors, _fp32_outputs=outputs,
                                   on_step=on_rank)
    else:
        ranking = rank_sensitivity(scales, ranking_source, ranking_indices, subset=config.subset,
                                   method_groups=config.method_groups, quantized=False, estimator=config.estimator,
                                   on_step=on_rank)
    record("rank", [], current, t0, cost_fp32_passes=ranking.cost_fp32_passes)

    spent = {"validate": 0.0, "rerank": 0.0}  # seconds, for the re-rankings' allowance

    def try_state(new_floats: list[str], new_overrides: dict[str, str]) -> tuple[onnx.ModelProto, _Measure]:
        t = time.perf_counter()
        m = scales.int8_model(new_floats, new_overrides)
        got = ev.measure(m)
        spent["validate"] += time.perf_counter() - t
        return m, got

    # 1) method switches: the whole model, then the worst groups, each kept only when it helps
    ranker = ranking.ranker
    order = [r.name for r in ranking.rows]

    def rerank(ranker: Any) -> tuple[Any, list[str]]:
        """The groups not in float ranked again in the current state (a ranker of every group's
        cuts: the ranking's, when it has them), and that ranker."""
        t0 = time.perf_counter()
        if ranker is None or not ranker.covers_all:  # the FP32 side of the subset is captured once
            ranker = _ranker_for(scales, eval_source, idx, ranking, ranking_source, ranking_indices)
        ranker.use_state(floats, overrides)
        remaining = [scales.group(n) for n in order if n not in floats]
        rows, _ = rank_groups(ranker, remaining, quantized=False, method_groups=0, on_step=on_rank)
        spent["rerank"] += time.perf_counter() - t0
        record("rerank", [], current, t0)
        return ranker, [*floats, *(r.name for r in rows)]

    def may_rerank() -> bool:
        if config.max_reranks is not None:
            return reranks < config.max_reranks
        return spent["rerank"] <= spent["validate"]

    if current.drop > config.max_drop and config.method_groups > 0:
        t0 = time.perf_counter()
        whole = _whole_model_method(scales, ranker, ranking.int8_error)
        if whole is not None:
            cand = {g.name: whole for g in groups}
            m, got = try_state(floats, cand)
            kept = got.drop < current.drop
            if kept:
                overrides, model, current = cand, m, got
            record("method", ["(every group)"], got, t0, method=whole, kept=kept)
            if kept and current.drop > config.max_drop and ranker is not None:  # rank again in this state
                ranker, order = rerank(ranker)
    for row in ranking.rows:
        if current.drop <= config.max_drop:
            break
        if row.best_method is None or row.best_method == overrides.get(row.name, scales.method) \
                or row.best_method_error is None \
                or row.best_method_error > (1.0 - MIN_METHOD_GAIN) * ranking.int8_error:
            continue
        t0 = time.perf_counter()
        if ranker is not None and overrides:  # the state moved since the ranking: check on the subset first
            now = ranker.use_state(floats, overrides)
            trial = ranker.with_method(scales.group(row.name), row.best_method)
            if trial > (1.0 - MIN_METHOD_GAIN) * now:
                record("method", [row.name], current, t0, method=row.best_method, kept=False, validated=False,
                       subset_error=trial, subset_error_before=now)
                continue
        cand = {**overrides, row.name: row.best_method}
        m, got = try_state(floats, cand)
        kept = got.drop < current.drop
        if kept:
            overrides, model, current = cand, m, got
        record("method", [row.name], got, t0, method=row.best_method, kept=kept)

    # 2) groups to float in sensitivity order, re-ranking after a step that made things worse
    helped: dict[str, bool] = {}
    reranks = 0
    message = ""
    while current.drop > config.max_drop:
        left = [g for g in order if g not in floats]
        if not left:
            break
        if config.max_float_groups is not None and len(floats) >= config.max_float_groups:
            message = f"within the limit of {config.max_float_groups} group(s) in float"
            break
        g = left[0]
        t0 = time.perf_counter()
        m, got = try_state([*floats, g], overrides)
        worse = got.drop > current.drop
        helped[g] = got.drop < current.drop
        floats.append(g)
        model, current = m, got
        record("float", [g], got, t0, kept=True)
        if worse and current.drop > config.max_drop and may_rerank():
            reranks += 1
            ranker, order = rerank(ranker)

    # 3) put back into INT8 what the budget allows: what did not help first, then from the least sensitive
    if current.drop <= config.max_drop:
        # without the group of the last float step: that state was measured before it, over the budget
        known = {floats[-1]} if floats and steps[-1]["action"] == "float" else set()
        for g in sorted((g for g in reversed(floats) if g not in known), key=lambda g: helped.get(g, True)):
            t0 = time.perf_counter()
            fewer = [f for f in floats if f != g]
            m, got = try_state(fewer, overrides)
            kept = got.drop <= config.max_drop
            if kept:
                floats, model, current = fewer, m, got
            record("int8 again", [g], got, t0, kept=kept)

    met = current.drop <= config.max_drop
    if met:
        message = (f"budget met: drop {current.drop:.3g} <= {config.max_drop:g} {metric} points with "
                   f"{len(floats)} of {len(groups)} groups in float"
                   + _switches({g: m for g, m in overrides.items() if g not in floats}, len(groups)))  # (as the result's)
    else:
        reason = message or ("even with every group in float" if len(floats) == len(groups) else "")
        message = (f"the budget of {config.max_drop:g} {metric} points cannot be met {reason}: drop "
                   f"{current.drop:.3g} with {len(floats)} of {len(groups)} groups in float").replace("  ", " ")
    return result(met, message, ranking)


def _switches(overrides: Mapping[str, str], num_groups: int) -> str:
    """How the methods were switched, for the result's message."""
    if not overrides:
        return ""
    methods = set(overrides.values())
    if len(overrides) == num_groups and len(methods) == 1:
        return f" and every group on {methods.pop()}"
    return f" and {len(overrides)} method switch(es)"


def _whole_model_method(scales: QdqScales, ranker: Any, plain_error: float) -> str | None:
    """The method (of ``WHOLE_MODEL_METHODS`` other than the plain one) that gives the ranking
    subset the lowest output error when every group uses it, if it beats ``plain_error`` by
    ``MIN_METHOD_GAIN``; without a ranker (the gradient estimator), the first such method."""
    methods = [m for m in WHOLE_MODEL_METHODS if m != scales.method and m in scales.methods]
    if not methods:
        return None
    if ranker is None:
        return methods[0]
    errors = {m: ranker.use_state([], {g.name: m for g in scales.groups}) for m in methods}
    ranker.use_state([], {})  # back to the plain state the ranking's rows were measured in
    best = min(errors, key=errors.__getitem__)
    return best if errors[best] <= (1.0 - MIN_METHOD_GAIN) * plain_error else None


def _ranker_for(scales: QdqScales, eval_source: "Source", idx: Sequence[int], ranking: SensitivityReport,
                ranking_source: "Source | None", ranking_indices: Sequence[int] | None) -> Any:
    from quantkit.debug.sensitivity import _Ranker

    src = eval_source if ranking_source is None else ranking_source
    return _Ranker(scales, src, ranking.subset_indices)




def check_fixed_output(model: onnx.ModelProto, specs: Sequence[Any], source: "Source", indices: Sequence[int],
                       run: Any, output: str | None = None) -> None:
    """Refuse, before any calibration, an error output (``error_output(model, output)``) whose shape
    follows the values: the FP32 model's output on the first two evaluation samples, run one at a
    time, has two shapes where their inputs have one (the boxes NonMaxSuppression keeps). The
    fallback compares that output sample by sample and found out only after the calibration. Run
    only where the output is computed through an op whose output shape follows the values it reads
    (``SELECTING_OPS``) of a weighted layer's results: INT8 can move those values, where a
    selection by an input (the tokens an attention mask keeps) is the same in both models."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.debug.sensitivity import _sample_shape, data_dependent_shape_error
    from quantkit.ptq import RunConfig, evaluation_batches

    name = error_output(model, output)
    if len(indices) < 2 or not _selected_by_computed_values(model, name):
        return
    seen: list[tuple[Any, list[int]]] = []
    batches = evaluation_batches(source, specs, list(indices[:2]), RunConfig(batch_size=1, threads=run.threads))
    with OrtRunner(model, threads=run.threads) as r:
        for b in batches:
            inputs = tuple(sorted((k, np.shape(v)) for k, v in b.feed.items()))
            seen.append((inputs, _sample_shape(r.infer(b.feed, b.batch_axes)[name])))
    if len(seen) == 2 and seen[0][0] == seen[1][0] and seen[0][1] != seen[1][1]:
        raise data_dependent_shape_error(f"{name!r} is {seen[0][1]} on one evaluation sample and {seen[1][1]} on the "
                                         "next, of the same input shape")


#: ops whose output shape follows the values of their inputs
SELECTING_OPS = frozenset({"NonMaxSuppression", "NonZero", "Compress", "Unique"})


def _selected_by_computed_values(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``name`` is computed through a ``SELECTING_OPS`` node that reads (through any path)
    a weighted layer's output: one forward pass in ONNX's topological order, as
    ``value_ordered_outputs`` makes."""
    from quantkit.onnx.model import WEIGHTED_OPS, node_reads

    computed: set[str] = set()  # tensors a weighted layer's output flows into
    selected: set[str] = set()  # tensors a selection of such values flows into
    for node in model.graph.node:
        reads = node_reads(node)
        if node.op_type in SELECTING_OPS and any(t in computed for t in reads) or any(t in selected for t in reads):
            selected.update(t for t in node.output if t)
        if node.op_type in WEIGHTED_OPS or any(t in computed for t in reads):
            computed.update(t for t in node.output if t)
    return name in selected


def drop_metric_for(model: onnx.ModelProto, output: str, metric: str | None, source: "Source",
                    indices: Sequence[int]) -> str:
    """``resolve_drop_metric`` for the graph output ``output`` of ``model``: its declared shape and
    whether it is an L2-normalized embedding decide the default."""
    rank, values = _output_shape(model, output)
    return resolve_drop_metric(metric, source, indices, output_rank=rank, output_values=values,
                               embedding=l2_normalized(model, output),
                               named_axis=named_axis_1(model, output), few_values=few_regression_values(model, output),
                               per_position=last_axis_classes(model, output))


def _output_shape(model: onnx.ModelProto, name: str | None = None) -> tuple[int | None, int | None]:
    """The error output's (``name``, default ``error_output``'s) rank and values a sample (the
    product of its static dims after the first; None where the shape does not say)."""
    name = name or error_output(model)
    t = next(o for o in model.graph.output if o.name == name).type.tensor_type
    if not t.HasField("shape"):
        return None, None
    dims = t.shape.dim[1:]
    values = int(np.prod([d.dim_value for d in dims])) if all(d.HasField("dim_value") for d in dims) else None
    return len(t.shape.dim), values
