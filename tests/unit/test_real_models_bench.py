"""benchmarks/real_models.py's peer selection (--peers) and its AIMET-ONNX driver, on a small
Conv-Relu-Conv graph standing in for a corpus model (no wheel needed)."""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_models  # noqa: E402
from tests.realmodels import corpus  # noqa: E402
from tests.realmodels.adapters import Adapter  # noqa: E402


def conv_relu_conv() -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 (4 ch, bias) -> Relu -> conv2 (5 ch) -> LayerNormalization -> y: a signed
    input, an unsigned inner activation, a signed output, a positive LayerNorm scale."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(5, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("LayerNormalization", ["c2", "gamma", "beta"], ["y"], name="ln", axis=-1)]
    gamma = numpy_helper.from_array(rng.uniform(0.5, 1.5, size=8).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "beta")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8, 8])],
                          [w1, b1, w2, gamma, beta])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@dataclass
class TinyAdapter(Adapter):
    """The metric: % of output values with FP32's sign."""

    path: Path = Path()

    def model_path(self) -> Path:
        return self.path

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(1).normal(size=(self.n_calib, 3, 8, 8)).astype(np.float32)}

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(2).normal(size=(self.n_eval, 3, 8, 8)).astype(np.float32)}

    def _sign(self, onnx_path: Path) -> np.ndarray:
        return np.sign(real_models.first_output(onnx_path, self.eval_feeds(), self))

    def score(self, onnx_path: Path) -> float:
        return 100.0 * float(np.mean(self._sign(onnx_path) == self._sign(self.path)))


@pytest.fixture
def tiny(tmp_path) -> TinyAdapter:
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_relu_conv(), path)
    work = tmp_path / "work"
    work.mkdir()
    return TinyAdapter("tiny", corpus.Wheel("tiny", "0", "tiny"), "onnx.helper", "test", "top-1 %",
                       n_calib=32, n_eval=32, path=path)


def test_peers_runs_only_the_named_peer(tiny, tmp_path, monkeypatch):
    """--peers aimet: quantkit's methods run (the ratio column needs them), AIMET's two columns are
    filled (here "not run", no venv), and neither ORT nor NNCF is run."""
    monkeypatch.setattr(real_models, "AIMET_PY", tmp_path / "no-venv" / "python")
    row = real_models.run_model(tiny, tmp_path / "work", peers=("aimet",), spread=False)
    assert row.error is None
    assert "entropy" in row.methods
    assert row.peers == {"AIMET W8A8 asym (default)": "not run: no AIMET venv",
                         "AIMET W8A8 sym": "not run: no AIMET venv"}


def _zero_points(path: Path) -> list[np.ndarray]:
    """The zero points of every QuantizeLinear node but the Conv weights' (input 1)."""
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    dq_out = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    q_of = {n.output[0]: n for n in m.graph.node if n.op_type == "QuantizeLinear"}
    weight_q = {q_of[dq_out[w]].name for w in weights if w in dq_out and dq_out[w] in q_of}
    return [inits[n.input[2]] for n in m.graph.node
            if n.op_type == "QuantizeLinear" and n.name not in weight_q and len(n.input) > 2]


@pytest.mark.slow
@pytest.mark.skipif(not real_models.AIMET_PY.exists(), reason=f"no AIMET venv at {real_models.AIMET_PY}")
def test_aimet_driver_symmetric_is_signed_int8_with_zero_point_0(tiny, tmp_path):
    """The AIMET peer runs in its venv and is scored like the others; its symmetric configuration
    exports what TensorRT builds (int8, zero point 0, also for the non-negative Relu output), its
    default exports asymmetric uint8 activations (a non-zero zero point on the signed input). No
    uint8 Q/DQ either on the LayerNorm scale, which AIMET's own rules quantize asymmetric."""
    work = tmp_path / "work"
    row = real_models.run_model(tiny, work, peers=("aimet",), spread=False)
    for name in ("AIMET W8A8 asym (default)", "AIMET W8A8 sym"):
        metric, sqnr, seconds = row.peers[name]
        assert sqnr > 25.0, (name, sqnr)
        assert metric >= 90.0 and seconds > 0
    sym, asym = _zero_points(work / "aimet-sym" / "model.onnx"), _zero_points(work / "aimet-asym" / "model.onnx")
    assert len(asym) == len(sym) + 1 and len(sym) >= 3  # x, r1, c2, y; asym also the LayerNorm scale
    assert all(z.dtype == np.int8 and not z.any() for z in sym)
    assert all(z.dtype == np.uint8 for z in asym) and any(z.any() for z in asym)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(work / "aimet-sym" / "model.onnx").graph.initializer}
    assert inits["w1_scale"].shape == (4,) and inits["w2_scale"].shape == (5,)  # per-channel weights
    assert not inits["w1_zero_point"].any()
