"""quantkit report: real results of calibrate / compare / bench on the bundled digits."""

import json

import pytest

from quantkit import sample
from quantkit.cli import main
from quantkit.errors import InputError
from tests.unit.test_cli import DIGITS

pytest.importorskip("matplotlib")


def test_report_from_real_results(digits_dirs, tmp_path, capsys):
    train, test = digits_dirs
    out, res = tmp_path / "cal", tmp_path / "results"
    res.mkdir()
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out), "--num-images", "256",
                 "--eval-images", "0", *DIGITS]) == 0
    int8 = out / "digits_cnn.int8.onnx"
    assert main(["compare", str(sample.model_path()), str(int8), "--images", str(test), "--json",
                 str(res / "compare.json"), *DIGITS]) == 0
    for name, model in (("fp32", sample.model_path()), ("int8", int8)):
        assert main(["bench", str(model), "--batch", "8", "--iterations", "5", "--warmup", "1",
                     "--json", str(res / f"bench-{name}.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(res), str(out / "ranges.json"), "-o", str(tmp_path / "rep")]) == 0
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"index.html", "accuracy_vs_latency.png", "accuracy_vs_latency.svg", "amax_by_method.png",
            "output_sqnr.svg"} <= names
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "data:image/png;base64," in page and "digits_cnn.int8" in page

    from quantkit.report import accuracy_latency_points, load_results

    points = accuracy_latency_points(load_results([res]))
    assert {p.label for p in points} == {"digits_cnn.int8", "digits_cnn (FP32)"}
    fp32 = next(p for p in points if p.reference)
    compare = json.loads((res / "compare.json").read_text())
    assert fp32.score == compare["accuracy_reference"] and fp32.score_name == "accuracy"


def test_report_bad_inputs(tmp_path):
    from quantkit.report import load_results

    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not a quantkit result"):
        load_results([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        load_results([tmp_path / "y.json"])
    with pytest.raises(InputError, match="does not exist"):
        load_results([tmp_path / "none.json"])
