"""The native statistics kernel against quantkit's NumPy code: the same counts, range, min and
max for the same values, exact (stride 1) or sampled (the default stride 5: the body from every
k-th value, the tail from all), scaled or not, and the same errors. Skipped where the kernel was
not built (no C compiler at install time)."""

import numpy as np
import pytest

from quantkit.calibrators import collectors as col
from quantkit.calibrators import native
from quantkit.calibrators.collectors import HistogramCollector, Scaled
from quantkit.errors import NonFiniteError
from quantkit.onnx.equalize import channel_max

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def _both(monkeypatch, fill, stride: int = 1):
    """fill(collector) with the native kernel, then with NumPy: both histograms."""
    a = HistogramCollector(2048, name="t", sample_stride=stride)
    fill(a)
    with monkeypatch.context() as m:
        m.setattr(native, "_LIB", None)
        b = HistogramCollector(2048, name="t", sample_stride=stride)
        fill(b)
    return a.compute(), b.compute()


def _same(a, b):
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.bin_width, a.observed_min, a.observed_max) == (b.bin_width, b.observed_min, b.observed_max)


def _batches(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    relu = np.maximum(rng.standard_normal((3, 16, 9, 13)), 0).astype(np.float32)  # half zeros
    signed = (rng.standard_normal((3, 16, 9, 13)) * 4).astype(np.float32)
    wide = (rng.standard_cauchy((3, 16, 9, 13)) * 2).astype(np.float32)  # a range that doubles
    odd = rng.standard_normal(1001).astype(np.float32)  # a length that no unrolling divides
    return [relu, signed, wide, odd]


def test_counts_equal_numpy_exact(monkeypatch):
    xs = _batches(0)

    def fill(c):
        for x in xs[:3]:
            c.update(x)

    _same(*_both(monkeypatch, fill))
    _same(*_both(monkeypatch, lambda c: c.update(xs[3])))
    # float16 and float64 values are counted as float32, as NumPy's code does
    _same(*_both(monkeypatch, lambda c: c.update(xs[1].astype(np.float16))))
    _same(*_both(monkeypatch, lambda c: c.update(xs[2].astype(np.float64))))


def test_top_value_lands_in_last_bin(monkeypatch):
    x = np.array([0.0, 0.5, 1.0, -1.0, 0.999999], dtype=np.float32)
    a, b = _both(monkeypatch, lambda c: c.update(x))
    _same(a, b)
    assert a.counts[-1] == 3 and a.counts[0] == 1 and a.total == 5


@pytest.mark.parametrize("axis", [1, -1, 2])
def test_scaled_equal_numpy(monkeypatch, axis):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 6, 10)).astype(np.float32)
    s = rng.uniform(0.1, 9.0, x.shape[axis]).astype(np.float32)
    a, b = _both(monkeypatch, lambda c: (c.update(x, s, axis), c.update(x * 3, s, axis)))
    _same(a, b)
    shape = [1] * x.ndim
    shape[axis] = -1
    _same(a, _both(monkeypatch, lambda c: (c.update(x * s.reshape(shape)), c.update(x * 3 * s.reshape(shape))))[1])


def test_scaled_jobs_side_by_side(monkeypatch):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 5, 7)).astype(np.float32) for _ in range(4)]
    s = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    monkeypatch.setattr(col, "HISTOGRAM_WORKERS", 3)
    monkeypatch.setattr(col, "_pool", None)
    cs = [HistogramCollector(256, name=f"t{k}") for k in range(4)]
    col.update_collectors((c, Scaled(x, s, 1)) for c, x in zip(cs, xs))
    for c, x in zip(cs, xs):
        ref = HistogramCollector(256)
        with monkeypatch.context() as m:
            m.setattr(native, "_LIB", None)
            ref.update(x * s.reshape(1, -1, 1))
        _same(c.compute(), ref.compute())


@pytest.mark.parametrize("kind", ["NaN", "Inf"])
def test_non_finite_named(kind):
    x = np.ones((2, 3, 4), dtype=np.float32)
    x[1, 2, 3] = np.nan if kind == "NaN" else -np.inf
    with pytest.raises(NonFiniteError, match=f"'layer7' has {kind}"):
        HistogramCollector(64, name="layer7").update(x)
    with pytest.raises(NonFiniteError, match=f"'layer7' has {kind}"):  # the factor does not hide it
        HistogramCollector(64, name="layer7").update(x, np.full(3, 2.0, np.float32), 1)


def test_all_zero_then_values(monkeypatch):
    z = np.zeros((4, 10), dtype=np.float32)
    x = np.linspace(-3, 2, 40, dtype=np.float32).reshape(4, 10)
    _same(*_both(monkeypatch, lambda c: (c.update(z), c.update(x), c.update(z))))


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_channel_max_equal_numpy(monkeypatch, axis):
    x = np.random.default_rng(4).standard_normal((3, 7, 5, 11)).astype(np.float32)
    got = channel_max(x, axis)
    monkeypatch.setattr(native, "_LIB", None)
    np.testing.assert_array_equal(got, channel_max(x, axis))


@pytest.mark.parametrize("stride", [5, 3, 2])
def test_sampled_counts_equal_numpy(monkeypatch, stride):
    """Updates large enough to be sampled (and small ones between, counted exactly), ranges that
    grow, a first sampled update after exact ones, odd lengths: NumPy's counts to the count."""
    rng = np.random.default_rng(5)
    big = [np.maximum(rng.standard_normal((4, 16, 80, 81)), 0).astype(np.float32),  # ReLU: half zeros
           (rng.standard_normal((4, 16, 80, 81)) * 3).astype(np.float32),
           (rng.standard_cauchy(415_001) * 2).astype(np.float32)]  # a long tail, the range doubles
    small = (rng.standard_normal(5000) * 0.5).astype(np.float32)

    def fill(c):
        c.update(small)
        for x in big:
            c.update(x)
        c.update(small)
        c.update(big[1] * 0.25)

    _same(*_both(monkeypatch, fill, stride))


@pytest.mark.parametrize("axis", [1, -1])
def test_sampled_scaled_equal_numpy(monkeypatch, axis):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 24, 50, 40)).astype(np.float32)
    s = rng.uniform(0.2, 6.0, x.shape[axis]).astype(np.float32)
    _same(*_both(monkeypatch, lambda c: (c.update(x, s, axis), c.update(x * 2, s, axis), c.update(x, s, axis)), 5))


def test_a_scale_that_does_not_fit_the_channels_is_refused():
    x = np.ones((2, 3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="2 scale factors for 3 channels"):
        HistogramCollector(64).update(x, np.ones(2, np.float32), 1)
    with pytest.raises(ValueError, match="3 scale factors for 4 channels"):
        native.minmax(x, np.ones(3, np.float32), -1)
