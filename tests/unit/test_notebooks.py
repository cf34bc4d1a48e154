"""Every notebook under notebooks/ re-executed on small settings (QUANTKIT_NB_SMALL=1), so a
notebook that stops working fails CI; each must also be committed with its outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_ptq_calibrators.ipynb", "02_qat.ipynb", "03_tensorrt_engines.ipynb",
                                           "04_debug_accuracy.ipynb"]


@pytest.mark.slow  # a kernel per notebook, training included: 1-2 minutes each on two busy cores
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_is_committed_with_outputs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: commit it executed (scripts/make_notebooks.py)"
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in code for o in c["outputs"]), f"{path.name} shows no plot"
    monkeypatch.setenv("QUANTKIT_NB_SMALL", "1")
    monkeypatch.setenv("QUANTKIT_NB_FIGURES", str(tmp_path / "figures"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the notebooks' work folders go with the test's
    for c in code:
        c["outputs"], c["execution_count"] = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert any((tmp_path / "figures").glob("*.png"))
