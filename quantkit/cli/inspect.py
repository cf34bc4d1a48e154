from __future__ import annotations

import argparse
from pathlib import Path

#: serialized TensorRT engines start with this tag (Ultralytics prepends a metadata block; its files are .engine)
_ENGINE_MAGIC = b"ftrt"
#: how far into a file named like an engine the tag is looked for (a prepended metadata block is small)
_TAG_SEARCH = 64 * 1024


def check_engine_file(path: Path) -> None:
    """Raise InputError for a file named like a TensorRT engine without an engine header (before
    TensorRT is looked for: random bytes named .plan are bad input, not a missing TensorRT)."""
    from quantkit.errors import InputError

    with open(path, "rb") as fh:
        head = fh.read(64)
        tagged = _ENGINE_MAGIC in head[:32] or _ENGINE_MAGIC in head + fh.read(_TAG_SEARCH)
    if not tagged:
        raise InputError(f"{str(path)!r} is named like a TensorRT engine but has no engine header "
                         f"({_ENGINE_MAGIC.decode()!r} tag) in its first {_TAG_SEARCH // 1024} KiB",
                         hint="give the file TensorRT wrote (trtexec --saveEngine, quantkit build)")


class Inspect:
    """Show a model's inputs, outputs, opset and Q/DQ plan, a calibration cache's contents, or
    what a TensorRT engine file is.

    example:
      quantkit inspect model.onnx
      quantkit inspect out/calibration.cache
      quantkit inspect model.plan
    """

    name = "inspect"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", metavar="FILE", help="an .onnx model, a calibration cache or a TensorRT engine")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit.backends import ENGINE_SUFFIXES
        from quantkit.errors import InputError, ModelError

        from quantkit._io import input_file

        path = input_file(args.path, "file")
        with open(path, "rb") as fh:
            head = fh.read(64)
            tagged = _ENGINE_MAGIC in head[:32] or _ENGINE_MAGIC in head + fh.read(_TAG_SEARCH)
        if head.startswith(b"TRT-"):  # a calibration cache's header, whatever the file is called
            return self._cache(path)
        if path.suffix.lower() in ENGINE_SUFFIXES or _ENGINE_MAGIC in head[:32]:
            # a serialized engine: reading it needs TensorRT (and the GPU it was built for)
            if not tagged:  # named like one, but the bytes say otherwise: do not call it an engine
                check_engine_file(path)
            print(f"{path}: TensorRT engine, {path.stat().st_size:,} bytes; TensorRT is needed to read its "
                  "bindings (`quantkit bench` runs it where TensorRT and a matching GPU are)")
            return 0
        if path.suffix.lower() == ".cache":
            return self._cache(path)  # a malformed cache: read_cache says what is wrong with it
        if path.suffix.lower() != ".onnx":
            try:
                return self._onnx(path)
            except ModelError as err:
                raise InputError(f"{str(path)!r} is not an ONNX model, a TensorRT calibration cache or a TensorRT engine",
                                 hint="a calibration cache starts with a TRT-<version>-<algorithm> line; quantkit's "
                                 "ranges.json, report.json and debug.json are read by `quantkit report`, its .qkstats "
                                 "by `quantkit merge-stats`") from err
        return self._onnx(path)

    def _onnx(self, path: Path) -> int:
        from quantkit.onnx.contrib import contrib_nodes, standard_ops
        from quantkit.onnx.model import (einsum_as_matmul, fold_weight_dequantize, input_specs, is_quantized_op,
                                         load_model, opset_version, output_specs, subgraph_node_count,
                                         with_node_names)
        from quantkit.onnx.qdq import float_by_rule, plan_qdq, recurrent_summary

        model = load_model(path)
        weight_only = fold_weight_dequantize(model, source=path.name)  # as calibrate prepares it
        print(f"{path}: opset {opset_version(model)}, {len(model.graph.node)} nodes")
        for label, specs in (("input", input_specs(model)), ("output", output_specs(model))):
            for s in specs:
                print(f"  {label} {s.name}: {list(s.shape)} {s.dtype}")
        quantized = [n.op_type for n in weight_only.graph.node if is_quantized_op(n.op_type)]
        if quantized:
            kinds = ", ".join(f"{quantized.count(t)} {t}" for t in dict.fromkeys(quantized))
            print(f"  already quantized: {kinds}")
        else:
            if weight_only is not model:
                count = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
                print(f"  weight-only quantized: {count} DequantizeLinear weight(s), taken as the float values they "
                      "dequantize to and quantized again per channel")
            fused = len(contrib_nodes(weight_only))
            model = standard_ops(weight_only, warn=False)
            left = sorted({n.op_type for n in contrib_nodes(model)})
            if fused:
                written = fused - len(contrib_nodes(model))
                print(f"  ONNX Runtime's own ops (com.microsoft): {written} of {fused} written as the standard ops "
                      "they fuse" + (f"; left as they are, in float, and not read by TensorRT's parser: "
                                     f"{', '.join(left)}" if left else ""))
            model = with_node_names(einsum_as_matmul(model))  # as calibrate prepares it
            plan = plan_qdq(model)
            print(f"  Q/DQ plan: {len(plan.activations)} activation tensors (per tensor), "
                  f"{len(plan.weights)} weights (per channel)")
            inside = subgraph_node_count(model.graph)
            from quantkit.ptq import has_layer_ops, op_summary

            if not has_layer_ops(model.graph):  # what `calibrate` refuses
                print(f"  nothing to quantize: no Conv, ConvTranspose, Gemm or MatMul node ({op_summary(model.graph)}); "
                      "`calibrate` refuses it: run it in FP32 or FP16")
            recurrent = recurrent_summary(model)
            if recurrent:  # no Q/DQ on them: they keep their weights in float
                print(f"  in float: {recurrent} (no INT8 recurrent layers: TensorRT runs them in FP16/FP32)")
            if inside:  # calibrate covers the main graph only (the tenth probe: a plan of 0 said nothing of why)
                print(f"  in float: {inside} node(s) inside If/Loop/Scan subgraphs (the plan covers the main graph)")
            for i, group in enumerate(plan.groups):  # why two tensors get one scale
                print(f"  scale group {i} (Concat/MaxPool/Resize): {', '.join(group)}")
            kept = float_by_rule(model)
            for why in dict.fromkeys(kept.values()):  # weighted ops the rules leave in FP16/FP32
                names = [n for n, w in kept.items() if w == why]
                print(f"  kept in float ({why}): {len(names)} node(s): {', '.join(names[:6])}"
                      + (", ..." if len(names) > 6 else ""))
        return 0

    def _cache(self, path: Path) -> int:
        from quantkit.calibrators.cache import read_cache

        cache = read_cache(path)
        print(f"{path}: TensorRT {cache.version}, {cache.algorithm}, {len(cache.scales)} tensors")
        for name, scale in cache.scales.items():
            print(f"  {name}: scale {scale:.6g} (amax {scale * 127:.6g})")
        return 0
