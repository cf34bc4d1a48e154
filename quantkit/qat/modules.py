"""Quantized versions of the layers TensorRT runs in INT8: an input quantizer (per tensor) and a
weight quantizer (per output channel) around the layer's own computation.

    QuantConv1d/2d/3d, QuantConvTranspose1d/2d/3d, QuantLinear

Each is a subclass of the PyTorch layer it replaces and shares that layer's parameters, so
optimizers, state dicts and BatchNorm folding see the usual ``weight`` and ``bias``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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


#: the torch.nn.functional calls a layer subclass's own forward makes its computation with
_FUNCTIONAL = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")
_intercepting = threading.local()  # this thread's stack of [layer, its call made]
_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict[str, Any] = {}


def _intercepted(name: str) -> Any:
    original = _originals[name]

    def call(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = getattr(_intercepting, "stack", None)
        if active and not active[-1][1]:
            active[-1][1] = True
            q = active[-1][0]
            return original(q.input_quantizer(input), q.weight_quantizer(weight), *args, **kwargs)
        return original(input, weight, *args, **kwargs)
    return call


@contextlib.contextmanager
def _quantized_call(layer: "FunctionalQuantMixin") -> Iterator[None]:
    """While ``layer``'s forward runs, its first ``F.conv*``/``F.linear`` call reads its input and
    weight through ``layer``'s quantizers: the functions are patched in torch.nn.functional while
    any such forward runs (counted, under a lock), and act only for the thread whose layer is
    running; every other call passes through."""
    global _patch_users
    stack = getattr(_intercepting, "stack", None)
    if stack is None:
        stack = _intercepting.stack = []
    with _patch_lock:
        if _patch_users == 0:
            _originals.update({name: getattr(F, name) for name in _FUNCTIONAL})
            for name in _FUNCTIONAL:
                setattr(F, name, _intercepted(name))
        _patch_users += 1
    stack.append([layer, False])
    try:
        yield
    finally:
        stack.pop()
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name in _FUNCTIONAL:
                    setattr(F, name, _originals[name])


class FunctionalQuantMixin(QuantMixin):
    """A quantized subclass of a Conv/Linear subclass with its own forward (timm's StdConv2d and
    ScaledStdConv2d, which standardize the weight first, Conv2dSame, which pads first, timm's
    Linear): that forward runs as written, and the first ``F.conv*``/``F.linear`` call it makes
    takes its input and weight through the quantizers (the weight it computes: a standardized
    weight is quantized as the convolution reads it)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _quantized_call(self):
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the class is made at run time (functional_quant_type): pickled as the user's class it
        # wraps, made again on loading (torch.save of a whole prepared model; deepcopy alike)
        state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
        return _made_again, (type(self).__bases__[1],), state


_FUNCTIONAL_TYPES: dict[type, type] = {}


def _made_again(cls: type) -> Any:
    """An empty instance of ``functional_quant_type(cls)`` for pickle to fill."""
    made = functional_quant_type(cls)
    return made.__new__(made)


def functional_quant_type(cls: type) -> type:
    """The quantized form of ``cls``, a subclass of a ``QUANT_TYPES`` layer with its own forward
    (made once per class)."""
    if cls not in _FUNCTIONAL_TYPES:
        axis = 1 if issubclass(cls, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
        _FUNCTIONAL_TYPES[cls] = type(f"Quant{cls.__name__}", (FunctionalQuantMixin, cls),
                                      {"weight_axis": axis, "__module__": cls.__module__})
    return _FUNCTIONAL_TYPES[cls]


#: float layer type -> quantized type (exact types; a subclass with its own forward: functional_quant_type)
QUANT_TYPES: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear,
}
