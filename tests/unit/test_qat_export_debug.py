"""A QAT export read by `quantkit debug` (and `--rank`), its float twin, half-precision models and
QatConfig's bad values.

torch's exporter writes one int8 zero point and hands it to the other Q/DQ pairs through
Identity nodes: `debug` read those pairs as uint8 [0, 255] (half the values "clipped", 5 dB on
healthy tensors) and `--rank` refused the model as unsigned. A module nested in a Sequential is
named by its nesting in an export of the original module and by `prepare`'s flat traced graph in
the QAT export, so `debug` could not pair them; `export_onnx(quantized=False)` writes the float
twin it pairs with."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import quantkit.qat as qq  # noqa: E402
from quantkit.cli import main  # noqa: E402
from quantkit.errors import InputError, ModelError  # noqa: E402


class Net(nn.Module):
    """Depthwise Conv, hard-swish, SiLU, a residual Add, BatchNorm and a nested Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.f = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(), nn.Conv2d(8, 4, 1))
        self.h, self.si = nn.Hardswish(), nn.SiLU()

    def forward(self, x):  # noqa: ANN001
        y = self.h(self.bn(self.a(x)))
        return self.f(self.si(self.b(y)) + y)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    q = qq.prepare(model)
    qq.calibrate(q, [torch.randn(8, 3, 16, 16) for _ in range(4)])
    d = tmp_path_factory.mktemp("qat")
    qq.export_onnx(q, d / "qat.onnx", torch.randn(1, 3, 16, 16))
    qq.export_onnx(q, d / "fp32.onnx", torch.randn(1, 3, 16, 16), quantized=False)
    np.savez(d / "d.npz", input=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    return d


def test_the_float_twin_has_no_qdq_and_computes_what_the_qat_model_does_without_it(exported):
    import onnxruntime as ort

    twin = onnx.load(str(exported / "fp32.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in twin.graph.node)
    x = np.load(exported / "d.npz")["input"]
    a = ort.InferenceSession(str(exported / "fp32.onnx")).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(exported / "qat.onnx")).run(None, {"input": x})[0]
    assert 10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum()) > 30


def test_debug_reads_zero_points_shared_through_identity_as_int8(exported):
    from quantkit.debug.layerwise import qdq_points

    qat = onnx.load(str(exported / "qat.onnx"))
    assert any(n.op_type == "Identity" for n in qat.graph.node)  # the exporter's shared zero point
    points = qdq_points(qat)
    assert points and all((p.qmin, p.qmax) == (-128, 127) for p in points)


def test_debug_and_rank_a_qat_export_against_its_float_twin(exported, capsys):
    d = exported
    common = [str(d / "fp32.onnx"), str(d / "qat.onnx"), "--npz", str(d / "d.npz"), "--no-progress"]
    assert main(["debug", *common, "-o", str(d / "dbg")]) == 0
    doc = json.loads((d / "dbg" / "debug.json").read_text())
    acts = doc["layerwise"]["activations"]
    assert acts and all(a["clipped_share"] < 0.01 for a in acts)  # 49% as uint8
    assert min(a["local_sqnr_db"] for a in acts) > 25  # 5-6 dB as uint8
    assert main(["debug", *common, "--rank", "-o", str(d / "rank")]) == 0
    assert "unsigned" not in capsys.readouterr().err


def test_a_model_without_residual_joins_is_not_traced_so_its_own_export_pairs(exported, tmp_path, capsys):
    """Net's Add joins no convolution output: prepare keeps the model itself (no fx trace, whose
    flattened names did not pair with the module's own export), and debug pairs the two."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(Net().eval(), torch.randn(1, 3, 16, 16), str(tmp_path / "orig.onnx"), input_names=["input"],
                          output_names=["output"], dynamo=False, opset_version=17)
    rc = main(["debug", str(tmp_path / "orig.onnx"), str(exported / "qat.onnx"), "--npz", str(exported / "d.npz"),
               "--no-progress", "-o", str(tmp_path / "dbg")])
    assert rc == 0, capsys.readouterr().err


def test_a_half_precision_model_exports_in_float32(tmp_path):
    """It wrote float16 activations into QuantizeLinear with float32 scales: a file that neither
    onnx.checker nor ONNX Runtime takes, and no error."""
    import onnxruntime as ort

    torch.manual_seed(0)
    q = qq.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).half())
    qq.calibrate(q, [torch.randn(4, 3, 8, 8).half() for _ in range(2)])
    for opset in (17, 19):
        path = qq.export_onnx(q, tmp_path / f"m{opset}.onnx", torch.randn(1, 3, 8, 8).half(), opset=opset)
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        sess = ort.InferenceSession(str(path))
        assert sess.get_inputs()[0].type == "tensor(float)"
        sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 3, 8, 8), np.float32)})
    assert all(p.dtype == torch.float16 for p in q.parameters())  # the model itself is not changed


@pytest.mark.parametrize("kwargs, what", [
    ({"disable": "fc"}, "tuple of names"),  # a bare string was split into letters: nothing disabled
    ({"disable_types": ("Linear",)}, "tuple of layer classes"),
    ({"disable_types": nn.Linear}, "tuple of layer classes"),
    ({"num_bins": 3}, "power of two"),
    ({"num_bins": True}, "num_bins must be int"),
    ({"percentile": "x"}, "percentile must be int or float"),
    ({"residual_add": "no"}, "residual_add must be bool"),
])
def test_qat_config_refuses_bad_values_at_once(kwargs, what):
    with pytest.raises(InputError, match=what):
        qq.QatConfig(**kwargs)


def test_a_calibration_applies_to_its_own_model_only_and_opsets_are_integers(tmp_path):
    torch.manual_seed(0)
    q = qq.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    cal = qq.calibrate(q, [torch.randn(4, 3, 8, 8)])
    other = qq.prepare(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(ModelError, match="not the prepared model"):
        cal.apply(other, "minmax")
    with pytest.raises(InputError, match="opset must be an integer"):
        qq.export_onnx(q, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), opset="17")
    assert list(tmp_path.iterdir()) == []
