"""quantkit report: real results of calibrate / compare / bench on the bundled digits."""

import json

import pytest

from quantkit import sample
from quantkit.cli import main
from quantkit.errors import InputError
from tests.helpers import DIGITS

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
    assert {"index.html", "accuracy_vs_latency.png", "accuracy_vs_latency.svg", "amax_by_method_digits_cnn.png",
            "output_sqnr.svg"} <= names
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "data:image/png;base64," in page and "digits_cnn.int8" in page

    from quantkit.report import accuracy_latency_points, load_results

    points = accuracy_latency_points(load_results([res]))
    assert {p.label for p in points} == {"digits_cnn.int8", "digits_cnn (FP32)"}
    # the same model's comparison in two files (a second compare --json of it): one point
    again = tmp_path / "again"
    again.mkdir()
    (again / "compare-again.json").write_text((res / "compare.json").read_text())
    both = load_results([res, again])
    assert len(both.compares) == 2
    assert sorted(p.label for p in accuracy_latency_points(both)) == ["digits_cnn (FP32)", "digits_cnn.int8"]
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


BENCH = {"model": "m.onnx", "backend": "onnxruntime", "device": "CPU", "batch": 8, "iterations": 5, "min_ms": 1.0,
         "median_ms": 1.2, "mean_ms": 1.2, "p90_ms": 1.3, "p99_ms": 1.4, "throughput_per_s": 6666.7}
COMPARE = {"reference": "m.onnx", "test": "m.int8.onnx", "samples": 4, "accuracy_test": None,
           "outputs": [{"name": "y", "cosine_mean": 0.99, "sqnr_db": "inf", "top1_agreement": 1.0}]}


@pytest.mark.parametrize("doc, field", [
    ({"median_ms": 1.0}, "'model' missing"),                                # no model
    ({**BENCH, "batch": "<script>alert(1)</script>"}, "not an integer"),   # text where a number goes
    ({**BENCH, "median_ms": "fast"}, "could not convert"),
    ({**COMPARE, "outputs": []}, "outputs"),
    ({**COMPARE, "outputs": [{"name": "y"}]}, "'cosine_mean' missing"),
    ({"method": "entropy", "tensors": [1, 2]}, "tensors"),
    ({"layerwise": {"activations": "all"}}, "activations"),
    ({"layerwise": {"activations": [{"tensor": "t", "depth": 1, "local_sqnr_db": [], "accumulated_sqnr_db": 1}]}},
     "not a number"),
])
def test_damaged_results_are_refused_naming_the_file(tmp_path, doc, field):
    """A hand-edited or damaged result was exit 1 (KeyError, IndexError, ...) or went into the page
    unescaped (a bench's batch as a <script>)."""
    from quantkit.report import load_results

    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="r.json: a damaged") as err:
        load_results([tmp_path / "r.json"])
    assert field in str(err.value)
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()


def test_a_folders_other_json_is_skipped(tmp_path):
    """calibrate --max-drop writes sensitivity.json beside its results: report reads the folder."""
    from quantkit.report import load_results

    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    (tmp_path / "sensitivity.json").write_text(json.dumps({"rows": [], "metric": "sqnr"}))
    assert len(load_results([tmp_path]).benches) == 1
    with pytest.raises(InputError, match="not a quantkit result"):  # named on its own, it is refused
        load_results([tmp_path / "sensitivity.json"])


def test_report_reads_demo_folders_one_point_per_model(tmp_path, capsys):
    """`report` on the output folders of `demo` (and `qat-demo`): every method of the demo is a
    comparison, its two benchmarks are points, plots are titled by the model."""
    from quantkit.report import accuracy_latency_points, load_results, plot_amax_by_method

    assert main(["demo", "-o", str(tmp_path / "demo"), "--no-progress"]) == 0
    res = load_results([tmp_path / "demo"])
    assert sorted(c["test"] for c in res.compares) == sorted(
        ["digits_cnn.int8.onnx", *(f"digits_cnn.{m}.int8.onnx" for m in ("minmax", "percentile", "mse", "auto",
                                                                          "entropy-trt"))])
    labels = sorted(p.label for p in accuracy_latency_points(res))
    assert labels == ["digits_cnn (FP32)", "digits_cnn.int8"]
    fig = plot_amax_by_method(res.ranges[0])
    ax = fig.axes[0]
    assert "digits_cnn.onnx" in ax.get_title() and "demo" not in ax.get_title()
    lines = ax.get_lines()
    methods = [ln.get_label() for ln in lines]
    assert methods == ["minmax", "entropy", "percentile", "mse", "auto", "entropy-trt"]
    # equal amax (minmax and entropy-trt agree on one-sided tensors) must still be seen: no two
    # methods are drawn at the same place with the same marker
    places = {(tuple(ln.get_xdata()), ln.get_marker()) for ln in lines}
    assert len(places) == len(lines) and len({tuple(ln.get_xdata()) for ln in lines}) == len(lines)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "demo"), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "amax_by_method_digits_cnn.png").is_file()


@pytest.mark.slow  # runs qat-demo (training): ~12 s
def test_report_reads_a_qat_demo_folder(tmp_path):
    pytest.importorskip("torch")
    from quantkit.report import load_results

    assert main(["qat-demo", "--epochs", "1", "--qat-epochs", "1", "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    res = load_results([tmp_path / "q"])
    assert len(res.qat) == 1 and res.qat[0]["rows"][0]["label"] == "FP32"
    assert all(str(tmp_path / "q") in r["path"] for r in res.qat[0]["rows"])  # where the models are now
    assert main(["report", str(tmp_path / "q"), "-o", str(tmp_path / "rep")]) == 0


def test_names_in_figure_tags_are_escaped(tmp_path):
    """A model named with quotes and an event handler went into the figure's <img alt=...>
    unescaped (stored XSS when index.html is opened)."""
    pytest.importorskip("matplotlib")
    evil = "m' onload='alert(document.domain)' x='.int8.onnx"
    acts = [{"tensor": f"t{i}", "depth": i, "local_sqnr_db": 30.0 + i, "accumulated_sqnr_db": 25.0} for i in range(3)]
    (tmp_path / "debug.json").write_text(json.dumps({"layerwise": {"reference": "m.onnx", "test": evil,
                                                                    "activations": acts}}))
    assert main(["report", str(tmp_path / "debug.json"), "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<img" in page and "onload='alert" not in page and "&#x27; onload=&#x27;alert" in page


@pytest.mark.parametrize("kw", [{"model_stem": "../../escaped"}, {"model_stem": "/abs/x"}, {"model_stem": ""},
                                {"model_stem": "m", "extra": {"x": ("../../e.json", {})}},
                                {"model_stem": "m", "extra": {"x": ("sub/e.json", {})}}])
def test_api_save_writes_only_plain_names_into_the_folder(tmp_path, kw):
    from quantkit import sample
    from quantkit.datasets import SyntheticSource
    from quantkit.ptq import quantize

    import onnx

    cal = quantize(onnx.load(str(sample.model_path())), SyntheticSource((1, 32, 32), count=8, seed=0))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    with pytest.raises(InputError, match="not a plain file name"):
        cal.save(work / "out", **kw)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]


def test_a_model_name_in_another_encoding_is_drawn(tmp_path):
    """A model file named in Latin-1 reaches the JSON as a lone surrogate: report was exit 1
    (matplotlib refused the title)."""
    pytest.importorskip("matplotlib")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "bench.json").write_text(json.dumps({**BENCH, "model": "m\udce9.onnx"}))
    (tmp_path / "res" / "compare.json").write_text(json.dumps({**COMPARE, "test": "m\udce9.int8.onnx"}))
    assert main(["report", str(tmp_path / "res"), "-o", str(tmp_path / "rep")]) == 0
    assert "m\ufffd" in (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")


def test_a_number_no_axis_can_hold_is_refused(tmp_path):
    """median_ms 1e308 passed the checks and made matplotlib fail (exit 1)."""
    (tmp_path / "bench.json").write_text(json.dumps({**BENCH, "median_ms": 1e308}))
    assert main(["report", str(tmp_path / "bench.json"), "-o", str(tmp_path / "rep")]) == 2


def test_every_output_of_a_model_is_in_the_table_and_the_figure(tmp_path):
    """The page showed each model's first output only: a GRU state exact in INT8 (SQNR inf,
    cosine 1) hid the output at 44.9 dB; an exact output's bar was drawn empty, like 0 dB."""
    pytest.importorskip("matplotlib")
    doc = {**COMPARE, "outputs": [{"name": "state", "cosine_mean": 1.0, "sqnr_db": "inf", "top1_agreement": None},
                                  {"name": "hidden", "cosine_mean": 0.97, "sqnr_db": 21.5, "top1_agreement": 0.75}]}
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "compare.json").write_text(json.dumps(doc))
    (tmp_path / "res" / "bench.json").write_text(json.dumps({**BENCH, "model": "m.int8.onnx"}))
    assert main(["report", str(tmp_path / "res"), "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<td>hidden</td>" in page and "21.50" in page and "<td>state</td>" in page
    from quantkit.report import Results, accuracy_latency_points

    point = accuracy_latency_points(Results(compares=[doc], benches=[{**BENCH, "model": "m.int8.onnx"}]))
    assert [p.score for p in point if p.label == "m.int8"] == [0.75]  # the worst output's agreement


@pytest.mark.parametrize("kind", ["huge", "nested"])
def test_a_file_no_result_can_be_is_refused_before_it_is_read(tmp_path, capsys, kind):
    """A 3 GiB .json was read whole (6.3 GB, 30 s); JSON nested 100000 deep was exit 1 (RecursionError)."""
    f = tmp_path / "r.json"
    if kind == "huge":
        with open(f, "wb") as fh:
            fh.truncate(300 << 20)  # sparse
    else:
        f.write_text("[" * 100000 + "]" * 100000)
    assert main(["report", str(f), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert ("MiB, not a quantkit result" if kind == "huge" else "nested too deeply") in err and "Traceback" not in err


def test_a_result_file_and_a_title_named_in_another_encoding_are_drawn(tmp_path):
    """A file name or --title of bytes that are not UTF-8 was exit 1 (UnicodeEncodeError writing the page)."""
    import os

    pytest.importorskip("matplotlib")
    name = os.fsdecode(b"c\xff.json")
    (tmp_path / name).write_text(json.dumps(BENCH))
    title = os.fsdecode(b"ti\xfftle")
    assert main(["report", str(tmp_path / name), "-o", str(tmp_path / "out"), "--title", title]) == 0
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "c\ufffd.json" in page and "ti\ufffdtle" in page


def test_each_fp32_point_keeps_its_own_comparisons_kind_of_score():
    """A labelled and an unlabelled comparison: the unlabelled model's FP32 point was drawn as
    accuracy 1.0 under an axis called accuracy (its agreement with itself, not an accuracy)."""
    from quantkit.report import Results, accuracy_latency_points

    labelled = {**COMPARE, "reference": "a.onnx", "test": "a.int8.onnx", "accuracy_reference": 0.99,
                "accuracy_test": 0.98, "outputs": [{"name": "y", "cosine_mean": 1.0, "sqnr_db": 30.0,
                                                    "top1_agreement": 0.97}]}
    plain = {**COMPARE, "reference": "b.onnx", "test": "b.int8.onnx", "accuracy_reference": None,
             "accuracy_test": None, "outputs": [{"name": "y", "cosine_mean": 1.0, "sqnr_db": 30.0,
                                                 "top1_agreement": 0.95}]}
    benches = [{**BENCH, "model": f"{m}.onnx"} for m in ("a", "a.int8", "b", "b.int8")]
    points = {p.label: (p.score, p.score_name) for p in accuracy_latency_points(Results(compares=[labelled, plain],
                                                                                      benches=benches))}
    assert points["a (FP32)"] == (0.99, "accuracy") and points["b (FP32)"] == (1.0, "top-1 agreement")
    assert points["a.int8"][1] == "accuracy" and points["b.int8"][1] == "top-1 agreement"


def test_calibrations_of_one_model_in_several_folders_are_told_apart(tmp_path):
    """Every `calibrate -o DIR` names its model <stem>.int8.onnx: four compares of four folders'
    models were one row and one bar (the last read), the others hidden."""
    from quantkit.report import accuracy_latency_points, load_results

    images = sample.write_image_folder(tmp_path / "img", "test")
    for method in ("minmax", "entropy-trt"):
        out = tmp_path / f"out-{method}"
        assert main(["calibrate", str(sample.model_path()), "--images", str(images), *DIGITS, "--num-images", "64",
                     "--eval-images", "0", "--method", method, "-o", str(out)]) == 0
        assert main(["compare", str(sample.model_path()), str(out / "digits_cnn.int8.onnx"), "--images", str(images),
                     *DIGITS, "--num-images", "64", "--json", str(tmp_path / "res" / f"{method}.json")]) == 0
    # the same file compared twice is still one model
    (tmp_path / "res" / "again.json").write_text((tmp_path / "res" / "minmax.json").read_text())
    res = load_results([tmp_path / "res"])
    assert sorted(c["test"] for c in res.compares) == ["digits_cnn.int8 [out-entropy-trt].onnx",
                                                      "digits_cnn.int8 [out-minmax].onnx",
                                                      "digits_cnn.int8 [out-minmax].onnx"]
    assert main(["report", str(tmp_path / "res"), "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "digits_cnn.int8 [out-minmax]" in page and "digits_cnn.int8 [out-entropy-trt]" in page
    assert accuracy_latency_points(res) == []  # no benchmark: no point, rather than another model's latency


def test_a_debug_ranking_is_drawn(digits_dirs, tmp_path, capsys):
    """`debug --rank`'s ranking reached debug.json and `--exclude-from`, never the report's page."""
    train, test = digits_dirs
    out = tmp_path / "cal"
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out), "--num-images", "128",
                 "--eval-images", "0", *DIGITS]) == 0
    assert main(["debug", str(sample.model_path()), str(out / "digits_cnn.int8.onnx"), "--images", str(test),
                 "--num-images", "64", "--rank", "-o", str(tmp_path / "dbg"), *DIGITS]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "dbg" / "debug.json"), "-o", str(tmp_path / "rep")]) == 0
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"sensitivity_digits_cnn.int8.png", "error_along_depth_digits_cnn.int8.png"} <= names, names
    doc = json.loads((tmp_path / "dbg" / "debug.json").read_text())
    doc["sensitivity"]["rows"][0]["only_float_error"] = "much"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "rep2")]) == 2
