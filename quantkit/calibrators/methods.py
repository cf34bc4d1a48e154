"""Range methods: pure functions from a Histogram to an amax (symmetric INT8, scale = amax/127).

Every method reads the same collected statistics, so comparing methods costs no extra pass.
Methods are registered by name; add one with ``@range_method("name")``.

Quantization is symmetric, so a method returns one number (the clipping threshold amax)
rather than a (lo, hi) pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantkit.calibrators.collectors import Histogram
from quantkit.errors import UnknownMethodError

RangeMethod = Callable[..., float]
_RANGE_METHODS: dict[str, RangeMethod] = {}

#: the four classic methods; ``auto`` picks among them per tensor, and ``entropy-trt`` is
#: TensorRT's KL search applied to every tensor, unguarded (see ``guarded_entropy_amax``)
BASE_METHODS = ("minmax", "entropy", "percentile", "mse")
ALL_METHODS = (*BASE_METHODS, "auto", "entropy-trt")


def range_method(name: str) -> Callable[[RangeMethod], RangeMethod]:
    def register(fn: RangeMethod) -> RangeMethod:
        _RANGE_METHODS[name] = fn
        return fn

    return register


def get_range_method(name: str) -> RangeMethod:
    try:
        return _RANGE_METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown calibration method {name!r}; available: {sorted(_RANGE_METHODS)}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_RANGE_METHODS)


@range_method("minmax")
def minmax_amax(hist: Histogram) -> float:
    """The absolute maximum seen (TensorRT's MinMaxCalibration)."""
    return hist.amax


@range_method("percentile")
def percentile_amax(hist: Histogram, *, percentile: float = 99.99) -> float:
    """The left edge of the bin where the CDF of |x| reaches ``percentile`` %.

    Same convention as NVIDIA's pytorch-quantization / Model Optimizer; 100 gives the exact max.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = hist.total
    if total == 0 or hist.bin_width == 0.0 or percentile == 100.0:
        return hist.amax
    cdf = np.cumsum(hist.counts, dtype=np.float64) / total
    idx = min(int(np.searchsorted(cdf, percentile / 100.0)), hist.num_bins - 1)
    return float(min(max(idx, 1) * hist.bin_width, hist.amax))


@range_method("entropy-trt")
def entropy_amax(
    hist: Histogram,
    *,
    num_quant_bins: int = 128,
    start_bin: int = 128,
    flatten_zero_bin: bool = True,
) -> float:
    """TensorRT's KL-divergence threshold search (EntropyCalibration2), vectorised.

    For each candidate i (bins [0, i) kept, i from ``start_bin`` to the number of bins):
    P = the first i bins with the clipped tail folded into bin i-1; Q = the first i bins
    merged into 128 levels and spread back evenly over each level's non-empty bins. The
    candidate with the smallest KL(P || Q) wins (the last one on ties), amax = i * bin width.
    ``flatten_zero_bin`` sets the count of bin 0 to that of bin 1, as NVIDIA's
    pytorch-quantization and Model Optimizer do, so a spike of exact zeros after ReLU does
    not dominate.

    The per-candidate loops of the reference are replaced by prefix sums: with C, Z, L the
    prefix sums of counts, of non-empty bins and of c*log(c), every candidate costs O(128).
    """
    counts = hist.counts.astype(np.float64)
    n = counts.size
    if hist.total == 0 or hist.bin_width == 0.0 or n <= start_bin:
        return hist.amax
    if flatten_zero_bin:
        counts[0] = counts[1]
    total = counts.sum()
    if total == 0.0:
        return hist.amax
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    cum_clogc = np.concatenate([[0.0], np.cumsum(clogc)])

    cand = np.arange(start_bin, n + 1)  # i: number of bins kept
    levels = np.arange(num_quant_bins + 1)
    starts = (levels[None, :] * cand[:, None] + num_quant_bins - 1) // num_quant_bins
    starts[:, -1] = cand
    level_sum = cum[starts[:, 1:]] - cum[starts[:, :-1]]  # S_j
    level_nz = nonzero[starts[:, 1:]] - nonzero[starts[:, :-1]]  # n_j
    tail = total - cum[cand]
    last = counts[cand - 1]
    kept = cum[cand]  # sum of Q before normalisation

    # sum p log p, with p = counts / total and the tail folded into the last kept bin
    last_p = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cum_clogc[cand - 1] + np.where(last_p > 0, last_p * np.log(last_p), 0.0)
        level_log_q = np.where(level_sum > 0, np.log(level_sum / np.maximum(level_nz, 1)), 0.0)
        self_term = plogp / total - np.log(total)
        cross = (level_sum * level_log_q).sum(axis=1) + tail * level_log_q[:, -1]
        cross = cross / total - np.log(kept)
    kl = self_term - cross
    kl[(last == 0) & (tail > 0)] = np.inf  # P has mass where Q has none
    kl[kept == 0] = np.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(min(cand[best] * hist.bin_width, hist.amax))


def quantization_mse(hist: Histogram, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared error of symmetric INT8 fake quantization, per candidate amax.

    Each bin's count sits at the bin centre; error is summed over the histogram and divided
    by the number of values. ``amaxes``: 1-D array of candidates; returns the same shape.
    """
    amaxes = np.asarray(amaxes, dtype=np.float64)
    used = np.nonzero(hist.counts)[0]
    if used.size == 0 or hist.bin_width == 0.0:
        return np.zeros_like(amaxes)
    centres = (used + 0.5) * hist.bin_width
    weights = hist.counts[used].astype(np.float64)
    out = np.empty_like(amaxes)
    step = max(1, (1 << 21) // used.size)  # bound the temporaries to ~16 MB each
    for s in range(0, amaxes.size, step):
        a = np.maximum(amaxes[s : s + step, None], 1e-30)
        scale = a / 127.0
        q = np.minimum(np.rint(centres[None, :] / scale), 127.0) * scale
        out[s : s + step] = ((q - centres[None, :]) ** 2 * weights[None, :]).sum(axis=1)
    return out / weights.sum()


@range_method("mse")
def mse_amax(hist: Histogram, *, start_bin: int = 128, coarse_step: int = 8) -> float:
    """The bin edge (from ``start_bin`` up) whose INT8 quantization has the least squared error.

    Searched coarse to fine: every ``coarse_step``-th edge first, then every edge within one
    coarse step of the three best coarse candidates (a 6x smaller search than all 1921 edges;
    the error curve is smooth at that scale, and the tests check the result against the
    exhaustive search).
    """
    n = hist.num_bins
    if hist.total == 0 or hist.bin_width == 0.0 or n <= start_bin:
        return hist.amax
    edges = np.unique(np.minimum(np.arange(start_bin, n + 1) * hist.bin_width, hist.amax))
    coarse = np.unique(np.concatenate([np.arange(0, edges.size, coarse_step), [edges.size - 1]]))
    coarse_err = quantization_mse(hist, edges[coarse])
    fine: set[int] = set()
    for k in np.argsort(coarse_err, kind="stable")[:3]:
        c = int(coarse[k])
        fine.update(range(max(0, c - coarse_step), min(edges.size, c + coarse_step + 1)))
    idx = np.array(sorted(fine))
    err = quantization_mse(hist, edges[idx])
    best = len(err) - 1 - int(np.argmin(err[::-1]))
    return float(edges[idx[best]])


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` picked for one tensor and why."""

    amax: float
    method: str
    errors: dict[str, float]


def auto_choice(candidates: dict[str, float], hist: Histogram, *, tolerance: float = 2.0) -> AutoChoice:
    """Entropy unless its expected quantization error is ``tolerance`` times the best candidate's.

    TensorRT's entropy method is kept wherever it is sane (it is what TensorRT users expect);
    on tensors where clipping the top of the distribution is expensive, such as a normalised
    network input whose strokes sit at the maximum, the candidate with the least expected
    squared error on the collected histogram is taken instead.
    """
    names = list(candidates)
    errs = quantization_mse(hist, np.array([candidates[m] for m in names]))
    errors = {m: float(e) for m, e in zip(names, errs)}
    best = min(names, key=lambda m: (errors[m], -candidates[m]))
    if "entropy" in candidates and errors["entropy"] <= tolerance * errors[best]:
        best = "entropy"
    return AutoChoice(candidates[best], best, errors)


def is_two_sided(hist: Histogram, *, ratio: float = 0.1) -> bool:
    """True when the negative side is a real part of the distribution (min < -ratio * max).

    Post-ReLU tensors (and GELU/SiLU outputs, whose negative dip is small) are one-sided.
    """
    return hist.observed_min < -ratio * max(hist.observed_max, 0.0) or (
        hist.observed_max <= 0.0 and hist.observed_min < 0.0
    )


@range_method("entropy")
def guarded_entropy_amax(hist: Histogram) -> float:
    """quantkit's entropy: TensorRT's KL threshold on one-sided tensors, the MSE-optimal amax on
    two-sided ones.

    The KL search runs on the histogram of |x|, which folds the two sides of a signed tensor
    together, and folding the clipped tail into the last kept bin makes it blind to saturating
    a dense mode at the top: on the sample's normalised input (background -0.8, strokes at the
    maximum 2.147) it clips at 0.945 and INT8 accuracy drops from 0.994 to 0.752. Post-ReLU
    tensors, the case the method was designed for, keep TensorRT's threshold.
    """
    return mse_amax(hist) if is_two_sided(hist) else entropy_amax(hist)


@dataclass(frozen=True)
class TensorRanges:
    """Every method's amax for one tensor, and what ``auto`` picked.

    ``amax`` keys: minmax, entropy, percentile, mse, auto, entropy-trt.
    ``two_sided``: whether ``entropy`` used the MSE rule instead of the KL search.
    """

    amax: dict[str, float]
    auto: AutoChoice
    two_sided: bool


def all_ranges(hist: Histogram, *, percentile: float = 99.99, auto_tolerance: float = 2.0) -> TensorRanges:
    """Every method's amax for one histogram, each computed once."""
    kl = entropy_amax(hist)
    mse = mse_amax(hist)
    two_sided = is_two_sided(hist)
    amax = {
        "minmax": minmax_amax(hist),
        "entropy": mse if two_sided else kl,
        "percentile": percentile_amax(hist, percentile=percentile),
        "mse": mse,
    }
    choice = auto_choice(amax, hist, tolerance=auto_tolerance)
    amax["auto"] = choice.amax
    amax["entropy-trt"] = kl
    return TensorRanges(amax, choice, two_sided)


# ``auto`` is registered so that get_range_method knows the name; it needs every candidate.
@range_method("auto")
def auto_amax(hist: Histogram, *, percentile: float = 99.99, auto_tolerance: float = 2.0) -> float:
    return all_ranges(hist, percentile=percentile, auto_tolerance=auto_tolerance).amax["auto"]
