"""The command line on bad or awkward input: one readable line, the right exit status, the right hint.

Issue 11, items 8 (compare/bench/inspect), 9 (already-quantized models), 10 (CLI hygiene) and
the broken pipe of item 4.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantkit import sample
from quantkit.cli import COMMANDS, build_parser, main
from tests.helpers import DIGITS, make_residual_model

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The residual test model with a dynamic batch, batch 1, batch 4, and dynamic H/W; the
    digits sample model with a fixed batch of 4."""
    root = tmp_path_factory.mktemp("cli_models")
    out = {"dyn": root / "dyn.onnx", "b1": root / "b1.onnx", "b4": root / "b4.onnx", "hw": root / "hw.onnx"}
    onnx.save(make_residual_model(), out["dyn"])
    onnx.save(make_residual_model(batch=1), out["b1"])
    onnx.save(make_residual_model(batch=4), out["b4"])
    hw = make_residual_model()
    for axis, name in ((2, "height"), (3, "width")):
        hw.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    onnx.save(hw, out["hw"])
    digits4 = onnx.load(sample.model_path())
    for vi in (digits4.graph.input[0], digits4.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    out["digits_b4"] = root / "digits_b4.onnx"
    onnx.save(digits4, out["digits_b4"])
    np.save(root / "x.npy", np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32))
    out["npy"] = root / "x.npy"
    return out


@pytest.fixture(scope="module")
def small_digits(digits_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """21 digit images in class folders, plus one corrupt PNG."""
    root = tmp_path_factory.mktemp("small_digits") / "imgs"
    for p in sorted(digits_dirs[1].rglob("*.png"))[:21]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    first = sorted(root.iterdir())[0]
    (first / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _err_line(err: str) -> str:
    assert err.startswith("quantkit: error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------- item 9: already quantized
def _qdq_helper_model() -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant_x")]
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z")]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _lstm_helper_model() -> onnx.ModelProto:
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"], name="qlstm", domain="com.microsoft",
                            hidden_size=4)
    g = helper.make_graph([node], "qlstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4]),
                                            helper.make_tensor_value_info("w", TensorProto.INT8, [1, 4, 16]),
                                            helper.make_tensor_value_info("r", TensorProto.INT8, [1, 4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 1, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


class _Reader:
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._it = iter([{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)])

    def get_next(self):
        return next(self._it, None)


def _ort_quantized(kind: str, tmp_path: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    src, dst = tmp_path / "fp32.onnx", tmp_path / f"{kind}.onnx"
    onnx.save(make_residual_model(), src)
    if kind == "dynamic":
        quantize_dynamic(src, dst)
    else:
        quantize_static(src, dst, _Reader(), quant_format=QuantFormat.QDQ if kind == "static_qdq" else QuantFormat.QOperator)
    return onnx.load(dst)


@pytest.mark.parametrize("kind, first_op", [
    ("helper_qdq", "QuantizeLinear"), ("helper_lstm", "DynamicQuantizeLSTM"),
    ("dynamic", None), ("static_qdq", None), ("static_qoperator", "QuantizeLinear"),
])
def test_already_quantized_model_refused(kind, first_op, tmp_path):
    from quantkit.errors import ModelError
    from quantkit.onnx.model import QUANTIZED_OP_TYPES
    from quantkit.ptq import prepare

    model = {"helper_qdq": _qdq_helper_model, "helper_lstm": _lstm_helper_model}.get(kind, lambda: _ort_quantized(kind, tmp_path))()
    consts = {i.name for i in model.graph.initializer}
    quantized = [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES or n.op_type.startswith("QLinear")]
    # named: the first that quantizes an activation (a weight's DequantizeLinear is what a weight-only model has)
    first = next((n for n in quantized if not (n.op_type == "DequantizeLinear" and n.input[0] in consts)), quantized[0])
    if first_op is not None:
        assert first.op_type == first_op
    if kind == "static_qoperator":
        assert any(n.op_type == "QLinearConv" for n in model.graph.node)
    if kind == "dynamic":
        assert {"ConvInteger", "DynamicQuantizeLinear"} & {n.op_type for n in model.graph.node}
    with pytest.raises(ModelError) as e:
        prepare(model, name="m.onnx")
    msg = str(e.value)
    assert "already quantized" in msg and first.op_type in msg and repr(first.name) in msg
    assert "FP32" in e.value.hint
    assert "no Conv" not in msg


def test_calibrate_refuses_quantized_model(tmp_path, digits_dirs, capsys):
    path = tmp_path / "q.onnx"
    onnx.save(_ort_quantized("static_qdq", tmp_path), path)
    rc = main(["calibrate", str(path), "--images", str(digits_dirs[0]), "-o", str(tmp_path / "o"), *DIGITS])
    err = _err_line(capsys.readouterr().err)
    assert rc == 2 and "already quantized" in err and "hint: calibrate the FP32" in err
    assert re.search(r"node '[^']+' is a (QuantizeLinear|DequantizeLinear)", err)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------- item 8: compare
@pytest.mark.parametrize("ref, test", [("dyn", "b4"), ("b4", "dyn"), ("dyn", "b1")])
def test_compare_dynamic_and_fixed_batch(ref, test, models, capsys, tmp_path):
    import json

    rc = main(["compare", str(models[ref]), str(models[test]), "--npz", str(models["npy"]), "--batch-size", "3",
               "--json", str(tmp_path / "c.json"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["num_samples"] == 10  # 10 samples: batches of 4 with the last padded, padding not counted
    assert rep["outputs"][0]["cosine_min"] > 0.99999  # same weights: padding rows would not change this,
    assert rep["outputs"][0]["max_abs_error"] < 1e-4  # but a wrong row alignment would


def test_compare_two_fixed_batches_named(models, capsys):
    rc = main(["compare", str(models["b1"]), str(models["b4"]), "--npz", str(models["npy"]), "--no-progress"])
    err = _err_line(capsys.readouterr().err)
    assert rc == 2
    assert "b1.onnx" in err and "b4.onnx" in err and "batch size of 1" in err and "batch size of 4" in err
    assert "resize" not in err and "crop" not in err


def test_compare_image_folder_fixed_batch_int8(models, small_digits, capsys, tmp_path):
    import json

    rc = main(["compare", str(sample.model_path()), str(models["digits_b4"]), "--images", str(small_digits),
               "--json", str(tmp_path / "c.json"), *DIGITS])
    assert rc == 0
    assert json.loads((tmp_path / "c.json").read_text())["num_samples"] == 21


@pytest.mark.parametrize("shape, hint", [((4, 3, 8, 8), "fixed batch size of 1"), ((1, 3, 9, 8), "resize")])
def test_shape_mismatch_hint_fits_the_cause(shape, hint):
    from quantkit.backends.base import check_feed
    from quantkit.errors import ShapeMismatchError
    from quantkit.onnx.model import TensorSpec

    with pytest.raises(ShapeMismatchError) as e:
        check_feed({"x": np.zeros(shape, np.float32)}, [TensorSpec("x", (1, 3, 8, 8), np.dtype(np.float32))])
    assert hint in e.value.hint and ("resize" in e.value.hint) == (hint == "resize")


# ----------------------------------------------------------------- item 8: bench
def _bench(*args: str) -> list[str]:
    return ["bench", *args, "--iterations", "2", "--warmup", "0"]


def test_bench_dynamic_dims_hint_names_the_dims(models, capsys):
    assert main(_bench(str(models["hw"]))) == 2
    err = _err_line(capsys.readouterr().err)
    assert "height" in err and "width" in err and "HEIGHT, WIDTH" in err and "--shapes x=1x3x224x224" in err


@pytest.mark.parametrize("shape", ["x=1x3x8x8", "x=1X3X8X8", "x:1x3x8x8", "x=1x3x8x8/2x3x8x8/4x3x8x8"])
def test_bench_shapes_syntax(shape, models, capsys):
    assert main(_bench(str(models["hw"]), "--shapes", shape)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    want = "2x3x8x8" if "/" in shape else "1x3x8x8"  # the opt shape of min/opt/max
    assert f"x {want}" in out


def test_bench_shapes_contradicting_model_named(models, capsys):
    assert main(_bench(str(models["b1"]), "--shapes", "x=4x3x8x8")) == 2
    err = _err_line(capsys.readouterr().err)
    assert "x=4x3x8x8" in err and "1x3x8x8" in err and "resize" not in err


def test_bench_shapes_unparsable_named(models, capsys):
    assert main(_bench(str(models["hw"]), "--shapes", "x=1x3xNxN")) == 2
    err = _err_line(capsys.readouterr().err)
    assert "x=1x3xNxN" in err and "must be a number" in err


def test_bench_batch_on_fixed_batch_model(models, capsys):
    assert main(_bench(str(models["b1"]), "--batch", "8")) == 2
    err = _err_line(capsys.readouterr().err)
    assert "--batch 8" in err and "fixed batch size of 1" in err
    assert main(_bench(str(models["b4"]))) == 0
    assert "x 4x3x8x8" in capsys.readouterr().out
    assert main(_bench(str(models["b4"]), "--batch", "4")) == 0
    assert main(_bench(str(models["dyn"]), "--batch", "8")) == 0
    assert "x 8x3x8x8" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing.plan", "missing.engine", "missing.onnx"])
def test_bench_missing_file(name, tmp_path, capsys, monkeypatch):
    def no_backend(*a, **k):
        raise AssertionError("a backend was loaded for a missing file")

    monkeypatch.setattr("quantkit.backends.runner_from_path", no_backend)
    assert main(_bench(str(tmp_path / name))) == 2
    err = _err_line(capsys.readouterr().err)
    assert "does not exist" in err and name in err and "TensorRT" not in err


# ----------------------------------------------------------------- item 8: inspect
@pytest.mark.parametrize("name", ["model.plan", "model.engine", "calibration.cache"])
def test_inspect_engine(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(b"ftrt" + bytes(range(256)) * 40)  # not text, not a cache header
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT engine" in out and "10,244 bytes" in out and "TensorRT is needed" in out
    assert "scale" not in out


@pytest.mark.parametrize("name", ["model.plan", "model.engine"])
@pytest.mark.parametrize("metadata", [0, 300])  # Ultralytics writes a length and JSON metadata before the engine
def test_inspect_engine_tag_after_metadata(name, metadata, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(metadata.to_bytes(4, "little") + b"{" * metadata + b"ftrt" + bytes(200))
    assert main(["inspect", str(path)]) == 0
    assert "TensorRT engine" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["inspect", "bench"])
@pytest.mark.parametrize("name", ["model.plan", "model.engine", "model.trt"])
def test_random_bytes_named_engine(name, command, tmp_path, capsys):
    """A file named like an engine without TensorRT's tag is not called one (inspect: exit 0; bench: exit 1,
    "TensorRT is required", as if the bytes were an engine)."""
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 40)
    assert main([command, str(path)]) == 2
    err = _err_line(capsys.readouterr().err)
    assert name in err and "no engine header" in err


@pytest.mark.parametrize("content", [b"hello world\n", b"", b"\x00\x01\x02binary"])
def test_inspect_other_file_one_line(content, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = _err_line(capsys.readouterr().err)
    assert "notes.txt" in err and "not an ONNX model, a TensorRT calibration cache or a TensorRT engine" in err
    assert path.read_bytes() == content


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.cache")]) == 2
    assert "does not exist" in _err_line(capsys.readouterr().err)


def test_inspect_cache_still_read(tmp_path, capsys):
    path = tmp_path / "calib.bin"
    path.write_text("TRT-101300-EntropyCalibration2\nimage: 3c010204\n")
    assert main(["inspect", str(path)]) == 0
    assert "image: scale" in capsys.readouterr().out


# ----------------------------------------------------------------- item 10: CLI hygiene
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_subcommand(where, tmp_path, capsys):
    cmd = ["inspect", str(tmp_path / "nope.onnx")]
    argv = ["--debug", *cmd] if where == "before" else [*cmd, "--debug"]
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(cmd) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_verbose_before_subcommand(tmp_path, capsys):
    args = build_parser().parse_args(["-v", "inspect", "x.onnx"])
    assert args.verbose and not getattr(args, "debug", False)


def test_ctrl_c_exits_130(monkeypatch, capsys):
    from quantkit.cli.inspect import Inspect

    def interrupted(self, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Inspect, "run", interrupted)
    assert main(["inspect", str(sample.model_path())]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_eval_images_negative_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(sample.model_path()), "--images", ".", "-o", "o", "--eval-images", "-1"])
    assert e.value.code == 2
    assert "--eval-images" in capsys.readouterr().err


def test_skip_warning_once_per_file(small_digits, tmp_path, caplog, capsys):
    # every image is used for calibration, so the report compares on the calibration images again
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(sample.model_path()), "--images", str(small_digits), "-o", str(tmp_path / "o"),
                   *DIGITS])
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if "zz_corrupt.png" in r.getMessage()]
    assert len(warnings) == 1, warnings
    out = capsys.readouterr().out
    assert out.count("skipped 1 unreadable file") == 1
    # the figures of an in-sample comparison are said to read high (a probe quoted 44.7 dB for 32.3 held out)
    assert "compared on calibration images, where the figures read higher" in out


def test_fixed_batch_drop_reported(models, small_digits, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(models["digits_b4"]), "--images", str(small_digits), "-o", str(tmp_path / "o"),
                   "--eval-images", "0", *DIGITS])
    assert rc == 0
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    # 22 files, 1 corrupt: 21 images, 5 batches of 4, the last image dropped
    assert len(dropped) == 1 and "dropped the last 1 of 21" in dropped[0] and "fixed batch size of 4" in dropped[0]
    out = capsys.readouterr().out
    assert "calibrated 20 samples" in out
    # the sample line said "22 of 22" beside "calibrated 20": it says what the fixed batch left out
    assert "20 calibrated, the last 1 do not fill the model's fixed batch" in out


def test_fixed_batch_drop_warned_once_per_source(caplog):
    from quantkit.datasets.batching import Batcher
    from quantkit.datasets.sources import SyntheticSource

    src = SyntheticSource((3,), count=10, seed=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the calibration pass, then the checks' passes over the same samples
            assert sum(b.size for b in Batcher(src, ["x"], batch_size=4, last_batch="drop")) == 8
        assert sum(b.size for b in Batcher(src, ["x"], batch_size=3, last_batch="drop")) == 9
    dropped = [r.getMessage() for r in caplog.records if "dropped the last" in r.getMessage()]
    assert len(dropped) == 2 and "2 of 10" in dropped[0] and "1 of 10" in dropped[1]


def _summaries(help_text: str) -> dict[str, str]:
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("COMMAND")) + 1
    entries: dict[str, str] = {}
    current = None
    for line in lines[start:]:
        if not line.strip() or not line.startswith("    "):
            break
        m = re.match(r"^    (\S+)(\s+(.*))?$", line)
        if m and m.group(1) in COMMANDS:
            current = m.group(1)
            entries[current] = (m.group(3) or "").strip()
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


def test_help_lists_every_command_with_complete_summary(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    entries = _summaries(capsys.readouterr().out)
    assert sorted(entries) == sorted(COMMANDS)
    for name, text in entries.items():
        assert text.endswith((".", ")")), f"{name}: summary cut: {text!r}"
        assert "unavailable" not in text, text
    assert "print the accuracy table" in entries["qat-demo"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_default_is_stated_in_help():
    missing = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            default = action.default
            if default is None or default is False or default is argparse.SUPPRESS:
                continue
            text = (action.help or "") % {"default": default, "prog": sub.prog}
            if str(default) not in text:
                missing.append(f"{name} {action.option_strings or action.dest}: default {default!r} not in {text!r}")
    assert not missing, "\n".join(missing)


def test_calibrate_help_states_num_images_default():
    help_text = " ".join(_subparsers()["calibrate"].format_help().split())
    assert re.search(r"--num-images N .*default 512", help_text)


# ----------------------------------------------------------------- item 4: broken pipe
def _first_line_then_close(argv: list[str]) -> tuple[int, str, bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "quantkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err, first


def test_broken_pipe_large_output(tmp_path):
    # more than a pipe buffer (64 KiB) of output: the writer is still writing when the reader closes
    cache = tmp_path / "big.cache"
    cache.write_text("TRT-101300-EntropyCalibration2\n" + "".join(f"tensor_{i:05d}: 3c010204\n" for i in range(4000)))
    rc, err, first = _first_line_then_close(["inspect", str(cache)])
    assert first.startswith(str(cache).encode())
    assert rc == 0 and err == "", err


def test_broken_pipe_inspect_sample_model():
    rc, err, first = _first_line_then_close(["inspect", str(sample.model_path())])
    assert b"opset" in first
    assert rc == 0 and err == "", err


def test_negative_seed_and_no_command_are_one_line_errors(capsys):
    """Found by the fuzz suite: `--seed -1` exited 1 with numpy's ValueError; no command at all
    exited 2 with nothing on stderr."""
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "m.onnx", "--images", "x", "-o", "o", "--seed", "-1"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "quantkit: error: no command given" and len(err) == 2


def test_multi_line_library_errors_print_on_one_line(monkeypatch, capsys):
    from quantkit.errors import ModelError

    def broken(*a, **k):
        raise ModelError("first line\nsecond line", hint="do this\nand that")

    monkeypatch.setattr("quantkit.onnx.model.load_model", broken)
    assert main(["inspect", str(sample.model_path())]) == 2
    assert capsys.readouterr().err.splitlines() == ["quantkit: error: first line; second line",
                                                   "  hint: do this; and that"]


def _npz_case(root: Path, kind: str) -> Path:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    path = root / f"{kind}.npz"
    if kind == "object":  # a pickled object array: np.load must not run it
        np.savez(path, x=np.array([object()] * 10, dtype=object))
    elif kind == "ragged":  # clips of different lengths (the eleventh probe's vocoder): an object array too
        clips = np.empty(3, dtype=object)
        clips[:] = [x[0, :, :, :n] for n in (4, 6, 8)]
        np.savez(path, x=clips)
    elif kind == "truncated":
        np.savez(path, x=x)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "nan":
        x[7, 0, 1, 1] = x[4, 2, 0, 0] = np.nan
        np.savez(path, x=x)
    elif kind == "inf":  # a mask input may mean it: not refused, but the inner tensor's error names the input
        x[5, 0, 1, 1] = np.inf
        np.savez(path, x=x)
    return path


@pytest.mark.parametrize("kind, message", [
    ("object", r"'x' cannot be read without unpickling"),
    ("ragged", r"'x' cannot be read without unpickling(.|\n)*different lengths .* cut or pad them"),
    ("truncated", r"is not a readable \.npy/\.npz file"),
    ("nan", r"input 'x': sample .*nan\.npz\[4\] has NaN values \(1 more in this batch\)"),
    ("inf", r"tensor 'r1' has Inf values in the batch of samples 0\.\.9, whose input 'x' has infinite values"),
])
def test_bad_npz_is_one_line_exit_2(kind, message, models, tmp_path, capsys):
    """Data files that cannot be used: exit 2 naming the file (and the sample), never exit 1."""
    path = _npz_case(tmp_path, kind)
    rc = main(["calibrate", str(models["dyn"]), "--npz", str(path), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_model_making_nan_is_exit_2_naming_the_tensor(tmp_path, capsys):
    """Finite data, a model that makes NaN (Sqrt of a negative value) before a Conv: exit 2, the tensor named."""
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["root"], name="sqrt"), helper.make_node("Conv", ["root", "w"], ["y"], name="conv")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "'root'" in err and "NaN" in err, err


@pytest.mark.parametrize("flag, path, said", [
    ("--images", "nowhere", "image folder '{}' does not exist"),
    ("--eval-dir", "nowhere", "image folder '{}' does not exist"),
    ("--eval-dir", "nowhere.npz", "NumPy file '{}' does not exist"),
    ("--eval-dir", "a_file.txt", "'{}' is not a folder of images"),
])
def test_a_missing_data_path_is_named_before_the_preprocessing_is_checked(flag, path, said, tmp_path, capsys):
    """The digits model wants gray images: a path that is not there was reported as a colour
    mismatch (the preprocessing was checked against the model first)."""
    (tmp_path / "a_file.txt").write_text("not images")
    target = tmp_path / path
    np.savez(tmp_path / "d.npz", image=np.random.default_rng(0).random((8, 1, 32, 32), np.float32))
    data = ["--npz", str(tmp_path / "d.npz")] if flag == "--eval-dir" else []
    rc = main(["calibrate", str(sample.model_path()), *data, flag, str(target), "--no-progress",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and said.format(target) in err and "colour" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [MemoryError(), OSError(28, "No space left on device", "/data/out/s.qkstats"),
                                   PermissionError(13, "Permission denied", "/data/model.onnx")])
def test_memory_and_file_system_errors_are_one_line_exit_2(monkeypatch, capsys, error):
    """Out of memory (a declared input of 3x100000x100000, an .npz header claiming 1 TiB) and a file
    system's refusal met during the work (a full disk, a file it may not read) are the machine's or
    the data's, not quantkit's bugs: one line naming the file, exit 2 (they were "report it" exit 1)."""
    from quantkit.cli.inspect import Inspect

    def fails(self, args):
        raise error

    monkeypatch.setattr(Inspect, "run", fails)
    assert main(["inspect", str(sample.model_path())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and "report it" not in err, err
    assert ("out of memory" in err) if isinstance(error, MemoryError) else (error.filename in err)


def test_impossible_flag_values_are_refused_before_the_work(tmp_path, capsys):
    """--min-cosine 2 failed every comparison (exit 1); a bad --shapes was hidden behind a missing
    TensorRT (exit 1)."""
    model = str(sample.model_path())
    for bad in ("2", "nan", "-1.5"):
        with pytest.raises(SystemExit) as e:
            main(["compare", model, model, "--npz", "x.npz", "--min-cosine", bad])
        assert e.value.code == 2 and "between -1 and 1" in capsys.readouterr().err
    assert main(["build", model, "-o", str(tmp_path / "m.plan"), "--shapes", "input=abc"]) == 2
    assert "every dimension must be a number" in capsys.readouterr().err


def test_report_draws_ranges_with_a_damaged_amax(tmp_path, capsys):
    """A ranges.json whose amax values are NaN stopped `report` in matplotlib's log scale (exit 1)."""
    import json

    doc = {"method": "entropy", "model": {"path": "m.onnx"}, "tensors": {"a": {"entropy": float("nan"), "minmax": 0.0},
                                                                         "b": {"entropy": 1.5, "minmax": 2.0}}}
    (tmp_path / "ranges.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "ranges.json"), "-o", str(tmp_path / "rep")]) == 0, capsys.readouterr().err
    assert (tmp_path / "rep" / "index.html").exists()


def test_trt_version_manifest_name_and_a_terminal_without_utf8(tmp_path, capsys):
    """--trt-version banana wrote the header TRT-0-...; --json into another run's manifest name made
    that folder refuse --force; a name the terminal's encoding lacks ended a finished run in a
    UnicodeEncodeError (exit 1)."""
    import shutil
    import subprocess
    import sys

    model = str(sample.model_path())
    with pytest.raises(SystemExit) as e:
        main(["calibrate", model, "--npz", "x.npz", "-o", str(tmp_path / "o"), "--trt-version", "banana"])
    assert e.value.code == 2 and "TensorRT version" in capsys.readouterr().err
    assert main(["bench", model, "--json", str(tmp_path / "quantkit-manifest.json"), "--iterations", "1"]) == 2
    assert "manifest" in capsys.readouterr().err
    run = [sys.executable, "-c", "import sys; from quantkit.cli import main; sys.exit(main(sys.argv[1:]))"]
    shutil.copy(model, tmp_path / "modèle.onnx")
    proc = subprocess.run([*run, "inspect", str(tmp_path / "modèle.onnx")], capture_output=True,
                          env={"PYTHONIOENCODING": "ascii", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and b"mod\\xe8le.onnx" in proc.stdout, proc.stderr


@pytest.mark.parametrize("extra, said", [
    (["--batch-axis", "nosuch=0"], "--batch-axis names 'nosuch', which is not an input of the model"),
    (["--std", "nan"], "argument --std: expected finite numbers"),
    (["--scale", "inf"], "argument --scale: expected a finite number"),
    (["--scale", "0"], "argument --scale: expected a number other than 0"),  # every sample one constant: exit 0
    (["--trt-version", "7.0"], "expected a TensorRT version from 8 to 11"),  # wrote a TRT-70000-... header
    (["--trt-version", "99.0"], "expected a TensorRT version from 8 to 11"),
])
def test_flags_that_name_no_input_or_no_number_are_refused(extra, said, models, tmp_path, capsys):
    """A --batch-axis naming no input was accepted silently; --std nan was blamed on the first sample."""
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3, 8, 8), np.float32))
    try:
        rc = main(["calibrate", str(models["dyn"]), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"),
                   "--no-progress", *extra])
    except SystemExit as exit_:  # argparse's own refusal of a flag's value
        rc = exit_.code
    assert rc == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_pickle_is_never_suggested_to_be_loaded(models, tmp_path, capsys):
    """NumPy's own text advises loading a pickled file "unsafely": quantkit says it never does."""
    import pickle

    (tmp_path / "p.npy").write_bytes(pickle.dumps({"x": 1}))
    assert main(["calibrate", str(models["dyn"]), "--npz", str(tmp_path / "p.npy"), "-o", str(tmp_path / "o")]) == 2
    assert main(["merge-stats", str(tmp_path / "p.npy"), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "never load" in err and "allow_pickle" not in err and "unsafely" not in err
    # a text file named .npz is no pickle, whatever NumPy takes it for; a truncated member neither
    (tmp_path / "t.npz").write_text("hello")
    assert main(["calibrate", str(models["dyn"]), "--npz", str(tmp_path / "t.npz"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither a .npy array nor an .npz (zip) archive" in err and "pickled" not in err


@pytest.mark.parametrize("name,value", [("QUANTKIT_HISTOGRAM_WORKERS", "abc"), ("OPENCV_IO_MAX_IMAGE_PIXELS", "abc"),
                                        ("OPENCV_IO_MAX_IMAGE_PIXELS", "-1"),
                                        # Python's int() takes these, OpenCV's std::stoull aborted on them
                                        ("OPENCV_IO_MAX_IMAGE_PIXELS", "+5000000"),
                                        ("OPENCV_IO_MAX_IMAGE_PIXELS", "1_000000"),
                                        ("OPENCV_IO_MAX_IMAGE_PIXELS", "\u0661\u0662"),
                                        ("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**70))])
def test_an_unusable_environment_variable_is_named(name, value):
    """QUANTKIT_HISTOGRAM_WORKERS=abc was exit 1 on every command, without its name; a bad
    OPENCV_IO_MAX_IMAGE_PIXELS aborted the process in OpenCV (SIGABRT, a C++ message)."""
    from quantkit import sample

    proc = subprocess.run([sys.executable, "-m", "quantkit", "inspect", str(sample.model_path())],
                          env={**os.environ, name: value}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{name}={value!r}" in proc.stderr and "Traceback" not in proc.stderr


def test_opencv_reads_the_pixel_limit_quantkit_read():
    """A value with spaces around it is quantkit's number; OpenCV gets it as plain digits."""
    proc = subprocess.run([sys.executable, "-c", "import os, quantkit, cv2; print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"],
                          env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": " 12 "}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "12", proc.stderr


def test_inspect_reads_a_large_file_named_cache_only_as_far_as_its_first_line(tmp_path, capsys):
    """A 3 GB file named .cache was read whole as text (6.3 GB of memory, 20 s)."""
    big = tmp_path / "big.cache"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)  # sparse: nothing is written
    assert main(["inspect", str(big)]) == 2
    assert "is not 'TRT-<version>-<Algorithm>'" in _err_line(capsys.readouterr().err)
    tagged = tmp_path / "tagged.cache"
    with open(tagged, "wb") as fh:
        fh.write(b"TRT-8600-EntropyCalibration2\n")
        fh.truncate(100 << 20)
    assert main(["inspect", str(tagged)]) == 2
    assert "larger than 64 MiB" in _err_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, said", [
    (["bench", "{model}", "--warmup", "-1"], "argument --warmup"),  # ran with exit 0
    (["debug", "{model}", "{model}", "--npz", "{npz}", "-o", "{out}", "--rows", "-1"], "argument --rows"),  # a row less
    (["debug", "{model}", "{model}", "--npz", "{npz}", "-o", "{out}", "--rows", "0"], "argument --rows"),
])
def test_count_flags_out_of_range_are_refused(argv, said, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    fill = {"model": str(sample.model_path()), "npz": str(tmp_path / "d.npz"), "out": str(tmp_path / "o")}
    with pytest.raises(SystemExit) as e:
        main([a.format(**fill) for a in argv])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["quantkit", "quantkit.cli"])
def test_both_module_entry_points_run(module):
    """`python -m quantkit.cli` said "No module named quantkit.cli.__main__" (the package is the CLI)."""
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "quantkit" in proc.stdout + proc.stderr


def test_a_tensor_name_with_a_line_break_is_refused_before_the_work(tmp_path, capsys):
    """A Conv output named "a\\nTRT-1-Evil\\nfoo" was written into the cache as three lines (quantkit's
    own reader refused the result; a name "x\\nother: 7f7fffff" would set another tensor's scale)."""
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    evil = "a\nTRT-1-Evil\nfoo"
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["h"], name="c", pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["h"], [evil], name="relu"),
                           helper.make_node("Conv", [evil, "w2"], ["y"], name="c2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [w, numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32))
    rc = main(["calibrate", str(tmp_path / "m.onnx"), "--npz", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
               "--no-progress", "--eval-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "has a line break in its name" in _err_line(err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    from quantkit.calibrators.cache import CalibrationCache
    from quantkit.errors import ModelError

    with pytest.raises(ModelError, match="line break"):  # the writer itself refuses (merge-stats, the API)
        CalibrationCache.from_amax({"x\nother": 1.0}, "entropy").to_text()


@pytest.mark.slow
def test_control_characters_in_file_names_are_escaped(small_digits, tmp_path):
    """A file name may hold ESC, BEL and line breaks: warnings printed them raw (the terminal's title
    set, the screen cleared) and a line break started a forged line ("quantkit: done, exit 0")."""
    folder = tmp_path / "imgs"
    shutil.copytree(small_digits, folder)
    bad = "\x1b]0;TITLE\x07\x1b[2J\x9bred\nquantkit: done, exit 0.png"
    first = folder / sorted(p.name for p in folder.iterdir())[0]
    (first / "zz_corrupt.png").unlink()  # the one bad file, which --strict stops at
    (first / bad).write_bytes(b"garbage")
    for strict in ([], ["--strict"]):
        run = subprocess.run([sys.executable, "-m", "quantkit", "calibrate", str(sample.model_path()), "--images",
                              str(folder), "-o", str(tmp_path / f"o{len(strict)}"), "--eval-images", "0",
                              "--no-progress", *DIGITS, *strict], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert run.returncode == (2 if strict else 0), run.stderr
        assert "\\x1b]0;TITLE\\x07\\x1b[2J\\x9bred" in run.stderr
        assert not any(c in run.stderr for c in "\x1b\x07\x9b")
        assert not any(line.startswith("quantkit: done") for line in run.stderr.splitlines()), run.stderr
