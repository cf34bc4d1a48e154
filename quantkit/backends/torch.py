"""PyTorch backend: an ``nn.Module`` behind the runner interface (needs torch).

``capture`` names are the module's inputs or qualified submodule names (``"block1_a.0"``); a
submodule's captured tensor is its output, taken by a forward hook, so the collectors of ONNX
PTQ (``quantkit.calibrators.collectors.collect_histograms``) run on a PyTorch model unchanged,
and a PyTorch model can be compared side by side with its ONNX export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from quantkit._deps import require
from quantkit.backends.base import Runner, TensorSink
from quantkit.datasets.batching import take_rows
from quantkit.errors import InputError
from quantkit.onnx.model import TensorSpec


class TorchRunner(Runner):
    """Run ``module`` in eval mode without gradients.

    Args:
        module: the model; called with one positional tensor per input, in ``inputs`` order.
        inputs: the input specs (name, shape with None/str for dynamic dims, numpy dtype).
        outputs: names for the module's outputs (a tensor, or a tuple/list of them).
        device: where the module runs (``"cpu"``, ``"cuda"``, ...).
        capture: input names or qualified submodule names whose outputs ``capture`` streams.
    """

    backend = "torch"

    def __init__(self, module: Any, inputs: Sequence[TensorSpec], outputs: Sequence[str] = ("output",), *,
                 device: str = "cpu", capture: Sequence[str] = ()):
        self.torch = require("torch", extra="torch")
        self.module = module.to(device).eval()
        self.device = str(device)
        self._inputs, self._outputs = list(inputs), list(outputs)
        named = dict(self.module.named_modules())
        fed = {s.name for s in self._inputs}
        unknown = [c for c in capture if c not in named and c not in fed]
        if unknown:
            raise InputError(f"{type(module).__name__} has no input or submodule {unknown[0]!r} to capture",
                             hint="name submodules as module.named_modules() does, e.g. 'layer1.0.conv1'")
        self._captured = list(dict.fromkeys(capture))
        self._hooked = {c: named[c] for c in self._captured if c not in fed}

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def captured_names(self) -> list[str]:
        return list(self._captured)

    def _run(self, feed: dict[str, np.ndarray], grab: dict[str, Any] | None) -> dict[str, np.ndarray]:
        torch = self.torch
        handles = []
        if grab is not None:
            for name, sub in self._hooked.items():
                def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
                    grab[name] = out[0] if isinstance(out, (tuple, list)) else out
                handles.append(sub.register_forward_hook(hook))
        try:
            with torch.no_grad():
                args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in self._inputs]
                out = self.module(*args)
        finally:
            for h in handles:
                h.remove()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self._outputs):
            raise InputError(f"{type(self.module).__name__} returned {len(outs)} outputs, {len(self._outputs)} named",
                             hint="give one name per output in `outputs`")
        return {n: t.detach().cpu().numpy() for n, t in zip(self._outputs, outs)}

    def _infer_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
        return self._run(feed, None)  # (the whole batch at once: ``axes`` splits nothing here)

    def _infer_captured_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None
                             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        grab: dict[str, Any] = {}
        outs = self._run(feed, grab)
        return outs, {n: feed[n] if n not in self._hooked else grab[n].detach().cpu().numpy() for n in self._captured}

    def capture(self, batches: Iterable[Any], sink: TensorSink, *,
                on_batch: Callable[[int], None] | None = None) -> None:
        for batch in batches:
            _, tensors = self._infer_captured_impl(take_rows(batch.feed, getattr(batch, "batch_axes", {}), 0, batch.size))
            sink(batch, batch.size, tensors)
            if on_batch is not None:
                on_batch(batch.size)

    def close(self) -> None:
        self.module = None
