"""Fake quantization of one tensor: symmetric int8 on PyTorch's own fake-quantize operators,
so that ``torch.onnx.export`` writes QuantizeLinear/DequantizeLinear pairs.

    activations: per tensor,  scale = amax / 127, zero point 0, range [-128, 127]
    weights:     per channel, amax = max |w| over the other axes, taken from the current
                 weight at every call (so folding BatchNorm into the weight keeps it exact)
                 and frozen into a buffer for export

Gradients pass straight through inside the range and are zero outside (PyTorch's STE).

Two quantizers that read the same tensor with the same range (the first convolution of a residual
block and its downsampling convolution or residual Add; ``quantkit.qat.calibrate`` links them when
they shared a calibration histogram) give the same output: the second one (``follows_``) returns
the first one's output when it is handed the very tensor the first one just quantized, so the
tensor is fake-quantized once (one write, one mask, one backward), with the same values and
gradients. Any later change of either range (``set_amax``, a loaded state dict) undoes the link.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from quantkit.errors import NotCalibratedError

QMIN, QMAX = -128, 127
# what torch.fake_quantize_per_tensor_affine calls with tensor scales (same values and gradient),
# given a persistent "enabled" flag; the public operator is kept for ONNX export (its symbolic)
_CACHEMASK = getattr(torch, "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", None)


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
        self.shares_ = False  # True: histogram_ is another quantizer's, which reads the same tensor
        self.start_range_ = 0.0  # > 0: a new histogram starts at this range (ranks agreed on it)
        self.qualified_name = "<quantizer>"  # set by prepare(), for messages
        self.bank_: Any = None  # weights: the model's quantkit.qat._cuda_fq.WeightBank (CUDA)
        self.follows_: tuple[TensorQuantizer, int] | None = None  # (leader, its range generation)
        self._generation = 0  # bumped whenever the range changes
        self._followed = False
        self._last: tuple[Any, int, Any] | None = None  # leader: weakrefs to its last input (+version) and output

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
        """max |w| over every axis but ``axis`` (one reduction kernel), detached."""
        dims = [d for d in range(w.dim()) if d != self.axis]
        w = w.detach()
        return torch.linalg.vector_norm(w, ord=float("inf"), dim=dims) if dims else w.abs()

    def set_amax(self, amax: torch.Tensor | float) -> None:
        """Fix the range: amax, and the scale and zero point derived from it, become buffers
        (used by every later call, and written by export as Q/DQ initializers)."""
        dev = self.amax.device
        value = torch.as_tensor(amax, dtype=torch.float32).detach().to(dev)
        self.amax = value if self.axis is not None else value.reshape(())
        scale, zero = scale_and_zero(self.amax, self.axis)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        # the "enabled" flag of PyTorch's per-tensor operator, kept so that no call allocates
        # and fills one (the public operator does, per call: a launch and an allocation)
        self.register_buffer("fake_quant_on", torch.ones(1, dtype=torch.long, device=dev), persistent=False)
        self._range_changed()

    def follow(self, leader: "TensorQuantizer") -> None:
        """Return ``leader``'s output for the tensor ``leader`` just quantized (the same range:
        the caller checks) instead of quantizing it again."""
        self.follows_ = (leader, leader._generation)
        leader._followed = True

    def _range_changed(self) -> None:
        self._generation += 1
        self.follows_ = None
        self._last = None

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        amax = state_dict.get(prefix + "amax")
        if isinstance(amax, torch.Tensor) and amax.numel() and not hasattr(self, "scale"):
            self.set_amax(amax)  # a calibrated checkpoint into a fresh model: its scale buffers exist now
        self._range_changed()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def freeze_to(self, w: torch.Tensor) -> None:
        """Fix a dynamic weight quantizer to ``w``'s current per-channel amax (before export)."""
        self.set_amax(self.channel_amax(w) if self.axis is not None else w.detach().abs().amax())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            self._last = None  # a follower must not take an output from before
            return x
        if self.calibrating:
            self._collect(x)
            return x
        if self.calibrated and hasattr(self, "scale"):
            if self.axis is None and _CACHEMASK is not None and not torch.onnx.is_in_onnx_export():
                if self.follows_ is not None:
                    leader, generation = self.follows_
                    last = leader._last
                    if generation == leader._generation and last is not None and last[0]() is x and last[1] == x._version:
                        out = last[2]()
                        if out is not None:
                            return out
                out = _CACHEMASK(x, self.scale, self.zero_point, self.fake_quant_on, QMIN, QMAX)[0]
                if self._followed:
                    self._last = (weakref.ref(x), x._version, weakref.ref(out))
                return out
            return _fake_quantize(x, self.scale, self.zero_point, self.axis)
        if self.dynamic:
            if self.axis == 0 and x.is_cuda:  # one kernel, identity backward (quantkit.qat._cuda_fq)
                if self.bank_ is not None:
                    out = self.bank_.lookup(self, x)
                    if out is not None:
                        return out
                from quantkit.qat._cuda_fq import fake_quantize_weight

                out = fake_quantize_weight(x)
                if out is not None:
                    return out
            return _fake_quantize_weight(x, self.channel_amax(x) if self.axis is not None else x.detach().abs().amax(),
                                         self.axis)
        raise NotCalibratedError(f"quantizer {self.qualified_name!r} was never calibrated",
                                 hint="run quantkit.qat.calibrate(model, loader) first, or disable it")

    def _collect(self, x: torch.Tensor) -> None:
        if self.shares_:
            return  # the quantizer whose histogram this is reads the same tensor
        if x.is_cuda:
            from quantkit.qat import histogram

            if self.histogram_ is None:
                owner = histogram.shared_for(x)
                if owner is not None and owner.num_bins == self.num_bins:
                    self.histogram_, self.shares_ = owner, True
                    return
                self.histogram_ = histogram.TorchHistogram(self.num_bins, self.qualified_name, x.device)
                self.histogram_.start_at(getattr(self, "start_range_", 0.0))
            self.histogram_.update(x)
            histogram.remember(x, self.histogram_)
            return
        if self.histogram_ is None:
            from quantkit.calibrators.collectors import HistogramCollector

            self.histogram_ = HistogramCollector(self.num_bins, self.qualified_name)
            self.histogram_.start_at(getattr(self, "start_range_", 0.0))
        self.histogram_.update(x.detach().float().numpy())


def scale_and_zero(amax: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = amax / 127 (float32), zero point 0 (int32)."""
    scale = torch.clamp(amax.detach().float(), min=1e-12) / QMAX
    if axis is None:
        scale = scale.reshape(())
    return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, QMIN, QMAX)


def _fake_quantize_weight(w: torch.Tensor, amax: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-channel fake quantization of a weight by its own amax, in five small kernels.

    PyTorch's per-channel operator checks its zero points on the host (a CUDA synchronisation
    per layer and step). Here the weight is divided by its per-channel scale, fake-quantized
    per tensor with scale 1 (Python scalars: nothing to check), and scaled back; the scale is
    detached, so the gradient is the straight-through identity (with amax = max |w| no value
    is outside the range).
    """
    scale = torch.clamp(amax, min=1e-12).div_(QMAX)
    if axis is not None:
        shape = [1] * w.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.fake_quantize_per_tensor_affine(w / scale, 1.0, 0, QMIN, QMAX) * scale
