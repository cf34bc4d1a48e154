"""DigitsNet, the network of the bundled sample (needs PyTorch), and its data as tensors.

stem -> residual block -> strided conv -> depthwise-separable residual block -> pool -> fc:
residual Adds after convolutions and a depthwise convolution, the cases Q/DQ placement must get
right, in a model that trains in about a minute on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from quantkit.sample import load_digits, metadata


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class DigitsNet(nn.Module):
    """The bundled sample's architecture (quantkit/sample/digits_cnn.onnx)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.block1_a, self.block1_b = conv_bn(16, 16), conv_bn(16, 16)
        self.down = conv_bn(16, 32, stride=2)
        self.dw = conv_bn(32, 32, groups=32)
        self.pw = conv_bn(32, 32, k=1)
        self.fc = nn.Linear(32, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.relu(x + self.block1_b(self.relu(self.block1_a(x))))
        x = self.relu(self.down(x))
        x = self.relu(x + self.pw(self.relu(self.dw(x))))
        return self.fc(x.mean(dim=(2, 3)))


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the sample's split, upsampled to 32x32 and
    normalised exactly as the shipped model expects (sample.json's mean and std)."""
    images, labels, test = load_digits()
    pp = metadata()["preprocess"]
    pixels = images.astype(np.float32) / 255.0
    x = torch.from_numpy((pixels[:, None] - pp["mean"][0]) / pp["std"][0])
    y = torch.from_numpy(labels.astype(np.int64))
    t = torch.from_numpy(test)
    return x[~t], y[~t], x[t], y[t]
