"""Depthwise equalization inside the calibration pass: one ONNX Runtime pass instead of two.

Equalization (``quantkit.onnx.equalize``) needs max|t| per channel of each tensor ``t`` that
feeds a depthwise Conv, over the first calibration samples, before the scaled tensors
``t * s`` can be histogrammed. Run as its own pass, that first pass costs up to one more FP32
pass (all of it when there are no more calibration samples than it reads). Here the
calibration pass runs the unequalized model and captures ``t`` as well::

    chunks of the first samples:  histograms of every tensor; per-channel max of each t;
                                  a copy of each t held
    after them:                   s decided, the model equalized; the held copies, then every
                                  later chunk's t, multiplied by s into the histogram of t * s

``t * s`` is computed in NumPy, the same float32 product ONNX Runtime's Mul makes. The tensors
after an equalized depthwise Conv come from the unequalized model, whose FP32 function is the
same (the Conv's weights divided by s change its rounding only): their histograms can differ
from the two-pass ones in a value that crosses a bin edge, not more.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from quantkit.calibrators.collectors import (HistogramCollector, Scaled, batch_rows, in_batch,
                                              update_collectors)
from quantkit.errors import NonFiniteError
from quantkit.onnx.equalize import (ChannelPeaks, Equalization, channel_axes, channel_max, equalize_depthwise,
                                   sample_rows, scales_for)

log = logging.getLogger(__name__)

def _held_budget(low: int = 512 * 2**20, high: int = 2 * 2**30) -> int:
    """A sixteenth of the machine's memory, from 512 MiB to 2 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows): the floor
        return low
    return int(min(high, max(low, total // 16)))


#: the copies of the first samples' depthwise inputs may hold at most this many bytes; above,
#: the pass stops and the caller runs the two passes instead. rapidocr-det: 310 MiB for 32
#: samples of 256 x 384; PP-OCRv5's recogniser at 48 x 320 needs 0.5-1 GiB (with 512 MiB its
#: calibration took 6.1 s instead of 3.3-4.0, peak RSS 1.2 instead of 1.8 GB). A sixteenth of
#: the memory: 1.5 GiB on a 24 GB machine, 512 MiB on 8 GB
HELD_BYTES = _held_budget()


class HeldTooLarge(Exception):
    """The depthwise inputs of the first samples do not fit ``HELD_BYTES`` (internal: the
    caller falls back to a separate first pass)."""


@dataclass
class EqualizingPass:
    """What ``capture_equalizing`` made.

    Attributes:
        model: the equalized model (the input model itself when nothing was equalized).
        equalized: the equalizations applied.
        collectors: per tensor (the captured ones and each ``Equalization.scaled``), its
            filled histogram collector.
        fitted: per tensor of ``found``, max|x| per channel over the first samples (what the
            factors were decided on).
        peaks: the same over every sample of the pass (``equalize.refit_scales``).
    """

    model: onnx.ModelProto
    equalized: list[Equalization]
    collectors: dict[str, HistogramCollector]
    fitted: dict[str, np.ndarray]
    peaks: dict[str, np.ndarray]


def capture_equalizing(runner: Any, model: onnx.ModelProto, found: Mapping[str, Sequence[str]],
                       batches: Iterable[Any], *, first_samples: int, total_samples: int, num_bins: int = 2048,
                       sample_stride: int = 5,
                       pow2_tensors: Collection[str] = (), grouped_after: Callable[[onnx.ModelProto], set[str]],
                       on_batch: Callable[[int], None] | None = None,
                       held_bytes: int | None = None) -> EqualizingPass:
    """One pass of ``runner`` (an ``OrtRunner`` of ``model`` capturing every tensor to histogram,
    the keys of ``found`` among them) over ``batches``: histograms of the captured tensors, and
    depthwise equalization of ``found`` (tensor -> the depthwise Conv nodes reading it) decided
    on its first ``first_samples`` samples (of ``total_samples``), with the histograms of the
    scaled tensors.

    ``held_bytes``: the most the held copies may take (None: ``HELD_BYTES``).
    ``pow2_tensors``: tensors whose collectors start on a power-of-two range (those merged
    afterwards); ``grouped_after(equalized_model)``: the same set for the equalized model.

    Raises:
        HeldTooLarge: the held copies would pass ``held_bytes``, or equalization changes which
            tensors are grouped (the caller runs the two passes instead).
        NonFiniteError: a captured or scaled tensor has NaN or Inf values.
    """
    held_bytes = HELD_BYTES if held_bytes is None else held_bytes
    collectors = {t: HistogramCollector(num_bins, name=t, sample_stride=sample_stride, pow2_grid=t in pow2_tensors)
                  for t in runner.captured_names}
    maxima: dict[str, np.ndarray] = {}
    axes = channel_axes(model, found)
    peaks = ChannelPeaks(axes)
    held: list[dict[str, np.ndarray]] = []
    state: dict[str, Any] = {"seen": 0, "bytes": 0, "factors": None, "model": model, "done": []}

    def decide() -> None:
        rows = {t: sample_rows(np.concatenate([sample_rows(part[t]) for part in held]))  # MatMul inputs' rows
                for t, axis in axes.items() if axis == -1 and held and all(part[t].ndim >= 2 for part in held)}
        scales = scales_for(model, found, maxima, rows)
        eq_model, done = equalize_depthwise(model, scales)
        factors: dict[str, tuple[str, np.ndarray, int]] = {}
        if done:
            grouped = grouped_after(eq_model)
            if grouped - {e.scaled for e in done} != set(pow2_tensors):
                raise HeldTooLarge("equalization changes the tensors that share a scale")
            for e in done:
                collectors[e.scaled] = HistogramCollector(num_bins, name=e.scaled, sample_stride=sample_stride,
                                                          pow2_grid=e.scaled in grouped)
                factors[e.tensor] = (e.scaled, e.scales, e.axis)
        for part in held:
            update_scaled(collectors, factors, part, None)
        held.clear()
        state.update(factors=factors, model=eq_model, done=done)

    def sink(batch: Any, rows: int, captured: Mapping[str, np.ndarray]) -> None:
        padded = getattr(batch, "num_rows", rows)
        try:
            jobs = [(collectors[name], batch_rows(arr, rows, padded)) for name, arr in captured.items()]
            peaks.add({t: batch_rows(captured[t], rows, padded) for t in found})
            if state["factors"] is not None:  # the scaled tensors' histograms in the same round of workers
                update_collectors([*jobs, *_scaled_jobs(collectors, state["factors"], captured, rows)])
                return
            update_collectors(jobs)
            take = min(rows, first_samples - state["seen"])
            part = {}
            for t in found:
                x = batch_rows(captured[t], rows, padded)
                if x.ndim >= 2 and take > 0:  # as _channel_maxima: max|x| per channel (axis 1, or last)
                    m = channel_max(x[:take], axes[t])
                    maxima[t] = m if t not in maxima else np.maximum(maxima[t], m)
                part[t] = x.copy()  # the runner's buffers are reused for the next chunk
                state["bytes"] += x.nbytes
            # known from the first chunk: stop there rather than after a share of the pass
            if state["bytes"] / (state["seen"] + rows) * min(first_samples, total_samples) > held_bytes:
                raise HeldTooLarge(f"the depthwise inputs of the first {first_samples} samples pass "
                                   f"{held_bytes // 2**20} MiB")
            held.append(part)
            state["seen"] += rows
            if state["seen"] >= first_samples:
                decide()
        except NonFiniteError as err:
            raise in_batch(err, batch) from err

    runner.capture(batches, sink, on_batch=on_batch)
    if state["factors"] is None:  # fewer samples than first_samples
        decide()
    return EqualizingPass(state["model"], state["done"], collectors, maxima, peaks.maxima)


def update_scaled(collectors: Mapping[str, HistogramCollector],
                  factors: Mapping[str, tuple[str, np.ndarray, int]],
                  captured: Mapping[str, np.ndarray], rows: int | None) -> None:
    """Each equalized tensor's histogram of ``t * s`` (s broadcast over the channel axis):
    ``factors``: t -> (its scaled copy's collector name, s, the channel axis); ``captured``'s
    first ``rows`` samples (None: all)."""
    update_collectors(_scaled_jobs(collectors, factors, captured, rows))


def _scaled_jobs(collectors: Mapping[str, HistogramCollector], factors: Mapping[str, tuple[str, np.ndarray, int]],
                 captured: Mapping[str, np.ndarray], rows: int | None) -> list[tuple[HistogramCollector, Scaled]]:
    """``update_collectors``' jobs for ``update_scaled``."""
    return [(collectors[name], Scaled(captured[t] if rows is None else captured[t][:rows], s, axis))
            for t, (name, s, axis) in factors.items()]
