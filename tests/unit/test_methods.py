from collections import Counter

import numpy as np
import pytest

from quantkit.calibrators import HistogramCollector, get_method, quantization_mse
from quantkit.calibrators.collectors import Histogram
from quantkit.calibrators.methods import (
    all_ranges,
    entropy_amax,
    guarded_entropy_amax,
    is_two_sided,
    mse_amax,
    percentile_amax,
)
from quantkit.errors import UnknownMethodError


def hist_of(x: np.ndarray, bins: int = 2048) -> Histogram:
    c = HistogramCollector(bins)
    c.update(x)
    return c.compute()


def brute_entropy(counts: np.ndarray, width: float, start: int = 128, nq: int = 128) -> tuple[float, np.ndarray]:
    """Direct transcription of the published loop (as in NVIDIA's pytorch-quantization)."""
    bins = counts.astype(np.float64).copy()
    bins[0] = bins[1]
    total = bins.sum()
    divs = []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=nq + 1)
        dig = np.digitize(range(i), space) - 1
        dig[bins[:i] == 0] = -1
        dens = np.zeros(nq)
        for idx, d in enumerate(dig):
            if d != -1:
                dens[d] += bins[idx]
        cnt = Counter(dig)
        for k, v in cnt.items():
            if k != -1:
                dens[k] /= v
        q = np.array([dens[d] if d != -1 else 0.0 for d in dig])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        assert round(p.sum()) == round(total)
        p, q = p / p.sum(), q / q.sum() if q.sum() > 0 else q
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        divs.append(terms.sum())
    divs = np.array(divs)
    best = len(divs) - 1 - int(np.argmin(divs[::-1]))
    return (start + best) * width, divs


@pytest.mark.parametrize("kind", ["relu_normal", "laplace", "bimodal", "sparse"])
def test_entropy_matches_brute_force(rng, kind):
    n = 200_000
    x = {
        "relu_normal": np.maximum(rng.standard_normal(n), 0),
        "laplace": np.abs(rng.laplace(size=n)),
        "bimodal": np.concatenate([rng.normal(1, 0.1, n // 2), rng.normal(4, 0.3, n // 2)]),
        "sparse": np.where(rng.random(n) < 0.95, 0.0, rng.exponential(2.0, n)),
    }[kind].astype(np.float32)
    h = hist_of(x, 512)  # 512 bins keeps the O(n^2) reference quick
    ref, divs = brute_entropy(h.counts, h.bin_width)
    got = entropy_amax(h)
    # identical threshold, or a tie in divergence to rounding
    k_got = int(round(got / h.bin_width)) - 128
    assert got == pytest.approx(min(ref, h.amax)) or divs[k_got] == pytest.approx(divs.min(), rel=1e-9, abs=1e-12)


def test_percentile_brackets_true_quantile(rng):
    x = rng.standard_normal(300_000).astype(np.float32)
    h = hist_of(x)
    for p in (90.0, 99.0, 99.9, 99.99):
        got = percentile_amax(h, percentile=p)
        true = float(np.quantile(np.abs(x), p / 100))
        # the left edge of the bin holding the quantile (plus order-statistic rounding)
        assert got <= true + h.bin_width and true - got <= 2 * h.bin_width


def test_percentile_100_is_max(rng):
    x = rng.standard_normal(10_000).astype(np.float32)
    h = hist_of(x)
    assert percentile_amax(h, percentile=100.0) == pytest.approx(h.amax)


def test_mse_matches_exhaustive_search(rng):
    for x in (rng.standard_normal(100_000), np.abs(rng.standard_cauchy(100_000)).clip(0, 50)):
        h = hist_of(x.astype(np.float32))
        cand = np.unique(np.minimum(np.arange(128, 2049) * h.bin_width, h.amax))
        err = quantization_mse(h, cand)
        got = mse_amax(h)
        assert quantization_mse(h, np.array([got]))[0] <= err.min() * (1 + 1e-9)


def test_quantization_mse_against_direct_fake_quant(rng):
    x = rng.standard_normal(50_000).astype(np.float32)
    h = hist_of(x, 4096)
    for amax in (1.0, 2.5, h.amax):
        s = amax / 127
        direct = np.mean((np.clip(np.rint(np.abs(x) / s), 0, 127) * s - np.abs(x)) ** 2)
        assert quantization_mse(h, np.array([amax]))[0] == pytest.approx(direct, rel=0.05)


def test_minmax_is_exact_max(rng):
    x = rng.standard_normal(1000).astype(np.float32) * 3
    assert all_ranges(hist_of(x)).amax["minmax"] == pytest.approx(float(np.abs(x).max()))


def test_guarded_entropy_on_two_sided_input(rng):
    """A normalised image input: dense background below zero, strokes at the max."""
    bg = np.full(80_000, -0.8, np.float32) + rng.normal(0, 0.01, 80_000).astype(np.float32)
    strokes = np.full(20_000, 2.15, np.float32) - np.abs(rng.normal(0, 0.05, 20_000)).astype(np.float32)
    h = hist_of(np.concatenate([bg, strokes]))
    assert is_two_sided(h)
    assert entropy_amax(h) < 0.6 * h.amax  # TensorRT's KL clips the strokes
    assert guarded_entropy_amax(h) > 0.95 * h.amax  # quantkit keeps them


def test_one_sided_keeps_kl(rng):
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    h = hist_of(x)
    assert not is_two_sided(h)
    assert guarded_entropy_amax(h) == entropy_amax(h)


def test_all_ranges_keys_and_auto(rng):
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    r = all_ranges(hist_of(x))
    assert set(r.amax) == {"minmax", "entropy", "percentile", "mse", "auto", "entropy-trt"}
    assert r.notes["auto_choice"] in ("minmax", "entropy", "percentile", "mse")
    assert r.amax["auto"] == r.amax[r.notes["auto_choice"]]
    assert r.notes["entropy_rule"] == "kl" and not r.entropy_not_kl
    assert all(0 < v <= r.amax["minmax"] + 1e-6 for v in r.amax.values())


def test_unknown_method():
    with pytest.raises(UnknownMethodError, match="available"):
        get_method("kl")


def test_empty_histogram_safe():
    h = Histogram(np.zeros(2048, np.int64), 0.0, 0.0, 0.0)
    assert entropy_amax(h) == 0.0 and mse_amax(h) == 0.0 and percentile_amax(h) == 0.0


def _ranges_of(x):
    from quantkit.calibrators.methods import all_ranges

    return all_ranges(hist_of(np.asarray(x, np.float32)))


def test_entropy_guard_on_silu_outputs(rng):
    """SiLU dips to -0.278: a signed tensor, where KL clipped at 10-25% of the maximum."""
    x = rng.standard_normal(200_000) * 3
    r = _ranges_of(x / (1 + np.exp(-x)))
    assert r.notes["entropy_rule"] == "mse (signed tensor)"
    assert r.amax["entropy"] == r.amax["mse"] > r.amax["entropy-trt"]


def test_entropy_guard_on_sparse_histograms(rng):
    """A pooled feature vector: a few hundred values in 2048 bins."""
    r = _ranges_of(np.maximum(rng.standard_normal(512), 0))
    assert r.notes["entropy_rule"] == "mse (too few values for a KL search)"
    assert r.amax["entropy"] == r.amax["mse"]


def test_entropy_keeps_kl_where_it_is_sound_and_not_where_it_costs(rng):
    """KL stays on a well-populated post-ReLU tensor; on the sample model's first ReLU output
    (real activations) its expected error is 16x the least-MSE amax's, and entropy takes MSE."""
    from quantkit import sample
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.calibrators.methods import KL_TOLERANCE

    relu = _ranges_of(np.maximum(rng.standard_normal(200_000), 0))
    assert relu.notes["entropy_rule"] == "kl" and relu.amax["entropy"] == relu.amax["entropy-trt"]

    images, _, _ = sample.load_digits()
    pp = sample.preprocess()
    x = np.stack([pp.apply(im[..., None]) for im in images[:256]]).astype(np.float32)
    with OrtRunner(sample.model_path(), capture=["/relu/Relu_output_0"]) as r:
        act = r.infer_captured({"image": x})[1]["/relu/Relu_output_0"]
    h = hist_of(act)
    ranges = _ranges_of(act)
    e_kl, e_mse = quantization_mse(h, np.array([ranges.amax["entropy-trt"], ranges.amax["mse"]]))
    assert e_kl > KL_TOLERANCE * e_mse
    assert ranges.notes["entropy_rule"].startswith("mse (KL error") and ranges.amax["entropy"] == ranges.amax["mse"]
