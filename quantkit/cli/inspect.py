from __future__ import annotations

import argparse
from pathlib import Path


class Inspect:
    """Show a model's inputs, outputs, opset and Q/DQ plan, or a calibration cache's contents.

    example:
      quantkit inspect model.onnx
      quantkit inspect out/calibration.cache
    """

    name = "inspect"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", metavar="FILE", help="an .onnx model or a calibration cache")

    def run(self, args: argparse.Namespace) -> int:
        path = Path(args.path)
        if path.suffix.lower() == ".onnx":
            from quantkit.onnx.model import input_specs, load_model, opset_version, output_specs
            from quantkit.onnx.qdq import plan_qdq

            model = load_model(path)
            print(f"{path}: opset {opset_version(model)}, {len(model.graph.node)} nodes")
            for label, specs in (("input", input_specs(model)), ("output", output_specs(model))):
                for s in specs:
                    print(f"  {label} {s.name}: {list(s.shape)} {s.dtype}")
            qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
            if qdq:
                print(f"  already quantized: {qdq} QuantizeLinear nodes")
            else:
                plan = plan_qdq(model)
                print(f"  Q/DQ plan: {len(plan.activations)} activation tensors (per tensor), "
                      f"{len(plan.weights)} weights (per channel)")
            return 0
        from quantkit.calibrators.cache import read_cache

        cache = read_cache(path)
        print(f"{path}: TensorRT {cache.version}, {cache.algorithm}, {len(cache.scales)} tensors")
        for name, scale in cache.scales.items():
            print(f"  {name}: scale {scale:.6g} (amax {scale * 127:.6g})")
        return 0
