"""Property-based fuzzing of the CLI (issue 11, item 13).

Every property runs ``quantkit.cli.main`` in-process on inputs that hypothesis generates (random
ONNX graphs, image folders of valid/truncated/random files with odd names, random flag
combinations) and checks the invariants of tests/strategies.py:

- exit status 0, 1 or 2 only (calibrate, bench, inspect and report: 0 or 2; compare: 1 only for
  --min-cosine); never a traceback without --debug;
- exit 2 is one ``quantkit: error:`` line plus at most one ``  hint:`` line. argparse's own
  usage errors count too: the CLI's parser prints them in that form (quantkit.cli._Parser);
- every input file is byte-identical afterwards, nothing is deleted;
- the output folder is unchanged on failure and complete on success (manifest hashes), no
  staging files are left beside it, and the written Q/DQ model loads and runs in ONNX Runtime
  with the FP32 model's inputs and outputs.

Budgets are small so the file runs in about a minute on 2 cores; ``QUANTKIT_FUZZ_SCALE=10``
runs ten times as many examples. Runs are derandomized (reproducible in CI). Per-property counts
and outcomes: ``pytest tests/unit/test_fuzz.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from quantkit.cli import main
from tests.strategies import (
    budget,
    check_cli_result,
    check_output_folder,
    check_qdq_model,
    fuzz_scale,
    image_folders,
    model_is_valid,
    no_staging_left,
    onnx_models,
    tree_hashes,
)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=budget(examples), deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured; argparse's SystemExit becomes the status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return rc, out.getvalue(), err.getvalue()


def outcome(rc: int, err: str, tmp: Path | str | None = None) -> None:
    """Record the exit status, and for errors the message (paths cut), in the statistics."""
    first = err.strip().splitlines()[0] if err.strip() else ""
    if tmp is not None:
        first = first.replace(str(tmp), "TMP")
    event(f"exit {rc}" + (f": {first[:60]}" if rc else ""))


def color_args(channels: int) -> list[str]:
    return ["--color", "gray"] if channels == 1 else []


def write_npz(path: Path, rng: np.random.Generator, shape: list[int], dtype: str = "float32") -> Path:
    np.save(path, rng.standard_normal(shape).astype(dtype))
    return path


def test_fuzz_scale_parsing():
    assert fuzz_scale({}) == 1.0
    assert fuzz_scale({"QUANTKIT_FUZZ_SCALE": "10"}) == 10.0
    for bad in ("0", "-1", "ten", "nan"):
        with pytest.raises(ValueError, match="QUANTKIT_FUZZ_SCALE"):
            fuzz_scale({"QUANTKIT_FUZZ_SCALE": bad})


# ------------------------------------------------------------------ random models, valid flags

@fuzz_settings(300)
@given(gen=onnx_models(), method=st.sampled_from(["entropy", "minmax", "percentile", "mse", "auto", "entropy-trt"]),
       target=st.sampled_from(["tensorrt", "onnxruntime"]), data=st.sampled_from(["images", "npz"]),
       n=st.integers(1, 6), batch_size=st.integers(1, 4), cache_all=st.booleans(), seed=st.integers(0, 99))
def test_calibrate_random_models(gen, method, target, data, n, batch_size, cache_all, seed):
    """Any small valid model calibrates (exit 0, a Q/DQ model ONNX Runtime runs, I/O kept) or is
    refused with one line (exit 2): never exit 1."""
    assume(model_is_valid(gen.model))
    event(f"opset {gen.opset}, weights as {gen.weights}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.onnx"
        onnx.save(gen.model, model_path)
        rng = np.random.default_rng(seed)
        if data == "images":
            src = tmp / "imgs"
            src.mkdir()
            import cv2

            for i in range(n):
                img = rng.integers(0, 256, (gen.size + 3, gen.size + 5, 3), dtype=np.uint8)
                cv2.imwrite(str(src / f"{i}.png"), img)
            data_args = ["--images", str(src), *color_args(gen.channels)]
        else:
            b = gen.batch if isinstance(gen.batch, int) else 1
            src = write_npz(tmp / "x.npy", rng, [max(n, b), gen.channels, gen.size, gen.size])
            data_args = ["--npz", str(src)]
        out = tmp / "out"
        before = tree_hashes(model_path, src)
        argv = ["calibrate", str(model_path), *data_args, "-o", str(out), "--method", method, "--target", target,
                "--batch-size", str(batch_size), "--eval-images", "2", "--threads", "1", "--no-progress",
                *(["--cache-all-tensors"] if cache_all else [])]
        rc, _, err = run_cli(argv)
        outcome(rc, err, tmp)
        check_cli_result(rc, err, debug=False, allowed=(0, 2))
        assert tree_hashes(model_path, src) == before, "an input was changed"
        check_output_folder(out, None, rc)
        assert no_staging_left(tmp) == []
        if rc == 0:
            check_qdq_model(out / "model.int8.onnx", gen.model)


# ------------------------------------------------------------------ random image folders

@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """x[N,3,8,8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N,3]."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(r.standard_normal((3, 4)).astype(np.float32), "wg")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("fuzz") / "small.onnx"
    onnx.save(model, path)
    return path


@fuzz_settings(250)
@given(folder=image_folders(), strict=st.booleans(), shuffle=st.booleans(),
       num_images=st.sampled_from([None, 1, 3, 20]), eval_images=st.sampled_from(["0", "2"]),
       preprocess=st.sampled_from([[], [], ["--preprocess", "none"], ["--preprocess", "none", "--resize", "8", "--crop", "8"],
                                   ["--color", "bgr", "--resize", "9"], ["--color", "gray"], ["--layout", "nhwc"]]),
       eval_dir=st.booleans())
def test_calibrate_random_image_folders(small_model, folder, strict, shuffle, num_images, eval_images,
                                        preprocess, eval_dir):
    """Image folders of mixed valid, truncated, random and empty files with odd names: exit 0 or
    one-line exit 2; no input changed; the output complete or absent."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = folder.write(tmp / "images")
        out = tmp / "out"
        before = tree_hashes(small_model, root)
        argv = ["calibrate", str(small_model), "--images", str(root), "-o", str(out), "--eval-images", eval_images,
                "--threads", "1", "--no-progress", *preprocess,
                *(["--strict"] if strict else []), *(["--shuffle"] if shuffle else []),
                *(["--num-images", str(num_images)] if num_images else []),
                *(["--eval-dir", str(root)] if eval_dir else [])]
        rc, _, err = run_cli(argv)
        outcome(rc, err, tmp)
        check_cli_result(rc, err, debug=False, allowed=(0, 2))
        assert tree_hashes(small_model, root) == before, "an input was changed"
        check_output_folder(out, None, rc)
        assert no_staging_left(tmp) == []
        if rc == 0:
            check_qdq_model(out / "small.int8.onnx", onnx.load(small_model))


# ------------------------------------------------------------------ random flag values

_FLAG_VALUES: dict[str, list[str]] = {
    "--method": ["entropy", "minmax", "mse", "bogus", ""],
    "--percentile": ["99.9", "100", "0", "101", "nan", "-5", "x"],
    "--num-bins": ["256", "2048", "300", "0", "-1", "1e3"],
    "--batch-size": ["1", "3", "0", "-2", "two"],
    "--num-images": ["1", "4", "1000", "0"],
    "--seed": ["0", "-1", "7", "x"],
    "--preprocess": ["imagenet", "none", "other"],
    "--resize": ["8", "10", "0", "-3"],
    "--crop": ["8", "8x8", "6x8", "0", "8x8x8", "axb"],
    "--mean": ["0.5", "0.1,0.2,0.3", "0.1,0.2", "nan", "x"],
    "--std": ["1", "0", "0.2,0.2,0.2", "-1", "inf"],
    "--scale": ["0.0039", "0", "1e30", "nan", "-1"],
    "--color": ["rgb", "bgr", "gray", "cmyk"],
    "--layout": ["nchw", "nhwc", "chw"],
    "--target": ["tensorrt", "onnxruntime", "cpu"],
    "--histogram-stride": ["1", "5", "0"],
    "--eval-images": ["0", "2", "-1", "x"],
    "--trt-version": ["10.13.0", "8.6.1", "10", "x.y", ""],
    "--threads": ["1", "0"],
}
_SWITCHES = ["--shuffle", "--strict", "--cache-all-tensors", "--force", "--debug", "--verbose", "--no-progress"]


@st.composite
def calibrate_argv(draw: st.DrawFn) -> tuple[list[str], bool]:
    flags = draw(st.lists(st.sampled_from(sorted(_FLAG_VALUES)), max_size=5, unique=True))
    argv: list[str] = []
    for f in flags:
        argv += [f, draw(st.sampled_from(_FLAG_VALUES[f]))]
    switches = draw(st.lists(st.sampled_from(_SWITCHES), max_size=3, unique=True))
    return argv + switches, "--debug" in switches


@fuzz_settings(400)
@given(args=calibrate_argv(), model_kind=st.sampled_from(["model", "model", "model", "missing", "folder", "empty",
                                                           "garbage", "truncated"]),
       out_kind=st.sampled_from(["new", "new", "empty-dir", "user-dir", "file", "inside-images", "model"]),
       images_kind=st.sampled_from(["images", "images", "missing", "file", "npz"]))
def test_calibrate_random_flags(small_model, args, model_kind, out_kind, images_kind):
    """Random flag values (valid and not), broken model files, clashing outputs: exit 0 or 2,
    one line; inputs and a pre-existing output untouched."""
    argv, debug = args
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = small_model.read_bytes()
        model = {"model": small_model, "missing": tmp / "nope.onnx", "folder": tmp,
                 "empty": tmp / "empty.onnx", "garbage": tmp / "garbage.onnx",
                 "truncated": tmp / "trunc.onnx"}[model_kind]
        if model_kind == "empty":
            model.write_bytes(b"")
        elif model_kind == "garbage":
            model.write_bytes(bytes(range(256)) * 3)
        elif model_kind == "truncated":
            model.write_bytes(data[: len(data) // 2])
        images = tmp / "imgs"
        import cv2

        images.mkdir()
        for i in range(4):
            cv2.imwrite(str(images / f"{i}.png"), np.full((10, 12, 3), 40 * i, np.uint8))
        if images_kind == "npz":
            data_args = ["--npz", str(write_npz(tmp / "x.npy", np.random.default_rng(0), [4, 3, 8, 8]))]
        else:
            src = {"images": images, "missing": tmp / "no-images", "file": small_model}[images_kind]
            data_args = ["--images", str(src)]
        out = {"new": tmp / "out", "empty-dir": tmp / "empty-out", "user-dir": tmp / "user-out",
               "file": tmp / "out.txt", "inside-images": images / "out", "model": model}[out_kind]
        if out_kind == "empty-dir":
            out.mkdir()
        elif out_kind == "user-dir":
            out.mkdir()
            (out / "mine.txt").write_text("user data")
        elif out_kind == "file":
            out.write_text("user file")
        inputs = [p for p in (small_model, model, images, tmp / "x.npy") if p.exists()]
        before_in, before_out = tree_hashes(*inputs), tree_hashes(out)
        rc, _, err = run_cli(["calibrate", str(model), *data_args, "-o", str(out), "--threads", "1", *argv])
        outcome(rc, err, tmp)
        check_cli_result(rc, err, debug=debug, allowed=(0, 2))
        assert tree_hashes(*inputs) == before_in, "an input was changed"
        if out_kind not in ("model", "inside-images"):  # those are inputs (checked above)
            check_output_folder(out, before_out, rc)
        assert no_staging_left(tmp) == []


# ------------------------------------------------------------------ other commands

@st.composite
def other_argv(draw: st.DrawFn, paths: dict[str, str]) -> tuple[list[str], bool]:
    command = draw(st.sampled_from(["compare", "bench", "inspect", "report"]))
    path = st.sampled_from(sorted(paths.values()))
    argv = [command]
    if command == "compare":
        argv += [draw(path), draw(path), "--images" if draw(st.booleans()) else "--npz", draw(path)]
        for f, vals in (("--min-cosine", ["0.5", "0.9999", "nan", "2", "x"]), ("--json", ["new", "model", "exists"]),
                        ("--num-images", ["1", "3", "99", "0"]), ("--batch-size", ["1", "2", "0"]),
                        ("--preprocess", ["none", "imagenet"]), ("--color", ["gray", "rgb"])):
            if draw(st.booleans()):
                argv += [f, draw(st.sampled_from(vals))]
    elif command == "bench":
        argv += [draw(path)]
        for f, vals in (("--batch", ["1", "2", "0", "x"]), ("--shapes", ["x=2x3x8x8", "x=1x3x9x9", "y=1", "x", "x=a"]),
                        ("--warmup", ["0", "1", "-1"]), ("--iterations", ["1", "2", "0"]),
                        ("--duration", ["0", "-1", "nan"]), ("--json", ["new", "model", "exists"]),
                        ("--streams", ["1", "2"])):
            if draw(st.booleans()):
                argv += [f, draw(st.sampled_from(vals))]
        if "--iterations" not in argv:
            argv += ["--iterations", "2", "--warmup", "1"]
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(["--cuda-graph", "--no-transfers"])))
    elif command == "inspect":
        argv += [draw(path)]
    else:
        argv += draw(st.lists(path, min_size=1, max_size=3)) + ["-o", draw(st.sampled_from(["new", "model", "exists"]))]
        if draw(st.booleans()):
            argv.append("--force")
    argv = [paths.get(a, a) if a in ("new", "model", "exists") else a for a in argv]
    debug = draw(st.booleans()) and draw(st.booleans())
    return argv + (["--debug"] if debug else []), debug


@pytest.fixture(scope="module")
def other_inputs(small_model, tmp_path_factory) -> dict[str, str]:
    """A model, its Q/DQ model, a cache, result JSON files, images, and broken files."""
    root = tmp_path_factory.mktemp("fuzz-other")
    images = root / "images"
    images.mkdir()
    import cv2

    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((8, 8, 3), 60 * i, np.uint8))
    out = root / "cal"
    assert run_cli(["calibrate", str(small_model), "--images", str(images), "-o", str(out), "--preprocess", "none",
                    "--eval-images", "2", "--no-progress", "--threads", "1"])[0] == 0
    np.save(root / "x.npy", np.zeros((3, 3, 8, 8), np.float32))
    (root / "garbage.onnx").write_bytes(b"\x00\x01garbage")
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[1, 2]")
    (root / "exists.json").write_text("{}")
    return {"model": str(small_model), "int8": str(out / "small.int8.onnx"), "cache": str(out / "calibration.cache"),
            "ranges": str(out / "ranges.json"), "report": str(out / "report.json"), "images": str(images),
            "npz": str(root / "x.npy"), "garbage": str(root / "garbage.onnx"), "empty": str(root / "empty.json"),
            "list": str(root / "list.json"), "exists": str(root / "exists.json"), "missing": str(root / "missing"),
            "folder": str(out), "new": str(root / "new-output")}


@fuzz_settings(400)
@given(data=st.data())
def test_other_commands_random_args(other_inputs, data):
    """compare, bench, inspect and report on random mixes of models, caches, results and broken
    files: exit 0 or one-line 2 (compare: 1 only for --min-cosine); inputs untouched."""
    import shutil

    argv, debug = data.draw(other_argv(other_inputs))
    event(argv[0])
    new = Path(other_inputs["new"])
    shutil.rmtree(new, ignore_errors=True)
    new.unlink(missing_ok=True)
    watched = [v for k, v in other_inputs.items() if k not in ("new", "missing")]
    before = tree_hashes(*watched)
    rc, out, err = run_cli(argv)
    outcome(rc, err, Path(other_inputs["new"]).parent)
    if argv[0] == "compare" and rc == 1:
        assert "--min-cosine" in argv and "FAILED" in out, err
    check_cli_result(rc, err, debug=debug, allowed=(0, 1, 2) if argv[0] == "compare" else (0, 2))
    assert tree_hashes(*watched) == before, "an input was changed"
    if rc != 0:
        assert not new.exists(), "a failed run left an output"


# ------------------------------------------------------------------ argv soup (parser only)

_TOKENS = ["calibrate", "compare", "bench", "inspect", "report", "build", "view", "demo", "qat-demo", "-o", "--output",
           "--images", "--npz", "--method", "entropy", "--batch-size", "0", "-1", "x", "--crop", "8x", "--help-me",
           "--", "-", "--debug", "--force", "--version", "missing.onnx", "ünï cödé", "--percentile", "1e999",
           "--num-bins", "--color", "--layout", "--shapes", "=", "--threads", "--seed", "--verbose", ""]


@fuzz_settings(500)
@given(argv=st.lists(st.sampled_from(_TOKENS), max_size=6))
def test_random_argv(argv):
    """Any token soup: exit 0/1/2 (0 only for --version/help), and argparse's usage errors are
    one ``quantkit: error:`` line plus a hint, like every other input error."""
    assume(not any(t in ("demo", "qat-demo", "view", "build") for t in argv[:1]))  # long-running or GPU commands
    debug = "--debug" in argv
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        rc, _, err = run_cli(argv)
        outcome(rc, err, tmp)
        check_cli_result(rc, err, debug=debug, allowed=(0, 2))
        assert sorted(p.name for p in Path(tmp).iterdir()) == [], "a failed run left files"


def test_usage_error_is_one_line_and_hint():
    """argparse's own errors follow the CLI's error format (exit 2, one line, a hint)."""
    rc, _, err = run_cli(["calibrate", "m.onnx", "--images", "d", "-o", "o", "--batch-size", "0"])
    assert rc == 2
    lines = err.splitlines()
    assert lines[0] == "quantkit: error: argument --batch-size: expected a positive number, got 0", lines
    assert lines[1] == "  hint: see `quantkit calibrate --help`", lines
    assert len(lines) == 2
