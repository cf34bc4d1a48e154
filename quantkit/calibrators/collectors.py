"""Streaming statistics for one tensor: absolute max and a fixed-size histogram of |x|.

The histogram covers ``[0, range_)`` with ``num_bins`` equal bins. When a batch exceeds the
range, the range doubles (as often as needed) and neighbouring bins are summed in pairs, which
re-bins the old counts *exactly*: no data is re-read and memory never depends on how many
images were seen.

    range 4, 8 bins:  |a|b|c|d|e|f|g|h|
    new max 7 -> range 8:  |a+b|c+d|e+f|g+h| 0 | 0 | 0 | 0 |
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit import env_int
from quantkit.calibrators import native
from quantkit.errors import InputError, NonFiniteError, NotCalibratedError

#: the most histogram bins a tensor may have (TensorRT uses 2048; 2**40 was accepted and then
#: allocated per tensor; a statistics file claiming 2**27 took 8 GB to read)
MAX_BINS = 1 << 16


def check_num_bins(num_bins: int) -> None:
    """Raise InputError unless ``num_bins`` is a power of two from 256 to ``MAX_BINS`` (the
    calibration histograms' bins: PTQ's ``StatsConfig`` and QAT's ``QatConfig`` alike)."""
    if num_bins > MAX_BINS:
        raise InputError(f"num_bins must be at most {MAX_BINS}, got {num_bins}")
    if num_bins < 256 or num_bins & (num_bins - 1):
        raise InputError(f"num_bins must be a power of two >= 256, got {num_bins}")
_CHUNK = 1 << 18  # elements per step: keeps the |x| and index buffers in cache
_MIN_SAMPLED = 1 << 16  # sampled updates keep at least this many values in the sample


@dataclass(frozen=True)
class Histogram:
    """Counts of |x| in ``len(counts)`` equal bins of ``bin_width`` starting at 0.

    Attributes:
        counts: int64 counts per bin.
        bin_width: width of one bin (same unit as the tensor).
        observed_min: smallest value seen (signed).
        observed_max: largest value seen (signed).
    """

    counts: np.ndarray
    bin_width: float
    observed_min: float
    observed_max: float

    @property
    def num_bins(self) -> int:
        return int(self.counts.size)

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.num_bins + 1, dtype=np.float64) * self.bin_width

    @property
    def amax(self) -> float:
        """Exact absolute maximum seen (not rounded to a bin edge)."""
        return float(max(abs(self.observed_min), abs(self.observed_max)))

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class HistogramCollector:
    """Collects abs-max and a histogram of |x| over batches, in one pass, in bounded memory.

    Args:
        num_bins: number of histogram bins (TensorRT uses 2048).
        name: tensor name, used in error messages.
        sample_stride: 1 counts every value. k > 1 (a prime; updates of at least
            ``k * 65536`` values only) counts the dense body of the distribution from every k-th
            value with weight k and the tail exactly: the bins that hold the top ~1% of the
            sample, and everything above them, are filled from every value. min and max always
            see every value. On CPU NumPy's exact histogram is a sizeable share of a ResNet's
            own inference time; k = 5 costs less than half as much and moved no range method's
            threshold on the benchmark's ResNet-18 (figures: benchmarks/results/design_notes.md).
            The native kernel (``quantkit.calibrators.native``) makes the same counts in one
            pass over the values.
        pow2_grid: start the range at the power of two at or above the first amax (instead of
            the amax itself), so that collectors run apart on different data (machines, shards)
            have ranges that differ by powers of two and merge exactly
            (``quantkit.calibrators.stats``). The final range lies in [amax, 2 amax) either way.
    """

    def __init__(self, num_bins: int = 2048, name: str = "<tensor>", *, sample_stride: int = 1,
                 pow2_grid: bool = False):
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
        if sample_stride < 1:
            raise ValueError(f"sample_stride must be >= 1, got {sample_stride}")
        self.num_bins = num_bins
        self.name = name
        self.sample_stride = sample_stride
        self.pow2_grid = pow2_grid
        self._updates = 0
        self._empty = False  # an update of no values came (a Slice past the end: [N, 0, H, W])
        self._tail_bin: int | None = None  # sampled updates: first bin counted exactly
        self._counts = np.zeros(num_bins, dtype=np.int64)
        self._range = 0.0  # 0 until a non-zero value is seen
        self._zeros = 0  # values seen while range is 0 (all exactly zero)
        self._min = np.inf
        self._max = -np.inf
        self._fbuf = np.empty(_CHUNK, dtype=np.float32)
        self._ibuf = np.empty(_CHUNK, dtype=np.intp)  # bincount's own index type: no copy
        self._mbuf = np.empty(_CHUNK, dtype=bool)

    def start_at(self, range_: float) -> None:
        """Fix the first range before any update (instead of the first batch's amax), so that
        collectors started at the same range on different data share one grid: their ranges
        differ by powers of two and merge exactly (``quantkit.qat.distributed``)."""
        if self._updates or self._zeros or np.isfinite(self._max):
            raise ValueError(f"tensor {self.name!r}: start_at must come before the first update")
        if range_ > 0.0:
            self._range = float(range_)

    def update(self, x: np.ndarray, scale: np.ndarray | None = None, axis: int = 1) -> None:
        """Add one batch of values (any shape; float16/32/64), each multiplied by ``scale[c]``
        (float32, c its index along ``axis``) when ``scale`` is given: an equalized tensor's
        values, counted without making them."""
        if native.available():
            self._update_native(x, scale, axis)
            return
        if scale is not None:
            x = np.asarray(x, dtype=np.float32)
            shape = [1] * x.ndim
            shape[axis % x.ndim] = -1
            x = x * np.asarray(scale, dtype=np.float32).reshape(shape)
        x = np.ascontiguousarray(x).reshape(-1)
        if x.size == 0:
            self._empty = True
            return
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        self._check_finite(lo, hi, np.isnan(lo) or np.isnan(hi))
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        amax = max(-lo, hi)
        if amax == 0.0 and self._range == 0.0:
            self._zeros += x.size
            return
        self._grow_to(amax)
        k = self.sample_stride
        if k > 1 and x.size >= k * _MIN_SAMPLED:
            self._accumulate_sampled(x, k, nonnegative=lo >= 0.0)
        else:
            self._counts += self._bincount(x, nonnegative=lo >= 0.0)
        self._updates += 1

    def _check_finite(self, lo: float, hi: float, nan: bool) -> None:
        if nan or not (np.isfinite(lo) and np.isfinite(hi)):
            raise NonFiniteError(f"tensor {self.name!r} has {'NaN' if nan else 'Inf'} values")

    def _update_native(self, x: np.ndarray, scale: np.ndarray | None, axis: int) -> None:
        """``update`` in the native kernel, with the same counts as the NumPy code (sampled as it
        samples). One pass when the values fit the range (every update after the first, but
        those that grow it), two otherwise."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.size == 0:
            self._empty = True
            return
        k = self.sample_stride
        sampled = k > 1 and x.size >= k * _MIN_SAMPLED
        status = "past"
        if self._range > 0.0 and not (sampled and self._tail_bin is None):
            status, lo, hi = self._bin_native(x, scale, axis, sampled)
        else:
            lo, hi, nan = native.minmax(x, scale, axis)
            status = "nan" if nan else status
        self._check_finite(lo, hi, status == "nan")
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        if status != "added":
            amax = max(-lo, hi)
            if amax == 0.0 and self._range == 0.0:
                self._zeros += x.size
                return
            self._grow_to(amax)
            if sampled and self._tail_bin is None:  # the first sampled update measures its own tail
                _, _, _, first, _ = native.histogram_sampled(x, self._range, self.num_bins, k, self._updates % k,
                                                             float("inf"), scale, axis)
                self._tail_bin = _tail_start(first)
            status, _, _ = self._bin_native(x, scale, axis, sampled)
            assert status == "added", status
        self._updates += 1

    def _bin_native(self, x: np.ndarray, scale: np.ndarray | None, axis: int, sampled: bool
                    ) -> tuple[str, float, float]:
        """One native pass binning ``x`` on the current range (``_accumulate_sampled``'s
        arithmetic when ``sampled``); the counts are added only when every value fits it."""
        if not sampled:
            return native.histogram_into(self._counts, x, self._range, scale, axis)
        k, n, tail_bin = self.sample_stride, self.num_bins, self._tail_bin
        assert tail_bin is not None
        bar = float(np.float32(tail_bin * self._range / n * (1.0 - 1e-6)))
        status, lo, hi, sample, tail = native.histogram_sampled(x, self._range, n, k, self._updates % k, bar,
                                                                scale, axis)
        if status == "added":
            self._counts[:tail_bin] += k * sample[:tail_bin]
            self._counts[tail_bin:] += tail[tail_bin:]
            self._tail_bin = _tail_start(sample)
        return status, lo, hi

    def _accumulate_sampled(self, x: np.ndarray, k: int, *, nonnegative: bool) -> None:
        """Body from every k-th value (weight k), tail bins from every value, in one pass of
        cache-sized chunks. The tail starts where the top ~1% of the previous sampled update
        began (the first sampled update measures its own)."""
        n = self.num_bins
        offset = self._updates % k
        if self._tail_bin is None:
            self._tail_bin = _tail_start(self._bincount(x[offset::k], nonnegative=nonnegative))
        tail_bin = self._tail_bin
        bar = np.float32(tail_bin * self._range / n * (1.0 - 1e-6))  # a hair low: binning decides
        sample = np.zeros(n, dtype=np.int64)
        tail = np.zeros(n, dtype=np.int64)
        mask = self._mbuf
        step = _CHUNK - _CHUNK % k  # chunks start on the stride, so the sample is every k-th value
        for start in range(0, x.size, step):
            chunk = x[start : start + step]
            sample += self._bincount(chunk[offset::k], nonnegative=nonnegative)
            m = mask[: chunk.size]
            if nonnegative:
                np.greater_equal(chunk, bar, out=m)
            else:
                a = self._fbuf[: chunk.size]
                np.abs(chunk, out=a)
                np.greater_equal(a, bar, out=m)
            if m.any():
                tail += self._bincount(chunk[m], nonnegative=nonnegative)
        self._counts[:tail_bin] += k * sample[:tail_bin]
        self._counts[tail_bin:] += tail[tail_bin:]
        self._tail_bin = _tail_start(sample)

    def _grow_to(self, amax: float) -> None:
        if self._range == 0.0:
            self._range = pow2_at_least(amax) if self.pow2_grid else amax
            self._counts[0] += self._zeros
            self._zeros = 0
            return
        while amax > self._range:
            if self._tail_bin is not None:
                self._tail_bin = max(1, self._tail_bin // 2)
            half = self._counts.reshape(-1, 2).sum(axis=1)
            self._counts[: half.size] = half
            self._counts[half.size :] = 0
            self._range *= 2.0

    def _bincount(self, x: np.ndarray, *, nonnegative: bool) -> np.ndarray:
        n = self.num_bins
        counts = np.zeros(n, dtype=np.int64)
        per_unit = np.float32(n / self._range)
        for start in range(0, x.size, _CHUNK):
            chunk = x[start : start + _CHUNK]
            a = self._fbuf[: chunk.size]
            idx = self._ibuf[: chunk.size]
            if nonnegative:  # ReLU outputs: |x| is x
                np.multiply(chunk, per_unit, out=a)
            else:
                np.abs(chunk, out=a)
                a *= per_unit
            np.copyto(idx, a, casting="unsafe")  # floor for non-negative values
            c = np.bincount(idx, minlength=n)
            if c.size > n:  # |x| == range lands on n: the last bin is closed (no clamp pass)
                c[n - 1] += c[n:].sum()
            counts += c[:n]
        return counts

    def merge(self, other: "HistogramCollector") -> "HistogramCollector":
        """Add another collector's statistics (e.g. from another process or shard)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge {other.num_bins} bins into {self.num_bins}")
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)
        if other._range == 0.0:
            if self._range == 0.0:
                self._zeros += other._zeros
            else:
                self._counts[0] += other._zeros
            return self
        if self._range == 0.0:
            self._range, zeros = other._range, self._zeros
            self._counts = other._counts.copy()
            self._counts[0] += zeros
            self._zeros = 0
            return self
        self._grow_to(other._range)
        self._counts += _rebin(other._counts, other._range, self._range)
        return self

    def compute(self) -> Histogram:
        """Return the collected statistics: those of a tensor of zeros when every update was
        empty (a tensor of no values: torch's ``t[:, 32:]`` of 32 channels). Raises
        NotCalibratedError before any update."""
        if not np.isfinite(self._max) and self._empty and not self._zeros:
            return Histogram(np.zeros(self.num_bins, np.int64), 0.0, 0.0, 0.0)
        if not np.isfinite(self._max):
            raise NotCalibratedError(f"tensor {self.name!r}: no data was collected")
        counts = self._counts.copy()
        width = self._range / self.num_bins
        if self._range == 0.0:
            counts[0] = self._zeros
        return Histogram(counts, width, float(self._min), float(self._max))


def pow2_at_least(x: float) -> float:
    """The smallest power of two >= x > 0 (exact: frexp, no logarithm)."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def _tail_start(sample: np.ndarray, fraction: float = 0.01) -> int:
    """First bin of the smallest tail that holds at most ``fraction`` of the sample (>= 1)."""
    from_top = np.cumsum(sample[::-1])[::-1]
    return int(np.argmax(from_top <= fraction * from_top[0])) or 1


def _rebin(counts: np.ndarray, src_range: float, dst_range: float) -> np.ndarray:
    """Move counts from bins over [0, src_range) to bins over [0, dst_range >= src_range).

    Exact when the ratio is a power of two (the usual case); otherwise each source bin's count
    is split between the destination bins it overlaps, in proportion to the overlap.
    """
    n = counts.size
    ratio = dst_range / src_range
    k = int(round(ratio))
    if abs(ratio - k) < 1e-9 and k & (k - 1) == 0:
        out = counts.reshape(-1, k).sum(axis=1)
        return np.concatenate([out, np.zeros(n - out.size, dtype=counts.dtype)])
    src_cdf = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    src_edges = np.linspace(0.0, src_range, n + 1)
    dst_edges = np.linspace(0.0, dst_range, n + 1)
    cdf_at = np.interp(dst_edges, src_edges, src_cdf)
    out = np.rint(np.diff(cdf_at)).astype(np.int64)
    out[np.argmax(out)] += int(counts.sum() - out.sum())  # keep the total exact
    return out


def merge_histogram(a: Histogram, b: Histogram) -> Histogram:
    """One histogram of the data of both: counts re-binned to the larger range and added
    (exact when the ranges differ by a power of two), min and max reduced."""
    if a.num_bins != b.num_bins:
        raise ValueError(f"cannot merge {b.num_bins} bins into {a.num_bins}")
    n = a.num_bins
    ra, rb = a.bin_width * n, b.bin_width * n
    big, small = (a, b) if ra >= rb else (b, a)
    r_big, r_small = max(ra, rb), min(ra, rb)
    counts = big.counts.astype(np.int64).copy()
    if r_small == 0.0:  # every value of that one was 0: bin 0
        counts[0] += small.counts.sum()
    else:
        counts += _rebin(small.counts.astype(np.int64), r_small, r_big)
    return Histogram(counts, big.bin_width, min(a.observed_min, b.observed_min),
                     max(a.observed_max, b.observed_max))


def batch_rows(arr: np.ndarray, rows: int, padded: int) -> np.ndarray:
    """The batch's real rows of a tensor: only a padded batch (``padded`` rows, a fixed-batch
    model's tail) has rows to cut, and only a tensor that carries them; a tensor without a batch
    axis (an anchor grid from the input's shape, a 0-d scalar) is taken whole."""
    return arr[:rows] if arr.ndim and rows < padded and arr.shape[0] == padded else arr


#: threads that fill histograms side by side, one tensor each (NumPy releases the GIL in the
#: binning): a quarter of the cores, at most 4, so that ONNX Runtime keeps the rest for the next
#: chunk; one (in the calling thread) on machines of up to 7 cores. Measured on 16 cores, 16
#: ResNet-sized tensors: 121 ms in one thread, 70 ms in 2, 45 ms in 4, 45 ms in 8.
HISTOGRAM_WORKERS = max(1, env_int("QUANTKIT_HISTOGRAM_WORKERS", 0) or min(4, (os.cpu_count() or 1) // 4))
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class Scaled:
    """A job's values times a per-channel factor (``HistogramCollector.update``'s scale, axis)."""

    values: np.ndarray
    scale: np.ndarray
    axis: int


def update_collectors(jobs: Iterable[tuple[HistogramCollector, np.ndarray | Scaled | Callable[[], np.ndarray]]]
                      ) -> None:
    """``collector.update(x)`` for each pair, side by side in ``HISTOGRAM_WORKERS`` threads (each
    collector at most once per call; ``x`` may be a ``Scaled``, or a function that makes the
    values, called in the worker). Returns when all are done; the first error is raised."""
    global _pool

    def run(c: HistogramCollector, x: np.ndarray | Scaled | Callable[[], np.ndarray]) -> None:
        if isinstance(x, Scaled):
            c.update(x.values, x.scale, x.axis)
        else:
            c.update(x() if callable(x) else x)

    jobs = list(jobs)
    if HISTOGRAM_WORKERS <= 1 or len(jobs) <= 1:
        for c, x in jobs:
            run(c, x)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(HISTOGRAM_WORKERS, thread_name_prefix="quantkit-histogram")
    futures = [_pool.submit(run, c, x) for c, x in jobs]
    for f in futures:
        f.result()


def samples_text(indices: Sequence[int], most: int = 8) -> str:
    """A batch's samples for a message, in order: "samples 3, 7, 12" (a random sampling order
    is not a range), "samples 0..31" when consecutive, the first ``most`` and a count past them."""
    idx = sorted(int(i) for i in indices)
    if not idx:
        return "no samples"
    if len(idx) == 1:
        return f"sample {idx[0]}"
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"samples {idx[0]}..{idx[-1]}"
    more = f" and {len(idx) - most} more" if len(idx) > most else ""
    return "samples " + ", ".join(map(str, idx[:most])) + more


def in_batch(err: NonFiniteError, batch: Any) -> NonFiniteError:
    """``err`` (a captured tensor's NaN/Inf) with the batch's samples named; when one of the
    batch's inputs is not finite itself, the data is named, not the model."""
    fed = next((n for n, v in getattr(batch, "feed", {}).items() if isinstance(v, np.ndarray)
                and np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()), None)
    if fed is not None:
        return NonFiniteError(f"{err} in the batch of {samples_text(batch.indices)}, whose input {fed!r} has "
                              "infinite values", hint="fix or leave out those samples")
    return NonFiniteError(f"{err} in the batch of {samples_text(batch.indices)}",
                          hint="check the model and the preprocessing (scale, mean/std) for this data")


def collect_histograms(executor: Any, batches: Iterable[Any], *, num_bins: int = 2048, sample_stride: int = 5,
                       pow2_grid: bool = False, pow2_tensors: Collection[str] = (),
                       on_batch: Callable[[int], None] | None = None,
                       also: Callable[[Mapping[str, np.ndarray]], None] | None = None,
                       ) -> dict[str, HistogramCollector]:
    """One pass of ``executor`` (any ``quantkit.backends`` runner made with ``capture=``) over
    ``batches``, each captured tensor streamed into its abs-max + |x| histogram collector, and
    to ``also`` (each batch's real rows), if given.

    ``pow2_grid``: every collector starts on a power-of-two range; ``pow2_tensors``: these do
    (tensors whose histograms are merged afterwards, e.g. a group that shares one scale: their
    ranges then differ by powers of two and ``merge_histogram`` is exact).

    Raises:
        NonFiniteError: a captured tensor has NaN or Inf values; the message names the tensor
            and the samples of the batch.
    """
    collectors = {t: HistogramCollector(num_bins, name=t, sample_stride=sample_stride,
                                        pow2_grid=pow2_grid or t in pow2_tensors)
                  for t in executor.captured_names}

    def sink(batch: Any, rows: int, tensors: Mapping[str, np.ndarray]) -> None:
        padded = getattr(batch, "num_rows", rows)
        try:
            real = {name: batch_rows(arr, rows, padded) for name, arr in tensors.items()}
            update_collectors((collectors[name], arr) for name, arr in real.items())
            if also is not None:
                also(real)
        except NonFiniteError as err:
            raise in_batch(err, batch) from err

    executor.capture(batches, sink, on_batch=on_batch)
    return collectors
