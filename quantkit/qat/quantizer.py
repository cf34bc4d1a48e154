"""Fake quantization of one tensor: symmetric int8 on PyTorch's own fake-quantize operators,
so that ``torch.onnx.export`` writes QuantizeLinear/DequantizeLinear pairs.

    activations: per tensor,  scale = amax / 127, zero point 0, range [-128, 127]
    weights:     per channel, amax = max |w| over the other axes, taken from the current
                 weight at every call (so folding BatchNorm into the weight keeps it exact)
                 and frozen into a buffer for export

Gradients pass straight through inside the range and are zero outside (PyTorch's STE).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.errors import NotCalibratedError

QMIN, QMAX = -128, 127


class TensorQuantizer(nn.Module):
    """Fake-quantizes its input; collects calibration statistics while ``calibrating``.

    Args:
        axis: None for per-tensor (activations); the channel axis for per-channel (weights).
        dynamic: take amax from the input at every call (weights) instead of calibration.
        num_bins: histogram bins for calibration.

    Attributes:
        amax: the calibrated (or frozen) amax buffer; empty until set.
        enabled: False passes the input through unchanged (the layer stays in floating point).
        calibrating: True collects statistics and passes the input through unchanged.
    """

    def __init__(self, *, axis: int | None = None, dynamic: bool = False, num_bins: int = 2048):
        super().__init__()
        self.axis = axis
        self.dynamic = dynamic
        self.num_bins = num_bins
        self.enabled = True
        self.calibrating = False
        self.register_buffer("amax", torch.empty(0))
        self.histogram_: Any = None
        self.qualified_name = "<quantizer>"  # set by prepare(), for messages

    @property
    def calibrated(self) -> bool:
        return self.amax.numel() > 0

    def extra_repr(self) -> str:
        kind = "per-channel axis=%d" % self.axis if self.axis is not None else "per-tensor"
        state = "disabled" if not self.enabled else ("dynamic" if self.dynamic else
                                                    f"amax={self.amax.tolist()}" if self.calibrated and self.amax.numel() == 1
                                                    else "calibrated" if self.calibrated else "not calibrated")
        return f"{kind}, {state}"

    def channel_amax(self, w: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(w.dim()) if d != self.axis]
        return w.detach().abs().amax(dim=dims) if dims else w.detach().abs()

    def freeze_to(self, w: torch.Tensor) -> None:
        """Store ``w``'s amax in the buffer (a dynamic weight quantizer before export)."""
        self.amax = self.channel_amax(w) if self.axis is not None else w.detach().abs().amax()

    def freeze_for_export(self) -> None:
        """Precompute scale and zero point as buffers, so the exported graph takes them as
        initializers instead of computing them (TensorRT reads Q/DQ scales from constants)."""
        scale, zero = scale_and_zero(self.amax, self.axis)
        self.register_buffer("export_scale", scale)
        self.register_buffer("export_zero", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self._collect(x)
            return x
        if hasattr(self, "export_scale"):
            return _fake_quantize(x, self.export_scale, self.export_zero, self.axis)
        if self.dynamic and not self.calibrated:
            amax = self.channel_amax(x) if self.axis is not None else x.detach().abs().amax()
        elif self.calibrated:
            amax = self.amax
        else:
            raise NotCalibratedError(f"quantizer {self.qualified_name!r} was never calibrated",
                                     hint="run quantkit.qat.calibrate(model, loader) first, or disable it")
        return fake_quantize(x, amax.to(x.device), self.axis)

    def _collect(self, x: torch.Tensor) -> None:
        if self.histogram_ is None:
            if x.is_cuda:
                from quantkit.qat.histogram import TorchHistogram

                self.histogram_ = TorchHistogram(self.num_bins, self.qualified_name, x.device)
            else:
                from quantkit.calibrators.collectors import HistogramCollector

                self.histogram_ = HistogramCollector(self.num_bins, self.qualified_name)
        if x.is_cuda:
            self.histogram_.update(x)
        else:
            self.histogram_.update(x.detach().float().numpy())


def scale_and_zero(amax: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = amax / 127 (float32), zero point 0 (int32)."""
    scale = torch.clamp(amax.detach().float(), min=1e-12) / QMAX
    if axis is None:
        scale = scale.reshape(())
    return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Symmetric int8 fake quantization with PyTorch's operators (exported as Q/DQ)."""
    scale, zero = scale_and_zero(amax, axis)
    return _fake_quantize(x, scale, zero, axis)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, QMIN, QMAX)
