"""The executor interface every backend implements: name-based inputs and outputs, and the
capture of chosen intermediate tensors, streamed batch by batch.

    runner.infer(feed) -> outputs                       one batch, the model's outputs
    runner.capture(batches, sink)                       every batch once; for each part of a
        -> sink(batch, rows, {tensor: array})           batch, the captured tensors (valid only
                                                        during the call; the backend may reuse
                                                        the buffers afterwards)

A backend that captures is built with the names it must capture (``capture=``), so that it
can arrange for them once (ONNX Runtime: extra graph outputs bound to reused buffers).
Collectors (``quantkit.calibrators.collectors.collect_histograms``) and side-by-side checks
take any runner, so ONNX Runtime, PyTorch and TensorRT feed the same statistics.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from quantkit.calibrators.collectors import batch_rows
from quantkit.errors import InputError, ShapeMismatchError
from quantkit.onnx.model import TensorSpec


def check_feed(feed: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise a clear error when ``feed`` does not fit the model inputs (names, rank, static dims)."""
    names = [s.name for s in specs]
    if set(feed) != set(names):
        raise InputError(
            f"inputs given {sorted(feed)} do not match the model inputs {names}",
            hint="name the data arrays after the model inputs",
        )
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)
        ):
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in spec.shape) or "a single value (0-d)"
            only_batch = arr.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d == a for d, a in list(zip(spec.shape, arr.shape))[1:])
            one_axis_short = arr.ndim == len(spec.shape) - 1 and all(
                not isinstance(d, int) or d == a for d, a in zip(spec.shape[2:], arr.shape[1:]))
            raise ShapeMismatchError(
                f"input {spec.name!r}: batch has shape {tuple(arr.shape)}, the model expects {want}",
                hint=f"the model has a fixed batch size of {spec.shape[0]}; feed batches of that size" if only_batch
                else "the data has one axis fewer than the model's input: an array of one sample saved without its "
                     "batch axis is read as that many samples; save it as [1, ...] (x[None])" if one_axis_short
                else "check the data's shape against the model input (images: the --resize/--crop/--layout settings; "
                     "arrays: the shape of each sample after the batch axis)",
            )


#: ``sink(batch, rows, tensors)``: ``rows`` leading rows of each array are real samples (a
#: fixed-batch model's padded tail has more); the arrays are valid only during the call
TensorSink = Callable[[Any, int, Mapping[str, np.ndarray]], None]


class Runner(abc.ABC):
    """Runs one model. ``infer`` checks the feed once, then delegates to ``_infer_impl``."""

    backend: str = "?"
    device: str = "?"
    #: the model declares a dynamic batch but runs one sample at a time only, found on its first
    #: batch (``OrtRunner``); the runner then splits every batch into samples
    one_at_a_time: bool = False

    @property
    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    def infer(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
        """The model's outputs on one batch; ``axes``: the batch axis of each input not batched on
        axis 0 (``Batch.batch_axes``: an RNN state's 1, None for one fed whole), for a runner that
        splits a batch (a model that runs one sample at a time)."""
        check_feed(feed, self.input_specs)
        cast = {s.name: np.asarray(feed[s.name], dtype=s.dtype) for s in self.input_specs}
        return self._infer_impl(cast, axes) if axes else self._infer_impl(cast)

    @abc.abstractmethod
    def _infer_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]: ...

    @property
    def captured_names(self) -> list[str]:
        """The tensors ``capture`` streams (given when the runner was made)."""
        return []

    def infer_captured(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One batch: the model's outputs and the captured tensors (fresh arrays, kept by the
        caller; ``capture`` is the faster route for a whole pass); ``axes`` as in ``infer``."""
        check_feed(feed, self.input_specs)
        cast = {s.name: np.asarray(feed[s.name], dtype=s.dtype) for s in self.input_specs}
        return self._infer_captured_impl(cast, axes) if axes else self._infer_captured_impl(cast)

    def _infer_captured_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None
                             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        raise NotImplementedError(f"the {self.backend} backend cannot capture intermediate tensors")

    def capture(self, batches: Iterable[Any], sink: "TensorSink", *,
                on_batch: Callable[[int], None] | None = None) -> None:
        """Run every batch once and hand the captured tensors of each part of it to ``sink``;
        ``on_batch(n)`` after each batch of ``n`` samples (progress)."""
        raise NotImplementedError(f"the {self.backend} backend cannot capture intermediate tensors")

    def close(self) -> None:
        """Free what the runner holds (sessions, engines, device memory)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_batch_axes(runner: Any) -> dict[str, int]:
    """Outputs whose samples are not on axis 0, by name -> the axis they are on: where the first
    input's batch dim is a symbol that an output declares on another axis (wired-table-rec's
    centre net: [1, batch, H, W]). Others (not listed) have their samples on axis 0."""
    inputs = getattr(runner, "input_specs", None) or []
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    if not isinstance(batch, str):
        return {}
    from quantkit.onnx.sampleaxis import SAMPLE_DIM  # a model run with a sample axis has its samples there

    out = {}
    for spec in getattr(runner, "output_specs", None) or []:
        dims = list(spec.shape or ())
        if dims and dims[0] != batch and dims[0] != SAMPLE_DIM and batch in dims:
            out[spec.name] = dims.index(batch)
    return out


def samples_first(outputs: dict[str, np.ndarray], axes: dict[str, int]) -> dict[str, np.ndarray]:
    """``outputs`` with each one's sample axis (``output_batch_axes``) moved to axis 0."""
    return {k: np.moveaxis(v, axes[k], 0) if k in axes and np.ndim(v) > axes[k] else v for k, v in outputs.items()}


def real_rows(value: Any, n: int, rows: int) -> Any:
    """An output's rows for the batch's ``n`` real samples of the ``rows`` fed (``batch_rows``).
    A run of one sample whose output's axis 0 is not of length 1 has no sample axis there (a
    fixed-batch-1 model that squeezed it: ``[C]`` for ``[1, C]``, scored before as C samples of which
    the first was kept): it gets one, so the whole output is that sample's."""
    if rows == 1 and (np.ndim(value) == 0 or value.shape[0] != 1):
        return np.asarray(value)[None]  # (0-d: a `x.squeeze()` head's one value of a batch of one)
    return batch_rows(value, n, rows)


def side_by_side(reference: Runner, test: Runner, batches: Iterable[Any]) -> Iterable[tuple[Any, dict, dict]]:
    """Run two models on the same batches: ``(batch, reference outputs, test outputs)`` per batch,
    each with its samples on axis 0 (``output_batch_axes``) and trimmed to the batch's real rows
    (a fixed-batch model's padded tail left out)."""
    axes = output_batch_axes(reference)
    for batch in batches:
        fed = getattr(batch, "batch_axes", None)
        ref, out = samples_first(reference.infer(batch.feed, fed), axes), samples_first(test.infer(batch.feed, fed), axes)
        n, rows = batch.size, getattr(batch, "num_rows", batch.size)
        yield batch, {k: real_rows(v, n, rows) for k, v in ref.items()}, {k: real_rows(v, n, rows) for k, v in out.items()}
