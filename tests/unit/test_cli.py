"""The command line end to end on real data (the bundled digits written as PNG folders)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from quantkit import sample
from quantkit.cli import main
from tests.helpers import DIGITS



def test_import_is_light():
    code = "import sys, quantkit, quantkit.cli; print(sorted({'torch','tensorrt','onnxruntime','cv2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("calibrate", "compare", "demo", "inspect"):
        assert cmd in out


def test_demo_accuracy_every_method(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for method in ("minmax", "entropy", "percentile", "mse", "auto"):
        r = report["methods"][method]
        assert r["accuracy_test"] >= r["accuracy_reference"] - 0.005, method  # within 0.5 points
        assert method in out
    assert report["methods"]["entropy-trt"]["outputs"][0]["sqnr_db"] < report["methods"]["entropy"]["outputs"][0]["sqnr_db"]
    assert report["entropy_differs_from_trt"][0]["tensor"] == "image"
    # the README's file table: the cache's provenance (`build` checks it) as calibrate writes it
    provenance = json.loads((tmp_path / "demo" / "calibration.cache.json").read_text())
    assert provenance["model_sha256"] == json.loads((tmp_path / "demo" / "ranges.json").read_text())["model"]["sha256"]
    assert report["entropy_differs_from_trt"][0]["rule"] == "mse (two-sided tensor)"
    # the README's demo table is this run's
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| method | INT8 accuracy | top-1 agreement | output SQNR (dB) |"):].split("\n\n")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    assert len(rows) == 6
    for method, acc, agree, sqnr in rows:
        r = report["methods"][method.split(" (")[0].strip()]
        # to one test image of 540 and 0.05 dB: ONNX Runtime's float kernels differ by CPU (AVX2 / AVX-512 /
        # AMX) in the last bits, which moves a range by a bin: entropy read 33.77 and 33.78 dB, the unguarded
        # entropy-trt one image apart, on two AMD EPYC machines of the same CI class
        assert abs(float(acc) - r["accuracy_test"]) < 0.002, method
        assert abs(float(agree) - r["outputs"][0]["top1_agreement"]) < 0.002, method
        assert abs(float(sqnr) - r["outputs"][0]["sqnr_db"]) < 0.05, method


def test_calibrate_writes_consistent_artifacts(digits_dirs, tmp_path, capsys):
    train, test = digits_dirs
    out = tmp_path / "out"
    rc = main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out),
               "--method", "percentile", "--num-images", "200", "--eval-dir", str(test), *DIGITS])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["calibration.cache", "calibration.cache.json", "digits_cnn.int8.onnx",
                                                     "quantkit-manifest.json", "ranges.json", "report.json"]
    provenance = json.loads((out / "calibration.cache.json").read_text())
    assert provenance["model_sha256"] == json.loads((out / "ranges.json").read_text())["model"]["sha256"]
    ranges = json.loads((out / "ranges.json").read_text())
    assert ranges["method"] == "percentile" and ranges["num_samples"] == 200
    image = ranges["tensors"]["image"]
    assert {"minmax", "entropy", "percentile", "mse"} <= set(image)
    lines = (out / "calibration.cache").read_text().splitlines()
    assert lines[0] == "TRT-101300-EntropyCalibration2"
    from quantkit.calibrators.cache import read_cache

    cache = read_cache(out / "calibration.cache")
    for name, t in ranges["tensors"].items():
        if "equalized_from" in t:  # depthwise equalization's scaled tensor: not a tensor of the user's model
            assert name not in cache.scales and t["equalized_from"] in cache.scales
            continue
        assert np.float32(cache.scales[name]) == np.float32(np.float32(t["percentile"]) / np.float32(127))
    q = onnx.load(out / "digits_cnn.int8.onnx")
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] and report["num_samples"] == 540
    assert report["accuracy_test"] >= report["accuracy_reference"] - 0.005
    assert "top-1 agree" in capsys.readouterr().out


def test_existing_output_refused_and_untouched(digits_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(out), *DIGITS])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupt_leaves_nothing(digits_dirs, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantkit.calibrators.cache.write_cache", boom)
    rc = main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(tmp_path / "out"),
               "--num-images", "64", "--eval-images", "0", *DIGITS])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_leave_nothing(digits_dirs, tmp_path, monkeypatch, capsys, signame):
    """kill (SIGTERM) or a closed terminal (SIGHUP) while the artifacts are written: they killed
    the process with its staging folder and a half-written .tmp left beside -o; now they end it
    as Ctrl-C does (exit 128 + the signal), the output as it was, and quantkit's handlers go."""
    import os
    import signal

    sig = getattr(signal, signame)
    before = signal.getsignal(sig)

    def killed(*a, **k):
        os.kill(os.getpid(), sig)

    monkeypatch.setattr("quantkit.calibrators.cache.write_cache", killed)
    rc = main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(tmp_path / "out"),
               "--num-images", "64", "--eval-images", "0", *DIGITS])
    assert rc == 128 + sig and f"interrupted ({signame})" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(sig) == before


def test_a_hangup_ignored_by_nohup_stays_ignored(digits_dirs, tmp_path, monkeypatch):
    """`nohup quantkit calibrate ... &` ignores SIGHUP; quantkit's handler must not replace that."""
    import os
    import signal

    from quantkit.calibrators import cache

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    write = cache.write_cache
    try:
        def hangup(*a, **k):
            os.kill(os.getpid(), signal.SIGHUP)
            return write(*a, **k)

        monkeypatch.setattr("quantkit.calibrators.cache.write_cache", hangup)
        rc = main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(tmp_path / "out"),
                   "--num-images", "64", "--eval-images", "0", *DIGITS])
        assert rc == 0 and (tmp_path / "out" / "calibration.cache").exists()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("case", ["missing", "not_onnx", "int_input", "too_many"])
def test_bad_input_exit_2(case, digits_dirs, tmp_path, capsys):
    model = str(sample.model_path())
    extra: list[str] = []
    if case == "missing":
        model = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "x.onnx").write_bytes(b"\x00garbage")
        model = str(tmp_path / "x.onnx")
    elif case == "int_input":
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"], name="i")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "i.onnx")
        model = str(tmp_path / "i.onnx")
    else:
        extra = ["--num-images", "100000"]
    rc = main(["calibrate", model, "--images", str(digits_dirs[0]), "-o", str(tmp_path / "o"), *DIGITS, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("quantkit: error: ") and "Traceback" not in err
    # (an integer-only model without layers is refused for having nothing to quantize, before its opset upgrade)
    assert {"missing": "does not exist", "not_onnx": "not a readable ONNX", "int_input": "nothing to quantize to INT8",
            "too_many": "--num-images 100000"}[case] in err
    if case == "int_input":  # what it has instead, and what to do
        assert "(its ops: 1 Identity)" in err and "hint: INT8 runs Conv, ConvTranspose, Gemm and MatMul" in err
        assert main(["inspect", model]) == 0
        assert "nothing to quantize: no Conv, ConvTranspose, Gemm or MatMul node (its ops: 1 Identity)" in \
            capsys.readouterr().out


def test_unexpected_error_exit_1_and_debug(monkeypatch, digits_dirs, tmp_path, capsys):
    monkeypatch.setattr("quantkit.calibrators.collectors.HistogramCollector.update", lambda *a, **k: 1 / 0)
    args = ["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "-o", str(tmp_path / "o"), *DIGITS]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "Traceback" not in err
    assert main([*args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_compare_and_inspect(digits_dirs, tmp_path, capsys):
    from quantkit.datasets import ImageFolder
    from quantkit.onnx.model import load_model
    from quantkit.ptq import ExportConfig, QuantizeConfig, quantize

    cal = quantize(load_model(sample.model_path()), ImageFolder(digits_dirs[0], sample.preprocess()),
                   QuantizeConfig(export=ExportConfig(method="mse")), indices=range(128))
    onnx.save(cal.int8_model(), tmp_path / "q.onnx")
    rc = main(["compare", str(sample.model_path()), str(tmp_path / "q.onnx"), "--images", str(digits_dirs[1]),
               "--json", str(tmp_path / "m.json"), "--min-cosine", "0.99", *DIGITS])
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_samples"] == 540 and m["outputs"][0]["cosine_mean"] > 0.99
    assert "warning:" not in capsys.readouterr().err
    assert main(["inspect", str(sample.model_path())]) == 0
    assert "7 activation tensors" in capsys.readouterr().out
    # the two models swapped: it still compares, and says the order
    assert main(["compare", str(tmp_path / "q.onnx"), str(sample.model_path()), "--images", str(digits_dirs[1]),
                 "--num-images", "16", *DIGITS]) == 0
    assert "given as the FP32 reference, has Q/DQ pairs" in capsys.readouterr().err


def test_bench_onnxruntime_and_engine_only_options(tmp_path, capsys):
    import json as _json

    from quantkit import sample
    from quantkit.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", str(sample.model_path()), "--batch", "4", "--iterations", "5", "--warmup", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "image 4x1x32x32" in text and "throughput" in text
    stats = _json.loads(out.read_text())
    assert stats["iterations"] >= 5 and stats["batch"] == 4 and stats["min_ms"] <= stats["median_ms"] <= stats["p99_ms"]
    assert main(["bench", str(sample.model_path()), "--cuda-graph"]) == 2
    assert "TensorRT engines only" in capsys.readouterr().err


@pytest.mark.parametrize("vnni", [False, True, None])
def test_onnxruntime_target_notes_a_cpu_without_vnni(digits_dirs, tmp_path, capsys, monkeypatch, vnni):
    """ONNX Runtime's integer kernels saturate on x86 without VNNI: calibrate --target onnxruntime
    says so there (and only there), after its figures, which are computed as TensorRT does."""
    monkeypatch.setattr("quantkit.backends.onnxruntime.cpu_has_vnni", lambda: vnni)
    out = tmp_path / "o"
    assert main(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), *DIGITS, "--num-images", "32",
                 "--eval-images", "16", "-o", str(out), "--target", "onnxruntime", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert ("this CPU has no VNNI" in text) is (vnni is False)
    assert (out / "report.json").exists()


def test_eval_dir_with_other_classes_than_the_model_is_warned_and_not_budgeted_on(digits_dirs, tmp_path, capsys,
                                                                                  caplog):
    """--eval-dir was never checked against the model's classes: 12 class folders for a 10-class
    model gave a meaningless accuracy, silently, and --max-drop budgeted on it."""
    import shutil

    ev = tmp_path / "ev"
    for cls in range(12):
        (ev / str(cls)).mkdir(parents=True)
        for png in sorted((digits_dirs[1] / str(cls % 10)).glob("*.png"))[:3]:
            shutil.copy(png, ev / str(cls) / png.name)
    common = ["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]), "--num-images", "32",
              "--eval-dir", str(ev), *DIGITS]
    assert main([*common, "-o", str(tmp_path / "a")]) == 0
    assert "12 class folders" in caplog.text and "meaningless" in caplog.text
    assert main([*common, "--max-drop", "1", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--eval-dir" in err and "--max-drop would budget on it" in err and not (tmp_path / "b").exists()


def test_calibrate_says_when_int8_loses_an_output(tmp_path, capsys):
    """A model INT8 does not hold (a diffusion UNet read 0.4 dB by every method) was written with
    exit 0 and its table alone: the summary now says so and names what to run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[0] *= 1e4  # one channel 10^4 larger: a per-tensor scale leaves the others no levels...
    w2 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    w2[:, 0] = 0  # ...and the next layer reads only those
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="c1"),
                           helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((48, 4, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o"),
                 "--no-progress", "--no-equalize", "--no-bias-correction"]) == 0
    out = capsys.readouterr().out
    assert "INT8 loses most of this output" in out and "quantkit debug FP32 INT8 --rank" in out
    # compare says it too (it printed the figure alone)
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx"), "--npz",
                 str(tmp_path / "d.npz"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'y' at" in out and "INT8 loses most of this output" in out


def test_an_eval_dir_that_is_the_calibration_folder_is_said_and_not_called_held_out(digits_dirs, tmp_path, caplog):
    """--eval-dir pointing at the calibration folder (or inside it) went unsaid: report.json called the
    calibration images held out."""
    import json

    train = digits_dirs[0]
    inner = next(p for p in sorted(train.iterdir()) if p.is_dir())
    for k, ev in enumerate((train, inner)):
        out = tmp_path / f"o{k}"
        assert main(["calibrate", str(sample.model_path()), "--images", str(train), "--num-images", "64",
                     "--eval-images", "16", "--eval-dir", str(ev), "--method", "minmax", "-o", str(out), *DIGITS]) == 0
        assert json.loads((out / "report.json").read_text())["held_out"] is False
    assert "is the calibration data:" in caplog.text and "is the calibration data (a folder inside it)" in caplog.text


def test_num_images_all_calibrates_on_every_sample(tmp_path):
    """`--num-images all` (the merge-stats recipe: each machine calibrates on every image of its part)."""
    x = np.random.default_rng(0).normal(0, 1, (40, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", image=x)
    assert main(["calibrate", str(sample.model_path()), "--npz", str(tmp_path / "c.npz"), "--num-images", "all",
                 "--save-stats", str(tmp_path / "s.qkstats"), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "ranges.json").read_text())["num_samples"] == 40


def test_an_onnx_graphsurgeon_too_old_for_the_onnx_installed_is_named(monkeypatch, digits_dirs, tmp_path, capsys):
    """onnx 1.20 dropped helper.float32_to_bfloat16, which onnx-graphsurgeon 0.5.x calls when it
    exports a graph: a GPU machine's image (onnx 1.23, onnx-graphsurgeon 0.5.8) failed every
    calibration on an AttributeError, after the pass. Now one line, before the work, naming the version to install."""
    import onnx_graphsurgeon

    monkeypatch.setattr(onnx_graphsurgeon, "__version__", "0.5.8")
    monkeypatch.delattr(onnx.helper, "float32_to_bfloat16", raising=False)
    train, _ = digits_dirs
    rc = main(["calibrate", str(sample.model_path()), "--images", str(train), "--num-images", "32", "-o", str(tmp_path / "o"), *DIGITS])
    err = capsys.readouterr().err
    assert rc == 1 and "onnx_graphsurgeon 0.5.8 found, quantkit needs >= 0.6.1" in err, err  # 1: the environment
    assert "onnx-graphsurgeon>=0.6.1" in err and "report it" not in err and "calibrating" not in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_calibrate_on_every_npz_sample_says_samples_not_images(residual_model, tmp_path, capsys):
    onnx.save(residual_model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(24, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no samples left after calibration; compared on calibration samples" in out, out


def test_calibrate_says_recurrent_layers_stay_in_float(tmp_path, capsys):
    """An LSTM gets no Q/DQ (no INT8 recurrent kernel in TensorRT or ONNX Runtime): the summary
    said nothing, on a speaker encoder whose LSTMs held 95% of the weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, feat = 16, 8
    w = rng.standard_normal((1, 4 * hidden, feat)).astype(np.float32) * 0.3
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3
    head = rng.standard_normal((hidden, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["seq", "h"], hidden_size=hidden, name="lstm"),
                           helper.make_node("Squeeze", ["h", "ax"], ["h2"]),
                           helper.make_node("MatMul", ["h2", "head"], ["y"], name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", feat])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"),
                           numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.array([0]), "ax")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((5, 40, feat)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    share = 100 * (w.size + r.size) / (w.size + r.size + head.size + 1)
    assert f"in float: 1 LSTM layer(s), {share:.0f}% of the weights" in out, out
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0  # inspect says it too
    assert f"in float: 1 LSTM layer(s), {share:.0f}% of the weights" in capsys.readouterr().out


def test_calibrate_says_the_opset_was_upgraded(tmp_path, capsys):
    """An opset-8 model is written at opset 13 (per-channel Q/DQ needs it): it was unsaid."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
                           helper.make_node("Relu", ["c"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert "opset 8 upgraded to 13" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "o" / "m.int8.onnx")).opset_import[0].version == 13


def test_the_opset_note_gives_the_upgrades_reason():
    from quantkit.cli.calibrate import _opset_note

    assert _opset_note(17, 17) == ""
    assert "per channel needs 13" in _opset_note(8, 13)
    # a float16 model at opset 17 (a probe's CREPE): the reason is float16's Q/DQ, not 13
    assert _opset_note(17, 19) == "; opset 17 upgraded to 19 (Q/DQ of float16 tensors needs 19)"


def _whole_groups_model(tmp_path) -> None:
    """``m.onnx`` in ``tmp_path``, a model of whole groups of four rows (ICLabel's Reshape to
    [-1, 4, C] and ReduceMean, with a layer after it), and ``x.npy``: 48 samples for it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
                           helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                           helper.make_node("Reshape", ["p", "shape"], ["g"]),
                           helper.make_node("ReduceMean", ["g"], ["m"], axes=[1], keepdims=0),
                           helper.make_node("MatMul", ["m", "w2"], ["y"], name="head")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 5])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 4, 3]), "shape"),
                           numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((48, 2, 8, 8)).astype(np.float32))


def test_a_model_that_runs_only_whole_groups_of_rows_calibrates(tmp_path, capsys):
    """ICLabel averages each component's four rows (Reshape to [-1, 4, C], ReduceMean): one
    sample alone does not run, and the capture's memory probe ran one sample and called the data
    unrunnable (exit 2) though every batch of 4 runs."""
    _whole_groups_model(tmp_path)
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                 "--batch-size", "4", "--order", "sorted", "--no-progress"]) == 0, capsys.readouterr()
    assert (tmp_path / "o" / "m.int8.onnx").exists()


def test_debug_of_a_model_that_runs_only_whole_groups_of_rows(tmp_path, capsys):
    """`debug` measured memory on one sample too (exit 2 on ICLabel); `--rank` picks single
    samples, which such a model cannot run: one line that says so, nothing written."""
    _whole_groups_model(tmp_path)
    data = ["--npz", str(tmp_path / "x.npy"), "--batch-size", "4", "--order", "sorted", "--no-progress"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o"), *data]) == 0
    pair = [str(tmp_path / "m.onnx"), str(tmp_path / "o" / "m.int8.onnx")]
    assert main(["debug", *pair, "-o", str(tmp_path / "d"), *data]) == 0
    assert (tmp_path / "d" / "debug.json").exists()
    capsys.readouterr()
    assert main(["debug", *pair, "-o", str(tmp_path / "r"), "--rank", *data]) == 2
    assert "does not run one sample alone" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_a_lost_output_names_a_graph_input_of_raw_units(tmp_path, capsys):
    """deepCR's cosmic-ray UNet reads electrons (median 77, up to 21,000): its first Conv's INT8
    input lost the output (-2.4 dB), and that one Conv in float gave 16.6 dB, but calibrate named
    only debug --rank and --max-drop. The note now names the input and the --exclude."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = np.abs(rng.normal(0.5, 0.2, (4, 1, 1, 1))).astype(np.float32)
    w2 = rng.normal(0, 0.3, (2, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="first"),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Add", ["r", "one"], ["r1"]),
             helper.make_node("Log", ["r1"], ["l"]),  # the model compresses the range inside
             helper.make_node("Conv", ["l", "w2"], ["y"], pads=[1] * 4, name="second")]
    g = helper.make_graph(nodes, "raw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 16, 16])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    x = rng.lognormal(1.0, 0.8, (64, 1, 16, 16)).astype(np.float32)
    for i in range(64):  # a few bright pixels an image
        x[i, 0, rng.integers(0, 16, 3), rng.integers(0, 16, 3)] = rng.uniform(10000, 20000, 3)
    np.save(tmp_path / "c.npy", x[:48])
    np.save(tmp_path / "e.npy", x[48:])
    data = ["--npz", str(tmp_path / "c.npy"), "--eval-dir", str(tmp_path / "e.npy"), "--no-progress",
            "--no-bias-correction"]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o"), *data]) == 0
    out = capsys.readouterr().out
    assert "INT8 loses most of this output" in out
    assert "input 'x' looks like raw units" in out and "--exclude 'first'" in out
    # and the --exclude it names brings the output back
    assert main(["calibrate", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"), *data, "--exclude", "first"]) == 0
    out = capsys.readouterr().out
    assert "INT8 loses" not in out and "raw units" not in out
