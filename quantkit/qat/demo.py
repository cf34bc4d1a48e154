"""The QAT walk-through on the bundled digits: train DigitsNet in FP32, quantize it after
training with every range method (PTQ, one calibration pass), fine-tune with fake quantization
(QAT), export each as Q/DQ ONNX and measure all of them through ONNX Runtime on the test split.

Run it with ``quantkit qat-demo`` or ``python examples/qat_digits.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import quantkit.qat as qq
from quantkit.sample.digits_net import DigitsNet, digits_tensors

log = logging.getLogger(__name__)
PTQ_METHODS = ("entropy", "minmax", "percentile", "mse")


@dataclass
class DemoRow:
    label: str
    accuracy: float
    agreement: float | None = None
    sqnr_db: float | None = None
    path: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow]
    fp32_curve: list[dict[str, float]] = field(default_factory=list)
    qat_curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        fp32 = self.rows[0].accuracy
        lines = ["| model | accuracy (ONNX Runtime) | vs FP32 (points) | top-1 agreement | SQNR dB |", "|---|---|---|---|---|"]
        for r in self.rows:
            agree = "-" if r.agreement is None else f"{r.agreement:.4f}"
            sqnr = "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}"
            lines.append(f"| {r.label} | {r.accuracy:.4f} | {100 * (r.accuracy - fp32):+.2f} | {agree} | {sqnr} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.__dict__ for r in self.rows], "fp32_curve": self.fp32_curve, "qat_curve": self.qat_curve,
                "seconds": self.seconds}


def _epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
           sched: Any = None, batch: int = 64, teacher: nn.Module | None = None, augment: bool = True) -> float:
    model.train()
    perm = torch.randperm(len(x))
    total = 0.0
    for s in range(0, len(x), batch):
        b = perm[s : s + batch]
        xb = x[b]
        if augment:
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))  # shift by up to 2 pixels
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        out = model(xb)
        if teacher is None:
            loss = nn.functional.cross_entropy(out, y[b])
        else:  # distillation: match the FP32 model's predictions
            with torch.no_grad():
                target = teacher(xb).log_softmax(1)
            loss = nn.functional.kl_div(out.log_softmax(1), target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * len(b)
    return total / len(x)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run(out_dir: str | Path, *, epochs: int = 40, qat_epochs: int = 2, qat_lr: float = 1e-3, seed: int = 0,
        calib_images: int = 512, echo: Callable[[str], None] = print,
        on_epoch: Callable[[int, float], None] | None = None) -> DemoResult:
    """Train, quantize every way, export to ``out_dir`` and measure; returns the table.

    ``echo`` receives a line per step; ``on_epoch(epoch, test_accuracy)`` is called after each
    FP32 training epoch (progress)."""
    from quantkit.backends.onnxruntime import OrtRunner

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = digits_tensors()

    # 1. FP32 training (the recipe of scripts/train_sample.py)
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    result = DemoResult([])
    for e in range(epochs):
        loss = _epoch(model, xtr, ytr, opt, sched)
        acc = _accuracy(model, xte, yte)
        result.fp32_curve.append({"epoch": e + 1, "loss": loss, "test_accuracy": acc})
        if on_epoch is not None:
            on_epoch(e + 1, acc)
    echo(f"FP32: {epochs} epochs, test accuracy (PyTorch) {acc:.4f}")
    model.eval()
    fp32_path = out / "digits.fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (xte[:1],), str(fp32_path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    feed = {"input": xte.numpy()}
    labels = yte.numpy()
    ref = OrtRunner(fp32_path).infer(feed)["output"]

    def measure(label: str, path: Path) -> DemoRow:
        logits = OrtRunner(path).infer(feed)["output"]
        noise = float(((logits - ref) ** 2).sum())
        sqnr = 10 * math.log10(float((ref**2).sum()) / noise) if noise > 0 else float("inf")
        row = DemoRow(label, float((logits.argmax(1) == labels).mean()), float((logits.argmax(1) == ref.argmax(1)).mean()),
                      sqnr, str(path))
        echo(f"{label}: accuracy {row.accuracy:.4f}")
        return row

    result.rows.append(DemoRow("FP32", float((ref.argmax(1) == labels).mean()), path=str(fp32_path)))

    # 2. PTQ: one calibration pass, every method. BatchNorm is folded into the convolutions
    #    first (exact in eval mode): QAT then trains the weights that export writes
    qmodel = qq.prepare(model, qq.QatConfig(method="entropy"))
    qq.fold_batchnorm(qmodel)
    calib = [xtr[i : i + 64] for i in range(0, min(calib_images, len(xtr)), 64)]
    cal = qq.calibrate(qmodel, calib, method="entropy")
    best: tuple[float, float, str] = (-1.0, -1.0, "entropy")
    for method in PTQ_METHODS:
        cal.apply(qmodel, method)
        path = qq.export_onnx(qmodel, out / f"digits.ptq-{method}.onnx", xte[:1])
        row = measure(f"PTQ {method}", path)
        result.rows.append(row)
        best = max(best, (row.accuracy, row.sqnr_db or 0.0, method))  # ties: the closer to FP32

    # 3. QAT: start from the best PTQ ranges, fine-tune with fake quantization and
    #    straight-through gradients to reproduce the FP32 model's predictions (distillation:
    #    on this small set, fitting the labels again moved the test accuracy by a few images
    #    either way; matching the FP32 outputs is the goal of quantization)
    cal.apply(qmodel, best[2])
    model.eval()
    opt = torch.optim.SGD(qmodel.parameters(), lr=qat_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, qat_epochs * math.ceil(len(xtr) / 64)))
    for e in range(qat_epochs):
        loss = _epoch(qmodel, xtr, ytr, opt, sched, teacher=model, augment=False)
        acc = _accuracy(qmodel, xte, yte)
        result.qat_curve.append({"epoch": e + 1, "loss": loss, "test_accuracy": acc})
        echo(f"QAT epoch {e + 1}: loss {loss:.4f}, test accuracy (PyTorch fake-quant) {acc:.4f}")
    path = qq.export_onnx(qmodel, out / "digits.qat.onnx", xte[:1])
    result.rows.append(measure(f"QAT ({qat_epochs} epochs from PTQ {best[2]})", path))
    result.seconds = time.perf_counter() - t_start
    return result
