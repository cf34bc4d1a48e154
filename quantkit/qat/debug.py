"""Which quantizers of a prepared PyTorch model cost accuracy: the error each one adds on its own.

The model runs in floating point (every quantizer passes its input through); a hook on each
calibrated quantizer fake-quantizes what it sees with its own range (activations: the
calibrated amax, per tensor; weights: max |w| per output channel) and sums the signal and the
error. So every quantizer is measured on the float model's activations, independently of the
others: the view ``quantkit debug`` gives for a Q/DQ ONNX model, before any fine-tuning, to
decide which quantizers to disable (``QatConfig(disable=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.errors import DatasetError
from quantkit.qat.calibrate import no_fastpath, run_batch
from quantkit.qat.prepare import passed_through, quantizers
from quantkit.qat.quantizer import QMAX, QMIN


@dataclass(frozen=True)
class QuantizerError:
    """Error one quantizer adds on its own (dB: higher is closer to float)."""

    name: str
    kind: str  # "input" or "weight"
    sqnr_db: float
    clipped_share: float
    clipping_share_of_error: float


def _fake_quant(q: Any, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    if q.dynamic:
        amax = q.channel_amax(x) if q.axis is not None else x.abs().amax()
        shape = [1] * x.dim()
        if q.axis is not None:
            shape[q.axis] = -1
        scale = (torch.clamp(amax, min=1e-12) / QMAX).reshape(shape)
    else:
        scale = torch.clamp(q.amax.float(), min=1e-12) / QMAX
    return torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale


@torch.no_grad()
@no_fastpath()
def quantizer_errors(model: nn.Module, loader: Iterable[Any], *, num_batches: int | None = None) -> list[QuantizerError]:
    """The error of every calibrated quantizer of ``model`` (from ``quantkit.qat.prepare`` and
    ``calibrate``) on the float model's activations, worst first.

    Raises:
        DatasetError: the loader yielded nothing.
    """
    measured = [(n, q) for n, q in quantizers(model) if q.enabled and (q.calibrated or q.dynamic)]
    sums = {n: [0.0, 0.0, 0.0, 0, 0] for n, _ in measured}  # signal, error, clipping error, clipped, values
    hooks = []

    def hook_for(name: str, q: Any) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            y = _fake_quant(q, x)
            err = (y - x) ** 2
            clipped = (x.abs() > (q.amax.float() if not q.dynamic else torch.inf))
            s = sums[name]
            s[0] += float((x * x).sum())
            s[1] += float(err.sum())
            s[2] += float(err[clipped].sum())
            s[3] += int(clipped.sum())
            s[4] += x.numel()
        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    with passed_through(model):  # the model runs in float; the hooks measure
        try:
            hooks.extend(q.register_forward_pre_hook(hook_for(name, q)) for name, q in measured)
            model.eval()
            seen = 0
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                run_batch(model, batch, device, check=i == 0)
                seen += 1
            if not seen:
                raise DatasetError("the loader yielded no batch", hint="give at least one batch")
        finally:
            for h in hooks:
                h.remove()
            model.train(training)
    out = []
    for name, q in measured:
        sig, err, clip_err, clipped, values = sums[name]
        sqnr = math.inf if err == 0 else -math.inf if sig == 0 else 10 * math.log10(sig / err)
        out.append(QuantizerError(name, "weight" if q.dynamic else "input", sqnr, clipped / max(values, 1),
                                  clip_err / err if err else 0.0))
    return sorted(out, key=lambda e: e.sqnr_db)
