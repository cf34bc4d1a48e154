"""`quantkit view`: Netron serves the model on loopback, and only the model."""

import contextlib
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantkit import sample
from quantkit.cli import main

needs_netron = pytest.mark.skipif(importlib.util.find_spec("netron") is None,
                                  reason="netron is not installed (pip install 'quantkit[view]')")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


@contextlib.contextmanager
def _viewer(model: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`quantkit view MODEL` in a child process on a free port: (the process, its first line, the
    URL, printed once the server listens); killed on the way out if it is still running."""
    proc = subprocess.Popen([sys.executable, "-m", "quantkit", "view", str(model), "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_netron
def test_view_serves_the_model_on_loopback_and_stops_on_ctrl_c(tmp_path):
    model = tmp_path / "digits_cnn.onnx"
    shutil.copyfile(sample.model_path(), model)
    (tmp_path / "secret.txt").write_text("not for the network")
    # (started from a shell's background job, the child inherits an ignored SIGINT: view takes it back)
    with _viewer(model) as (proc, first):
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert m, (first, proc.stderr.read() if proc.poll() is not None else "")
        base = m.group(0)
        html = _get(base).decode("utf-8")
        assert "<title>Netron</title>" in html
        served = re.search(r'<meta name="file" content="(/data/[^"]+)">', html)
        assert served and served.group(1) == "/data/digits_cnn.onnx"
        assert _get(base + served.group(1)[1:]) == model.read_bytes()
        with pytest.raises(urllib.error.HTTPError) as err:  # the model's neighbours stay private
            _get(base + "data/secret.txt")
        assert err.value.code == 404
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=20)
    assert proc.returncode == 0, errs
    assert "stopped" in out and "Traceback" not in errs
    assert model.read_bytes() == sample.model_path().read_bytes()


def test_view_missing_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["view", str(tmp_path / "nope.onnx"), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantkit: error: model file") and "nope.onnx" in err and "does not exist" in err
    assert "Traceback" not in err


def test_view_without_netron_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "netron", None)  # import netron -> ImportError
    assert main(["view", str(sample.model_path()), "--no-browser"]) == 1
    err = capsys.readouterr().err
    assert "netron is required" in err and "pip install 'quantkit[view]'" in err


def test_view_help_warns_that_host_exposes_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["view", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default 127.0.0.1" in out and "EXPOSES THE MODEL TO THE NETWORK" in out


@needs_netron
def test_view_port_in_use_is_one_line_exit_2(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", str(sample.model_path()), "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "hint:" in err


@needs_netron
def test_view_stops_on_sigterm_and_removes_its_private_copy(tmp_path):
    import tempfile

    model = tmp_path / "digits_cnn.onnx"
    shutil.copyfile(sample.model_path(), model)
    before = set(Path(tempfile.gettempdir()).glob("quantkit-view-*"))
    with _viewer(model) as (proc, first):
        assert re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        mine = set(Path(tempfile.gettempdir()).glob("quantkit-view-*")) - before
        assert len(mine) == 1  # the private folder Netron serves from
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "stopped" in out
    assert not any(p.exists() for p in mine)
