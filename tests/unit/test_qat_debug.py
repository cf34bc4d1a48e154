"""qq.quantizer_errors: each quantizer's own error on the float model's activations."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import quantkit.qat as qq  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):  # noqa: ANN001
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_errors_equal_brute_force_and_leave_the_model_as_it_was():
    x = torch.randn(64, 3, 8, 8)
    model = qq.prepare(Net(), qq.QatConfig(method="minmax"))
    qq.calibrate(model, [x[:32], x[32:]])
    qs = dict(qq.quantizers(model))
    conv_in = next(n for n in qs if n.startswith("conv") and not qs[n].dynamic)
    qs[conv_in].set_amax(1.0)  # clip a normal input at 1 sigma: a large, known error
    before = model(x)
    errors = qq.quantizer_errors(model, [x[:16], x[16:40], x[40:]])
    assert torch.equal(model(x), before) and all(q.enabled for q in qs.values())
    by_name = {e.name: e for e in errors}
    e = by_name[conv_in]
    s = 1.0 / 127
    fq = torch.clamp(torch.round(x / s), -128, 127) * s
    expect = 10 * math.log10(float((x * x).sum()) / float(((fq - x) ** 2).sum()))
    assert e.sqnr_db == pytest.approx(expect, rel=1e-4)
    assert e.clipped_share == pytest.approx(float((x.abs() > 1.0).float().mean()), rel=1e-6)
    assert e.clipping_share_of_error > 0.9
    assert errors[0].name == conv_in  # worst first
    w = model.conv.weight.detach()
    ws = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    wq = torch.clamp(torch.round(w / ws), -128, 127) * ws
    w_db = 10 * math.log10(float((w * w).sum()) / float(((wq - w) ** 2).sum()))
    weight = next(e for e in errors if e.kind == "weight" and e.name.startswith("conv"))
    assert weight.sqnr_db == pytest.approx(w_db, rel=1e-4) and weight.clipped_share == 0.0
