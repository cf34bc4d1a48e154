"""Models from torch's default ONNX exporter (``torch.onnx.export(..., dynamo=True)``, the default
since PyTorch 2.9): opset 18+ graphs written by onnxscript, with ``LayerNormalization`` and
``Gelu`` as ops, attention from ``scaled_dot_product_attention``, an LSTM, SiLU written as
Sigmoid-Mul, a Split/Concat neck and a nearest Resize; node names like ``node_Conv_0`` and a
symbolic batch. Each is calibrated with the default and must run in ONNX Runtime close to FP32.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantkit.datasets import NumpySource
from quantkit.ptq import prepare, quantize

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript: pip install -e '.[test]'")
nn, F = torch.nn, torch.nn.functional


def _cbs(ci: int, co: int, k: int = 3, s: int = 1) -> "nn.Module":
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())


class Yolo(nn.Module):
    """A YOLOv8-like stem, C2f-style split/concat, an upsampled neck and two detection heads."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.m = _cbs(3, 16, 3, 2), _cbs(16, 32, 3, 2), _cbs(16, 16)
        self.c3, self.down, self.fuse = _cbs(48, 32, 1), _cbs(32, 64, 3, 2), _cbs(96, 32, 1)
        self.h1, self.h2 = nn.Conv2d(32, 10, 1), nn.Conv2d(64, 10, 1)

    def forward(self, x):
        x = self.c2(self.c1(x))
        a, b = x.chunk(2, 1)
        x = self.c3(torch.cat([a, b, self.m(b)], 1))
        d = self.down(x)
        f = self.fuse(torch.cat([F.interpolate(d, scale_factor=2.0, mode="nearest"), x], 1))
        o = torch.cat([self.h1(f).flatten(2), self.h2(d).flatten(2)], 2)
        return torch.cat([o[:, :4], o[:, 4:].sigmoid()], 1)


class Attention(nn.Module):
    """Patch embedding, pre-norm attention (SDPA) and a tanh-GELU MLP, mean-pooled to 5 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.pe, self.qkv, self.proj = nn.Conv2d(3, 48, 8, 8), nn.Linear(48, 144), nn.Linear(48, 48)
        self.n1, self.n2 = nn.LayerNorm(48), nn.LayerNorm(48)
        self.mlp = nn.Sequential(nn.Linear(48, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 48))
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = self.pe(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, 4, 12).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        x = x + self.mlp(self.n2(x))
        return self.head(x.mean(1))


class Crnn(nn.Module):
    """Convs over a text line, a bidirectional LSTM over its columns, per-column log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(_cbs(1, 16), nn.MaxPool2d(2), _cbs(16, 32), nn.MaxPool2d((2, 1)), _cbs(32, 32),
                                 nn.AdaptiveAvgPool2d((1, None)))
        self.rnn, self.fc = nn.LSTM(32, 32, bidirectional=True, batch_first=True), nn.Linear(64, 20)

    def forward(self, x):
        y, _ = self.rnn(self.cnn(x).squeeze(2).transpose(1, 2))
        return self.fc(y).log_softmax(-1)


def _inputs(shape: tuple[int, ...], n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    return (x + np.roll(x, 1, -1) + np.roll(x, 1, -2)) / 3  # smoother than white noise


@pytest.mark.parametrize("make, shape, ops", [
    (Yolo, (3, 64, 64), {"Sigmoid", "Split", "Resize"}),
    (Attention, (3, 64, 64), {"LayerNormalization", "Softmax"}),
    (Crnn, (1, 32, 64), {"LSTM"}),
], ids=["yolo", "attention", "crnn"])
def test_dynamo_export_calibrates_and_stays_close_to_fp32(make, shape, ops, tmp_path):
    torch.manual_seed(0)
    module = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.from_numpy(_inputs(shape, 2)),), dynamo=True, input_names=["x"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    program.save(str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.opset_import[0].version >= 18 and ops <= {n.op_type for n in model.graph.node}
    x = _inputs(shape, 96)
    np.savez(tmp_path / "x.npz", x=x[:64])
    prepared = prepare(model)
    if make is Attention:  # attention's probabilities x V stay float; Q.K^T and the Linears are INT8
        consumers = {c for cs in prepared.plan.activations.values() for c in cs}
        kinds = {n.name: n.op_type for n in model.graph.node}
        assert sum(kinds[c] == "MatMul" for c in consumers) >= 1
    cal = quantize(prepared, NumpySource(tmp_path / "x.npz", shapes={s.name: s.shape for s in prepared.specs}))
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x[64:]})[0]
    out = ort.InferenceSession(cal.int8_model().SerializeToString()).run(None, {"x": x[64:]})[0]
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - out).astype(np.float64) ** 2).sum())
    assert sqnr >= 25.0, sqnr
