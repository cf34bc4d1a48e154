"""quantkit._io on its own (test_output_safety.py covers the rules through the CLI): atomic
writes that leave the old file or nothing, modes from the umask, the manifest's read and
"ours" logic, and the checks made before the work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import quantkit._io as qio
from quantkit._io import (MANIFEST, OutputError, check_output_dir, check_output_file, current_umask, output_dir,
                          read_manifest, write_bytes_atomic, write_json_atomic)
from quantkit.errors import InputError, OutputExistsError


@pytest.fixture
def umask():
    """Set a umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027 and current_umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_the_umask(tmp_path, umask, mask):
    old = tmp_path / "f.bin"
    old.write_bytes(b"old")
    old.chmod(0o600)
    umask(mask)
    for p in (tmp_path / "new" / "f.bin", old):  # a new file (and folder), and a replaced one
        write_bytes_atomic(p, b"data")
        assert p.read_bytes() == b"data" and p.stat().st_mode & 0o777 == 0o666 & ~mask, p


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    target = tmp_path / "ranges.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(qio.os, "replace", fail)
    with pytest.raises(type(error)):
        write_bytes_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ranges.json"]


def test_write_json_atomic_round_trips(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    p = write_json_atomic(tmp_path / "o.json", obj)
    text = p.read_text()
    assert json.loads(text) == obj and text.endswith("}\n") and list(json.loads(text)) == ["b", "a"]


def _manifest(folder: Path, files: dict[str, bytes], **override) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    doc = {"tool": "quantkit", "version": "0", "command": "t",
           "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}}
    (folder / MANIFEST).write_text(json.dumps({**doc, **override}))


@pytest.mark.parametrize("content,readable", [
    (None, False), ("not json", False), ('["a list"]', False), ('{"tool": "other", "files": {}}', False),
    ('{"tool": "quantkit", "files": []}', False), ('{"tool": "quantkit", "files": {}}', True),
])
def test_read_manifest_accepts_only_quantkits(tmp_path, content, readable):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    assert (read_manifest(tmp_path) is not None) == readable


def test_ours_is_listed_unchanged_and_a_plain_file(tmp_path):
    _manifest(tmp_path, {"a.txt": b"a", "b.txt": b"b", "c.txt": b"c"})
    (tmp_path / "b.txt").write_bytes(b"changed")
    (tmp_path / "c.txt").rename(tmp_path / "c.real")
    (tmp_path / "c.txt").symlink_to(tmp_path / "c.real")  # the recorded content, but through a link
    (tmp_path / "d.txt").write_bytes(b"d")  # not listed
    m = read_manifest(tmp_path)
    assert [n for n in ("a.txt", "b.txt", "c.txt", "d.txt", "gone.txt") if qio._ours(tmp_path, m, n)] == ["a.txt"]
    assert not qio._ours(tmp_path, None, "a.txt")


@pytest.mark.parametrize("where,relation", [("data", "is"), (".", "holds"), ("data/sub/out", "is inside")])
def test_output_overlapping_an_input_is_refused(tmp_path, where, relation):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match=f"output folder .* {relation} the input") as err:
        check_output_dir(tmp_path / where, force=True, inputs=[tmp_path / "data"])
    assert "\n" not in str(err.value) and err.value.hint
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(OutputError, match="output file .* is the input"):
        check_output_file(model, force=True, inputs=[None, model])
    check_output_dir(tmp_path / "elsewhere", force=False, inputs=[tmp_path / "data", model])  # a sibling is fine


def test_check_output_dir_rules(tmp_path):
    out = tmp_path / "out"
    assert check_output_dir(out / "deeper", force=False) == out / "deeper" and not out.exists()  # checked, not made
    out.mkdir()
    check_output_dir(out, force=False)  # empty
    (out / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        check_output_dir(out, force=False)
    with pytest.raises(OutputExistsError, match="did not write"):
        check_output_dir(out, force=True)
    _manifest(out, {"x": b"x"})
    check_output_dir(out, force=True)
    (out / "x").write_text("edited")
    with pytest.raises(OutputExistsError, match="changed since"):
        check_output_dir(out, force=True)
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(out / "x", force=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(out / "x" / "below", force=True)


def test_check_output_file_rules(tmp_path):
    f = tmp_path / "r.json"
    assert check_output_file(f, force=False) == f and not f.exists()
    f.write_text("keep")
    with pytest.raises(OutputExistsError, match="exists"):
        check_output_file(f, force=False)
    check_output_file(f, force=True)
    with pytest.raises(OutputExistsError, match="is a folder"):
        check_output_file(tmp_path, force=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output_file(f / "x.json", force=True)
    with pytest.raises(OutputError, match="not enough space"):
        check_output_file(tmp_path / "huge", force=False, need_bytes=2**62)
    assert f.read_text() == "keep"
    assert issubclass(OutputError, InputError)  # exit 2 with the hint


def test_output_dir_writes_a_manifest_of_every_file(tmp_path):
    out = tmp_path / "a" / "b"
    with output_dir(out, force=False, command="quantkit test") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "w.bin").write_bytes(b"\x00\x01")
        (staging / "r.json").write_text("{}")
        assert not out.exists()  # nothing in place before the end
    m = read_manifest(out)
    assert m["command"] == "quantkit test" and sorted(m["files"]) == ["r.json", "sub/w.bin"]
    assert m["files"]["sub/w.bin"] == {"sha256": hashlib.sha256(b"\x00\x01").hexdigest(), "size": 2}
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "r.json", "sub"])


@pytest.mark.parametrize("exists", [False, True])
def test_output_dir_failure_leaves_nothing(tmp_path, exists):
    out = tmp_path / "new" / "out"
    if exists:
        out.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, force=False) as staging:
            (staging / "half.onnx").write_bytes(b"partial")
            raise KeyboardInterrupt
    if exists:
        assert list(out.iterdir()) == []  # the staging folder inside it is gone
    else:
        assert list(tmp_path.iterdir()) == []  # the parents it made are removed too
