"""Export a quantized model as Q/DQ ONNX for TensorRT (and ONNX Runtime).

    copy -> fold BatchNorm into the preceding convolution -> freeze weight amax (per channel)
      -> torch.onnx.export (TorchScript-based, dynamo=False) -> check -> atomic write

Why ``dynamo=False``: the dynamo exporter stops with ``GuardOnDataDependentSymNode`` when a
scale is computed from the data while tracing, and it needs ``onnxscript``; with every scale
frozen into a buffer first (below) it exported our digits model too (torch 2.13), but merged
duplicate pairs. The TorchScript exporter maps PyTorch's fake-quantize operators to
QuantizeLinear/DequantizeLinear (per-axis from opset 13), needs nothing more, and only warns
that it is deprecated; its output is what the tests check. Weights stay float initializers
feeding a Q/DQ pair, as TensorRT expects.

BatchNorm is folded first: with a weight Q/DQ pair between the weight and the Conv, the
exporter cannot fuse BN and would leave a BatchNormalization node. Folding is exact for
per-channel symmetric weights: scaling channel c by s_c scales its amax by |s_c| too.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit._io import write_bytes_atomic
from quantkit.errors import InputError, ModelError, NotCalibratedError
from quantkit.qat.calibrate import no_fastpath
from quantkit.qat.modules import QUANT_TYPES, FunctionalQuantMixin, QuantMixin
from quantkit.qat.prepare import is_plain_batchnorm, passed_through, quantizers

log = logging.getLogger(__name__)

MIN_OPSET = 13


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into its weight and bias (in
    place; uses running statistics); returns how many were folded. Works on torch.fx
    GraphModules (from ``prepare``) and on ``nn.Sequential`` pairs."""
    folded = 0
    # a module registered under two names (weight tying) is one object: folding a BatchNorm into
    # it would change its other uses too
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    if isinstance(model, torch.fx.GraphModule):
        modules = dict(model.named_modules(remove_duplicate=False))  # every name a call may use
        calls = Counter(id(modules[str(n.target)]) for n in model.graph.nodes
                        if n.op == "call_module" and str(n.target) in modules)
        for node in list(model.graph.nodes):
            bn = modules.get(str(node.target)) if node.op == "call_module" else None
            if not is_plain_batchnorm(bn):  # a subclass (BatchNorm + activation, ...) is exported as it is
                continue
            src = node.args[0]
            conv = modules.get(str(src.target)) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
            if not _plain_conv(conv) or len(src.users) != 1:
                continue
            if max(calls[id(conv)], names[id(conv)]) > 1 or max(calls[id(bn)], names[id(bn)]) > 1:
                log.warning("BatchNorm %s is not folded into %s: the %s is used more than once (shared weights)",
                            node.target, src.target, "convolution" if max(calls[id(conv)], names[id(conv)]) > 1
                            else "BatchNorm")
                continue
            _fold(conv, bn)
            node.replace_all_uses_with(src)
            model.graph.erase_node(node)
            # no parameters left behind that the forward never uses (DistributedDataParallel
            # rejects them): the BatchNorm becomes an Identity, as in the Sequential case below
            parent, _, leaf = str(node.target).rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
            folded += 1
        model.graph.lint()
        model.recompile()
        return folded
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (a_name, a), (bn_name, b) in zip(children, children[1:]):
                if _plain_conv(a) and is_plain_batchnorm(b):
                    if names[id(a)] > 1 or names[id(b)] > 1:
                        log.warning("BatchNorm %s is not folded into %s: one of them is used more than once (shared "
                                    "weights)", bn_name, a_name)
                        continue
                    _fold(a, b)
                    setattr(parent, bn_name, nn.Identity())
                    folded += 1
    return folded


#: a fold found by running the model is kept where the outputs after it agree with the ones before
#: to this noise/signal (-40 dB; a fold is exact but for float rounding and the INT8 steps it may
#: flip; a BatchNorm whose input is also read elsewhere moves an output by far more)
RUN_FOLD_NOISE = 1e-4


def fold_batchnorm_by_run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Fold the BatchNorms that ``fold_batchnorm`` cannot see (a module that calls ``self.bn(
    self.conv(x))`` in its own forward, in a model fx cannot trace or one ``prepare`` returned as
    itself) into their convolutions, in place: one forward pass on the example finds each plain
    BatchNorm called once on the very tensor a convolution (called once) returned, and the folds
    are kept only where the model's outputs on the example then agree with its outputs before
    (``RUN_FOLD_NOISE``; else each pair is tried alone and only those that agree are kept).
    The runs pass every quantizer through: a fold is exact in float, and the INT8 steps that its
    float rounding flips added up to more than the noise on timm's EfficientNet-B0 and
    MobileNetV3 (random weights), so the Q/DQ export kept BatchNorms that its float twin folded,
    and ``quantkit debug`` could not pair the two. Returns how many were folded."""
    with passed_through(model):
        return _fold_by_run(model, args, kwargs)


def _fold_by_run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """``fold_batchnorm_by_run``'s runs and folds, its quantizers passed through."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    convs = {n: m for n, m in model.named_modules() if _is_conv(m) and names[id(m)] == 1}
    bns = {n: m for n, m in model.named_modules() if _foldable_batchnorm(m) and names[id(m)] == 1}
    if not convs or not bns:
        return 0
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in convs}
    ins: dict[str, list[torch.Tensor]] = {n: [] for n in bns}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: outs[n].append(o)) for n, m in convs.items()]
    hooks += [m.register_forward_hook(lambda _m, i, _o, n=n: ins[n].append(i[0] if i else None))
              for n, m in bns.items()]
    try:
        with torch.no_grad(), no_fastpath():
            before = _flat_outputs(model(*args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
    by_output = {id(o[0]): n for n, o in outs.items() if len(o) == 1}
    pairs = [(by_output[id(i[0])], b) for b, i in ins.items() if len(i) == 1 and id(i[0]) in by_output]
    if not pairs:
        return 0

    def agrees() -> bool:
        with torch.no_grad(), no_fastpath():
            after = _flat_outputs(model(*args, **kwargs))
        if len(after) != len(before):
            return False
        signal = sum(float((b.double() ** 2).sum()) for b in before)
        noise = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(after, before))
        return noise <= RUN_FOLD_NOISE * signal

    def fold(pair: tuple[str, str]) -> tuple[nn.Module, nn.Module, Any, Any]:
        conv, bn = model.get_submodule(pair[0]), model.get_submodule(pair[1])
        kept = (conv.weight, conv.bias)
        _fold(conv, bn)
        parent, _, leaf = pair[1].rpartition(".")
        if is_plain_batchnorm(bn):
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
            return conv, bn, kept, (parent, leaf)
        # a subclass (timm's BatchNormAct2d: BatchNorm, then its activation in its own forward)
        # stays, its normalization made the identity; the export drops that node (_drop_identity_batchnorms)
        return conv, bn, kept, _neutralize(bn)

    def unfold(done: tuple[nn.Module, nn.Module, Any, Any]) -> None:
        conv, bn, (weight, bias), where = done
        conv.weight, conv.bias = weight, bias
        if isinstance(where, dict):
            for name, value in where.items():
                setattr(bn, name, value)
            return
        parent, leaf = where
        setattr(model.get_submodule(parent) if parent else model, leaf, bn)

    done = [fold(p) for p in pairs]
    if agrees():
        return len(done)
    for d in reversed(done):
        unfold(d)
    kept = 0
    for p in pairs:  # one at a time: the pair whose convolution's output is read elsewhere too stays
        d = fold(p)
        if agrees():
            kept += 1
        else:
            unfold(d)
            conv = model.get_submodule(p[0])
            why = "its forward transforms its weight (a standardized weight takes no scale)" \
                if isinstance(conv, FunctionalQuantMixin) else "the convolution's output is read elsewhere too"
            log.warning("BatchNorm %s is not folded into %s: the outputs change (%s)", p[1], p[0], why)
    return kept


@contextlib.contextmanager
def _computed_weights(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """For the runs in the block: the weight each enabled ``FunctionalQuantMixin`` layer of ``model``
    hands its weight quantizer (what its own forward computes: timm's StdConv2d standardizes it),
    by id of the layer; freezing those quantizers to the parameter instead clipped the weight the
    layer reads."""
    seen: dict[int, torch.Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, FunctionalQuantMixin) and m.weight_quantizer.enabled]
    hooks = [m.weight_quantizer.register_forward_pre_hook(
        lambda _q, inp, key=id(m): seen.setdefault(key, inp[0].detach())) for m in layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _tensor_paths(out: Any) -> list[tuple[Any, ...]]:
    """The pytree key paths of the tensors in a forward's output, in the order the exporter
    flattens it (tuples, lists and dicts, nested)."""
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(out)
    return [tuple(path) for path, leaf in leaves if isinstance(leaf, torch.Tensor)]


def _output_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """ONNX output names for the tensors at ``paths``: "output" for one, "output_i" where no dict
    holds them, else their keys and positions joined by dots ("head.logits", "aux.0")."""
    from torch.utils._pytree import MappingKey, SequenceKey

    if not any(isinstance(k, MappingKey) for path in paths for k in path):
        return ["output"] if len(paths) == 1 else [f"output_{i}" for i in range(len(paths))]
    names: list[str] = []
    for i, path in enumerate(paths):
        name = ".".join(str(k.key) if isinstance(k, MappingKey) else str(k.idx) if isinstance(k, SequenceKey)
                        else str(k) for k in path) or f"output_{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def _tensor_outputs_only(m: nn.Module) -> None:
    """Make ``m`` (export's own copy) return the tensors of its output only, as a flat tuple in the
    exporter's order: its forward wrapped on the instance, so the module scopes that name the
    exported nodes stay the model's own."""
    forward = m.forward

    def tensors_only(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        leaves = torch.utils._pytree.tree_leaves(forward(*args, **kwargs))
        return tuple(t for t in leaves if isinstance(t, torch.Tensor))

    m.forward = tensors_only  # type: ignore[method-assign]


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output (a tensor, tuples, lists, dicts), flattened."""
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _plain_conv(m: Any) -> bool:
    """A convolution whose forward is PyTorch's own (or quantkit's quantized form of it): folding a
    BatchNorm's scale into its weight is exact. A subclass with its own forward (timm's StdConv2d
    standardizes its weight, undoing the scale: a blind fold changed the model) is left to
    ``fold_batchnorm_by_run``, which keeps a fold only where the outputs stay."""
    return _is_conv(m) and not isinstance(m, FunctionalQuantMixin) and (isinstance(m, QuantMixin)
                                                                       or type(m) in QUANT_TYPES)


def _is_conv(m: Any) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def _foldable_batchnorm(m: nn.Module) -> bool:
    """PyTorch's BatchNorms and subclasses of them that normalize with running statistics, in eval
    mode (their fold is checked by a run, ``fold_batchnorm_by_run``)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
        and m.running_var is not None and not m.training


def _neutralize(bn: nn.Module) -> dict[str, Any]:
    """Make ``bn``'s normalization the identity (mean 0, variance 1 - eps, weight 1, bias 0), in
    place; returns what it had, to put back."""
    kept = {"running_mean": bn.running_mean, "running_var": bn.running_var, "weight": bn.weight, "bias": bn.bias}
    assert isinstance(bn.running_mean, torch.Tensor) and isinstance(bn.running_var, torch.Tensor)
    bn.running_mean = torch.zeros_like(bn.running_mean)
    bn.running_var = torch.ones_like(bn.running_var) - float(bn.eps)  # type: ignore[arg-type]
    if bn.weight is not None:
        bn.weight = nn.Parameter(torch.ones_like(bn.weight), requires_grad=bn.weight.requires_grad)
    if bn.bias is not None:
        bn.bias = nn.Parameter(torch.zeros_like(bn.bias), requires_grad=bn.bias.requires_grad)
    return kept


#: a BatchNormalization node whose parameters are within this of the identity's is dropped from an export
_IDENTITY_TOLERANCE = 1e-6


def _drop_identity_batchnorms(proto: Any) -> int:
    """Remove the BatchNormalization nodes of ``proto`` (an export) that compute the identity (the
    subclasses ``fold_batchnorm_by_run`` folded): their readers read the Conv's output. Both
    exports drop the same nodes, so the float twin pairs with the Q/DQ export. How many."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    # the exporter shares equal constants through Identity nodes (a zero bias and a zero mean)
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    inits.update({out: inits[src] for out, src in aliases.items()})
    outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) != 1 or node.output[0] in outputs \
                or len(node.input) < 5 or not all(t in inits for t in node.input[1:5]):
            continue
        attrs = {a.name: a for a in node.attribute}
        if "training_mode" in attrs and attrs["training_mode"].i:
            continue
        eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        scale, bias, mean, var = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in node.input[1:5])
        if all(np.abs(a - want).max(initial=0) <= _IDENTITY_TOLERANCE
               for a, want in ((scale, 1.0), (bias, 0.0), (mean, 0.0), (var + eps, 1.0))):
            dropped.append(node)
    for node in dropped:
        for reader in graph.node:
            for k, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[k] = node.input[0]
        graph.node.remove(node)
    params = {t for n in dropped for t in n.input[1:5]}
    read = {t for n in graph.node for t in n.input} | outputs
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in params - read]:
        graph.node.remove(node)  # an alias that only a dropped node read
    read = {t for n in graph.node for t in n.input} | outputs
    for init in [i for i in graph.initializer if i.name in params | set(aliases.values()) and i.name not in read]:
        graph.initializer.remove(init)
    return len(dropped)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> None:
    assert isinstance(conv.weight, torch.Tensor) and bn.running_var is not None and bn.running_mean is not None
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    s = gamma / std
    transposed = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    w = conv.weight
    if transposed:  # [C_in, C_out/groups, ...]: output channels on axis 1 (groups == 1 here)
        if getattr(conv, "groups", 1) != 1:
            raise InputError("folding BatchNorm into a grouped ConvTranspose is not supported")
        shape = [1, -1] + [1] * (w.dim() - 2)
    else:
        shape = [-1] + [1] * (w.dim() - 1)
    # new tensors, not in place: another module may hold the same Parameters (prepare's swapped
    # copies of a convolution registered twice share them), and its weights must stay unfolded
    conv.weight = nn.Parameter(w * s.reshape(shape), requires_grad=w.requires_grad)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    conv.bias = nn.Parameter((bias - bn.running_mean) * s + beta)


def check_calibrated(model: nn.Module) -> None:
    """Raise NotCalibratedError naming the first enabled input quantizer without amax."""
    for name, q in quantizers(model, inputs_only=True):
        if q.enabled and not q.calibrated:
            raise NotCalibratedError(f"quantizer {name!r} was never calibrated",
                                     hint="run quantkit.qat.calibrate(model, loader) before exporting")


def _unparametrize(model: nn.Module) -> None:
    """Parametrized tensors (``weight_norm``, ``spectral_norm``) as the plain tensors they compute,
    in place (the export's copy): the weight a Q/DQ pair quantizes, and BatchNorm folds into."""
    from torch.nn.utils import parametrize

    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            # not parametrize.remove_parametrizations: a deep copy shares the parametrized class
            # with the model it was copied from, and removing deletes the class's property, so the
            # user's model lost its weight
            with torch.no_grad():
                values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}  # type: ignore[union-attr]
            m.__class__ = type(m).__bases__[0]
            del m._modules["parametrizations"]
            for name, v in values.items():
                m.register_parameter(name, nn.Parameter(v))


def _does_not_run(err: BaseException) -> InputError:
    return InputError(f"the model does not run on the example input ({type(err).__name__}: "
                      f"{' '.join(str(err).split())[:200]})",
                      hint="give a batch shaped as the model's training data; several inputs as a tuple, "
                           "keyword inputs as a dict")


def _untraceable(err: BaseException) -> InputError:
    """The error for the model's forward failing inside torch.onnx.export's trace (it ran on the
    example before: transformers 5's BERT, "got multiple values for keyword argument 'use_cache'")."""
    if "batch_size" in str(err):  # BatchNorm without running statistics (track_running_stats=False)
        return InputError(f"torch.onnx.export cannot write this model with a dynamic batch axis: "
                          f"{' '.join(str(err).split())[:200]}",
                          hint="export with dynamic_batch=False (the example's batch size is then the model's)")
    return InputError(f"torch.onnx.export could not trace the model's forward on the example input "
                      f"({type(err).__name__}): {' '.join(str(err).split())[:200]}",
                      hint="give the example as the forward takes it (a tensor, a tuple of positional inputs, a dict "
                           "of keyword inputs, or (x, {...})); the same error with quantized=False means the model "
                           "does not export as it is (a TorchScript-tracing limit)")


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example_input: Any, *, dynamic_batch: bool = True,
                opset: int = 17, input_names: list[str] | None = None, output_names: list[str] | None = None,
                quantized: bool = True) -> Path:
    """Write ``model`` as a Q/DQ ONNX file (atomically); the model itself is not changed.

    ``quantized=False`` writes the same network in float, without Q/DQ (every quantizer passed
    through, BatchNorm folded the same way): the FP32 reference that ``quantkit debug`` pairs with
    the Q/DQ export, tensor for tensor (an export of the original module names tensors by its own
    module nesting, which ``prepare``'s traced graph flattens, and holds the weights before
    fine-tuning). A float16 or bfloat16 model is exported in float32 (ONNX's QuantizeLinear takes
    float32 with a float32 scale); TensorRT picks each layer's precision from the builder flags.

    Raises:
        NotCalibratedError: an enabled input quantizer has no range.
        InputError: ``opset`` not an integer from 13 (per-channel Q/DQ needs 13).
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InputError(f"opset must be an integer, got {opset!r}", hint=f"e.g. opset=17 ({MIN_OPSET} or later)")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} cannot hold per-channel Q/DQ; use {MIN_OPSET} or later")
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{str(target)!r} is a folder; give the ONNX file to write (e.g. {str(target / 'model.onnx')!r})")
    if quantized:
        check_calibrated(model)
    m = copy.deepcopy(model).eval()
    low = {p.dtype for p in m.parameters()} & {torch.float16, torch.bfloat16}
    if low:
        m = m.float()
        log.info("exporting in float32: the model's parameters are %s", ", ".join(sorted(str(d) for d in low)))
    _unparametrize(m)
    folded = fold_batchnorm(m)
    # torch.onnx.export's forms: a tensor, a tuple of positional inputs whose last item may be a
    # dict of keyword inputs, or (quantkit's loaders' form) a dict of keyword inputs
    if isinstance(example_input, Mapping):
        args, kwargs = (), dict(example_input)
    elif isinstance(example_input, tuple) and example_input and isinstance(example_input[-1], Mapping):
        args, kwargs = example_input[:-1], dict(example_input[-1])
    else:
        args, kwargs = (example_input if isinstance(example_input, tuple) else (example_input,)), {}
    if low:  # the example input in the exported precision too
        args = tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in low else x for x in args)
        kwargs = {k: x.float() if isinstance(x, torch.Tensor) and x.dtype in low else x for k, x in kwargs.items()}
    if not quantized:
        for _, q in quantizers(m):
            q.enabled = False
    try:
        folded += fold_batchnorm_by_run(m, args, kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # the example input does not fit the model
        raise _does_not_run(err) from err
    n_in = len(args) + len(kwargs)
    input_names = input_names or (["input"] if n_in == 1 and args else
                                  [*(f"input_{i}" for i in range(len(args))), *kwargs])
    try:
        with _computed_weights(m) as computed, torch.no_grad(), no_fastpath():
            out = m(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # the example input does not fit the model
        raise _does_not_run(err) from err
    for layer in m.modules():
        if isinstance(layer, QuantMixin) and layer.weight_quantizer.enabled and quantized:
            # a layer whose forward computes its weight (a standardized one) is fixed to what it computes
            layer.weight_quantizer.freeze_to(computed.get(id(layer), layer.weight))  # type: ignore[attr-defined]
    paths = _tensor_paths(out)
    if len(paths) < len(torch.utils._pytree.tree_leaves(out)):
        # None, numbers or strings beside the tensors (an aux head's None in eval): the exporter keeps
        # tensors only and its trace refuses a constant; the forward exported returns the tensors
        _tensor_outputs_only(m)
    if output_names is None:  # named by their keys where it returns dicts (nested: "head.logits")
        output_names = _output_names(paths)
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), no_fastpath():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            # PRESERVE (the model is in eval mode): without the exporter's eval-mode peephole, which
            # fuses a BatchNorm into the Conv before it only where the Conv's weight is a constant:
            # in the float twin, not after the Q/DQ export's quantized weights, so the two named
            # their tensors apart and `quantkit debug` could not pair them (a BatchNorm that
            # fold_batchnorm_by_run leaves: its convolution's output is read elsewhere too)
            torch.onnx.export(m, args, buf, kwargs=kwargs or None, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as err:
            if not isinstance(err, torch.onnx.errors.OnnxExporterError) and "opset" not in str(err).lower():
                raise _untraceable(err) from err
            # an op or opset it has no form for ("Unsupported onnx_opset_version: 99")
            raise InputError(f"torch.onnx.export failed at opset {opset}: {' '.join(str(err).split())[:200]}",
                             hint="use an opset torch supports (13-20)") from err
        except (TypeError, ValueError, AssertionError) as err:  # AssertionError: the exporter's own checks
            raise _untraceable(err) from err
    proto = onnx.load_from_string(buf.getvalue())
    _drop_identity_batchnorms(proto)
    try:  # with type inference: a file that ONNX Runtime or TensorRT would refuse is not written
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"the exported model is not valid ONNX, nothing was written: {' '.join(str(err).split())[:200]}",
                         hint="report it with the model's layers if it looks like quantkit's bug") from err
    log.info("exported %s (%d BatchNorms folded)", path, folded)
    return write_bytes_atomic(path, proto.SerializeToString())
