"""|x| histograms of torch tensors on the tensor's own device, with no host synchronisation.

Same statistics as ``quantkit.calibrators.HistogramCollector`` (2048 bins over [0, range),
range doubling with exact pairwise re-binning, signed min and max), so the same range methods
apply. On CUDA one update is one read of the tensor in quantkit's own kernel
(``quantkit.qat._cuda_hist``, compiled with NVRTC through cuda-python). Without cuda-python, or
on another device, every step is a torch operation:

    amax = max|x|                     (device scalar)
    k    = max(0, ceil(log2(amax / range)))   range *= 2**k   old bin i -> bin i >> k
    counts += histc(|x| * bins / range, bins, 0+, bins)  in chunks of <= 2**24 values, so the
                                                         float32 counts of histc stay exact;
    counts[0] += number of exact zeros                   (a reduction: no atomic contention)

NaN/Inf are flagged in a device boolean and reported once, when the statistics are read.

Quantizers that read the same tensor (a block's input feeds its first convolution, its
downsampling convolution and the residual Add) can share one histogram: ``sharing()`` opens a
registry for one forward pass in which the second reader of a tensor object, unmodified since,
gets the first reader's histogram instead of reading the tensor again (used by
``quantkit.qat.collect`` for the forward it captures as a CUDA graph, where the pairs cannot
change).

``lagged()`` moves the updates off the model's critical path: inside it, each CUDA update runs
on a side stream as soon as its tensor is ready, concurrently with the layers that follow (the
histogram reads memory; the next convolution mostly computes), and the model's stream waits for
it only ``LAG`` updates later, holding the tensor until then so that its memory is not re-used
under the kernel. That is safe unless the model modifies a quantized input in place within the
lag, which the same context detects (``modified``): ``quantkit.qat.collect`` runs its first
forward without a side stream to find out, and overlaps only models that do not. Used only in
the captured graph: eagerly the per-update stream switches and events cost more host time than
the overlap saves (figures: benchmarks/results/design_notes.md).
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from quantkit.calibrators.collectors import Histogram
from quantkit.errors import NonFiniteError, NotCalibratedError

_EXACT = 1 << 24  # float32 counts are exact up to here


_registry: dict[int, tuple[Any, int, "TorchHistogram"]] | None = None


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """Within the block, ``shared_for`` finds the histogram that already read a tensor."""
    global _registry
    _registry = {}
    try:
        yield
    finally:
        _registry = None


def shared_for(x: Any) -> "TorchHistogram | None":
    """The histogram that read this very tensor (same object, not modified since) inside
    ``sharing()``; None outside it or for a new tensor."""
    if _registry is None:
        return None
    entry = _registry.get(id(x))
    if entry is None or entry[0]() is not x or entry[1] != x._version:
        return None
    return entry[2]


def remember(x: Any, h: "TorchHistogram") -> None:
    if _registry is not None:
        _registry[id(x)] = (weakref.ref(x), x._version, h)


LAG = 2  # updates in flight on the side stream before the model's stream waits for the oldest


class Lag:
    """The updates in flight inside ``lagged()``: (tensor, its version, name, done event)."""

    def __init__(self, stream: Any = None):
        self.stream = stream  # the side stream; None: updates run in place
        self.modified: str | None = None  # first histogram whose input was modified in place within the lag
        self._flight: collections.deque[tuple[Any, int, str, Any]] = collections.deque()

    def run(self, x: Any, name: str, update: Any) -> None:
        import torch

        event = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(self.stream):
                update()
            event = torch.cuda.Event()
            event.record(self.stream)
        else:
            update()
        self._flight.append((x, x._version, name, event))
        while len(self._flight) > LAG:
            self._retire()

    def _retire(self) -> None:
        import torch

        x, version, name, event = self._flight.popleft()
        if event is not None:
            torch.cuda.current_stream(x.device).wait_event(event)
        if x._version != version and self.modified is None:
            self.modified = name

    def join(self) -> None:
        while self._flight:
            self._retire()


_lag: Lag | None = None


@contextlib.contextmanager
def lagged(stream: Any = None) -> Iterator[Lag]:
    """Within the block, CUDA histogram updates run on ``stream`` and are joined into the
    current stream ``LAG`` updates later and on exit; with no stream they run in place and the
    block only checks for in-place modifications within the lag."""
    global _lag
    outer, _lag = _lag, Lag(stream)
    state = _lag
    try:
        yield state
    finally:
        _lag = outer
        state.join()


class TorchHistogram:
    """Streaming abs-max + |x| histogram on ``device``.

    Args:
        num_bins: a power of two.
        name: the module or tensor name, for messages.
        device: where the statistics live (the tensors' device).
    """

    def __init__(self, num_bins: int = 2048, name: str = "<tensor>", device: Any = "cpu"):
        import torch

        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.name = name
        self.device = torch.device(device)
        # all state in one zeroed allocation (a calibration creates one histogram per quantizer):
        # counts (float64), pending (int32: the CUDA kernels' counts not yet in counts), float32
        # range, scale, min, max (+ the previous range and scale, for the kernels), int32 NaN
        # flag, ticket, rescan flag, and the bool NaN flag of the torch path
        nb = num_bins
        state = torch.zeros(12 * nb + 64, dtype=torch.uint8, device=self.device)
        self._counts = state[: 8 * nb].view(torch.float64)
        self._pending = state[8 * nb : 12 * nb].view(torch.int32)
        self._f = state[12 * nb : 12 * nb + 24].view(torch.float32)
        self._i = state[12 * nb + 32 : 12 * nb + 48].view(torch.int32)
        self._bad = state[12 * nb + 48].view(torch.bool)
        self._f[2:4].fill_(float("inf"))  # min = inf, max = -inf (fill_: no host-to-device copy)
        self._f[3:4].neg_()
        self._range, self._min, self._max = self._f[0], self._f[2], self._f[3]
        self._bins: Any = None  # torch path only: bin indices and a re-binning buffer
        self._tmp: Any = None
        self._params: Any = None
        self._max_grid = 0
        # CUDA tensors: "cuda" (quantkit.qat._cuda_hist: one read, two launches) or "torch"
        # (torch operations; also the fallback when the kernel cannot be built)
        self.kernel = "cuda"
        self._seen = 0

    def start_at(self, range_: float) -> None:
        """Fix the first range before any update (instead of the first batch's amax): histograms
        started at the same range on different data share one grid, their ranges differ by
        powers of two and merge exactly (``quantkit.qat.distributed``)."""
        if self._seen:
            raise ValueError(f"{self.name}: start_at must come before the first update")
        if range_ > 0.0:
            self._f[0:1].fill_(float(range_))
            self._f[1:2].fill_(self.num_bins / float(range_))  # the CUDA kernel bins with this scale

    def clone(self) -> "TorchHistogram":
        """An independent copy of the statistics so far (for a quantizer that stops sharing)."""
        twin = TorchHistogram(self.num_bins, self.name, self.device)
        self._counts.add_(self._pending)
        self._pending.zero_()
        for name in ("_counts", "_f", "_bad"):
            getattr(twin, name).copy_(getattr(self, name))
        twin._i[0].copy_(self._i[0])  # the NaN flag (not the ticket counter)
        twin._seen = self._seen
        twin.kernel = self.kernel
        return twin

    def update(self, x: Any) -> None:
        """Add a batch. Every state tensor is updated in place, so a CUDA graph that captured
        this call accumulates correctly when replayed."""
        import torch

        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype != torch.float32:
            x = x.float()
        x = x.reshape(-1)
        if x.is_cuda and _lag is not None:
            _lag.run(x, self.name, lambda: self._update(x))
        else:
            self._update(x)

    def _update(self, x: Any) -> None:
        import torch

        if x.is_cuda and self.kernel == "cuda":
            from quantkit.qat._cuda_hist import cuda_update

            if cuda_update(self, x.contiguous()):
                self._seen += 1
                return
        lo, hi = torch.aminmax(x)
        self._bad.logical_or_(~(torch.isfinite(lo) & torch.isfinite(hi)))
        torch.minimum(self._min, lo, out=self._min)
        torch.maximum(self._max, hi, out=self._max)
        amax = torch.nan_to_num(torch.maximum(-lo, hi), nan=0.0, posinf=0.0)
        # grow the range by powers of two (first non-zero batch: range = amax)
        first = self._range == 0
        base = torch.where(first, amax, self._range)
        k = torch.ceil(torch.log2(torch.clamp(amax / torch.clamp(base, min=1e-30), min=1.0)))
        new_range = base * torch.exp2(k)
        shift = torch.where(first, torch.zeros_like(k), k).long()
        if self._bins is None:
            self._bins = torch.arange(self.num_bins, device=self.device)
            self._tmp = torch.zeros_like(self._counts)
        self._tmp.zero_().index_add_(0, self._bins >> shift, self._counts)
        self._counts.copy_(self._tmp)
        self._range.copy_(new_range)
        # bin this batch (range 0 = all zeros so far: every value lands in bin 0); NaN values
        # are flagged above and fall outside histc's range
        scale = self.num_bins / torch.where(new_range > 0, new_range, torch.ones_like(new_range))
        a = x.abs().mul_(scale)
        # exact zeros (half of a ReLU output) are counted by a reduction, not by histc: all in one
        # bin, they serialise histc's atomic adds. histc's lower edge sits just above 0 (bin
        # edges move by 1e-30 of a bin)
        self._counts[:1].add_(a.numel() - torch.count_nonzero(a))
        for start in range(0, a.numel(), _EXACT):
            self._counts.add_(torch.histc(a[start : start + _EXACT], bins=self.num_bins, min=1e-30, max=self.num_bins))
        self._seen += 1

    def compute(self) -> Histogram:
        """Read the statistics (one device-to-host transfer)."""
        import torch

        if self._seen == 0:
            raise NotCalibratedError(f"{self.name}: no data was collected")
        self._counts.add_(self._pending)  # the CUDA kernels' last overflow counts and NaN flag
        self._pending.zero_()
        self._bad |= self._i[0].bool()
        packed = torch.stack([self._range.double(), self._min.double(), self._max.double(), self._bad.double()])
        rng, lo, hi, bad = packed.cpu().tolist()
        if bad:
            raise NonFiniteError(f"{self.name}: NaN or Inf values in its input during calibration",
                                 hint="check the model and the data loader's normalisation")
        counts = self._counts.cpu().numpy().round().astype(np.int64)
        return Histogram(counts, rng / self.num_bins if rng > 0 else 0.0, float(lo), float(hi))
