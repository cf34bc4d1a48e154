from __future__ import annotations

import argparse
from pathlib import Path

from quantkit.cli.common import add_data_args, add_preprocess_args, positive_int, progress, select, source_for_model


class Build:
    """Build a TensorRT engine from an ONNX model (needs TensorRT 10 or 11 and a GPU).

    FP32 / FP16 from an FP32 model; INT8 from a Q/DQ model (explicit: TensorRT 10 and 11), or
    from an FP32 model with a TensorRT calibrator fed from --images, or with a calibration
    cache (implicit: TensorRT 10 only; TensorRT 11 removed it).

    examples:
      quantkit build model.onnx --precision int8 --calibrator entropy --images ./calib --preprocess imagenet -o model.plan
      quantkit build out/model.int8.onnx -o model.plan
      quantkit build model.onnx --precision int8 --calibration-cache out/calibration.cache -o model.plan
      quantkit build model.onnx --precision fp16 --shapes input=1x3x224x224/32x3x224x224/64x3x224x224 -o model.plan
    """

    name = "build"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL.onnx", help="FP32 model, or Q/DQ model from `quantkit calibrate`")
        parser.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write (.plan)")
        parser.add_argument("--force", action="store_true", help="replace an existing engine file (and --layer-info JSON)")
        g = parser.add_argument_group("engine")
        g.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                       help="default: int8 for a Q/DQ model or with a calibrator/cache, else fp32")
        g.add_argument("--calibrator", choices=["entropy", "minmax"], default=None,
                       help="implicit INT8 with TensorRT's IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator "
                            "fed from --images (TensorRT 10)")
        g.add_argument("--calibration-cache", metavar="FILE",
                       help="with --calibrator: read it if it exists (skips calibration), else write it; "
                            "alone: build from this cache (from `quantkit calibrate` or an earlier build)")
        g.add_argument("--shapes", action="append", metavar="NAME=MIN[/OPT/MAX]",
                       help="optimisation profile, e.g. input=1x3x224x224/8x3x224x224/32x3x224x224 "
                            "(repeat or comma-separate for several inputs)")
        g.add_argument("--max-batch", type=positive_int, default=32,
                       help="opt/max batch for inputs whose only dynamic dim is the batch (default 32)")
        g.add_argument("--workspace", type=positive_int, default=None, metavar="MiB", help="workspace pool limit")
        g.add_argument("--timing-cache", metavar="FILE", help="read and update a TensorRT timing cache")
        g.add_argument("--layer-info", metavar="FILE", help="write TensorRT's per-layer information (JSON)")
        g.add_argument("--strongly-typed", action="store_true", help="strongly typed network (always on TensorRT 11)")
        add_data_args(parser, required=False)
        add_preprocess_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from contextlib import ExitStack

        from quantkit.calibrators.cache import CacheProvenance, check_cache_matches, trt_version_number
        from quantkit._io import check_output_file
        from quantkit.backends import ENGINE_SUFFIXES
        from quantkit.errors import InputError
        from quantkit.onnx.model import file_sha256, float_input_specs, load_model
        from quantkit.backends.tensorrt.builder import BuildOptions, build_engine, build_mode, has_qdq, parse_shapes
        from quantkit.backends.tensorrt.calibrator import CALIBRATORS, CalibratorCore, cache_only_core
        from quantkit.backends.tensorrt.load import load_tensorrt

        out = Path(args.output)
        model_path = Path(args.model)
        model = load_model(model_path)
        inputs = [p for p in (args.model, args.images, args.npz, args.calibration_cache, args.timing_cache) if p]
        # before the work: outputs never over an input, never an unasked overwrite, room for the engine
        check_output_file(out, force=args.force, inputs=inputs, need_bytes=model_path.stat().st_size,
                          replaceable=lambda p: p.suffix.lower() in ENGINE_SUFFIXES,
                          what=f"an engine file ({', '.join(ENGINE_SUFFIXES)})")
        if args.layer_info:
            check_output_file(args.layer_info, force=args.force, inputs=[*inputs, out], replaceable=_layer_info,
                              what="TensorRT layer information (JSON with \"Layers\")")
        explicit = has_qdq(model)
        calibrating = args.calibrator is not None or args.calibration_cache is not None
        precision = args.precision or ("int8" if explicit or calibrating else "fp32")
        if args.calibrator and not (args.images or args.npz):
            if not (args.calibration_cache and Path(args.calibration_cache).exists()):
                raise InputError("--calibrator needs calibration data", hint="add --images DIR (or --npz FILE)")

        shapes = parse_shapes(args.shapes)  # a bad flag is said before a missing TensorRT
        trt = load_tensorrt()
        major = int(str(trt.__version__).split(".")[0])
        build_mode(major, precision=precision, explicit=explicit, calibrating=calibrating)  # refuse early
        version = trt_version_number(str(trt.__version__))
        options = BuildOptions(precision=precision, shapes=shapes, batch=args.max_batch,
                               workspace_mb=args.workspace,
                               timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                               layer_info=Path(args.layer_info) if args.layer_info else None,
                               strongly_typed=args.strongly_typed)

        core = None
        stack = ExitStack()
        sha = file_sha256(model_path)
        if args.calibrator:
            specs = float_input_specs(model, source=str(model_path))
            source = source_for_model(args, specs)
            idx = select(source, args, what="images").indices
            from quantkit.datasets import Batcher
            from quantkit.datasets.batching import data_batch_axes
            from quantkit.onnx.model import fixed_batch

            names = [s.name for s in specs]
            batches = Batcher(source, names, fixed_batch(specs, data_batch_axes(source, names)) or args.batch_size, indices=idx,
                              last_batch="drop", strict=args.strict, dtypes={s.name: s.dtype for s in specs})
            pp = getattr(source, "preprocess", None)
            algorithm = CALIBRATORS[args.calibrator][1]
            bar = stack.enter_context(progress(len(idx), "calibrating (TensorRT)", disable=args.no_progress))
            core = CalibratorCore(batches, batches.batch_size, cache_path=args.calibration_cache,
                                  provenance=CacheProvenance(sha, pp.to_dict() if pp else None, algorithm, version,
                                                             args.calibrator),
                                  algorithm=algorithm, trt_version=version,
                                  on_batch=lambda b: bar.update(getattr(b, "size", 0)))
            if args.calibration_cache and Path(args.calibration_cache).exists():
                check_cache_matches(args.calibration_cache, model_sha256=sha, preprocess=pp.to_dict() if pp else None,
                                    trt_version=version, algorithm=algorithm)
        elif args.calibration_cache:
            cache = check_cache_matches(args.calibration_cache, model_sha256=sha, preprocess=None, trt_version=version)
            core = cache_only_core(args.calibration_cache, algorithm=cache.algorithm, trt_version=version)

        with stack:
            result = build_engine(model_path, out, options, calibrator=core)
        print(f"built {result.mode} engine in {result.seconds:.1f} s with TensorRT {trt.__version__}")
        if result.calibration_cache_used:
            print(f"  calibration skipped: used the cache {args.calibration_cache}")
        for p in (result.engine, result.layer_info, result.timing_cache):
            if p is not None:
                print(f"  wrote {p}")
        return 0


def _layer_info(path: Path) -> bool:
    """``path`` is TensorRT layer information as ``build --layer-info`` writes it (what ``--force``
    may replace)."""
    from quantkit._io import json_document

    doc = json_document(path)
    return isinstance(doc, dict) and "Layers" in doc
