"""Insert fake quantization into a PyTorch model, by the placement rules of shared/DESIGN.md.

    Conv / ConvTranspose / Linear  -> quantized layer (input per tensor, weight per channel)
    Add whose one operand comes from a convolution (directly or through BatchNorm)
                                   -> a quantizer on the other (residual) operand

Layers are swapped module by module. The residual quantizers need the model's graph: the model
is traced with torch.fx (our quantized layers and quantizers kept as leaves); a model that
cannot be traced keeps its Adds in floating point, with a warning.

A trace records one branch of every ``if`` it meets, and ``self.training`` is a plain bool to it:
traced in train mode, a functional dropout or a BatchNorm subclass written with
``F.batch_norm(..., self.training, ...)`` would stay in its training behaviour after ``eval()``
(in calibration, in the export). So every module whose own forward reads ``self.training``
(timm's DropPath and BatchNormAct2d, custom dropouts) is kept as a leaf, called as itself, and the
model is traced in both modes: where the two graphs differ (the model's own forward reads it),
the trace is not used (residual Adds stay in floating point, with a warning).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import inspect
import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.calibrators.collectors import check_num_bins
from quantkit.errors import InputError, ModelError, check_fields, check_names
from quantkit.qat._cuda_fq import WeightBank
from quantkit.qat.modules import QUANT_TYPES, FunctionalQuantMixin, QuantMixin, functional_quant_type
from quantkit.qat.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

#: BatchNorm classes (exact types: a subclass may compute more, e.g. timm's BatchNormAct2d applies
#: its activation too, and is neither folded nor looked through)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_plain_batchnorm(m: object) -> bool:
    """True for PyTorch's own BatchNorm1d/2d/3d (not a subclass of them) with running statistics:
    one that folds into its convolution (``track_running_stats=False`` normalizes every batch by
    its own statistics, in eval mode too: its export crashed on a bare AssertionError)."""
    return type(m) in _BN and getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


@dataclass(frozen=True)
class QatConfig:
    """How to quantize a model.

    Attributes:
        method: range method for the input quantizers (entropy, minmax, percentile, mse, auto,
            entropy-trt); every method is computed from the one calibration pass.
        percentile: for the percentile method.
        num_bins: calibration histogram bins.
        residual_add: quantize the residual operand of Adds that follow a convolution.
        disable: module names (fnmatch patterns, e.g. ``"fc"`` or ``"layer4.*"``) left in
            floating point.
        disable_types: layer types left in floating point (e.g. ``(nn.Linear,)``).
        weight_bank_distributed: on CUDA all weights are fake-quantized in one launch a step
            (quantkit.qat._cuda_fq.WeightBank), also inside a torch.distributed job unless this
            is False (measured on two H200s, the bank is faster under DDP too, as one segment:
            benchmarks/results/gpu_distributed.md).
    """

    method: str = "entropy"
    percentile: float = 99.99
    num_bins: int = 2048
    residual_add: bool = True
    disable: tuple[str, ...] = ()
    disable_types: tuple[type, ...] = field(default_factory=tuple)
    weight_bank_distributed: bool = True

    def __post_init__(self) -> None:
        from quantkit.calibrators.methods import check_method, method_params

        check_fields(self, method=(str,), percentile=(int, float), num_bins=(int,), residual_add=(bool,),
                     weight_bank_distributed=(bool,))
        check_names(self, "disable")
        if isinstance(self.disable_types, type) or not isinstance(self.disable_types, (tuple, list)) or \
                not all(isinstance(t, type) for t in self.disable_types):
            raise InputError(f"QatConfig.disable_types must be a tuple of layer classes, got {self.disable_types!r}",
                             hint="e.g. disable_types=(torch.nn.Linear,)")
        check_method(self.method)  # the registry validates method names and parameters
        method_params({"percentile": self.percentile})
        check_num_bins(self.num_bins)


@functools.lru_cache(maxsize=None)  # a trace asks for every module, twice (both modes): one read of a class's source
def _reads_training(cls: type) -> bool:
    """True when ``cls``'s own forward (or one it inherits from outside torch.nn) mentions
    ``self.training``."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or "forward" not in vars(klass):
            continue
        try:
            source = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):  # no source (a C extension, an interactive session)
            continue
        return "self.training" in source
    return False


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, TensorQuantizer)) or super().is_leaf_module(m, qualname) or \
            (m is not self.root and _reads_training(type(m)))  # (``trace`` sets ``root``)


def prepare(model: nn.Module, config: QatConfig = QatConfig(), *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) with fake quantization.

    With ``inplace=True`` layers are swapped in the given model and no residual quantizers are
    added (that needs a traced graph, which is a new module).

    Raises:
        ModelError: the model has no layer left to quantize.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"prepare takes a torch.nn.Module, got {type(model).__name__}",
                         hint="pass the model object (load a checkpoint into it first)")
    if not isinstance(config, QatConfig):
        raise InputError(f"config must be a QatConfig, got {type(config).__name__}")
    if any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ModelError(f"{type(model).__name__} is already prepared (it has quantized layers)",
                         hint="prepare the original float model once; to change the config, prepare it again "
                         "from the float model")
    _check_disable_patterns(model, config)
    target = model if inplace else copy.deepcopy(model)
    swapped = _swap_layers(target, config)
    if not swapped:
        top = type(model).__name__
        raise ModelError(
            (f"{top} is itself a layer: prepare swaps the layers inside a model, not the model"
             if _is_layer(model) else f"{top} has no Conv, ConvTranspose or Linear layer to quantize")
            + (" (all are disabled by the config)" if config.disable or config.disable_types else ""),
            hint="wrap it, e.g. nn.Sequential(layer)" if _is_layer(model) else "check QatConfig.disable / disable_types")
    if config.residual_add and not inplace:
        traced = _with_residual_quantizers(target, config)
        if traced is not None:
            target = traced
    _say_left_in_float(target, config)
    _name_quantizers(target)
    target.qat_config_ = config  # what calibrate applies unless told otherwise
    bank = WeightBank(distributed=config.weight_bank_distributed)  # on CUDA, every weight fake-quantized in one launch a step
    for m in target.modules():
        if isinstance(m, QuantMixin) and not isinstance(m, FunctionalQuantMixin):  # (those quantize a weight they compute)
            bank.add(m.weight_quantizer, m)
    log.info("quantized %d layers", len(swapped))
    return target


def _check_disable_patterns(model: nn.Module, config: QatConfig) -> None:
    """A ``QatConfig.disable`` pattern that matches no layer is a typo (the layer it meant would be
    quantized after all): refused, naming the closest layer names."""
    import difflib

    layers = [n for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, tuple(QUANT_TYPES))]
    for pattern in config.disable:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            close = difflib.get_close_matches(pattern, layers, n=3, cutoff=0.5) or layers[:3]
            raise InputError(f"QatConfig.disable pattern {pattern!r} matches no quantizable layer of "
                             f"{type(model).__name__}", hint=f"layer names look like {', '.join(map(repr, close))} "
                             "(fnmatch patterns: 'layer4.*')")


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d, nn.Linear))


def _disabled(name: str, module: nn.Module, config: QatConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.disable) or isinstance(module, config.disable_types)


def _swap_layers(model: nn.Module, config: QatConfig) -> list[str]:
    """Replace the quantizable layers by their quantized forms, in place; the names swapped. A layer
    registered under several names (``self.head = self.fc``, or in two parents) becomes one
    quantized layer under all of them, left in float where a ``disable`` pattern matches any of
    them (``named_children`` yielded it once: the other names kept the float layer)."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    swapped = []
    # id(float layer) -> (that layer, held so its id is not reused; its quantized form, None: left as it is)
    done: dict[int, tuple[nn.Module, nn.Module | None]] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                qtype = _quant_type(child, parent)
                quantized = None if qtype is None or any(_disabled(n, child, config) for n in names[id(child)]) else \
                    _quantized(qtype, child, config.num_bins)
                done[id(child)] = child, quantized
                if quantized is not None:
                    swapped.append(name)
            quantized = done[id(child)][1]
            if quantized is not None:
                setattr(parent, child_name, quantized)
    return swapped


def _quant_type(m: nn.Module, parent: nn.Module) -> type | None:
    """The quantized class for layer ``m``: ``QUANT_TYPES``' for PyTorch's own layers (and a
    parametrized one's), ``functional_quant_type``'s for a subclass with its own forward; None for
    anything else, a layer already quantized, and nn.MultiheadAttention's out_proj (its parent
    computes with its weight; ``_say_left_in_float`` names the attention)."""
    qtype = QUANT_TYPES.get(_plain_type(m))
    if qtype is not None:
        return qtype
    if isinstance(m, tuple(QUANT_TYPES)) and not isinstance(m, QuantMixin) and \
            not isinstance(parent, nn.MultiheadAttention) and not _parametrized(m):
        return functional_quant_type(type(m))
    return None


def _parametrized(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(m)


def _plain_type(m: nn.Module) -> type:
    """``m``'s class, or for a parametrized layer (``weight_norm``, ``spectral_norm`` from
    ``torch.nn.utils.parametrizations``: PyTorch makes a ``ParametrizedConv2d`` subclass whose
    ``weight`` is computed) the class it was made from."""
    from torch.nn.utils import parametrize

    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _quantized(qtype: type, layer: nn.Module, num_bins: int) -> nn.Module:
    """``qtype.from_float(layer)``; a parametrized layer keeps its parametrizations (the very
    ``ParametrizationList`` objects, so its original tensors are shared and fine-tuned as the
    float layer's are), and its quantizers see the tensor they compute."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(layer):
        return qtype.from_float(layer, num_bins)  # type: ignore[attr-defined, no-any-return]
    lists = dict(layer.parametrizations.items())  # type: ignore[union-attr]
    q = qtype.from_float(layer, num_bins)  # type: ignore[attr-defined]
    del q._modules["parametrizations"]
    for tensor_name, plist in lists.items():
        with torch.no_grad():
            setattr(q, tensor_name, nn.Parameter(getattr(layer, tensor_name).detach().clone()))
        parametrize.register_parametrization(q, tensor_name, plist[0], unsafe=True)
        q.parametrizations[tensor_name] = plist  # the layer's own originals and chain
    return q  # type: ignore[no-any-return]


def _say_left_in_float(model: nn.Module, config: QatConfig) -> None:
    """Warn about the layers ``prepare`` cannot quantize: nn.MultiheadAttention (PyTorch computes
    its projections in ``F.multi_head_attention_forward`` from its parameters, not through its
    Linear modules) and subclasses of the quantizable layers left in float (a parametrized one)."""
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                 and not _disabled(n, m, config)]
    inside = tuple(f"{n}." for n in attention)
    others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
              if _is_layer(m) and not isinstance(m, QuantMixin) and _plain_type(m) not in QUANT_TYPES
              and not n.startswith(inside) and not _disabled(n, m, config)]
    if attention:
        log.warning("%d nn.MultiheadAttention module(s) stay in floating point (%s): PyTorch computes their "
                    "projections from their parameters, not through Linear layers (quantkit calibrate on the exported "
                    "ONNX model quantizes their MatMuls); in eval mode without gradients PyTorch's fused fast path "
                    "also skips the quantized Linear layers of an nn.TransformerEncoderLayer: quantkit turns it off "
                    "while it calibrates and exports, torch.backends.mha.set_fastpath_enabled(False) does for your "
                    "own evaluation", len(attention),
                    ", ".join(attention[:3]) + (", ..." if len(attention) > 3 else ""))
    if others:
        log.warning("%d layer(s) subclassing Conv/Linear stay in floating point: %s",
                    len(others), ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""))


def _traced(model: nn.Module, training: bool) -> torch.fx.Graph:
    was_training = model.training
    try:
        model.train(training)
        return _Tracer().trace(model)
    finally:
        model.train(was_training)


def _with_residual_quantizers(model: nn.Module, config: QatConfig) -> nn.Module | None:
    def untraceable(why: str) -> None:
        log.warning("%s cannot be traced by torch.fx (%s); residual Adds stay in floating point",
                    type(model).__name__, why)

    try:
        graph = _traced(model, False)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no residual quantizers
        untraceable(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    modules = dict(model.named_modules())  # the names the graph's calls use

    def from_conv(node: torch.fx.Node) -> bool:
        while node.op == "call_module" and is_plain_batchnorm(modules.get(str(node.target))):
            node = node.args[0]  # type: ignore[assignment]
        return node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantMixin)

    joins = []  # (Add node, its residual operand)
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            continue
        a_conv = from_conv(a)
        if a_conv != from_conv(b):  # one operand from a convolution: a residual join
            joins.append((node, b if a_conv else a))
    if not joins:
        return None  # the model keeps its own class, forward and attributes
    try:  # a trace keeps one mode's branches: used only where both modes trace alike
        same = str(_traced(model, True)) == str(graph)
    except Exception:  # noqa: BLE001
        same = False
    if not same:
        untraceable("its forward reads self.training, and a trace would keep one mode's behaviour")
        return None
    gm = _graph_module(model, graph)  # it holds ``graph`` itself: the joins' nodes are its nodes
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for i, (node, residual) in enumerate(joins):
        qname = f"residual_quantizer_{i}"
        gm.add_submodule(qname, TensorQuantizer(num_bins=config.num_bins).to(device))
        with gm.graph.inserting_before(node):
            q = gm.graph.call_module(qname, (residual,))
        node.replace_input_with(residual, q)
    gm.graph.lint()
    gm.recompile()
    log.info("%d residual Add inputs quantized", len(joins))
    return _keeping_model_surface(gm, model)


def _graph_module(model: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """The traced ``model`` as a GraphModule that is also an instance of ``model``'s class (its
    methods answer: a YOLO's ``predict``; ``isinstance`` holds); a plain GraphModule where the two
    classes cannot be combined. The forward is the traced one (GraphModule installs it on a class
    of its own, first in the order)."""
    name = type(model).__name__

    def init(self: torch.fx.GraphModule, root: nn.Module, g: torch.fx.Graph, class_name: str = name) -> None:
        torch.fx.GraphModule.__init__(self, root, g, class_name)  # not the model's own __init__

    try:  # the model's class first: GraphModule's super().__init__() is then nn.Module's
        cls = type(name, (type(model), torch.fx.GraphModule), {"__init__": init, "__module__": type(model).__module__})
        return cls(model, graph)
    except Exception as err:  # noqa: BLE001 - a layout or metaclass conflict: a plain GraphModule
        log.info("the prepared model is a GraphModule, not a %s (%s)", name, err)
        return torch.fx.GraphModule(model, graph, class_name=name)


def _keeping_model_surface(gm: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
    """``gm`` with the attributes of ``model`` its trace left out: plain attributes (``stride``,
    ``names``, a transformer's ``config``) and the parameters, buffers and child modules its
    forward does not read (anchors)."""
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in vars(gm) and not callable(value):
            setattr(gm, name, value)
    for name, b in model.named_buffers(recurse=False):
        if not hasattr(gm, name):
            gm.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
    for name, p in model.named_parameters(recurse=False):
        if not hasattr(gm, name):
            gm.register_parameter(name, p)
    for name, child in model.named_children():
        if not hasattr(gm, name):
            gm.add_module(name, child)
    return gm


def _name_quantizers(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            m.qualified_name = name


def quantizers(model: nn.Module, *, inputs_only: bool = False) -> Iterator[tuple[str, TensorQuantizer]]:
    """(name, quantizer) pairs in module order; ``inputs_only`` skips weight quantizers."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and not (inputs_only and m.dynamic):
            yield name, m


@contextlib.contextmanager
def passed_through(model: nn.Module) -> Iterator[None]:
    """Every quantizer of ``model`` passed through for the block (the float model), then as it was."""
    enabled = [(q, q.enabled) for _, q in quantizers(model)]
    for q, _ in enabled:
        q.enabled = False
    try:
        yield
    finally:
        for q, on in enabled:
            q.enabled = on
