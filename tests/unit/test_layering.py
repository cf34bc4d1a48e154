"""The calibrate path runs downward through the layers: no quantkit module calls into a module
that calls back into it (A -> B -> A), and the static imports keep the layers apart."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from quantkit import sample
from quantkit.cli import main
from tests.helpers import DIGITS

PKG = Path(__file__).resolve().parents[2] / "quantkit"


def _chains_of(argv: list[str]) -> tuple[int, set[str], list[str]]:
    """Run the CLI under a profiler: exit code, files entered, call chains that re-enter a file."""
    root = str(PKG) + "/"
    stack: list[str | None] = []
    files: set[str] = set()
    reentries: list[str] = []

    def prof(frame, event, arg):  # noqa: ANN001
        if event == "call":
            f = frame.f_code.co_filename
            q = f[len(root):] if f.startswith(root) else None
            stack.append(q)
            if q:
                files.add(q)
                chain = [s for s in stack if s]
                comp = [c for i, c in enumerate(chain) if i == 0 or c != chain[i - 1]]
                if comp.count(q) > 1:
                    reentries.append(" -> ".join(comp[comp.index(q):]))
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(prof)
    try:
        rc = main(argv)
    finally:
        sys.setprofile(None)
    return rc, files, reentries


def test_calibrate_path_never_reenters_a_module(digits_dirs, tmp_path):
    rc, files, reentries = _chains_of(["calibrate", str(sample.model_path()), "--images", str(digits_dirs[0]),
                                       "-o", str(tmp_path / "o"), "--num-images", "64", "--eval-images", "32",
                                       "--save-stats", str(tmp_path / "o" / "s.npz"), *DIGITS])
    assert rc == 0
    assert reentries == []
    # only the invoked command's module is loaded; no other command's code runs
    assert {f for f in files if f.startswith("cli/")} == {"cli/__init__.py", "cli/calibrate.py", "cli/common.py"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantkit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("quantkit"))
    return found


def test_layers_import_downward_only():
    """Layers, lowest first: calibrators (numpy maths) < onnx (graphs, Q/DQ) and datasets (which
    read a model's input specs) < backends (executors) < ptq (the verb) < cli. No layer imports
    one above it, and the TensorRT calibrator adapter lives with the TensorRT backend."""
    above = ("quantkit.backends", "quantkit.ptq", "quantkit.cli", "quantkit.qat", "quantkit.report")
    rules = {"calibrators": (*above, "quantkit.onnx", "quantkit.datasets"),
             "onnx": (*above, "quantkit.datasets"),
             "datasets": (*above, "quantkit.calibrators"),
             "backends": ("quantkit.ptq", "quantkit.cli", "quantkit.qat", "quantkit.report")}
    bad = []
    for pkg, forbidden in rules.items():
        for f in sorted((PKG / pkg).rglob("*.py")):
            for mod in _imports(f):
                if mod.startswith(forbidden):
                    bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert bad == []
