"""User data is sacred: outputs never over, into or around the inputs; --force replaces only
quantkit's own artifacts; the output is checked before the work; files follow the umask; the
results are on disk before anything is printed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit import sample
from quantkit._io import MANIFEST, output_dir, read_manifest
from quantkit.cli import main
from tests.helpers import DIGITS, snapshot

QUICK = ["--num-images", "32", "--eval-images", "0", "--batch-size", "16", *DIGITS]


@pytest.fixture
def project(tmp_path: Path, digits_dirs: tuple[Path, Path]) -> Path:
    """proj/model.onnx and proj/images/<class>/*.png: a user's project folder."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(sample.model_path(), proj / "model.onnx")
    for cls in ("0", "1", "2"):
        dst = proj / "images" / cls
        dst.mkdir(parents=True)
        for png in sorted((digits_dirs[0] / cls).glob("*.png"))[:16]:
            shutil.copy(png, dst / png.name)
    return proj


def calibrate(proj: Path, out: Path | str, *extra: str) -> int:
    return main(["calibrate", str(proj / "model.onnx"), "--images", str(proj / "images"), "-o", str(out),
                 *QUICK, *extra])


# ------------------------------------------------------------------ 1. --force and the inputs
@pytest.mark.parametrize("where", ["project", "images", "inside-images", "model-file"])
def test_force_never_writes_over_into_or_around_inputs(project, where, capsys):
    before = snapshot(project)
    out = {"project": project, "images": project / "images", "inside-images": project / "images" / "0" / "q",
           "model-file": project / "model.onnx"}[where]
    assert calibrate(project, out, "--force") == 2
    err = capsys.readouterr().err
    assert "input" in err or "not a folder" in err
    assert len(err.strip().splitlines()) <= 2  # one line and a hint
    assert snapshot(project) == before
    assert not (project / "images" / "0" / "q").exists()


def test_report_refuses_its_own_inputs_as_output(project, tmp_path, capsys):
    res = tmp_path / "res"
    assert calibrate(project, res) == 0
    before = snapshot(res)
    assert main(["report", str(res), "-o", str(res), "--force"]) == 2
    assert "input" in capsys.readouterr().err
    assert snapshot(res) == before


def test_force_keeps_files_quantkit_did_not_write(project, tmp_path, capsys):
    out = tmp_path / "out"
    assert calibrate(project, out) == 0
    first = read_manifest(out)
    assert first is not None and "ranges.json" in first["files"]
    (out / "notes.txt").write_text("mine")
    (out / "old.int8.onnx").write_bytes(b"a file of the user's that looks like an artifact")
    assert calibrate(project, out, "--force", "--method", "minmax") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "old.int8.onnx").read_bytes().startswith(b"a file of the user's")
    assert json.loads((out / "ranges.json").read_text())["method"] == "minmax"
    assert set(read_manifest(out)["files"]) == set(first["files"])  # notes.txt is not claimed


def test_force_refuses_a_folder_without_manifest(project, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "ranges.json").write_text("{}")  # a user's file with an artifact's name
    before = snapshot(out)
    assert calibrate(project, out, "--force") == 2
    assert "did not write" in capsys.readouterr().err
    assert snapshot(out) == before


def test_force_refuses_an_artifact_the_user_changed(project, tmp_path, capsys):
    out = tmp_path / "out"
    assert calibrate(project, out) == 0
    (out / "ranges.json").write_text('{"edited": true}')
    before = snapshot(out)
    assert calibrate(project, out, "--force") == 2
    assert "ranges.json" in capsys.readouterr().err
    assert snapshot(out) == before


def test_force_removes_only_unchanged_stale_artifacts(tmp_path):
    out = tmp_path / "o"
    with output_dir(out, force=False) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
    (out / "user.txt").write_text("u")
    with output_dir(out, force=True) as tmp:
        (tmp / "a.txt").write_text("a2")
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.txt", "user.txt", MANIFEST])
    assert (out / "a.txt").read_text() == "a2"
    with output_dir(out, force=True) as tmp:  # stale files in sub-folders: the folders they leave empty go too
        (tmp / "a.txt").write_text("a3")
        (tmp / "images" / "0").mkdir(parents=True)
        (tmp / "images" / "0" / "x.png").write_text("x")
        (tmp / "images" / "1").mkdir()
        (tmp / "images" / "1" / "y.png").write_text("y")
    (out / "images" / "1" / "mine.txt").write_text("the user's")
    with output_dir(out, force=True) as tmp:
        (tmp / "a.txt").write_text("a4")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        ["a.txt", "user.txt", MANIFEST, "images", "images/1", "images/1/mine.txt"])


def test_ctrl_c_while_a_folder_is_moved_in_place_leaves_one_whole_run(tmp_path, monkeypatch):
    # files are renamed into an existing folder one by one: a Ctrl-C after the first rename left a
    # new model beside the old cache and manifest (the next --force refused the folder); it is now
    # delivered once the run's files and manifest are all in place
    import signal

    import quantkit._io as qio

    out = tmp_path / "o"
    with output_dir(out, force=False) as tmp:
        for name in ("m.int8.onnx", "calibration.cache", "ranges.json"):
            (tmp / name).write_text(f"old {name}")
    renames: list[str] = []
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        renames.append(str(dst))
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(qio.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, force=True) as tmp:
            for name in ("m.int8.onnx", "calibration.cache", "ranges.json"):
                (tmp / name).write_text(f"new {name}")
    monkeypatch.undo()
    doc = read_manifest(out)
    assert doc is not None and sorted(doc["files"]) == ["calibration.cache", "m.int8.onnx", "ranges.json"]
    assert all((out / n).read_text() == f"new {n}" for n in doc["files"])
    assert all(qio._ours(out, doc, n) for n in doc["files"])
    with output_dir(out, force=True) as tmp:  # the folder is still quantkit's, whole
        (tmp / "m.int8.onnx").write_text("newer")


@pytest.mark.parametrize("entry", ["../victim.txt", "ABS", "sub/../../victim.txt"])
def test_force_never_removes_what_a_manifest_lists_outside_the_folder(project, tmp_path, entry, capsys):
    """A manifest is a file in the user's folder, not a license: entries outside -o (``..``, an
    absolute path) with the right hash were removed as stale artifacts by --force, the input
    model among them. Such a manifest is not quantkit's: the folder is refused, nothing removed."""
    import hashlib

    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    assert calibrate(project, out) == 0
    victim.write_text("the user's thesis")
    name = str(victim) if entry == "ABS" else entry
    doc = read_manifest(out)
    doc["files"][name] = {"sha256": hashlib.sha256(victim.read_bytes()).hexdigest(), "size": victim.stat().st_size}
    model = project / "model.onnx"
    doc["files"]["../proj/model.onnx"] = {"sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "size": 1}
    (out / MANIFEST).write_text(json.dumps(doc))
    before, outside = snapshot(out), snapshot(project)
    assert calibrate(project, out, "--force") == 2
    assert "not one quantkit wrote" in capsys.readouterr().err
    assert victim.read_text() == "the user's thesis" and snapshot(project) == outside and snapshot(out) == before


def test_force_never_removes_the_exclude_from_file(project, tmp_path, capsys):
    """`debug --rank -o dbg`, then `calibrate -o dbg --force --exclude-from dbg/debug.json`: the
    ranking file is an input (it was removed as a stale artifact)."""
    dbg = tmp_path / "dbg"
    with output_dir(dbg, force=False) as tmp:
        (tmp / "debug.json").write_text(json.dumps({"sensitivity": {"rows": []}}))
    before = snapshot(dbg)
    assert calibrate(project, dbg, "--force", "--exclude-from", str(dbg / "debug.json"), "--top", "1") == 2
    assert "input" in capsys.readouterr().err
    assert snapshot(dbg) == before


def test_save_stats_is_never_written_through_a_symlink_or_over_the_output(project, tmp_path, capsys):
    out = tmp_path / "out"
    assert calibrate(project, out) == 0
    (out / "data").symlink_to(project / "images", target_is_directory=True)
    before = snapshot(project)
    assert calibrate(project, out, "--force", "--save-stats", str(out / "data" / "s.qkstats")) == 2
    assert "symlink" in capsys.readouterr().err
    assert snapshot(project) == before
    assert calibrate(project, tmp_path / "o2", "--save-stats", str(tmp_path / "o2")) == 2
    assert "is the output folder" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_single_file_outputs_never_overwrite_inputs(project, tmp_path, capsys):
    model = project / "model.onnx"
    before = snapshot(project)
    assert main(["compare", str(model), str(model), "--images", str(project / "images"), "--json", str(model),
                 "--force", *DIGITS]) == 2
    assert main(["bench", str(model), "--json", str(model), "--force", "--iterations", "1"]) == 2
    assert snapshot(project) == before
    existing = tmp_path / "b.json"
    existing.write_text("keep")
    assert main(["bench", str(model), "--json", str(existing), "--iterations", "1", "--warmup", "0"]) == 2
    assert existing.read_text() == "keep"


def test_force_replaces_only_an_earlier_result_of_the_same_command(project, tmp_path, capsys):
    # `--json FILE --force` replaces an earlier compare's (bench's) JSON, never a user's file, another
    # command's result or a file of a calibrate folder (its manifest would then fail --force there)
    model, res = project / "model.onnx", tmp_path / "res"
    assert calibrate(project, res) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    bench = ["bench", str(model), "--iterations", "2", "--warmup", "0", "--force", "--json"]
    compare = ["compare", str(model), str(res / "model.int8.onnx"), "--images", str(project / "images"),
               "--num-images", "16", *DIGITS, "--force", "--json"]
    before = snapshot(res)
    for argv in (bench + [str(notes)], compare + [str(notes)], compare + [str(res / "ranges.json")],
                 bench + [str(res / "calibration.cache.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) <= 2 and ("is not an earlier" in err or "files quantkit wrote" in err), err
    assert notes.read_text() == "my precious notes" and snapshot(res) == before
    assert calibrate(project, res, "--force") == 0  # the folder is still quantkit's, whole
    b, c = tmp_path / "b.json", tmp_path / "c.json"
    assert main(bench[:-1] + ["--json", str(b)]) == 0 and main(bench + [str(b)]) == 0
    assert main(compare[:-1] + ["--json", str(c)]) == 0 and main(compare + [str(c)]) == 0
    assert main(bench + [str(c)]) == 2 and json.loads(c.read_text())["test"]  # a compare result stays one


# ------------------------------------------------------------------ 2. checked before the work
@pytest.mark.parametrize("name", ["model.int8.onnx", "ranges.json", "report.json"])
def test_force_refuses_a_users_file_of_an_artifacts_name_before_the_work(project, tmp_path, monkeypatch, capsys,
                                                                         name):
    # an earlier run's folder with the user's own file named like one of this run's artifacts:
    # refused before calibrating (it was refused only when the files were moved in), the file kept
    import quantkit.ptq

    out = tmp_path / "out"
    assert calibrate(project, out) == 0
    (out / name).unlink(missing_ok=True)
    (out / name).write_text("the user's own")
    before = snapshot(out)

    def no_work(*a, **k):
        raise AssertionError("calibrated before the output was checked")

    monkeypatch.setattr(quantkit.ptq, "quantize", no_work)
    eval_images = ["--eval-images", "8"] if name == "report.json" else []
    assert calibrate(project, out, "--force", *eval_images) == 2
    err = capsys.readouterr().err
    assert f"{name}' exists and was not written by quantkit" in err or "changed since" in err, err
    assert snapshot(out) == before
def test_output_below_a_file_is_refused_before_work(project, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert calibrate(project, blocker / "out") == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "calibrat" not in err.split("error:")[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to check as another user")
def test_unwritable_folder_is_refused(tmp_path):
    """As an ordinary user (a forked child that drops to nobody): a folder without write
    permission is refused by the check that runs before the work."""
    from quantkit._io import check_output_dir
    from quantkit.errors import InputError

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, report through the pipe
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                check_output_dir(locked / "out", force=False)
                msg = "no error"
            except InputError as err:
                msg = f"InputError: {err}"
            except BaseException as err:  # noqa: BLE001
                msg = f"{type(err).__name__}: {err}"
            os.write(write, msg.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        msg = fh.read()
    os.waitpid(pid, 0)
    assert msg.startswith("InputError:") and "permission denied" in msg, msg
    assert list(locked.iterdir()) == []


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_file_system_is_refused(project, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert calibrate(project, ro / "out") == 2
        assert "read-only file system" in capsys.readouterr().err


def test_full_disk_is_refused_before_the_work(project, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=64k") as small:  # the INT8 model alone is ~55 KB
        (small / "filler").write_bytes(b"\0" * 40_000)
        assert calibrate(project, small / "out") == 2
        assert "not enough space" in capsys.readouterr().err
        assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_immutable_folder_is_refused(project, tmp_path, capsys):
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert calibrate(project, frozen) == 2
        assert "cannot write into" in capsys.readouterr().err
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=False)


def test_empty_mount_point_is_written_in_place(project, tmp_path):
    """A mount point cannot be renamed (EBUSY): an existing empty folder is filled file by file."""
    with tmpfs(tmp_path / "mnt", "size=8m") as mnt:
        inode = mnt.stat().st_ino
        assert calibrate(project, mnt) == 0
        assert mnt.stat().st_ino == inode
        names = sorted(p.name for p in mnt.iterdir())
        assert names == sorted(["calibration.cache", "calibration.cache.json", "model.int8.onnx", "ranges.json",
                                MANIFEST])
        assert set(read_manifest(mnt)["files"]) == set(names) - {MANIFEST}


# ------------------------------------------------------------------ 3. umask
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_artifacts_follow_the_umask(project, tmp_path, mask):
    old = os.umask(mask)
    try:
        assert calibrate(project, tmp_path / "new" / "out") == 0
        existing = tmp_path / "existing"
        existing.mkdir()
        existing.chmod(0o755)
        assert calibrate(project, existing) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", tmp_path / "new" / "out"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
    assert existing.stat().st_mode & 0o777 == 0o755
    for f in [*(tmp_path / "new" / "out").iterdir(), *existing.iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


# ------------------------------------------------------------------ 4. results before output
def test_results_are_written_before_anything_is_printed(project, tmp_path):
    out = tmp_path / "out"
    code = "import sys; from quantkit.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "calibrate", str(project / "model.onnx"), "--images",
                             str(project / "images"), "-o", str(out), "--num-images", "32", "--eval-images", "16",
                             *DIGITS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line: `| head -0`
    proc.wait(timeout=120)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert (out / "report.json").is_file() and (out / "model.int8.onnx").is_file(), stderr
    assert read_manifest(out) is not None


# ------------------------------------------------------------------ 11. the demos
@pytest.mark.slow  # two demo runs, one writing 1257 PNGs: ~35 s on two busy cores
def test_demo_leaves_no_temporary_images(tmp_path, monkeypatch, caplog):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["demo", "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    assert list(scratch.iterdir()) == []
    assert main(["demo", "-o", str(tmp_path / "k"), "--keep-images", "--no-progress"]) == 0
    assert len(list((tmp_path / "k" / "images" / "train").rglob("*.png"))) == 1257
    assert "images/train/0/" in "".join(read_manifest(tmp_path / "k")["files"])
    # --force without --keep-images: the earlier run's images go (quantkit's, unchanged), said in one line
    mine = tmp_path / "k" / "images" / "mine.txt"
    mine.write_text("the user's")
    caplog.clear()  # the line is a logged warning: where it prints depends on the handler an earlier main() set up
    assert main(["demo", "-o", str(tmp_path / "k"), "--force", "--no-progress"]) == 0
    err = caplog.text
    assert "removed 1797 file(s) an earlier quantkit run wrote there and this one does not (images/)" in err, err
    assert [p.name for p in (tmp_path / "k" / "images").iterdir()] == ["mine.txt"]  # never the user's


def test_qat_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "mine.txt").write_text("x")
    assert main(["qat-demo", "--epochs", "1", "--qat-epochs", "1", "-o", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_save_stats_inside_outdir_is_an_artifact_and_never_an_input(project, tmp_path, capsys):
    out = tmp_path / "out"
    assert calibrate(project, out, "--save-stats", str(out / "stats.npz")) == 0
    assert "stats.npz" in read_manifest(out)["files"]
    before = snapshot(project)
    assert calibrate(project, tmp_path / "o2", "--save-stats", str(project / "model.onnx"), "--force") == 2
    assert "input" in capsys.readouterr().err
    assert snapshot(project) == before and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("name", ["model.int8.onnx", "ranges.json", "calibration.cache", MANIFEST])
def test_save_stats_never_takes_the_name_of_an_artifact(project, tmp_path, name, capsys):
    """Written inside -o under an artifact's name, the statistics replaced the INT8 model (exit 0)."""
    out = tmp_path / "out"
    assert calibrate(project, out, "--save-stats", str(out / name)) == 2
    assert "artifact" in capsys.readouterr().err
    assert not out.exists()


def test_force_replaces_only_a_statistics_file_as_save_stats(project, tmp_path, capsys):
    """--force refreshes -o; a user's file named as --save-stats stays (calibrate's --force help: never
    other files); an earlier statistics file is replaced."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert calibrate(project, tmp_path / "o1", "--save-stats", str(notes), "--force") == 2
    assert "not a quantkit statistics file" in capsys.readouterr().err
    assert notes.read_text() == "my notes" and not (tmp_path / "o1").exists()
    stats = tmp_path / "s.qkstats"
    assert calibrate(project, tmp_path / "o2", "--save-stats", str(stats)) == 0
    assert calibrate(project, tmp_path / "o2", "--save-stats", str(stats), "--force", "--method", "minmax") == 0


def test_force_never_replaces_another_commands_results(project, tmp_path, capsys):
    """report/debug --force into a calibration's folder removed its INT8 model, cache and ranges as
    stale artifacts (exit 0): a folder is replaced only by the command that wrote it."""
    out = tmp_path / "out"
    assert calibrate(project, out) == 0
    before = snapshot(out)
    assert calibrate(project, tmp_path / "other") == 0
    assert main(["report", str(tmp_path / "other"), "-o", str(out), "--force"]) == 2
    assert "holds the results of `quantkit calibrate`" in capsys.readouterr().err
    assert snapshot(out) == before
    assert calibrate(project, out, "--force") == 0  # the same command still replaces its own


def test_external_data_files_are_inputs(project, tmp_path, capsys):
    """A model's external data file is read: writing --json over it destroyed the weights."""
    import onnx

    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(str(project / "model.onnx")), str(ext / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    before = snapshot(ext)
    assert main(["bench", str(ext / "m.onnx"), "--json", str(ext / "m.data"), "--force", "--iterations", "1"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert snapshot(ext) == before


def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_work(project, tmp_path, capsys):
    """A 245-byte -o passed the checks, calibrated, and failed at the end ("File name too long")."""
    out = tmp_path / ("a" * 245)
    assert calibrate(project, out) == 2
    assert "bytes" in capsys.readouterr().err and not out.exists()
    assert main(["compare", str(project / "model.onnx"), str(project / "model.onnx"), "--images",
                 str(project / "images"), "--json", str(tmp_path / ("b" * 250)), *DIGITS]) == 2


def test_a_full_disk_leaves_neither_the_folder_nor_the_statistics_and_names_the_output(project, tmp_path, capsys,
                                                                                         monkeypatch):
    """--save-stats outside -o was written after the folder was committed, so a failure of either
    left the other (the folder complete, a rerun refused); a write() that failed named no file."""
    import errno

    from quantkit.ptq import Calibration

    def full(self, outdir, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Calibration, "save", full)
    stats = tmp_path / "elsewhere" / "s.qkstats"
    assert calibrate(project, tmp_path / "out", "--save-stats", str(stats)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "out" in err.splitlines()[0]
    assert not stats.exists() and not (tmp_path / "out").exists()
    assert not stats.parent.exists()  # the staged file is gone too, and the folder made for it


def test_an_interrupted_demo_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    """demo without -o made its temporary output folder first and left it behind when stopped
    (while saying that nothing partial was written)."""
    import tempfile

    import quantkit.cli.demo as demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_demo", stopped)
    assert main(["demo"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_folder_another_run_filled_meanwhile_is_said_so(tmp_path, monkeypatch):
    """Two runs into one new -o: the later one's rename met a full folder and said only
    'Directory not empty'; the other run's files stay as they were."""
    import quantkit._io as qio
    from quantkit._io import OutputError

    out = tmp_path / "out"
    real = os.replace

    def race(src, dst, *a, **k):
        if Path(dst) == out and not out.exists():  # the other run commits first
            out.mkdir()
            (out / "theirs.txt").write_text("other run")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(qio.os, "replace", race)
    with pytest.raises(OutputError, match="filled by another process"):
        with output_dir(out, force=False, command="quantkit calibrate") as staging:
            (staging / "mine.txt").write_text("this run")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_a_staged_file_that_is_not_committed_leaves_no_folders_it_made(tmp_path):
    """`--save-stats nd/x/s.qkstats` made nd/x before the work and left them, empty, when the run failed."""
    from quantkit._io import staged_file

    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError):
        with staged_file(tmp_path / "keep" / "nd" / "x" / "s.qkstats", b"stats"):
            raise RuntimeError("the run failed after the work")
    assert list((tmp_path / "keep").iterdir()) == []  # nd/x gone, the folder that was there stays
    with staged_file(tmp_path / "keep" / "nd" / "s.qkstats", b"stats") as commit:
        commit()
    assert (tmp_path / "keep" / "nd" / "s.qkstats").read_bytes() == b"stats"


def test_onnx_runtime_leaves_nothing_in_home_or_tmpdir(tmp_path):
    """ONNX Runtime 1.32 keeps telemetry files on Linux (a '.ses' in $TMPDIR, a device id and a
    database under ~/.cache/Microsoft) and uploads them: with quantkit loaded first it does neither,
    unless the user turns it on."""
    import subprocess
    import sys

    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "XDG_CACHE_HOME": str(tmp_path / "home" / ".cache")}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir()
    code = ("import quantkit, onnx, onnxruntime as ort; from onnx import helper as h\n"
            "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', 1, [1])],"
            " [h.make_tensor_value_info('y', 1, [1])])\n"
            "ort.InferenceSession(h.make_model(g).SerializeToString(), providers=['CPUExecutionProvider'])")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "home", tmp_path / "tmp"]
