import numpy as np
import pytest

from quantkit.calibrators import HistogramCollector
from quantkit.errors import NonFiniteError, NotCalibratedError


def brute_hist(values: np.ndarray, rng_max: float, bins: int) -> np.ndarray:
    """Reference: floor(|x| * bins / range), the last bin closed."""
    a = np.abs(values.astype(np.float64)).ravel()
    idx = np.minimum(np.floor(a * np.float32(bins / rng_max)), bins - 1).astype(int)
    return np.bincount(idx, minlength=bins)


def test_single_batch_matches_brute_force(rng):
    x = rng.standard_normal((7, 33, 17)).astype(np.float32)
    c = HistogramCollector(256, name="t")
    c.update(x)
    h = c.compute()
    assert h.amax == pytest.approx(float(np.abs(x).max()))
    assert h.total == x.size
    ref = brute_hist(x, h.bin_width * 256, 256)
    assert np.abs(h.counts - ref).sum() <= 2  # float32 rounding at bin edges only
    assert h.observed_min == pytest.approx(float(x.min()))


def test_growth_rebins_exactly(rng):
    """Growing the range re-bins old counts exactly: same as one histogram over the final range."""
    a = rng.uniform(-1, 1, 50_000).astype(np.float32)
    b = rng.uniform(-3.5, 3.5, 50_000).astype(np.float32)
    c = HistogramCollector(512)
    c.update(a)
    first_range = c.compute().bin_width * 512
    c.update(b)
    h = c.compute()
    assert h.bin_width * 512 == pytest.approx(first_range * 4)  # doubled twice
    ref = brute_hist(np.concatenate([a, b]), h.bin_width * 512, 512)
    assert np.abs(h.counts - ref).sum() <= 4
    assert h.total == 100_000


def test_memory_is_bounded():
    c = HistogramCollector(2048)
    for k in range(20):
        c.update(np.full(1000, 2.0**k, dtype=np.float32))
    assert c.compute().counts.size == 2048


def test_merge_equals_single_pass(rng):
    x = rng.standard_normal(40_000).astype(np.float32)
    whole, left, right = HistogramCollector(256), HistogramCollector(256), HistogramCollector(256)
    whole.update(x[:20_000])
    whole.update(x[20_000:])
    left.update(x[:20_000])
    right.update(x[20_000:])
    merged = left.merge(right).compute()
    assert merged.total == whole.compute().total
    assert merged.amax == whole.compute().amax


def test_all_zero_then_values():
    c = HistogramCollector(64)
    c.update(np.zeros(100, np.float32))
    c.update(np.array([0.0, 1.0, -2.0], np.float32))
    h = c.compute()
    assert h.total == 103 and h.counts[0] == 101 and h.amax == 2.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_tensor(bad):
    c = HistogramCollector(64, name="layer3.out")
    with pytest.raises(NonFiniteError, match="layer3.out"):
        c.update(np.array([1.0, bad], np.float32))


def test_compute_before_update():
    with pytest.raises(NotCalibratedError, match="no data"):
        HistogramCollector(64, name="t").compute()


def test_bins_must_be_power_of_two():
    with pytest.raises(ValueError):
        HistogramCollector(1000)
