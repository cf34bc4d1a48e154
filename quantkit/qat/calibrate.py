"""Calibrate the input quantizers of a prepared model with quantkit's collectors and range
methods: one pass over the data on the model's device, every method computed from it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.calibrators.methods import ALL_METHODS, TensorRanges, all_ranges
from quantkit.errors import DatasetError, ModelError, UnknownMethodError
from quantkit.qat.prepare import quantizers

log = logging.getLogger(__name__)


@dataclass
class QatCalibration:
    """Ranges of every input quantizer under every method, and the method applied."""

    method: str
    ranges: dict[str, TensorRanges]
    batches: int

    def amax(self, method: str | None = None) -> dict[str, float]:
        return {n: r.amax[method or self.method] for n, r in self.ranges.items()}

    def apply(self, model: nn.Module, method: str) -> None:
        """Set every calibrated quantizer of ``model`` to ``method``'s amax (no new pass)."""
        if method not in ALL_METHODS:
            raise UnknownMethodError(f"unknown calibration method {method!r}; available: {list(ALL_METHODS)}")
        qs = dict(quantizers(model, inputs_only=True))
        for name, amax in self.amax(method).items():
            q = qs[name]
            q.amax = torch.tensor(max(amax, 1e-8), dtype=torch.float32, device=q.amax.device)
        self.method = method


def _inputs(batch: Any) -> tuple[Any, ...]:
    """The model inputs in a loader's batch: a tensor, (inputs, labels), or a dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)
    raise DatasetError(f"cannot take model inputs from a batch of type {type(batch).__name__}",
                       hint="yield tensors, (inputs, labels) pairs or dicts")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def collect(model: nn.Module, loader: Iterable[Any], *, num_batches: int | None = None,
            on_batch: Callable[[int], None] | None = None) -> int:
    """Run the data through ``model`` with every enabled input quantizer collecting (and not
    quantizing); returns the number of batches. Statistics stay on the model's device."""
    qs = [q for _, q in quantizers(model, inputs_only=True) if q.enabled]
    if not qs:
        raise ModelError("the model has no enabled input quantizers; call quantkit.qat.prepare first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    for q in qs:
        q.histogram_ = None
        q.calibrating = True
    count = 0
    try:
        for batch in loader:
            (x,) = _inputs(batch)
            model(**_to(x, device)) if isinstance(x, dict) else model(_to(x, device))
            count += 1
            if on_batch is not None:
                on_batch(count)
            if num_batches is not None and count >= num_batches:
                break
    finally:
        for q in qs:
            q.calibrating = False
        model.train(was_training)
    if count == 0:
        raise DatasetError("the calibration loader yielded no batch", hint="check the loader and its dataset")
    return count


def calibrate(model: nn.Module, loader: Iterable[Any], method: str | None = None, *, num_batches: int | None = None,
              percentile: float = 99.99, on_batch: Callable[[int], None] | None = None) -> QatCalibration:
    """Calibrate every enabled input quantizer of a prepared model.

    Args:
        model: from ``quantkit.qat.prepare``.
        loader: yields tensors, (inputs, labels) pairs or dicts of inputs.
        method: entropy, minmax, percentile, mse, auto or entropy-trt (default: the config's
            method recorded at prepare time, else entropy).
        num_batches: stop after this many batches.
        percentile: for the percentile method.

    Raises:
        DatasetError: the loader yielded nothing.
        NonFiniteError: NaN or Inf reached a quantizer (the message names it).
    """
    method = method or getattr(model, "qat_method_", "entropy")
    if method not in ALL_METHODS:
        raise UnknownMethodError(f"unknown calibration method {method!r}; available: {list(ALL_METHODS)}")
    batches = collect(model, loader, num_batches=num_batches, on_batch=on_batch)
    ranges: dict[str, TensorRanges] = {}
    for name, q in quantizers(model, inputs_only=True):
        if not q.enabled or q.histogram_ is None:
            continue
        hist = q.histogram_.compute()  # one host transfer per quantizer, after the pass
        ranges[name] = all_ranges(hist, percentile=percentile)
        q.histogram_ = None
    result = QatCalibration(method, ranges, batches)
    result.apply(model, method)
    log.info("calibrated %d quantizers from %d batches (%s)", len(ranges), batches, method)
    return result
