"""Polygraphy interop: the loader feeds quantkit's own batches, and `polygraphy run` runs them."""

import importlib.util
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit import sample
from quantkit.datasets import Batcher, ImageFolder, ordered_indices
from quantkit.errors import InputError
from quantkit.interop import polygraphy as qp

PRE = sample.preprocess()
DIGITS = ["--model", str(sample.model_path()), "--preprocess", "none", "--color", "gray", "--scale", repr(1 / 255),
          "--mean", str(PRE.mean[0]), "--std", str(PRE.std[0])]


def _as_list(feeds):
    return [f["image"] for f in feeds]


def test_loader_yields_exactly_the_batchers_arrays(digits_dirs):
    test_dir = digits_dirs[1]
    feeds = qp.feeds_from_args([*DIGITS, "--images", str(test_dir), "--batch-size", "7", "--num-images", "40",
                                "--shuffle", "--seed", "3"])
    source = ImageFolder(str(test_dir), PRE, expected_hw=(32, 32))
    idx = ordered_indices(len(source), shuffle=True, seed=3)[:40]
    expected = [b.feed["image"] for b in Batcher(source, ["image"], 7, indices=idx)]
    got = _as_list(feeds)
    assert [a.shape[0] for a in got] == [7, 7, 7, 7, 7, 5]
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert all(np.array_equal(a, b) for a, b in zip(_as_list(feeds), expected))  # re-iterable
    dropped = qp.feeds_from_args([*DIGITS, "--images", str(test_dir), "--batch-size", "7", "--num-images", "40",
                                  "--drop-last"])
    assert len(dropped) == 5 and [a.shape[0] for a in _as_list(dropped)] == [7] * 5


def test_loader_takes_calibrates_default_sample_count(digits_dirs):
    from quantkit.cli.calibrate import DEFAULT_CALIBRATION_IMAGES

    feeds = qp.feeds_from_args([*DIGITS, "--images", str(digits_dirs[1])])  # 540 images, calibrate uses 512
    assert len(feeds.batcher.indices) == DEFAULT_CALIBRATION_IMAGES and len(feeds) == DEFAULT_CALIBRATION_IMAGES // 32


def test_args_from_env_parses_once_and_fails_readably():
    args = qp.args_from_env({qp.ENV_VAR: "--model 'my model.onnx' --images \"my images\" --batch-size 4"})
    assert (args.model, args.images, args.batch_size) == ("my model.onnx", "my images", 4)
    with pytest.raises(InputError, match="QUANTKIT_DATA_ARGS is not set"):
        qp.args_from_env({})
    with pytest.raises(InputError, match="not a valid flag string"):
        qp.args_from_env({qp.ENV_VAR: "--model 'unclosed"})
    with pytest.raises(InputError, match="unrecognized arguments: --bogus"):
        qp.args_from_env({qp.ENV_VAR: "--model m.onnx --images d --bogus"})
    with pytest.raises(InputError, match="--model"):
        qp.args_from_env({qp.ENV_VAR: "--images d"})


def test_load_data_reads_the_environment(digits_dirs, monkeypatch):
    monkeypatch.setenv(qp.ENV_VAR, " ".join([*DIGITS, "--images", str(digits_dirs[1]), "--num-images", "10",
                                             "--batch-size", "4"]))
    assert [a.shape for a in _as_list(qp.load_data())] == [(4, 1, 32, 32), (4, 1, 32, 32), (2, 1, 32, 32)]


@pytest.mark.parametrize("name", ["json.py", "polygraphy.py", "calib-data.py", "calib_data.txt", "existing.py"])
def test_write_script_refuses_bad_names_and_existing_files(digits_dirs, tmp_path, capsys, name):
    (tmp_path / "existing.py").write_text("keep me\n")
    out = tmp_path / name
    before = out.read_text() if out.exists() else None
    assert qp.main([*DIGITS, "--images", str(digits_dirs[1]), "--write-script", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantkit: error: --write-script") and "Traceback" not in err
    assert (out.read_text() if out.exists() else None) == before


def test_write_script_checks_the_data_first(tmp_path, capsys):
    out = tmp_path / "calib_data.py"
    assert qp.main([*DIGITS, "--images", str(tmp_path / "missing"), "--write-script", str(out)]) == 2
    assert "quantkit: error:" in capsys.readouterr().err and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_written_script_error_is_one_line(digits_dirs, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(digits_dirs[1] / "3", images / "3")
    monkeypatch.chdir(tmp_path)
    assert qp.main([*DIGITS, "--images", "images", "--write-script", "calib_data.py"]) == 0
    load_data = runpy.run_path(str(tmp_path / "calib_data.py"))["load_data"]
    assert sum(f["image"].shape[0] for f in load_data()) == len(list((images / "3").iterdir()))
    shutil.rmtree(images)
    with pytest.raises(SystemExit) as exit_:
        load_data()
    assert str(exit_.value.code).startswith("quantkit: error:") and "images" in str(exit_.value.code)


def _polygraphy() -> str | None:
    beside = Path(sys.executable).parent / "polygraphy"
    return str(beside) if beside.exists() else shutil.which("polygraphy")


@pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None or _polygraphy() is None,
                    reason="polygraphy is not installed (pip install polygraphy)")
def test_polygraphy_run_feeds_from_the_written_script(digits_dirs, tmp_path, monkeypatch):
    from polygraphy.json import load_json

    monkeypatch.chdir(digits_dirs[1].parent)  # a relative --images, resolved where the script was written
    script = tmp_path / "calib_data.py"
    flags = [*DIGITS, "--images", digits_dirs[1].name, "--batch-size", "16", "--num-images", "50"]
    assert qp.main([*flags, "--write-script", str(script)]) == 0
    saved = tmp_path / "inputs.json"
    run = subprocess.run([_polygraphy(), "run", str(sample.model_path()), "--onnxrt", "--data-loader-script",
                          script.name, "--save-inputs", str(saved)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr
    fed = [f["image"] for f in load_json(str(saved))]
    assert [a.shape[0] for a in fed] == [16, 16, 16, 2]  # 50 images, 4 iterations
    expected = _as_list(qp.feeds_from_args(flags))
    assert all(np.array_equal(a, b) for a, b in zip(fed, expected))


def test_write_script_again_in_the_working_folder_says_it_exists(digits_dirs, tmp_path, monkeypatch, capsys):
    """The second run in the same folder: the script is there, and importable from the working
    folder; the message says it exists (it said Python had a module of that name)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [*DIGITS, "--images", str(digits_dirs[1]), "--num-images", "8", "--write-script", "calib_data.py"]
    assert qp.main(args) == 0
    before = (tmp_path / "calib_data.py").read_bytes()
    capsys.readouterr()
    assert qp.main(args) == 2
    assert "exists; quantkit does not overwrite it" in capsys.readouterr().err
    assert (tmp_path / "calib_data.py").read_bytes() == before


@pytest.mark.parametrize("folder", ['x"""+__import__("os").system("touch PWNED")+"""', "we\\Nird", "new\nline"])
def test_a_model_path_in_the_script_is_never_code(digits_dirs, tmp_path, monkeypatch, folder):
    """The model's path went into the script's docstring as it was: a folder named with '\"\"\"'
    ran code when Polygraphy imported the script, a backslash made it a SyntaxError."""
    model = tmp_path / folder / "m.onnx"
    model.parent.mkdir()
    shutil.copy(sample.model_path(), model)
    monkeypatch.chdir(tmp_path)
    flags = [*DIGITS[2:], "--model", str(model), "--images", str(digits_dirs[1]), "--num-images", "4"]
    assert qp.main([*flags, "--write-script", "calib_data.py"]) == 0
    load_data = runpy.run_path(str(tmp_path / "calib_data.py"))["load_data"]
    assert not (tmp_path / "PWNED").exists()
    assert sum(f["image"].shape[0] for f in load_data()) == 4


def test_write_script_refuses_a_path_inside_the_data_and_unwritable_paths(digits_dirs, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(digits_dirs[1] / "3", images / "3")
    before = sorted(p.name for p in images.rglob("*"))
    assert qp.main([*DIGITS, "--images", str(images), "--write-script", str(images / "calib_in.py")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in images.rglob("*")) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert qp.main([*DIGITS, "--images", str(images), "--write-script", str(blocker / "calib_x.py")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
