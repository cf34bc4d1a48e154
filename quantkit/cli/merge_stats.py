from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class MergeStats:
    """Merge calibration statistics saved by `calibrate --save-stats`; write the artifacts of all of them.

    Calibration of one ONNX model spread over machines (any scheduler): each machine runs
    `quantkit calibrate ... --save-stats part.qkstats` on its share of the images; this command
    merges the files (histograms re-binned to one range and added, min/max reduced: exact, since
    --save-stats histograms start on power-of-two ranges) and writes the Q/DQ model, the TensorRT
    cache and ranges.json, as one calibrate run over all the images would (no FP32-vs-INT8 report).

    example:
      quantkit merge-stats a.qkstats b.qkstats --method entropy -o out/
    """

    name = "merge-stats"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from quantkit.calibrators.methods import method_names
        from quantkit.cli.common import trt_version

        parser.add_argument("stats", nargs="+", metavar="STATS", help="files written by calibrate --save-stats")
        parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
        parser.add_argument("--force", action="store_true", help="replace the artifacts of an earlier run in OUTDIR (never other files)")
        parser.add_argument("--model", metavar="MODEL.onnx",
                            help="the FP32 model (default: the path recorded in the statistics; its SHA-256 must match)")
        parser.add_argument("--method", choices=method_names(), default="entropy",
                            help="scales written to the model and cache (default entropy)")
        parser.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
        parser.add_argument("--trt-version", default="10.13.0", type=trt_version, help="TensorRT version for the cache header (default 10.13.0)")
        parser.add_argument("--save-stats", metavar="FILE", help="also save the merged statistics to FILE")

    def run(self, args: argparse.Namespace) -> int:
        import os

        from quantkit._io import check_output_dir
        from quantkit.calibrators.cache import trt_version_number
        from quantkit.calibrators.stats import StatsError, load_stats, merge_stats
        from quantkit.cli.calibrate import save_with_stats, stats_target
        from quantkit.onnx.model import file_sha256, load_model
        from quantkit.ptq import Calibration, ExportConfig

        import hashlib

        seen: dict[Any, str] = {}
        for p in args.stats:  # one file twice would count its samples twice: a path, a link or a copy
            try:
                st = os.stat(p)
                with open(p, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest() if st.st_size < (1 << 31) else None
            except OSError:
                continue  # load_stats says what is wrong with it
            for key, what in (((st.st_dev, st.st_ino), "given twice"), (digest, "a byte-identical copy")):
                if key is not None and key in seen:
                    said = what if seen[key] == p else f"{what} (of {seen[key]!r})"
                    raise StatsError(f"statistics file {p!r} is {said}: its samples would count twice",
                                     hint="give each run's statistics once")
                if key is not None:
                    seen[key] = p
        inputs = [*args.stats, *([args.model] if args.model else [])]
        check_output_dir(args.output, force=args.force, inputs=inputs,
                         command="quantkit merge-stats")  # before the work
        stats_inside = stats_target(args.save_stats, args.output, force=args.force, inputs=[*inputs, args.output])
        parts = [load_stats(p) for p in args.stats]
        merged = merge_stats(parts, names=args.stats)
        model_path = Path(args.model or merged.model.get("path", ""))
        if not model_path.is_file():
            if args.model:
                raise StatsError(f"the model {args.model!r} (--model) is not a file", hint="give the FP32 model file")
            raise StatsError(f"the model {str(model_path)!r} recorded in the statistics is not there",
                             hint="give it with --model MODEL.onnx")
        sha = file_sha256(model_path)
        if sha != merged.model.get("sha256"):
            raise StatsError(f"{str(model_path)!r} is not the model the statistics were collected on (SHA-256 differs)",
                             hint="give the same FP32 model with --model")
        cal = Calibration.from_stats(load_model(model_path), merged,
                                     ExportConfig(method=args.method, params={"percentile": args.percentile}),
                                     model_name=str(model_path))
        meta = {"model": {"path": str(model_path), "sha256": sha}, "preprocess": merged.preprocess,
                "data": merged.data}
        paths = save_with_stats(cal, args.output, args.save_stats, stats_inside, merged if args.save_stats else None,
                                model_stem=model_path.stem.removesuffix(".fp32"), metadata=meta,
                                trt_version=trt_version_number(args.trt_version), force=args.force,
                                inputs=[*inputs, model_path], command="quantkit merge-stats")
        print(f"merged {len(parts)} statistics files: {cal.num_samples} samples, "
              f"{len(cal.plan.activations)} activations quantized ({args.method})")
        for p in paths.values():
            print(f"  wrote {p}")
        return 0
