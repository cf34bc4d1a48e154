"""Reproduce the bundled sample: train the digits CNN and export quantkit/sample/*.

    pip install -e '.[torch,test]' && python scripts/train_sample.py

Data: scikit-learn's bundled handwritten digits (1797 images, 8x8, 0-16), upsampled to 32x32
uint8 exactly as the demo writes them; a stratified 70/30 train/test split (seed 0).
Deterministic on CPU (seeded, one thread).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quantkit.sample import upsample  # noqa: E402
from quantkit.sample.digits_net import DigitsNet  # noqa: E402

OUT = ROOT / "quantkit" / "sample"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.3, random_state=0, stratify=digits.target)
    test = np.zeros(len(idx), dtype=bool)
    test[test_idx] = True
    images8 = digits.images.astype(np.uint8)
    np.savez_compressed(OUT / "digits.npz", images=images8, labels=digits.target.astype(np.uint8), test=test)

    pixels = upsample(images8).astype(np.float32) / 255.0
    mean, std = float(pixels[~test].mean()), float(pixels[~test].std())
    mean, std = round(mean, 4), round(std, 4)
    x = torch.from_numpy((pixels[:, None] - mean) / std)
    y = torch.from_numpy(digits.target.astype(np.int64))
    xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]

    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(xtr) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for s in range(0, len(xtr), 64):
            b = perm[s : s + 64]
            xb = xtr[b]
            # light augmentation: shift by up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  test accuracy {acc:.4f}")

    model.eval()
    path = OUT / "digits_cnn.onnx"
    torch.onnx.export(
        model, (xte[:1],), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
    )
    meta = {
        "description": "DigitsNet: 3x3 conv stem, residual block, strided conv, depthwise-separable residual block, "
        "global average pool, linear; trained on scikit-learn's digits (70/30 stratified split, seed 0)",
        "preprocess": {"resize": None, "crop": None, "color": "gray", "scale": 1 / 255, "mean": [mean],
                       "std": [std], "layout": "nchw", "dtype": "float32", "interpolation": "linear"},
        "classes": [str(i) for i in range(10)],
        "train_images": int((~test).sum()),
        "test_images": int(test.sum()),
        "torch_test_accuracy": round(acc, 4),
    }
    (OUT / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
