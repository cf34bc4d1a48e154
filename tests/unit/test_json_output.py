"""Result files are JSON any parser reads: RFC 8259 has no Infinity or NaN (JavaScript's JSON.parse
and jq's strict readers refuse them), and `compare` of identical outputs has an infinite SQNR."""

from __future__ import annotations

import json
import math

import numpy as np

from quantkit._io import json_safe, write_json_atomic


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_strings_float_reads_back(tmp_path):
    doc = {"sqnr_db": math.inf, "low": -np.inf, "amax": np.float32("nan"), "ok": np.float64(2.5),
           "rows": [{"e": float("inf")}, (np.int64(3), "inf-named")]}
    path = write_json_atomic(tmp_path / "r.json", doc)
    got = _strict(path.read_text())
    assert got == {"sqnr_db": "inf", "low": "-inf", "amax": "nan", "ok": 2.5, "rows": [{"e": "inf"}, [3, "inf-named"]]}
    assert float(got["sqnr_db"]) == math.inf and math.isnan(float(got["amax"]))
    assert json_safe([1.0, "x"]) == [1.0, "x"]


def test_compare_of_a_model_with_itself_writes_strict_json_and_report_reads_it(tmp_path, digits_dirs):
    from quantkit import sample
    from quantkit.cli import main
    from tests.helpers import DIGITS

    out = tmp_path / "same.json"
    m = str(sample.model_path())
    assert main(["compare", m, m, "--images", str(digits_dirs[1]), "--json", str(out), *DIGITS]) == 0
    doc = _strict(out.read_text())
    assert doc["outputs"][0]["sqnr_db"] == "inf" and doc["outputs"][0]["max_abs_error"] == 0
    assert main(["report", str(out), "-o", str(tmp_path / "rep")]) == 0
    assert "<td>inf</td>" in (tmp_path / "rep" / "index.html").read_text()
