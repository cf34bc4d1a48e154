import numpy as np
import pytest

from quantkit.calibrators.cache import (
    CalibrationCache,
    cache_from_text,
    hex_from_scale,
    read_cache,
    scale_from_hex,
    trt_version_number,
    write_cache,
)
from quantkit.errors import CacheError


def test_known_value():
    assert hex_from_scale(1 / 127) == "3c010204"
    assert scale_from_hex("3c010204") * 127 == pytest.approx(1.0)


def test_round_trip_exact(tmp_path, rng):
    amax = {f"t{i}/out:0": float(v) for i, v in enumerate(rng.uniform(1e-4, 100, 50))}
    cache = CalibrationCache.from_amax(amax, "entropy", 100300)
    path = write_cache(tmp_path / "c.cache", cache)
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    back = read_cache(path)
    assert back == cache
    assert all(np.float32(back.scales[n]) == np.float32(np.float32(a) / np.float32(127)) for n, a in amax.items())
    assert back.to_text() == text


def test_a_name_that_is_not_ascii_reads_back(tmp_path):
    """A PyTorch module attribute may be any identifier (``self.aktivität``), and its export names
    tensors after it: the cache was written in UTF-8 and read as ASCII (inspect and build refused
    the file calibrate had just written)."""
    cache = CalibrationCache.from_amax({"/aktivität/Relu_output_0": 2.5, "/层/Conv_output_0": 1.0}, "entropy")
    back = read_cache(write_cache(tmp_path / "c.cache", cache))
    assert back == cache


def test_minmax_header():
    assert CalibrationCache.from_amax({"x": 1.0}, "minmax").algorithm == "MinMaxCalibration"


def test_version_number():
    assert trt_version_number("10.3.0") == 100300
    assert trt_version_number("10.13.0.35") == 101300


@pytest.mark.parametrize("text,msg", [
    ("", "empty"),
    ("hello\n", "first line"),
    ("TRT-100300-EntropyCalibration2\nx: zz\n", "line 2"),
    ("TRT-100300-EntropyCalibration2\nx: 3c010a14\nx: 3c010a14\n", "line 3: tensor 'x' is given twice"),
    ("TRT-100300-EntropyCalibration2\nx: 7f800000\n", "scale inf"),      # +inf
    ("TRT-100300-EntropyCalibration2\nx: 7fc00000\n", "scale nan"),      # NaN
    ("TRT-100300-EntropyCalibration2\nx: bc010a14\n", "not a finite number >= 0"),  # negative
])
def test_malformed(text, msg):
    with pytest.raises(CacheError, match=msg):
        cache_from_text(text)


def test_missing_file(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        read_cache(tmp_path / "nope.cache")
