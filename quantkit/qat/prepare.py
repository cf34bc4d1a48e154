"""Insert fake quantization into a PyTorch model, by the placement rules of shared/DESIGN.md.

    Conv / ConvTranspose / Linear  -> quantized layer (input per tensor, weight per channel)
    Add whose one operand comes from a convolution (directly or through BatchNorm)
                                   -> a quantizer on the other (residual) operand

Layers are swapped module by module. The residual quantizers need the model's graph: the model
is traced with torch.fx (our quantized layers and quantizers kept as leaves); a model that
cannot be traced keeps its Adds in floating point, with a warning.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.calibrators.collectors import check_num_bins
from quantkit.errors import InputError, ModelError, check_fields, check_names
from quantkit.qat._cuda_fq import WeightBank
from quantkit.qat.modules import QUANT_TYPES, QuantMixin
from quantkit.qat.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, TensorQuantizer)) or super().is_leaf_module(m, qualname)


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
    _name_quantizers(target)
    target.qat_config_ = config  # what calibrate applies unless told otherwise
    bank = WeightBank(distributed=config.weight_bank_distributed)  # on CUDA, every weight fake-quantized in one launch a step
    for m in target.modules():
        if isinstance(m, QuantMixin):
            bank.add(m.weight_quantizer, m)
    log.info("quantized %d layers", len(swapped))
    return target


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d, nn.Linear))


def _disabled(name: str, module: nn.Module, config: QatConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.disable) or isinstance(module, config.disable_types)


def _swap_layers(model: nn.Module, config: QatConfig) -> list[str]:
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            qtype = QUANT_TYPES.get(type(child))
            if qtype is None or _disabled(name, child, config):
                continue
            setattr(parent, child_name, qtype.from_float(child, config.num_bins))
            swapped.append(name)
    return swapped


def _with_residual_quantizers(model: nn.Module, config: QatConfig) -> nn.Module | None:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no residual quantizers
        log.warning("%s cannot be traced by torch.fx (%s); residual Adds stay in floating point",
                    type(model).__name__, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    modules = dict(gm.named_modules())

    def from_conv(node: torch.fx.Node) -> bool:
        while node.op == "call_module" and isinstance(modules.get(str(node.target)), _BN):
            node = node.args[0]  # type: ignore[assignment]
        return node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantMixin)

    added = 0
    for node in list(gm.graph.nodes):
        is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            continue
        if from_conv(a) == from_conv(b):
            continue  # both or neither from a convolution: not a residual join
        residual = b if from_conv(a) else a
        qname = f"residual_quantizer_{added}"
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        gm.add_submodule(qname, TensorQuantizer(num_bins=config.num_bins).to(device))
        with gm.graph.inserting_before(node):
            q = gm.graph.call_module(qname, (residual,))
        node.replace_input_with(residual, q)
        added += 1
    gm.graph.lint()
    gm.recompile()
    log.info("%d residual Add inputs quantized", added)
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
