"""Graph edges exporters write that the checks' own ONNX Runtime sessions tripped on (a probe of
wheels, twenty-first session): an input no node reads (paddle2onnx's ``length``), an output that
is a constant, an input passed through as an output. ``OrtRunner`` fed the first with zeros; the
bias correction's and the method check's sessions, fed the batches as they are, failed, and the
calibration was written uncorrected and unchecked. A constant output measured the budget."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import quantkit
from quantkit.datasets.sources import NumpySource
from quantkit.onnx.biascorrect import guard_outputs
from quantkit.onnx.model import error_output

RNG = np.random.default_rng(0)
W1, B1 = RNG.normal(0, 0.3, (16, 32)).astype(np.float32), RNG.normal(0, 0.1, 32).astype(np.float32)
W2, B2 = RNG.normal(0, 0.3, (32, 8)).astype(np.float32), RNG.normal(0, 0.1, 8).astype(np.float32)


def _model(*, unread: bool = False, constant: bool = False, passthrough: bool = False,
           outputs_first: bool = False) -> onnx.ModelProto:
    """x [N, 16] -> MatMul + bias -> Relu -> MatMul + bias -> y [N, 8]; and optionally an INT64
    input no node reads, a constant output, an input passed through as an output (listed before
    y with ``outputs_first``)."""
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m1"]), h.make_node("Add", ["m1", "B1"], ["a1"]),
             h.make_node("Relu", ["a1"], ["r1"]), h.make_node("MatMul", ["r1", "W2"], ["m2"]),
             h.make_node("Add", ["m2", "B2"], ["y"])]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])]
    inits = [nh.from_array(a, n) for a, n in ((W1, "W1"), (B1, "B1"), (W2, "W2"), (B2, "B2"))]
    extra = []
    if unread:
        inputs.append(h.make_tensor_value_info("length", T.INT64, ["N"]))
    if constant:
        inits.append(nh.from_array(np.arange(4, dtype=np.float32), "table"))
        extra.append(h.make_tensor_value_info("table", T.FLOAT, [4]))
    if passthrough:
        inputs.append(h.make_tensor_value_info("aux", T.FLOAT, ["N", 3]))
        extra.append(h.make_tensor_value_info("aux", T.FLOAT, ["N", 3]))
    outputs = [*extra, *outputs] if outputs_first else [*outputs, *extra]
    model = h.make_model(h.make_graph(nodes, "edges", inputs, outputs, inits), opset_imports=[h.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _data(tmp_path, n: int = 64, **extra: bool) -> NumpySource:
    arrays = {"x": RNG.normal(0, 1, (n, 16)).astype(np.float32)}
    if extra.get("unread"):
        arrays["length"] = np.full(n, 16, np.int64)
    if extra.get("passthrough"):
        arrays["aux"] = RNG.normal(0, 1, (n, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **arrays)
    return NumpySource(tmp_path / "d.npz")


@pytest.mark.parametrize("edge", ["unread", "constant", "passthrough"])
def test_the_checks_run_on_a_graph_with_the_edge(tmp_path, caplog, edge):
    model = _model(**{edge: True})
    with caplog.at_level(logging.WARNING):
        cal = quantkit.quantize(model, _data(tmp_path, **{edge: True}))
        cal.int8_model()
    assert "skipped" not in caplog.text, caplog.text  # bias correction and the method check ran
    assert cal.method_check is not None and cal.bias_shifts.get(cal.config.method)


def test_outputs_no_node_computes_are_not_measured():
    model = _model(constant=True, passthrough=True, outputs_first=True)
    assert guard_outputs(model) == ["y"]
    assert error_output(model) == "y"  # the constant first: the budget read it as met at once
    assert error_output(model, "table") == "table"  # asked for by name: as asked
