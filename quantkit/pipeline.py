"""Post-training calibration end to end: one capture pass, every method, every artifact.

    model + source -> Batcher -> capture (ONNX Runtime) -> histograms -> amax per method
      -> Q/DQ ONNX, TensorRT calibration cache, ranges.json (+ report.json by the caller)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from quantkit.calibrators.cache import DEFAULT_TRT_VERSION, CalibrationCache
from quantkit.calibrators.collectors import Histogram
from quantkit.calibrators.methods import ALL_METHODS, BASE_METHODS, TensorRanges, all_ranges
from quantkit.datasets.batching import Batch, Batcher
from quantkit.datasets.sources import Source
from quantkit.errors import DatasetError, InputError, ModelError, UnknownMethodError
from quantkit.onnx.capture import capture_histograms, float_activations
from quantkit.onnx.model import TensorSpec, check_not_quantized, ensure_opset, float_input_specs, opset_version
from quantkit.onnx.qdq import QdqPlan, insert_qdq, plan_qdq

if TYPE_CHECKING:
    from quantkit.calibrators.stats import CalibrationStats

log = logging.getLogger(__name__)

METHODS = ALL_METHODS


@dataclass(frozen=True)
class CalibConfig:
    """Settings of one calibration.

    Attributes:
        method: the method whose scales go into the Q/DQ model and the cache.
        num_bins: histogram bins per tensor.
        percentile: for the percentile method, in (0, 100].
        auto_tolerance: ``auto`` keeps entropy unless its expected error is this many times
            the best candidate's.
        batch_size: samples per inference batch (a model with a fixed batch uses its own).
        threads: ONNX Runtime intra-op threads (None: one per core).
        cache_all_tensors: capture every float tensor, so the TensorRT cache covers the whole
            network (slower); by default only the tensors that Q/DQ placement quantizes.
        strict: stop at the first unreadable sample instead of skipping it.
        sample_stride: histograms of large activations count the body from every k-th value
            and the tail from every value (1: every value everywhere); see HistogramCollector.
        target: Q/DQ placement, ``tensorrt`` (inputs of weighted layers and residual Adds) or
            ``onnxruntime`` (every activation, so ONNX Runtime runs integer kernels).
        pow2_grid: histograms start on a power-of-two range, so that the statistics of runs
            on different data merge exactly (``quantkit merge-stats``).
    """

    method: str = "entropy"
    num_bins: int = 2048
    percentile: float = 99.99
    auto_tolerance: float = 2.0
    batch_size: int = 32
    threads: int | None = None
    cache_all_tensors: bool = False
    strict: bool = False
    sample_stride: int = 5
    target: str = "tensorrt"
    pow2_grid: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownMethodError(f"unknown calibration method {self.method!r}; available: {list(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise InputError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if self.num_bins < 256 or self.num_bins & (self.num_bins - 1):
            raise InputError(f"num_bins must be a power of two >= 256, got {self.num_bins}")
        from quantkit.onnx.qdq import TARGETS

        if self.target not in TARGETS:
            raise InputError(f"unknown Q/DQ target {self.target!r}; choose one of {list(TARGETS)}")
        if self.sample_stride < 1:
            raise InputError(f"histogram sample stride must be >= 1, got {self.sample_stride}")


@dataclass
class Calibration:
    """The statistics of one pass and everything derived from them."""

    model: onnx.ModelProto
    plan: QdqPlan
    histograms: dict[str, Histogram]
    ranges: dict[str, TensorRanges]
    config: CalibConfig
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sampling: dict[str, Any] | None = None

    def amax(self, method: str | None = None, *, quantized_only: bool = False) -> dict[str, float]:
        method = method or self.config.method
        if method not in METHODS:
            raise UnknownMethodError(f"unknown calibration method {method!r}; available: {list(METHODS)}")
        names = self.plan.activation_names if quantized_only else list(self.ranges)
        return {t: self.ranges[t].amax[method] for t in names}

    def int8_model(self, method: str | None = None) -> onnx.ModelProto:
        """The Q/DQ model with the scales of ``method`` (default: the configured one)."""
        return insert_qdq(self.model, self.plan, self.amax(method, quantized_only=True))

    def cache(self, method: str | None = None, *, trt_version: int = DEFAULT_TRT_VERSION) -> CalibrationCache:
        method = method or self.config.method
        return CalibrationCache.from_amax(self.amax(method), method, trt_version)

    def ranges_document(self, method: str | None = None, **metadata: Any) -> dict[str, Any]:
        """The content of ranges.json."""
        method = method or self.config.method
        tensors = {}
        for name, r in self.ranges.items():
            h = self.histograms[name]
            tensors[name] = {
                **{m: r.amax[m] for m in BASE_METHODS},
                "auto": r.amax["auto"],
                "entropy-trt": r.amax["entropy-trt"],
                "auto_choice": r.auto.method,
                "entropy_rule": "mse (two-sided tensor)" if r.two_sided else "kl",
                "observed_min": h.observed_min,
                "observed_max": h.observed_max,
                "quantized": name in self.plan.activations,
            }
        return {
            "method": method,
            "tensors": tensors,
            "weights": {n: {"axis": ax, "consumers": list(c)} for n, (ax, c) in self.plan.weights.items()},
            "num_samples": self.num_samples,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            **({"sampling": self.sampling} if self.sampling is not None else {}),
            "config": {
                "num_bins": self.config.num_bins,
                "percentile": self.config.percentile,
                "auto_tolerance": self.config.auto_tolerance,
                "cache_all_tensors": self.config.cache_all_tensors,
                "sample_stride": self.config.sample_stride,
                "target": self.config.target,
            },
            **metadata,
        }


def prepare_model(model: onnx.ModelProto, *, source: str = "model",
                  target: str = "tensorrt") -> tuple[onnx.ModelProto, list[TensorSpec], QdqPlan]:
    """Not quantized already, opset >= 13, float activations checked, Q/DQ placement planned for
    ``target``.

    Inputs may be int64/int32/bool (token ids, masks): the float activations after them are
    calibrated, the inputs themselves are fed as they are.
    """
    check_not_quantized(model, source=source)
    model = ensure_opset(model)
    specs = float_input_specs(model, source=source)
    plan = plan_qdq(model, target)
    if not plan.activations:
        raise ModelError(
            f"{source} has no Conv, ConvTranspose, Gemm or MatMul nodes: nothing to quantize to INT8"
        )
    log.debug("opset %d, %d activation and %d weight Q/DQ pairs planned", opset_version(model),
              len(plan.activations), len(plan.weights))
    return model, specs, plan


def calibration_batches(source: Source, specs: Sequence[TensorSpec], indices: Sequence[int], config: CalibConfig) -> Batcher:
    """Batches for calibration: a fixed-batch model uses its batch size and drops a short tail."""
    fixed = specs[0].static_batch
    if fixed is not None and len(indices) < fixed:
        raise DatasetError(
            f"the model has a fixed batch size of {fixed}, but only {len(indices)} calibration samples were given",
            hint=f"give at least {fixed} samples",
        )
    return Batcher(
        source, [s.name for s in specs], fixed or config.batch_size, indices=indices,
        last_batch="drop" if fixed else "keep", strict=config.strict, dtypes={s.name: s.dtype for s in specs},
    )


def calibrate(
    model: onnx.ModelProto,
    source: Source,
    *,
    indices: Sequence[int] | None = None,
    config: CalibConfig = CalibConfig(),
    on_batch: Callable[[Batch], None] | None = None,
    model_name: str = "model",
    sampling: dict[str, Any] | None = None,
) -> Calibration:
    """Collect statistics in one pass over ``source`` and compute every method's ranges.

    Args:
        model: the FP32 model (not modified).
        source: calibration data, preprocessed for the model.
        indices: which samples to use, in order (default: all).
        config: calibration settings.
        on_batch: progress callback, called once per batch.
        model_name: used in messages.
        sampling: how ``indices`` were drawn (``quantkit.datasets.Sample.to_dict()``), recorded
            in ranges.json as "sampling".
    """
    model, specs, plan = prepare_model(model, source=model_name, target=config.target)
    tensors = plan.activation_names
    if config.cache_all_tensors:
        tensors = list(dict.fromkeys([*tensors, *float_activations(model)]))
    idx = list(range(len(source))) if indices is None else list(indices)
    batcher = calibration_batches(source, specs, idx, config)
    collectors = capture_histograms(model, tensors, batcher, num_bins=config.num_bins,
                                    threads=config.threads, on_batch=on_batch, sample_stride=config.sample_stride,
                                    pow2_grid=config.pow2_grid)
    histograms = {t: c.compute() for t, c in collectors.items()}
    ranges = {
        t: all_ranges(h, percentile=config.percentile, auto_tolerance=config.auto_tolerance)
        for t, h in histograms.items()
    }
    return Calibration(model, plan, histograms, ranges, config, batcher.used_, list(batcher.skipped_), sampling)


def stats_from_calibration(calibration: Calibration, *, model: dict[str, Any], preprocess: dict[str, Any] | None,
                           data: str) -> "CalibrationStats":
    """The statistics of a calibration, to save and merge (``quantkit.calibrators.stats``)."""
    from quantkit.calibrators.stats import CalibrationStats

    c = calibration.config
    settings = {"num_bins": c.num_bins, "target": c.target, "cache_all_tensors": c.cache_all_tensors,
                "sample_stride": c.sample_stride, "pow2_grid": c.pow2_grid}
    return CalibrationStats(dict(calibration.histograms), calibration.num_samples, model, settings, preprocess, [data])


def calibration_from_stats(model: onnx.ModelProto, stats: "CalibrationStats", config: CalibConfig, *,
                           model_name: str = "model") -> Calibration:
    """Every method's ranges from saved (or merged) statistics, as ``calibrate`` computes them
    from its own pass; ``config``'s method, percentile and auto tolerance apply."""
    model, _, plan = prepare_model(model, source=model_name, target=config.target)
    missing = [t for t in plan.activation_names if t not in stats.histograms]
    if missing:
        raise InputError(f"the statistics have no histogram for {len(missing)} tensor(s) of {model_name}, "
                         f"e.g. {missing[0]!r}", hint="use statistics collected on this model with the same --target")
    ranges = {t: all_ranges(h, percentile=config.percentile, auto_tolerance=config.auto_tolerance)
              for t, h in stats.histograms.items()}
    return Calibration(model, plan, dict(stats.histograms), ranges, config, stats.num_samples)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Save an ONNX model (within an atomic output folder, or atomically on its own)."""
    from quantkit._io import write_bytes_atomic

    return write_bytes_atomic(path, model.SerializeToString())


def entropy_effect(calibration: Calibration) -> list[dict[str, Any]]:
    """Tensors where quantkit's entropy differs from TensorRT's (two-sided tensors), for reports."""
    return [
        {"tensor": t, "entropy_trt": r.amax["entropy-trt"], "entropy": r.amax["entropy"],
         "observed_min": calibration.histograms[t].observed_min, "observed_max": calibration.histograms[t].observed_max}
        for t, r in calibration.ranges.items() if r.two_sided and r.amax["entropy"] != r.amax["entropy-trt"]
    ]


def write_artifacts(
    calibration: Calibration,
    outdir: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Sequence[Any] = (),
    command: str = "quantkit calibrate",
    **contents: Any,
) -> dict[str, Path]:
    """Write the artifacts of ``write_artifacts_into`` (``contents`` are its keyword arguments)
    into ``outdir`` through ``quantkit._io.output_dir``: staged, then renamed into place, with a
    manifest; ``force`` replaces only an earlier run's artifacts; ``inputs`` are the run's input
    files and folders, which the output must not be, hold or lie inside."""
    from quantkit._io import output_dir

    with output_dir(outdir, force=force, inputs=inputs, command=command) as tmp:
        names = write_artifacts_into(tmp, calibration, **contents)
    return {k: Path(outdir) / v for k, v in names.items()}


def write_artifacts_into(
    folder: Path,
    calibration: Calibration,
    *,
    model_stem: str,
    int8_model: onnx.ModelProto,
    report: dict[str, Any] | None,
    metadata: dict[str, Any],
    trt_version: int = DEFAULT_TRT_VERSION,
    extra: dict[str, onnx.ModelProto] | None = None,
) -> dict[str, str]:
    """Write ``<stem>.int8.onnx``, ``calibration.cache`` (+ ``calibration.cache.json``, its
    provenance, when ``metadata["model"]["sha256"]`` is given), ``ranges.json``, ``report.json``
    and the ``extra`` models into ``folder`` (a staging folder). Returns file names by kind."""
    from quantkit._io import write_json_atomic
    from quantkit.calibrators.cache import CacheProvenance, sidecar_path, write_cache, write_sidecar

    method = calibration.config.method
    names = {"model": f"{model_stem}.int8.onnx", "cache": "calibration.cache", "ranges": "ranges.json"}
    save_model(int8_model, folder / names["model"])
    cache = calibration.cache(method, trt_version=trt_version)
    write_cache(folder / names["cache"], cache)
    sha = (metadata.get("model") or {}).get("sha256")
    if sha:  # provenance, so that a cache is never reused for another model or preprocessing
        names["cache_provenance"] = sidecar_path(names["cache"]).name
        write_sidecar(folder / names["cache"], CacheProvenance(sha, metadata.get("preprocess"), cache.algorithm,
                                                             cache.version, method))
    write_json_atomic(folder / names["ranges"], calibration.ranges_document(method, **metadata))
    if report is not None:
        names["report"] = "report.json"
        write_json_atomic(folder / names["report"], report)
    for name, model in (extra or {}).items():
        save_model(model, folder / name)
        names[name] = name
    return names
