"""The method registry is the single source of truth: a method registered the documented way
reaches the CLI's --method choices, ranges.json, the TensorRT cache, the report and QAT
calibration with no other edit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantkit import sample
from quantkit.calibrators.methods import (RangeContext, get_method, method_names, percentile_amax, range_method,
                                          unregister_method)
from quantkit.cli import main
from quantkit.errors import InputError, UnknownMethodError
from tests.helpers import DIGITS


@pytest.fixture
def p999():
    """A method defined in a test: the 99.9th percentile, with a parameter of its own, written
    to the cache as MinMaxCalibration."""

    @range_method("p999", params={"p999_rank": 99.9}, cache_algorithm="MinMaxCalibration")
    def _p999(ctx: RangeContext) -> float:
        """the 99.9th percentile of |x|"""
        return percentile_amax(ctx.hist, percentile=ctx.param("p999_rank"))

    yield "p999"
    unregister_method("p999")


def test_registered_method_reaches_cli_ranges_cache_and_report(p999, digits_dirs, tmp_path, capsys):
    train, test = digits_dirs
    out = tmp_path / "out"
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out), "--method", "p999",
                 "--num-images", "64", "--eval-dir", str(test), "--eval-images", "32", *DIGITS]) == 0
    ranges = json.loads((out / "ranges.json").read_text())
    assert ranges["method"] == "p999"
    image = ranges["tensors"]["image"]
    assert list(image)[: len(method_names())] == list(method_names()) and "p999" in image
    assert ranges["config"]["p999_rank"] == 99.9
    cache = (out / "calibration.cache").read_text().splitlines()
    assert cache[0].endswith("-MinMaxCalibration")
    scale = {line.split(": ")[0]: line.split(": ")[1] for line in cache[1:]}["image"]
    assert np.frombuffer(bytes.fromhex(scale)[::-1], np.float32)[0] == pytest.approx(image["p999"] / 127, rel=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "p999" and "(p999)" in report["test"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    assert "p999: the 99.9th percentile of |x|" in " ".join(capsys.readouterr().out.split())


def test_registered_method_in_report_plots(p999, digits_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    from quantkit.report import load_results, plot_amax_by_method

    out = tmp_path / "out"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out),
                 "--num-images", "32", "--eval-images", "0", *DIGITS]) == 0
    fig = plot_amax_by_method(load_results([out / "ranges.json"]).ranges[0])
    assert "p999" in [ln.get_label() for ln in fig.axes[0].get_lines()]


def test_registered_method_in_qat_calibration(p999):
    torch = pytest.importorskip("torch")
    import quantkit.qat as qq
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    x = digits_tensors()[0][:64]
    model = qq.prepare(DigitsNet().eval(), qq.QatConfig(method="p999"))
    cal = qq.calibrate(model, [x[:32], x[32:]])
    assert cal.method == "p999" and set(cal.amax("p999")) == set(cal.amax("minmax"))
    assert all(0 < a <= m for a, m in zip(cal.amax("p999").values(), cal.amax("minmax").values()))
    del torch


def test_qat_config_method_and_percentile_are_applied():
    """QatConfig(method=..., percentile=...) was validated and then ignored by calibrate."""
    torch = pytest.importorskip("torch")
    import quantkit.qat as qq
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    x = digits_tensors()[0][:64]
    model = qq.prepare(DigitsNet().eval(), qq.QatConfig(method="percentile", percentile=90.0))
    cal = qq.calibrate(model, [x[:32], x[32:]])
    assert cal.method == "percentile"
    applied = {n: float(q.amax) for n, q in qq.quantizers(model, inputs_only=True) if q.enabled}
    assert applied == pytest.approx(cal.amax("percentile"))
    other = qq.prepare(DigitsNet().eval(), qq.QatConfig(method="percentile"))  # 99.99
    assert qq.calibrate(other, [x[:32], x[32:]]).amax("percentile") != pytest.approx(cal.amax("percentile"))
    with pytest.raises(UnknownMethodError):
        qq.QatConfig(method="kl")
    with pytest.raises(InputError, match="percentile"):
        qq.QatConfig(percentile=0.0)
    del torch


def test_registry_facts():
    assert method_names()[:6] == ("minmax", "entropy", "percentile", "mse", "auto", "entropy-trt")
    assert get_method("minmax").cache_algorithm == "MinMaxCalibration"
    assert {get_method(m).cache_algorithm for m in method_names() if m != "minmax"} == {"EntropyCalibration2"}
    assert all(get_method(m).description for m in method_names())
    with pytest.raises(ValueError, match="cache_algorithm"):
        range_method("x", cache_algorithm="LegacyCalibration")


def test_method_registered_after_quantize_is_a_clear_error(request):
    """Ranges are computed for the methods registered when quantize() runs; a method registered
    afterwards has none: one InputError saying so (it was a bare KeyError)."""
    from quantkit.datasets import SyntheticSource
    from quantkit.onnx.model import load_model
    from quantkit.ptq import quantize

    cal = quantize(load_model(sample.model_path()), SyntheticSource((1, 32, 32), 32))
    p999 = request.getfixturevalue("p999")
    with pytest.raises(InputError, match=f"method '{p999}' has no ranges in this calibration"):
        cal.int8_model(p999)


def test_quantize_api_names_a_batch_that_does_not_fit_the_model():
    """Through the API as through the CLI: a source whose samples do not fit the model's input
    is one ShapeMismatchError naming the input (it was ONNX Runtime's own error)."""
    from quantkit.datasets import SyntheticSource
    from quantkit.errors import ShapeMismatchError
    from quantkit.onnx.model import load_model
    from quantkit.ptq import quantize

    with pytest.raises(ShapeMismatchError, match=r"input 'image': batch has shape \(32, 1, 8, 8\)"):
        quantize(load_model(sample.model_path()), SyntheticSource((1, 8, 8), 32))
