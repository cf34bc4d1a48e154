"""Quantized versions of the layers TensorRT runs in INT8: an input quantizer (per tensor) and a
weight quantizer (per output channel) around the layer's own computation.

    QuantConv1d/2d/3d, QuantConvTranspose1d/2d/3d, QuantLinear

Each is a subclass of the PyTorch layer it replaces and shares that layer's parameters, so
optimizers, state dicts and BatchNorm folding see the usual ``weight`` and ``bias``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.qat.quantizer import TensorQuantizer


class QuantMixin:
    """Adds ``input_quantizer`` and ``weight_quantizer`` to a layer."""

    weight_axis = 0
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def _init_quantizers(self, num_bins: int) -> None:
        self.input_quantizer = TensorQuantizer(num_bins=num_bins)
        self.weight_quantizer = TensorQuantizer(axis=self.weight_axis, dynamic=True)

    @classmethod
    def from_float(cls, layer: nn.Module, num_bins: int = 2048) -> Any:
        """A quantized layer sharing ``layer``'s parameters and buffers."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        # the layer's state, with its own copies of the parameter/buffer/module tables (the
        # Parameter objects themselves are shared)
        q.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in layer.__dict__.items()})
        q._init_quantizers(num_bins)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            q.input_quantizer.to(weight.device)
            q.weight_quantizer.to(weight.device)
        q.train(layer.training)
        return q


class _QuantConvNd(QuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: Any = self
        return conv._conv_forward(self.input_quantizer(x), self.weight_quantizer(conv.weight), conv.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    pass


class _QuantConvTransposeNd(QuantMixin):
    weight_axis = 1  # ConvTranspose weights are [C_in, C_out / groups, ...]
    _fn: Any = None
    _spatial_dims = 2

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        conv: Any = self
        # output_size picks the output padding, as PyTorch's own ConvTranspose forward does
        output_padding = conv.output_padding if output_size is None else conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size, self._spatial_dims, conv.dilation)
        return type(self)._fn(self.input_quantizer(x), self.weight_quantizer(conv.weight), conv.bias, conv.stride,
                              conv.padding, output_padding, conv.groups, conv.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _fn = staticmethod(F.conv_transpose1d)
    _spatial_dims = 1


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _fn = staticmethod(F.conv_transpose2d)
    _spatial_dims = 2


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _fn = staticmethod(F.conv_transpose3d)
    _spatial_dims = 3


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


#: float layer type -> quantized type (exact types: subclasses of these are not swapped)
QUANT_TYPES: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear,
}
