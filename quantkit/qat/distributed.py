"""Calibration statistics across the ranks of a ``torch.distributed`` job (torchrun; NCCL on
GPUs, Gloo on CPU): every rank collects on its own shard, and every rank ends with the
statistics, and so the ranges, of the whole data set.

The grids are aligned on purpose, so that the merge is exact:

    first batch, before any update:  a probe forward gives each quantizer's first amax a_r on
                                     rank r; R0 = a_0, rank 0's (max over the ranks where a_0 is
                                     0), shared with one all-reduce; every rank's histogram
                                     starts at range R0 (``start_at``) and grows from there
    the pass:                        ranges only double: rank r ends at R0 * 2**k_r
    merge (``merge_histograms_``):   R = all-reduce MAX of the ranges; each rank re-bins to R by
                                     summing 2**(K - k_r) neighbouring bins (exact); counts
                                     all-reduce SUM (float64 holding integers: exact below 2**53);
                                     min all-reduce MIN, max and the NaN flag all-reduce MAX

So every rank holds bit-identical statistics and computes bit-identical amax for every method.
minmax equals a single process's exactly. A single process reading the same batches with rank
0's first batch first (batch g on rank g % world, say) starts its grid at the same R0 and ends
at the same range (the smallest R0 * 2**k above the global amax): the same counts, up to values
lying exactly on a range that later doubles (the last bin is closed, so such a value's bin
depends on the order of the updates: one count one bin over). Any other order (a
DistributedSampler interleaves samples, so rank 0's first batch is not one process's) starts
that process's grid elsewhere, by a factor that is not a power of two, and the histogram
methods can then differ a little (entropy and mse most, on flat error curves).

Without alignment (``collect(..., align=False)``) ranges differ by arbitrary factors and the
merge re-bins proportionally (``quantkit.calibrators.collectors._rebin``): still the same on
every rank, no longer exact.

Collectives run outside any CUDA graph (the probe is eager, the merge follows the pass).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from quantkit.calibrators.collectors import HistogramCollector, _rebin
from quantkit.errors import QuantkitError
from quantkit.qat.histogram import TorchHistogram

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group of more than one rank."""
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _device(group: Any = None) -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: Any, group: Any = None) -> torch.Tensor:
    dev = _device(group)
    buf = t.to(dev)
    torch.distributed.all_reduce(buf, op=op, group=group)
    return buf.cpu()


def _range_of(h: Any) -> float:
    if h is None:
        return 0.0
    if isinstance(h, TorchHistogram):
        return float(h._range.item())
    return float(h._range)


def agree_start_ranges_(qs: list[Any], probe: Any = None, group: Any = None) -> None:
    """Agree on each quantizer's first histogram range across the ranks, before any update.

    ``probe()`` runs one forward with the quantizers collecting (each rank on its first batch;
    None: this rank has no batch and contributes zeros); its histograms are dropped and each
    quantizer's ``start_range_`` becomes the largest first amax over the ranks, so every rank's
    grid starts at the same range. Every rank must call this once, with the same quantizers.
    The probe's error, if any, is raised after the collective (so the other ranks go on to
    ``check_ranks``)."""
    err: BaseException | None = None
    if probe is not None:
        try:
            probe()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the collective
            err = e
    local = torch.tensor([_range_of(q.histogram_) if err is None else 0.0 for q in qs], dtype=torch.float64)
    first = local if torch.distributed.get_rank(group) == 0 else torch.zeros_like(local)
    both = _all_reduce(torch.cat([first, local]), torch.distributed.ReduceOp.MAX, group).tolist()
    for i, q in enumerate(qs):
        q.histogram_, q.shares_ = None, False
        # rank 0's first amax: where one process reading rank 0's first batch first starts its
        # grid; the largest over the ranks where rank 0 saw only zeros
        q.start_range_ = float(both[i] or both[len(qs) + i])
    if err is not None:
        raise err


def check_ranks(err: BaseException | None, group: Any = None) -> None:
    """Raise on every rank when the calibration pass failed on any: ``err`` on the rank that
    had it, a QuantkitError naming the failed ranks on the others (instead of a hang in the
    next collective)."""
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = 1.0 if err is not None else 0.0
    flags = _all_reduce(flags, torch.distributed.ReduceOp.MAX, group)
    if err is not None:
        raise err
    failed = [i for i, f in enumerate(flags.tolist()) if f]
    if failed:
        raise QuantkitError(f"calibration failed on rank(s) {failed}; see their error messages",
                            hint="fix the failing rank's data or model; every rank stops together")


def sum_count(count: int, group: Any = None) -> int:
    """The batches of every rank together."""
    return int(_all_reduce(torch.tensor([float(count)], dtype=torch.float64), torch.distributed.ReduceOp.SUM,
                           group).item())


def _unshare_disagreeing_(qs: list[Any], group: Any = None) -> None:
    """Quantizers that share a histogram (same tensor) must share it on every rank; where the
    ranks disagree (a CUDA graph captured on one rank only), each gets its own copy."""
    leaders = []
    for q in qs:
        lead = -1
        if q.shares_:
            lead = next((i for i, o in enumerate(qs) if o.histogram_ is q.histogram_ and not o.shares_), -1)
        leaders.append(float(lead))
    mine = torch.tensor(leaders, dtype=torch.float64)
    both = _all_reduce(torch.cat([mine, -mine]), torch.distributed.ReduceOp.MAX, group)
    hi, lo = both[: len(qs)], -both[len(qs) :]
    if torch.equal(hi, lo):
        return
    log.info("the ranks share calibration histograms differently; every quantizer keeps its own")
    for q in qs:
        if q.shares_:
            q.histogram_, q.shares_ = q.histogram_.clone(), False


def _read(h: Any, num_bins: int) -> tuple[float, np.ndarray, float, float, float, float]:
    """(range, counts float64, min, max, NaN flag, seen) of a histogram of either kind (None:
    this rank saw no data)."""
    if h is None:
        return 0.0, np.zeros(num_bins), math.inf, -math.inf, 0.0, 0.0
    if isinstance(h, TorchHistogram):
        h._counts.add_(h._pending)  # the CUDA kernels' pending counts and NaN flag
        h._pending.zero_()
        h._bad |= h._i[0].bool()
        h._i[0].zero_()
        rng, lo, hi, bad = torch.stack([h._range.double(), h._min.double(), h._max.double(),
                                        h._bad.double()]).cpu().tolist()
        return rng, h._counts.cpu().numpy().copy(), lo, hi, bad, float(h._seen > 0)
    counts = h._counts.astype(np.float64)
    if h._range == 0.0:
        counts[0] += h._zeros
    return h._range, counts, h._min, h._max, 0.0, float(np.isfinite(h._max))


def _aligned(counts: np.ndarray, src: float, dst: float) -> np.ndarray:
    """``counts`` over [0, src) re-binned to [0, dst >= src): exact for power-of-two ratios."""
    if src == 0.0 or src == dst:  # range 0: every value seen was 0, in bin 0
        return counts
    return _rebin(np.rint(counts).astype(np.int64), src, dst).astype(np.float64)


def _write(q: Any, device: torch.device, rng: float, counts: np.ndarray, lo: float, hi: float, bad: float,
           seen: float) -> None:
    h = q.histogram_
    nb = counts.size
    if h is None:
        h = q.histogram_ = (TorchHistogram(nb, q.qualified_name, device) if device.type == "cuda"
                            else HistogramCollector(nb, q.qualified_name))
    if isinstance(h, TorchHistogram):
        h._counts.copy_(torch.from_numpy(counts))
        h._pending.zero_()
        h._f[0:4].copy_(torch.tensor([rng, nb / rng if rng > 0 else 1.0, lo, hi], dtype=torch.float32))
        h._bad.fill_(bool(bad))
        h._i[0].zero_()
        h._seen = max(h._seen, int(seen))
        return
    if rng > 0.0:
        h._range, h._counts, h._zeros = rng, np.rint(counts).astype(np.int64), 0
    else:
        h._range, h._counts, h._zeros = 0.0, np.zeros(nb, dtype=np.int64), int(round(counts[0]))
    h._min, h._max = lo, hi
    h._updates = max(h._updates, int(seen))


def merge_histograms_(qs: list[Any], device: torch.device, group: Any = None) -> None:
    """Merge the calibration histograms of ``qs`` (the enabled input quantizers, in the same
    order on every rank) across the ranks, in place: afterwards every rank holds the
    statistics of all the data, bit-identical (see the module docstring for the alignment).

    Every rank must call this with the same quantizers; a rank that saw no data contributes
    empty statistics. Call it outside CUDA graph capture (the pass's replays are done)."""
    _unshare_disagreeing_(qs, group)
    own = [q for q in qs if not q.shares_]
    states = [_read(q.histogram_, q.num_bins) for q in own]
    ReduceOp = torch.distributed.ReduceOp
    ranges = _all_reduce(torch.tensor([s[0] for s in states], dtype=torch.float64), ReduceOp.MAX, group).tolist()
    flat = np.concatenate([_aligned(s[1], s[0], r) for s, r in zip(states, ranges)]) if states else np.zeros(0)
    total = _all_reduce(torch.from_numpy(flat), ReduceOp.SUM, group).numpy()
    extremes = torch.tensor([[-s[2], s[3], s[4], s[5]] for s in states], dtype=torch.float64).reshape(-1, 4)
    extremes = _all_reduce(extremes, ReduceOp.MAX, group).tolist()
    start = 0
    for q, r, (neg_lo, hi, bad, seen) in zip(own, ranges, extremes):
        counts = total[start : start + q.num_bins].copy()
        start += q.num_bins
        _write(q, device, r, counts, -neg_lo, hi, bad, seen)
