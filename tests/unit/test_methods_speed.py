"""The range methods' fast paths against straightforward references: the same amax, bit for bit.

The references are the one-pass implementations the methods had before they were made
cache-friendly (chunked candidates, cached level boundaries); they are kept here so that any
later optimisation is held to the same results.
"""

import numpy as np
import pytest

import quantkit.ptq as ptq
from quantkit.calibrators.collectors import Histogram, HistogramCollector
from quantkit.calibrators.methods import entropy_amax, method_params, mse_amax, quantization_mse


def reference_entropy_amax(hist: Histogram, *, num_quant_bins: int = 128, start_bin: int = 128) -> float:
    """TensorRT's KL search with prefix sums over the whole [candidates, 128] matrix at once."""
    counts = hist.counts.astype(np.float64)
    n = counts.size
    if hist.total == 0 or hist.bin_width == 0.0 or n <= start_bin:
        return hist.amax
    counts[0] = counts[1]
    total = counts.sum()
    if total == 0.0:
        return hist.amax
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    cum_clogc = np.concatenate([[0.0], np.cumsum(clogc)])
    cand = np.arange(start_bin, n + 1)
    levels = np.arange(num_quant_bins + 1)
    starts = (levels[None, :] * cand[:, None] + num_quant_bins - 1) // num_quant_bins
    starts[:, -1] = cand
    level_sum = cum[starts[:, 1:]] - cum[starts[:, :-1]]
    level_nz = nonzero[starts[:, 1:]] - nonzero[starts[:, :-1]]
    tail = total - cum[cand]
    last = counts[cand - 1]
    kept = cum[cand]
    last_p = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cum_clogc[cand - 1] + np.where(last_p > 0, last_p * np.log(last_p), 0.0)
        level_log_q = np.where(level_sum > 0, np.log(level_sum / np.maximum(level_nz, 1)), 0.0)
        self_term = plogp / total - np.log(total)
        cross = (level_sum * level_log_q).sum(axis=1) + tail * level_log_q[:, -1]
        cross = cross / total - np.log(kept)
    kl = self_term - cross
    kl[(last == 0) & (tail > 0)] = np.inf
    kl[kept == 0] = np.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(min(cand[best] * hist.bin_width, hist.amax))


def reference_quantization_mse(hist: Histogram, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared INT8 error per candidate amax, every candidate in one array."""
    amaxes = np.asarray(amaxes, dtype=np.float64)
    used = np.nonzero(hist.counts)[0]
    if used.size == 0 or hist.bin_width == 0.0:
        return np.zeros_like(amaxes)
    centres = (used + 0.5) * hist.bin_width
    weights = hist.counts[used].astype(np.float64)
    scale = np.maximum(amaxes[:, None], 1e-30) / 127.0
    q = np.minimum(np.rint(centres[None, :] / scale), 127.0) * scale
    return ((q - centres[None, :]) ** 2 * weights[None, :]).sum(axis=1) / weights.sum()


def reference_mse_amax(hist: Histogram, *, start_bin: int = 128, coarse_step: int = 8) -> float:
    """The coarse-to-fine least-MSE edge with np.unique and the one-array error."""
    n = hist.num_bins
    if hist.total == 0 or hist.bin_width == 0.0 or n <= start_bin:
        return hist.amax
    edges = np.unique(np.minimum(np.arange(start_bin, n + 1) * hist.bin_width, hist.amax))
    coarse = np.unique(np.concatenate([np.arange(0, edges.size, coarse_step), [edges.size - 1]]))
    coarse_err = reference_quantization_mse(hist, edges[coarse])
    fine: set[int] = set()
    for k in np.argsort(coarse_err, kind="stable")[:3]:
        c = int(coarse[k])
        fine.update(range(max(0, c - coarse_step), min(edges.size, c + coarse_step + 1)))
    idx = np.array(sorted(fine))
    err = reference_quantization_mse(hist, edges[idx])
    best = len(err) - 1 - int(np.argmin(err[::-1]))
    return float(edges[idx[best]])


def _histograms(seed: int, count: int, bins: int | None = None) -> list[Histogram]:
    """Histograms of many shapes: ReLU, heavy-tailed, signed, sparse, spiky, few values, 256..4096 bins."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(50, 60_000))
        kind = i % 6
        x = {0: np.maximum(rng.standard_normal(n), 0) * rng.uniform(0.1, 10),
             1: rng.standard_cauchy(n).clip(-200, 200),
             2: rng.standard_normal(n) * 3 - 1,
             3: np.where(rng.random(n) < 0.97, 0.0, rng.exponential(2.0, n)),
             4: np.concatenate([rng.normal(1, 0.01, n // 2), rng.normal(6, 0.3, n - n // 2)]),
             5: rng.integers(0, 5, n).astype(np.float64)}[kind].astype(np.float32)
        c = HistogramCollector(bins or int(2 ** rng.integers(8, 13)))
        c.update(x)
        out.append(c.compute())
    return out


def test_entropy_amax_equals_reference_on_many_histograms():
    for h in _histograms(0, 60):
        assert entropy_amax(h) == reference_entropy_amax(h)


def test_quantization_mse_and_mse_amax_equal_reference_on_many_histograms():
    for h in _histograms(1, 40):
        cand = np.concatenate([np.linspace(0.0, h.amax, 300), [h.amax * 2, 1e-3]])
        assert np.array_equal(quantization_mse(h, cand), reference_quantization_mse(h, cand))
    for h in _histograms(2, 30):
        assert mse_amax(h) == reference_mse_amax(h)


def test_method_ranges_computes_each_group_once(monkeypatch):
    """A tensor of a group gets its group's ranges; its own are not computed (they were, and
    were thrown away)."""
    hists = {t: h for t, h in zip("abc", _histograms(3, 3, bins=2048))}
    calls = []
    original = ptq.all_ranges
    monkeypatch.setattr(ptq, "all_ranges", lambda h, p: calls.append(h) or original(h, p))
    ranges = ptq.method_ranges(hists, [("b", "c")], method_params())  # |x| up to 200 and 17.8
    assert len(calls) == 2  # the group's merged histogram and a's
    assert list(ranges) == ["a", "b", "c"] and ranges["b"] is ranges["c"]
    assert ranges["a"].amax == original(hists["a"], method_params()).amax


def test_a_group_member_of_far_smaller_values_keeps_its_own_ranges():
    """A Concat's input that a residual Add also quantizes, beside an input 1000x larger (a
    diffusion UNet), got the group's scale: 2 dB local SQNR for the Add. Below 1/16 of the
    group's largest value, a member keeps its own ranges."""
    hists = {t: h for t, h in zip("abc", _histograms(3, 3, bins=2048))}  # |x| up to 1.93, 200, 17.8
    ranges = ptq.method_ranges(hists, [("a", "b", "c")], method_params())
    own = ptq.method_ranges({"a": hists["a"]}, [], method_params())["a"]
    assert ranges["a"].amax == own.amax  # 1.93 * 16 < 200
    assert ranges["b"] is ranges["c"]  # 17.8 * 16 >= 200: they share
    assert ranges["b"].amax["minmax"] == pytest.approx(200.0, rel=1e-3)
    zero = HistogramCollector(2048)
    zero.update(np.zeros(100, np.float32))  # 0 on every sample: it keeps the group's scale, not a placeholder
    ranges = ptq.method_ranges({"b": hists["b"], "z": zero.compute()}, [("b", "z")], method_params())
    assert ranges["z"] is ranges["b"]
