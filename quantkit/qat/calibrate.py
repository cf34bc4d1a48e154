"""Calibrate the input quantizers of a prepared model with quantkit's collectors and range
methods: one pass over the data on the model's device, every method computed from it."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.calibrators.methods import TensorRanges, all_ranges, check_method
from quantkit.errors import DatasetError, InputError, ModelError
from quantkit.qat import histogram
from quantkit.qat.modules import QuantMixin
from quantkit.qat.prepare import quantizers

log = logging.getLogger(__name__)


@dataclass
class QatCalibration:
    """Ranges of every input quantizer under every method, and the method applied."""

    method: str
    ranges: dict[str, TensorRanges]
    batches: int
    shared: dict[str, str] = field(default_factory=dict)  # quantizer -> the one it shared a histogram with

    def amax(self, method: str | None = None) -> dict[str, float]:
        return {n: r.amax[method or self.method] for n, r in self.ranges.items()}

    def apply(self, model: nn.Module, method: str) -> None:
        """Set every calibrated quantizer of ``model`` to ``method``'s amax (no new pass)."""
        check_method(method)
        qs = dict(quantizers(model, inputs_only=True))
        amaxes = self.amax(method)
        missing = [n for n in amaxes if n not in qs]
        if missing:
            raise ModelError(f"the model has no quantizer {missing[0]!r} ({len(missing)} of this calibration's "
                             f"{len(amaxes)} missing): it is not the prepared model this calibration was made on",
                             hint="apply a calibration to the model quantkit.qat.calibrate calibrated "
                             "(or a copy of it)")
        for name, amax in amaxes.items():
            qs[name].set_amax(max(amax, 1e-8))
        for name, leader in self.shared.items():  # same tensor, same range: quantized once
            if amaxes.get(name) == amaxes.get(leader) and name in qs and leader in qs:
                qs[name].follow(qs[leader])
        self.method = method


Call = tuple[tuple[Any, ...], dict[str, Any]]  # a model call's positional and keyword arguments


def _inputs(batch: Any) -> Call:
    """The model call in a loader's batch, as (args, kwargs): a tensor; a dict of keyword inputs;
    or a tuple/list read as (inputs, labels, ...) whose inputs are a tensor, a tuple/list of the
    model's positional inputs, or a dict of its keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor):
            return (first,), {}
        if isinstance(first, Mapping):
            return (), dict(first)
        if isinstance(first, (list, tuple)) and first:
            return tuple(first), {}
        raise DatasetError(f"cannot take model inputs from a batch whose first item is a {type(first).__name__}",
                           hint="yield tensors, (inputs, labels) pairs, ((input_1, input_2), labels) or dicts")
    raise DatasetError(f"cannot take model inputs from a batch of type {type(batch).__name__}",
                       hint="yield tensors, (inputs, labels) pairs, ((input_1, input_2), labels) or dicts")


def _check_call(model: nn.Module, call: Call) -> None:
    """A DatasetError where the model's forward does not take the batch's inputs (a model of two
    inputs given an (x, y) batch, which reads as (inputs, labels))."""
    args, kwargs = call
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to check against
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        took = ", ".join([*(f"a {type(a).__name__}" for a in args), *(f"{k}=" for k in kwargs)])
        raise DatasetError(f"{type(model).__name__}.forward{sig} does not take the batch's inputs ({took}): {err}",
                           hint="a tuple batch is read as (inputs, labels): yield ((input_1, input_2), labels) "
                           "or a dict of the forward's arguments for a model of several inputs") from None


def _call_on(batch: Any, device: torch.device) -> Call:
    """``batch``'s model call (``_inputs``), its tensors moved to ``device``."""
    args, kwargs = _inputs(batch)
    return _to(args, device), _to(kwargs, device)


def run_batch(model: nn.Module, batch: Any, device: torch.device, *, check: bool = False) -> Any:
    """``model`` called on ``batch``'s inputs (``_inputs``), moved to ``device``."""
    args, kwargs = _call_on(batch, device)
    if check:
        _check_call(model, (args, kwargs))
    return model(*args, **kwargs)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if type(x) in (list, tuple):  # (not a namedtuple's own type)
        return type(x)(_to(v, device) for v in x)
    return x


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """PyTorch's fused transformer "fast path" off: in eval mode without gradients,
    nn.TransformerEncoderLayer and nn.MultiheadAttention run one fused kernel from their weights,
    and the quantized Linear layers inside them are never called (no statistics, no fake
    quantization)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@torch.no_grad()
@no_fastpath()
def collect(model: nn.Module, loader: Iterable[Any], *, num_batches: int | None = None,
            on_batch: Callable[[int], None] | None = None, cuda_graph: bool | None = None,
            distributed: bool | None = None, align: bool = True) -> int:
    """Run the data through ``model`` with every enabled input quantizer collecting (and not
    quantizing); returns the number of batches (of every rank, when merged across ranks).
    Statistics stay on the model's device.

    Inside an initialised torch.distributed process group (``distributed`` None or True), each
    rank collects on its own loader (its shard: a ``DistributedSampler``, say) and the
    statistics are then merged across the ranks (``quantkit.qat.distributed``), so every rank
    ends with those of all the data; with ``align`` the ranks first agree on each histogram's
    starting range (one extra forward of the first batch), which makes the merge exact.
    ``distributed=False`` keeps each rank's own statistics. Every rank must call ``collect``.

    On CUDA (``cuda_graph`` None or True) the first batch runs eagerly, then the whole
    calibration forward, histograms included, is captured once as a CUDA graph and replayed for
    every further batch of the same shape: the statistics code never synchronises with the
    host, so it captures, and replay removes the launch cost of its many small kernels. A model
    that cannot be captured falls back to eager calls.
    """
    from quantkit.qat import distributed as qdist

    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise InputError(f"num_batches must be a positive whole number or None (every batch), got {num_batches!r}")
    qs = [q for _, q in quantizers(model, inputs_only=True) if q.enabled]
    merge = qdist.is_distributed() if distributed is None else distributed and qdist.is_distributed()
    if not qs:
        raise ModelError("the model has no enabled input quantizers; call quantkit.qat.prepare first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph and device.type == "cuda"
    # statistics of the floating-point network, as TensorRT and quantkit's ONNX calibration
    # collect them: weight quantizers are bypassed during the pass
    weights = [q for _, q in quantizers(model) if q.dynamic and q.enabled]
    was_training = model.training
    model.eval()
    for q in qs:
        q.histogram_, q.shares_, q.start_range_ = None, False, 0.0
        q.calibrating = True
    for q in weights:
        q.enabled = False
    count = 0
    graph: Any = None
    static: torch.Tensor | None = None
    agreed = not (merge and align)
    failure: BaseException | None = None
    try:
        try:
            for batch in loader:
                args, kwargs = _call_on(batch, device)
                if count == 0:
                    _check_call(model, (args, kwargs))
                if not agreed:  # the ranks agree on where each histogram's grid starts
                    agreed = True
                    qdist.agree_start_ranges_(qs, lambda: model(*args, **kwargs))
                x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
                if x is None:  # several inputs, keyword inputs: called as they are
                    model(*args, **kwargs)
                elif graph is not None and static is not None and x.shape == static.shape:
                    static.copy_(x)
                    graph.replay()
                elif use_graph and count == 0:
                    graph, static = _warm_up_and_capture(model, x, qs)
                else:
                    model(x)
                count += 1
                if on_batch is not None:
                    on_batch(count)
                if num_batches is not None and count >= num_batches:
                    break
        except Exception as err:
            if not merge:
                raise
            failure = err  # raised on every rank together, below
        if merge:
            if not agreed:  # this rank had no batch, or failed before its first
                qdist.agree_start_ranges_(qs, None)
            qdist.check_ranks(failure)
            count = qdist.sum_count(count)
            qdist.merge_histograms_(qs, device)
    finally:
        for q in qs:
            q.calibrating = False
        for q in weights:
            q.enabled = True
        model.train(was_training)
    if count == 0:
        raise DatasetError("the calibration loader yielded no batch", hint="check the loader and its dataset")
    return count


@contextlib.contextmanager
def _capturing(graph: Any) -> Iterator[None]:
    """``torch.cuda.graph`` without its ``empty_cache`` calls (after which every allocation of
    the calibration run, and of the caller's code after it, is a fresh cudaMalloc): capture on a
    side stream, ended even when the forward raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            yield
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)


def _warm_up_and_capture(model: nn.Module, x: torch.Tensor,
                         qs: list[Any]) -> tuple[Any, torch.Tensor | None]:
    """Run ``x`` eagerly on a side stream (its statistics count), then capture one calibration
    forward as a CUDA graph over a static copy of ``x``. Returns (None, None) when capture fails.

    In the graph the histogram updates run on a side stream, concurrently with the layers that
    follow (``histogram.lagged``), unless the eager run found a quantized input modified in place
    within the lag. (Eagerly, the stream switches cost more host time than the overlap saves.)

    Quantizers that read the same tensor share one histogram from the eager run on (the graph
    replays the same tensors, so the pairs hold); if capture fails, each gets its own copy
    before the eager calls go on."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), histogram.sharing(), histogram.lagged() as lag:
        model(x)
    torch.cuda.current_stream().wait_stream(side)
    if lag.modified is not None:
        log.info("%s's input is modified in place soon after it is read: histogram updates stay on the "
                 "model's stream", lag.modified)
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    try:
        # the histograms' side stream: the warm-up's, idle now (no stream is created during capture)
        with _capturing(graph), histogram.lagged(side if lag.modified is None else None):
            model(static)
    except Exception as err:  # noqa: BLE001 - any capture failure: stay eager
        log.info("calibration forward not capturable as a CUDA graph (%s); running eagerly", err)
        for q in qs:
            if q.shares_:
                q.histogram_, q.shares_ = q.histogram_.clone(), False
        return None, None
    return graph, static


def _leave_uncalled_in_float(model: nn.Module) -> list[str]:
    """Turn off the quantizers of the quantized layers the calibration pass never called (their
    weights used by another module's forward through ``F.linear``/``F.conv2d``: BEiT's and EVA's
    attention read ``self.qkv.weight`` with their own bias), and of input quantizers that saw no
    data and have no range: they stay in float, said in one warning; export refused them as never
    calibrated. The names turned off."""
    off = []
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            q = m.input_quantizer
            if q.enabled and q.histogram_ is None and not q.calibrated:
                q.enabled = m.weight_quantizer.enabled = False
                off.append(name)
    for name, q in quantizers(model, inputs_only=True):  # what is left: the residual joins' quantizers
        if q.enabled and q.histogram_ is None and not q.calibrated:
            q.enabled = False
            off.append(name)
    if off:
        log.warning("%d quantized layer(s) or quantizer(s) were not called in the calibration pass and stay in float "
                    "(their weights used in another module's forward, e.g. through F.linear): %s", len(off),
                    ", ".join(off[:6]) + (", ..." if len(off) > 6 else ""))
    return off


def calibrate(model: nn.Module, loader: Iterable[Any], method: str | None = None, *, num_batches: int | None = None,
              percentile: float | None = None, on_batch: Callable[[int], None] | None = None,
              cuda_graph: bool | None = None, distributed: bool | None = None, align: bool = True) -> QatCalibration:
    """Calibrate every enabled input quantizer of a prepared model.

    Args:
        model: from ``quantkit.qat.prepare``.
        loader: yields tensors, (inputs, labels) pairs or dicts of inputs.
        method: a registered range method (``quantkit.calibrators.method_names()``; default:
            the ``QatConfig`` method given to ``prepare``).
        num_batches: stop after this many batches.
        percentile: for the percentile method (default: the ``QatConfig``'s).
        cuda_graph: on CUDA, replay the calibration forward as a CUDA graph (default); see collect.
        distributed: inside a torch.distributed process group, merge the statistics of every
            rank (default), so that every rank computes the same, whole-data-set ranges; False
            keeps each rank's own. See collect and ``quantkit.qat.distributed``.
        align: with ``distributed``, agree on the histograms' starting ranges first (exact merge).

    Raises:
        DatasetError: the loader yielded nothing.
        NonFiniteError: NaN or Inf reached a quantizer (the message names it).
    """
    config = getattr(model, "qat_config_", None)
    method = check_method(method or (config.method if config is not None else "entropy"))
    params = {"percentile": percentile if percentile is not None else config.percentile if config is not None else 99.99}
    batches = collect(model, loader, num_batches=num_batches, on_batch=on_batch, cuda_graph=cuda_graph,
                      distributed=distributed, align=align)
    _leave_uncalled_in_float(model)
    ranges: dict[str, TensorRanges] = {}
    owners: dict[int, str] = {}
    shared: dict[str, str] = {}
    calibrated = [(n, q) for n, q in quantizers(model, inputs_only=True) if q.enabled and q.histogram_ is not None]
    for name, q in calibrated:
        if not q.shares_:
            owners[id(q.histogram_)] = name
            hist = q.histogram_.compute()  # one host transfer per histogram, after the pass
            ranges[name] = all_ranges(hist, params)
    for name, q in calibrated:
        if q.shares_:
            shared[name] = owners[id(q.histogram_)]
            ranges[name] = ranges[shared[name]]
        q.histogram_, q.shares_ = None, False
    result = QatCalibration(method, ranges, batches, shared)
    result.apply(model, method)
    log.info("calibrated %d quantizers from %d batches (%s)", len(ranges), batches, method)
    return result
