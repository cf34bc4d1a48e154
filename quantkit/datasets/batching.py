"""Batching: fixed batch size, deterministic order, parallel decoding, last-batch rule.

Samples are loaded by a thread pool (OpenCV releases the GIL while decoding) a few batches
ahead of the consumer, so decoding overlaps inference. Order never depends on thread timing.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from quantkit.datasets.dtypes import cast_for_input
from quantkit.datasets.sources import SampleError, Source
from quantkit.errors import DatasetError, InputError, ShapeMismatchError

log = logging.getLogger(__name__)
#: extra data arrays already warned about (``Batcher._feed``)
_EXTRA_NOTED: set[tuple[str, ...]] = set()

LastBatch = Literal["keep", "pad", "drop"]


@dataclass(frozen=True)
class Batch:
    """One batch. ``size`` counts real samples; rows past it are padding (repeats).

    ``batch_axes``: the batch axis of an input that is not batched on axis 0 (an RNN state
    [layers, N, C]: 1), or None for an input fed as is (a 0-d sample rate); inputs not named
    are batched on axis 0. Slice a batch with ``rows``, not ``feed[k][a:b]``.
    """

    feed: dict[str, np.ndarray]
    labels: np.ndarray | None
    indices: tuple[int, ...]
    size: int
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """Rows in the feed, padding included."""
        return feed_rows(self.feed, self.batch_axes)

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The feed's rows ``start:stop`` along each input's batch axis (unbatched inputs whole)."""
        return take_rows(self.feed, self.batch_axes, start, stop)


def feed_rows(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None]) -> int:
    """Rows of a feed: the size of the first batched input along its batch axis (0 if none)."""
    for name, value in feed.items():
        ax = axes.get(name, 0)
        if ax is not None and value.ndim > ax:
            return int(value.shape[ax])
    return 0


def take_rows(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None], start: int, stop: int
              ) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of every batched input along its axis (0 unless ``axes`` says); an
    input whose axis is None, or a 0-d array, as it is."""
    out = {}
    for name, value in feed.items():
        ax = axes.get(name, 0)
        if ax is None or value.ndim <= ax:
            out[name] = value
        else:
            index = [slice(None)] * value.ndim
            index[ax] = slice(start, stop)
            out[name] = value[tuple(index)]
    return out


def ordered_indices(count: int, *, shuffle: bool = False, seed: int = 0) -> list[int]:
    """0..count-1, or a seeded permutation of it."""
    if not shuffle:
        return list(range(count))
    return [int(i) for i in np.random.default_rng(seed).permutation(count)]


def data_batch_axes(source: Any, input_names: Sequence[str]) -> dict[str, int | None]:
    """Batch axes by model input name, from a source that has them (``NumpySource.batch_axes_``;
    None: the array is fed whole); empty for any other source (every input batched on axis 0)."""
    found = getattr(source, "batch_axes_", None) or {}
    if list(found) == [""] and len(input_names) == 1:  # a .npy array feeds the only input
        return {input_names[0]: found[""]}
    return dict(found)


class Batcher:
    """Iterate a source in batches keyed by model input name.

    Args:
        source: the data source.
        input_names: model input names; a source that yields plain arrays feeds the first.
        batch_size: samples per batch.
        indices: which samples, in which order (default: all, in order).
        last_batch: "keep" a short last batch, "pad" it to ``batch_size`` by repeating its
            last sample (outputs of padding rows are to be ignored), or "drop" it.
        strict: raise on the first unreadable sample instead of skipping it.
        workers: decoding threads (default: min(8, CPUs)).
        prefetch: batches loaded ahead of the consumer.
        known_skips: samples (as ``source.describe`` names them) already warned about in this
            run, e.g. by the calibration pass before an evaluation on the same images: they are
            skipped and recorded again, but logged at debug level, so a warning appears once.
        dtypes: the model's input dtypes by name; each input array is cast to its dtype when
            that is safe (see ``cast_for_input``), else refused with an InputError.
    """

    def __init__(
        self,
        source: Source,
        input_names: Sequence[str],
        batch_size: int = 32,
        *,
        indices: Sequence[int] | None = None,
        last_batch: LastBatch = "keep",
        strict: bool = False,
        workers: int | None = None,
        prefetch: int = 2,
        known_skips: Collection[str] = (),
        dtypes: Mapping[str, Any] | None = None,
    ):
        if batch_size <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}")
        if last_batch not in ("keep", "pad", "drop"):
            raise InputError(f"last_batch must be keep, pad or drop, got {last_batch!r}")
        self.source = source
        self.input_names = list(input_names)
        self.batch_size = batch_size
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.last_batch = last_batch
        self.strict = strict
        #: samples an image folder's preprocessing made (float32 of quantkit's own, not the user's data)
        self._preprocessed = getattr(getattr(source, "source", source), "preprocess", None) is not None
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.prefetch = prefetch
        self.known_skips = frozenset(known_skips)
        self.dtypes = {k: np.dtype(v) for k, v in (dtypes or {}).items()}
        self._noted: set[str] = set()  # inputs whose lossy cast was noted once
        self.skipped_: list[tuple[str, str]] = []
        self.loaded_ = 0  # samples read successfully
        self.used_ = 0  # samples in the batches handed out (a dropped tail is not counted)

    def __len__(self) -> int:
        """Number of batches if no sample is skipped."""
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (1 if rest and self.last_batch != "drop" else 0)

    def _load(self, index: int) -> tuple[int, np.ndarray | dict[str, np.ndarray] | None, str | None]:
        try:
            return index, self.source.load(index), None
        except SampleError as err:
            if self.strict:
                raise
            return index, None, err.reason

    def _samples(self) -> Iterator[tuple[int, np.ndarray | dict[str, np.ndarray]]]:
        window = self.batch_size * (self.prefetch + 1)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="quantkit-decode") as pool:
            pending: deque[Future[tuple[int, object, str | None]]] = deque()
            it = iter(self.indices)
            try:
                for idx in it:
                    pending.append(pool.submit(self._load, idx))  # type: ignore[arg-type]
                    if len(pending) >= window:
                        break
                while pending:
                    index, sample, reason = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(self._load, nxt))  # type: ignore[arg-type]
                    if sample is None:
                        where = self.source.describe(index)
                        (log.debug if where in self.known_skips else log.warning)("skipping %s: %s", where, reason)
                        self.skipped_.append((where, str(reason)))
                        continue
                    self.loaded_ += 1
                    yield index, sample  # type: ignore[misc]
            finally:
                for fut in pending:
                    fut.cancel()

    def _feed(self, samples: list[np.ndarray | dict[str, np.ndarray]], indices: list[int]) -> dict[str, np.ndarray]:
        first = samples[0]
        if isinstance(first, dict):
            missing = [n for n in self.input_names if n not in first]
            extra = [n for n in first if n not in self.input_names]
            if extra and not missing and tuple(extra) not in _EXTRA_NOTED:
                # an input the model declares but no node reads (paddle2onnx's `length`), or any other
                # array: every input has its array, so the rest is left out (said once a process)
                log.warning("data arrays %s are not inputs the model reads; left out", extra)
                _EXTRA_NOTED.add(tuple(extra))
            if missing:
                raise InputError(
                    f"data arrays {sorted(first)} do not match the model inputs {self.input_names}"
                    + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""),
                    hint="name the arrays in the .npz after the model inputs",
                )
            keys = self.input_names
        else:
            if len(self.input_names) != 1:
                raise InputError(
                    f"this source gives one array per sample, the model has {len(self.input_names)} inputs "
                    f"{self.input_names}",
                    hint="use an .npz file with one array per input name",
                )
            keys = [""]
        feed = {}
        axes = self._axes()
        for key, name in zip(keys, self.input_names):
            arrays = [_as_array(s[key] if isinstance(s, dict) else s) for s in samples]
            axis = axes.get(name, 0)
            if axis is None:  # no batch axis: the same array in every sample
                feed[name] = arrays[0]
                if name in self.dtypes:
                    feed[name] = cast_for_input(feed[name], self.dtypes[name], name=name,
                                                where=self.source.describe(indices[0]), noted=self._noted)
                continue
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                odd = next(i for i, a in zip(indices, arrays) if a.shape != arrays[0].shape)
                raise ShapeMismatchError(
                    f"input {name!r}: sample {self.source.describe(odd)} has shape "
                    f"{tuple(next(a.shape for i, a in zip(indices, arrays) if i == odd))}, others {arrays[0].shape}",
                    hint="set --resize/--crop so every image has the same size (or --batch-size 1 for a model "
                         "that takes any size)",
                )
            feed[name] = np.stack(arrays, axis=axis)
            if np.issubdtype(feed[name].dtype, np.floating) and np.isnan(feed[name]).any():
                bad = sorted({i for i, a in zip(indices, arrays) if np.isnan(a).any()})
                raise DatasetError(f"input {name!r}: sample {self.source.describe(bad[0])} has NaN values"
                                   + (f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""),
                                   hint="fix or leave out the samples with NaN values")
            if (np.issubdtype(feed[name].dtype, np.floating) and f"inf:{name}" not in self._noted
                    and np.isinf(feed[name]).any()):  # a mask input may mean it (-inf): said once, not refused
                self._noted.add(f"inf:{name}")
                first_inf = next(i for i, a in zip(indices, arrays) if np.isinf(a).any())
                log.warning("input %r: sample %s has infinite values; an additive mask may mean them, but an output "
                            "computed from them without a clip or a mask may not be finite (its error figures then "
                            "read nan)",
                            name, self.source.describe(first_inf))
            if name in self.dtypes:  # an image folder's float32 is quantkit's own preprocessing: cast unsaid
                feed[name] = cast_for_input(feed[name], self.dtypes[name], name=name,
                                            where=self.source.describe(indices[0]),
                                            noted=None if self._preprocessed else self._noted)
        return feed

    def _batch(self, chunk: list[tuple[int, np.ndarray | dict[str, np.ndarray]]]) -> Batch:
        size = len(chunk)
        self.used_ += size
        if self.last_batch == "pad" and size < self.batch_size:
            chunk = chunk + [chunk[-1]] * (self.batch_size - size)
        indices = [i for i, _ in chunk]
        labels = [self.source.label(i) for i in indices[:size]]
        lab = None if any(v is None for v in labels) else np.asarray(labels, dtype=np.int64)
        axes = {k: v for k, v in self._axes().items() if v != 0}
        return Batch(self._feed([s for _, s in chunk], indices), lab, tuple(indices[:size]), size, axes)

    def _axes(self) -> dict[str, int | None]:
        return data_batch_axes(self.source, self.input_names)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped_, self.loaded_, self.used_ = [], 0, 0
        chunk: list[tuple[int, np.ndarray | dict[str, np.ndarray]]] = []
        for item in self._samples():
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk and self.last_batch != "drop":
            yield self._batch(chunk)
        elif chunk and _first_drop(self.source, self.loaded_, self.batch_size):
            log.warning("dropped the last %d of %d samples: the model has a fixed batch size of %d and they do not "
                        "fill a batch; use a multiple of %d samples to use them all",
                        len(chunk), self.loaded_, self.batch_size, self.batch_size)
        if self.loaded_ == 0 and self.indices:
            raise DatasetError(
                f"none of the {len(self.indices)} samples could be read "
                f"(first problem: {self.skipped_[0][0]}: {self.skipped_[0][1]})" if self.skipped_ else
                "the data source yielded no samples"
            )


#: by id of a source: a weak reference to it and the (samples, batch size) whose short tail was
#: warned about (once, not at every pass over the same samples); sources are often unhashable
_DROP_WARNED: dict[int, tuple[Any, set[tuple[int, int]]]] = {}


def _first_drop(source: Any, loaded: int, batch_size: int) -> bool:
    """Whether this pass's dropped tail is the first of its kind for ``source`` (the calibration
    and the checks' passes read the same samples); True where the source cannot be tracked."""
    try:
        ref = weakref.ref(source)
    except TypeError:
        return True
    held = _DROP_WARNED.get(id(source))
    if held is None or held[0]() is not source:  # a new source (perhaps at a freed one's address)
        for k in [k for k, (r, _) in _DROP_WARNED.items() if r() is None]:
            del _DROP_WARNED[k]
        held = _DROP_WARNED[id(source)] = (ref, set())
    if (loaded, batch_size) in held[1]:
        return False
    held[1].add((loaded, batch_size))
    return True


def _as_array(value: Any) -> np.ndarray:
    """One sample's value as an array: a sample of a 1-D text array (a STRING input ``[N]``, one
    string a sample) is a Python str, which has no shape; it stays text (object), as ONNX Runtime
    takes it."""
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value, dtype=object if isinstance(value, (str, bytes)) else None)
