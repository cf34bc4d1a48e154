"""PTQ of an ONNX model spread over machines: `calibrate --save-stats` on parts, `merge-stats`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from quantkit import sample
from quantkit.cli import main
from tests.helpers import DIGITS

#: the digits flags, no evaluation, every value counted (exact histograms, so merges compare exactly)
FLAGS = [*DIGITS, "--eval-images", "0", "--histogram-stride", "1"]


@pytest.fixture(scope="module")
def parts(digits_dirs, tmp_path_factory):
    """300 images as one folder and as two folders of 150; part b's images are darkened (to a
    quarter), so the two parts' activations, and histogram ranges, differ."""
    import cv2

    root = tmp_path_factory.mktemp("parts")
    files = sorted(p for p in digits_dirs[0].rglob("*.png"))[::4][:300]
    for name in ("all", "a", "b"):
        (root / name).mkdir()
    for i, f in enumerate(files):
        part = "a" if i < 150 else "b"
        if part == "a":
            shutil.copy(f, root / "a" / f.name)
        else:
            cv2.imwrite(str(root / "b" / f.name), cv2.imread(str(f), cv2.IMREAD_UNCHANGED) // 4)
        shutil.copy(root / part / f.name, root / "all" / f.name)
    return root


def _calibrate(folder, out, *extra):
    return main(["calibrate", str(sample.model_path()), "--images", str(folder), "-o", str(out),
                 *FLAGS, *extra])


def test_merged_statistics_equal_one_run_over_all_the_data(parts, tmp_path, capsys, caplog):
    from quantkit.calibrators.stats import load_stats

    assert _calibrate(parts / "a", tmp_path / "a", "--save-stats", str(tmp_path / "a.qkstats")) == 0
    # the mergeable model leaves out what needs the samples, and says so (a MediaPipe hand model lost 16 dB unsaid)
    assert "--save-stats: the model written is the one `quantkit merge-stats` makes" in caplog.text
    assert "without equalization, bias correction and the method check" in caplog.text
    # and its ranges.json says what ran (it said "equalize": true, "equalize_pointwise": true)
    config = json.loads((tmp_path / "a" / "ranges.json").read_text())["config"]
    assert (config["equalize"], config["equalize_pointwise"], config["bias_correction"]) == (False, False, False)
    assert _calibrate(parts / "b", tmp_path / "b", "--save-stats", str(tmp_path / "b.qkstats")) == 0
    assert _calibrate(parts / "all", tmp_path / "all", "--save-stats", str(tmp_path / "all.qkstats")) == 0
    rc = main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "b.qkstats"), "-o", str(tmp_path / "merged"),
               "--save-stats", str(tmp_path / "merged.qkstats")])
    assert rc == 0
    one, merged = load_stats(tmp_path / "all.qkstats"), load_stats(tmp_path / "merged.qkstats")
    b = load_stats(tmp_path / "b.qkstats")
    assert merged.num_samples == one.num_samples == 300
    assert merged.histograms.keys() == one.histograms.keys()
    # the parts saw different ranges: the merge had to re-bin (power-of-two ratios: exactly)
    assert any(b.histograms[t].bin_width < one.histograms[t].bin_width for t in one.histograms)
    for t, h in one.histograms.items():
        m = merged.histograms[t]
        assert (m.bin_width, m.observed_min, m.observed_max) == (h.bin_width, h.observed_min, h.observed_max), t
        np.testing.assert_array_equal(m.counts, h.counts, err_msg=t)
    # so the artifacts are those of the one run: every method's ranges, the cache, the Q/DQ model
    r_one = json.loads((tmp_path / "all" / "ranges.json").read_text())
    r_merged = json.loads((tmp_path / "merged" / "ranges.json").read_text())
    assert r_merged["tensors"] == r_one["tensors"]
    assert (tmp_path / "merged" / "calibration.cache").read_text() == (tmp_path / "all" / "calibration.cache").read_text()
    assert (tmp_path / "merged" / "digits_cnn.int8.onnx").read_bytes() == (tmp_path / "all" / "digits_cnn.int8.onnx").read_bytes()


def test_merge_stats_bad_inputs(parts, tmp_path, capsys):
    (tmp_path / "junk.qkstats").write_bytes(b"not a zip")
    assert main(["merge-stats", str(tmp_path / "junk.qkstats"), "-o", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "junk.qkstats" in err and "hint:" in err and "Traceback" not in err
    assert main(["merge-stats", str(tmp_path / "missing.qkstats"), "-o", str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err
    # statistics of other settings do not merge
    assert _calibrate(parts / "a", tmp_path / "a", "--save-stats", str(tmp_path / "a.qkstats")) == 0
    assert _calibrate(parts / "b", tmp_path / "b", "--num-bins", "1024", "--save-stats", str(tmp_path / "b.qkstats")) == 0
    capsys.readouterr()
    assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "b.qkstats"), "-o", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "num_bins" in err and "b.qkstats" in err
    assert not (tmp_path / "o3").exists()
    # one file twice would count its samples twice
    assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "a.qkstats"), "-o", str(tmp_path / "o4")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    # --save-stats inside -o is one of its artifacts: in the manifest, and the same command with --force runs again
    for extra in ([], ["--force"]):
        assert main(["merge-stats", str(tmp_path / "a.qkstats"), "-o", str(tmp_path / "o5"),
                     "--save-stats", str(tmp_path / "o5" / "m.qkstats"), *extra]) == 0
        assert "m.qkstats" in json.loads((tmp_path / "o5" / "quantkit-manifest.json").read_text())["files"]


def test_pow2_grid_starts_on_a_power_of_two():
    from quantkit.calibrators.collectors import HistogramCollector, pow2_at_least

    assert [pow2_at_least(v) for v in (0.3, 0.5, 1.0, 1.5, 4.0, 5.0)] == [0.5, 0.5, 1.0, 2.0, 4.0, 8.0]
    c = HistogramCollector(256, pow2_grid=True)
    c.update(np.array([0.0, 0.7, -2.5], dtype=np.float32))
    h = c.compute()
    assert h.bin_width * 256 == 4.0 and h.amax == 2.5
    assert np.flatnonzero(h.counts).tolist() == [0, 44, 160] and h.counts.sum() == 3  # 0, 0.7 * 64, 2.5 * 64


@pytest.mark.parametrize("damage", ["nan width", "no settings", "negative counts"])
def test_damaged_statistics_files_are_refused(tmp_path, damage):
    """A NaN or negative histogram made NaN/inf cache scales with exit 0; a header without its
    settings was KeyError (exit 1)."""
    import dataclasses
    import json

    from quantkit.calibrators.collectors import Histogram
    from quantkit.calibrators.stats import CalibrationStats, StatsError, load_stats, save_stats

    hist = Histogram(np.arange(8, dtype=np.int64), 0.5, -1.0, 4.0)
    stats = CalibrationStats({"t": hist}, 8, {"path": "m.onnx", "sha256": "0"}, {"num_bins": 8}, None, [])
    if damage == "nan width":
        stats = dataclasses.replace(stats, histograms={"t": Histogram(hist.counts, float("nan"), -1.0, 4.0)})
    elif damage == "negative counts":
        stats = dataclasses.replace(stats, histograms={"t": Histogram(-hist.counts, 0.5, -1.0, 4.0)})
    save_stats(tmp_path / "s.qkstats", stats)
    if damage == "no settings":
        with np.load(tmp_path / "s.qkstats") as z:
            arrays = dict(z)
        header = json.loads(bytes(arrays["header"]).decode())
        del header["settings"]
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        np.savez(tmp_path / "s.npz", **arrays)
        (tmp_path / "s.npz").rename(tmp_path / "s.qkstats")
    with pytest.raises(StatsError):
        load_stats(tmp_path / "s.qkstats")


def _edited_stats(tmp_path, edit):
    """A valid statistics file with its arrays / header changed by ``edit(arrays, header)``."""
    from quantkit.calibrators.collectors import Histogram
    from quantkit.calibrators.stats import CalibrationStats, save_stats

    hist = Histogram(np.arange(8, dtype=np.int64), 0.5, -1.0, 4.0)
    save_stats(tmp_path / "s.qkstats", CalibrationStats({"t": hist}, 8, {"path": "m.onnx", "sha256": "0"},
                                                        {"num_bins": 8}, None, []))
    with np.load(tmp_path / "s.qkstats") as z:
        arrays = dict(z)
    header = json.loads(bytes(arrays["header"]).decode())
    edit(arrays, header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "e.npz", **arrays)
    (tmp_path / "e.npz").rename(tmp_path / "e.qkstats")
    return tmp_path / "e.qkstats"


@pytest.mark.parametrize("edit,what", [
    (lambda a, h: a.update(scalars_0=np.array([1e300, -1e300, 1e300])), "float32"),  # was an inf scale, exit 0
    (lambda a, h: a.update(counts_0=np.arange(5, dtype=np.int64)), "5 bins where the settings say 8"),
    (lambda a, h: a.update(counts_0=np.full(8, 2**62, dtype=np.int64)), "2**53"),  # int64 overflow when merged
    (lambda a, h: a.update(counts_0=np.arange(8) + 0.5), "whole numbers"),
    (lambda a, h: a.update(counts_0=np.arange(8, dtype=np.int64).reshape(2, 4)), "one row"),
    (lambda a, h: a.update(scalars_0=np.array([0.1, -1.0, 4.0])), "beyond its bins"),
    (lambda a, h: h.update(model="x"), "'model' is not a mapping"),  # was exit 1 (AttributeError)
    (lambda a, h: h.update(settings=None), "'settings' is not a mapping"),
    (lambda a, h: h.update(num_samples=1.5), "num_samples"),
    (lambda a, h: h.update(num_samples=0), "num_samples"),
    (lambda a, h: h.update(tensors=["t", "t"]), "twice"),
    (lambda a, h: h.update(model={"path": ["x"], "sha256": 5}), "path is not a string"),  # was exit 1 (TypeError)
    # a made-up size: 2**27 bins of zeros compress to a few MB and took 8 GB to read before the check
    (lambda a, h: h["settings"].update(num_bins=2**27), "not 1..65536"),
    (lambda a, h: a.update(counts_0=np.zeros(4096, dtype=np.int64)), "more than 8 bins"),  # read before the size check
])
def test_made_up_or_damaged_statistics_are_refused_naming_the_tensor(tmp_path, edit, what):
    from quantkit.calibrators.stats import StatsError, load_stats

    with pytest.raises(StatsError, match="damaged") as err:
        load_stats(_edited_stats(tmp_path, edit))
    assert what in str(err.value)


def test_a_hard_link_or_a_copy_of_one_statistics_file_is_refused(parts, tmp_path, capsys):
    """Only the real path was compared: a hard link or a copy counted the samples twice."""
    assert _calibrate(parts / "a", tmp_path / "a", "--save-stats", str(tmp_path / "a.qkstats")) == 0
    os.link(tmp_path / "a.qkstats", tmp_path / "link.qkstats")
    shutil.copy(tmp_path / "a.qkstats", tmp_path / "copy.qkstats")
    capsys.readouterr()
    for other, what in (("link", "given twice"), ("copy", "byte-identical copy")):
        assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / f"{other}.qkstats"),
                     "-o", str(tmp_path / other)]) == 2
        assert what in capsys.readouterr().err and not (tmp_path / other).exists()


def test_a_tensor_zero_on_every_sample_gets_the_same_placeholder_scale_in_the_cache_and_the_model():
    """The cache wrote scale 0 (no dynamic range TensorRT can use) where the Q/DQ model has 1."""
    from quantkit.calibrators.cache import CalibrationCache

    assert CalibrationCache.from_amax({"z": 0.0, "t": 127.0}, "entropy").scales == {"z": 1.0, "t": 1.0}


def test_a_tensor_too_small_for_a_float32_scale_gets_the_placeholder_not_0():
    """Data around 1e-42 wrote scale 0 (and 00000000 in the cache): ONNX and TensorRT need a positive scale."""
    from quantkit.calibrators.cache import CalibrationCache
    from quantkit.calibrators.weights import scale_from_amax

    assert float(scale_from_amax(1e-43)) == 1.0 and float(scale_from_amax(127.0)) == 1.0
    assert CalibrationCache.from_amax({"tiny": 1e-43}, "entropy").scales == {"tiny": 1.0}
    assert scale_from_amax(np.array([1e-43, 2.54], np.float32)).tolist() == [1.0, np.float32(0.02)]


def test_exclusions_travel_with_the_statistics_and_one_folder_twice_is_said(parts, tmp_path, caplog):
    """--exclude was lost on the merge route (the merged model quantized the excluded Conv again);
    merging a folder's statistics with themselves counted its samples twice without a word."""
    import logging

    import onnx

    excl = ["--exclude", "/fc/Gemm"]
    assert _calibrate(parts / "a", tmp_path / "a", *excl, "--save-stats", str(tmp_path / "a.qkstats")) == 0
    assert _calibrate(parts / "b", tmp_path / "b", *excl, "--save-stats", str(tmp_path / "b.qkstats")) == 0
    assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "b.qkstats"), "-o", str(tmp_path / "m")]) == 0
    merged = onnx.load(str(next((tmp_path / "m").glob("*.int8.onnx"))))
    dq = {n.output[0] for n in merged.graph.node if n.op_type == "DequantizeLinear"}
    assert not [n for n in merged.graph.node if n.name == "/fc/Gemm" and dq & set(n.input)]
    assert _calibrate(parts / "b", tmp_path / "b2", "--save-stats", str(tmp_path / "b2.qkstats")) == 0  # no exclusion
    assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "b2.qkstats"), "-o", str(tmp_path / "x")]) == 2
    assert _calibrate(parts / "a", tmp_path / "a2", *excl, "--num-images", "100", "--save-stats",
                      str(tmp_path / "a2.qkstats")) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["merge-stats", str(tmp_path / "a.qkstats"), str(tmp_path / "a2.qkstats"), "-o",
                     str(tmp_path / "y")]) == 0
    assert "is in more than one of the merged statistics" in caplog.text
