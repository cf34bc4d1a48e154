from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quantkit.cli.common import (add_data_args, add_preprocess_args, positive_int, progress, ranking_progress,
                                 select, source_for_model, with_sample_axis)


class Debug:
    """Find where an INT8 (Q/DQ) model's error comes from: the error at every quantized tensor and weight.

    Runs the FP32 model and the Q/DQ model side by side on the data and, for every Q/DQ pair,
    measures the error that pair adds on its own (FP32 activation against its fake-quantized
    self: clipping and rounding, share clipped), the error accumulated from everything upstream
    (FP32 activation against the INT8 model's), and for weights the per-channel error. Works on
    Q/DQ models from quantkit, ONNX Runtime, Model Optimizer or NNCF. Memory does not grow with
    the number of images. Writes debug.json (and quantkit report draws it).

    example:
      quantkit debug resnet.onnx out/resnet.int8.onnx --images ./val --preprocess imagenet -o dbg/
    """

    name = "debug"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("reference", metavar="FP32.onnx", help="the FP32 model")
        parser.add_argument("test", metavar="INT8.onnx", help="the Q/DQ model made from it")
        parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for debug.json")
        parser.add_argument("--force", action="store_true",
                            help="replace the files of an earlier debug run in DIR (never other files)")
        parser.add_argument("--rows", type=positive_int, default=15, help="rows of the printed table (default 15)")
        parser.add_argument("--rank", action="store_true",
                            help="also rank the quantization groups by sensitivity (output error with only that group "
                                 "in float, or only it quantized) on the --subset samples with the largest error; "
                                 "written as debug.json's \"sensitivity\", which calibrate --exclude-from reads")
        parser.add_argument("--subset", type=positive_int, default=32, metavar="N",
                            help="with --rank: samples in the ranking subset (default 32)")
        parser.add_argument("--estimator", choices=["exact", "gradient"], default="exact",
                            help="with --rank: exact (suffix runs, default) or gradient (first-order estimates from one "
                                 "forward + backward pass in torch; falls back to exact when torch cannot run the model)")
        parser.add_argument("--error-output", metavar="NAME",
                            help="with --rank: the output whose error the ranking reads (default: the first float "
                                 "output not ordered by value; a detector whose first output is its boxes: name its "
                                 "class scores)")
        add_data_args(parser, num_images_help="use the first N samples of the --order (default: all)")
        add_preprocess_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_dir, output_dir, write_json_atomic
        from quantkit.debug import layerwise_error
        from quantkit.onnx.model import input_specs, load_model
        from quantkit.ptq import RunConfig, evaluation_batches

        if (args.estimator != "exact" or args.error_output) and not args.rank:
            from quantkit.errors import InputError

            flag = "--estimator" if args.estimator != "exact" else "--error-output"
            raise InputError(f"{flag} needs --rank", hint="add --rank")
        inputs = [p for p in (args.reference, args.test, args.images, args.npz) if p]
        fp32 = with_sample_axis(args, load_model(args.reference), name=Path(args.reference).name)
        int8 = with_sample_axis(args, load_model(args.test), name=Path(args.test).name, quiet=True)
        check_output_dir(args.output, force=args.force, inputs=inputs, command="quantkit debug")  # before the work
        if args.error_output:
            from quantkit.onnx.model import error_output

            error_output(fp32, args.error_output)  # a name that is not a float output: said before the work
        specs = input_specs(fp32)
        source = source_for_model(args, specs)
        drawn = select(source, args)
        # the evaluation policy: a fixed-batch model's short tail padded, padding left out of the sums
        batches = evaluation_batches(source, specs, drawn.indices, RunConfig(batch_size=args.batch_size, strict=args.strict))
        with progress(len(drawn.indices), "debugging", disable=args.no_progress) as bar:
            report = layerwise_error(fp32, int8, batches, threads=args.threads, reference_name=Path(args.reference).name,
                                     test_name=Path(args.test).name, on_batch=bar.update)
        report = _user_names(report, fp32)
        doc, ranking = report.to_dict(), None
        if args.rank:
            from quantkit.debug.sensitivity import QdqScales, rank_sensitivity

            # a model that runs one sample at a time (the side-by-side pass found it, and warned)
            run = RunConfig(batch_size=1 if report.one_at_a_time else args.batch_size, threads=args.threads,
                            strict=args.strict)
            with ranking_progress(disable=args.no_progress) as on_rank:
                ranking = rank_sensitivity(QdqScales.from_qdq_model(fp32, int8, run), source, drawn.indices,
                                           subset=args.subset, estimator=args.estimator, output=args.error_output,
                                           on_step=on_rank)
            doc["sensitivity"] = ranking.to_dict()
        with output_dir(args.output, force=args.force, inputs=inputs, command="quantkit debug") as staging:
            write_json_atomic(staging / "debug.json", doc)
        print(report.table(args.rows))
        if ranking is not None:
            print(ranking.table(args.rows))
        print(f"  wrote {Path(args.output) / 'debug.json'}")
        return 0


def _user_names(report: Any, fp32: Any) -> Any:
    """``report`` with a model run with a sample axis (``with_sample_axis``) naming its tensors as
    the user's model does (the wrapper's inner inputs read ``speech__sample``)."""
    from dataclasses import replace

    from quantkit.onnx.sampleaxis import original_names

    names = original_names(fp32)
    if not names:
        return report
    return replace(report, activations=[replace(p, tensor=names.get(p.tensor, p.tensor)) for p in report.activations])
