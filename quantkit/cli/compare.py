from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from quantkit.cli.common import (add_data_args, add_preprocess_args, describe_sample, lost_note, progress,
                                 runner_for, select, source_for_model)


class Compare:
    """Compare an INT8 model with its FP32 reference on a data set (accuracy, agreement, SQNR).

    Metrics per output: top-1 agreement, cosine similarity (mean and min over samples),
    SQNR in dB, max absolute error; accuracy when the image folder has class subfolders.

    example:
      quantkit compare resnet.onnx out/resnet.int8.onnx --images ./val_images --preprocess imagenet
    """

    name = "compare"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("reference", metavar="FP32.onnx", help="the reference (FP32) model")
        parser.add_argument("test", metavar="INT8.onnx", help="the model to check")
        parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
        parser.add_argument("--force", action="store_true", help="replace an existing --json FILE that an earlier compare wrote")
        parser.add_argument("--min-cosine", type=_cosine, default=None,
                            help="exit 1 when any output's mean cosine similarity is below this")
        parser.add_argument("--ort-kernels", action="store_true",
                            help="run a Q/DQ model on ONNX Runtime's integer kernels, as ONNX Runtime deploys it (a "
                            "model calibrated with --target onnxruntime); by default its quantized ops compute what "
                            "TensorRT computes (the QuantizeLinear's rounding, then exact integer products), whatever "
                            "the CPU: ONNX Runtime's kernels on x86 CPUs without VNNI saturate 16-bit sums")
        add_data_args(parser)
        add_preprocess_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_file, is_result_json, write_json_atomic
        from quantkit.compare import compare_runners, comparison_batch
        from quantkit.datasets import Batcher
        from quantkit.datasets.batching import data_batch_axes
        from quantkit.datasets.classes import check_classes, label_output

        if args.json:  # before the work: never over an input, never an unasked overwrite
            check_output_file(args.json, force=args.force,
                              inputs=[p for p in (args.reference, args.test, args.images, args.npz) if p],
                              replaceable=is_result_json("compare"), what="an earlier `quantkit compare --json` result")

        ref = runner_for(args, args.reference, integer_kernels=args.ort_kernels)
        test = runner_for(args, args.test, quiet=True, integer_kernels=args.ort_kernels)
        if getattr(ref, "quantized", False) and getattr(test, "quantized", None) is False:  # ONNX models both
            print(f"warning: {Path(args.reference).name}, given as the FP32 reference, has Q/DQ pairs and "
                  f"{Path(args.test).name} has none: the order is `quantkit compare FP32.onnx INT8.onnx`",
                  file=sys.stderr)
        specs = ref.input_specs
        source = source_for_model(args, specs)
        outputs = getattr(ref, "output_specs", None) or getattr(test, "output_specs", [])
        check_classes(source, outputs)
        drawn = select(source, args)
        idx = drawn.indices
        batch, fixed = comparison_batch(ref, test, args.batch_size, reference_name=Path(args.reference).name,
                                        test_name=Path(args.test).name,
                                        axes=data_batch_axes(source, [s.name for s in specs]))
        batches = Batcher(source, [s.name for s in specs], batch, indices=idx,
                          last_batch="pad" if fixed else "keep", strict=args.strict,
                          dtypes={s.name: s.dtype for s in specs})
        with ref, test, progress(len(idx), "comparing", disable=args.no_progress) as bar:
            report = compare_runners(ref, test, batches, reference_name=Path(args.reference).name,
                                     test_name=Path(args.test).name, on_batch=bar.update,
                                     label_output=label_output(source, outputs))
        if args.json:  # written before anything is printed
            write_json_atomic(args.json, {**report.to_dict(), **_paths(args)})
        if drawn.count < drawn.total:
            print(f"compared on {describe_sample(drawn, 'samples')}")
        print(report.table())
        note = lost_note(report)
        if note:
            print(note)
        if getattr(test, "quantized", False) and getattr(ref, "quantized", None) is False:
            differs = _not_derived(args.reference, args.test)
            if differs:
                print(f"  note: {differs}; these figures then measure the other weights' difference too, not INT8's "
                      "error alone (another checkpoint, a fine-tuning; compare with the FP32 model it was made from)")
        if args.json:
            print(f"  wrote {args.json}")
        if args.min_cosine is not None:
            # integer outputs have none, one-value outputs none that means more than a sign
            cosines = [m.cosine_mean for m in report.outputs if not math.isnan(m.cosine_mean)]
            if not cosines:
                print("FAILED: --min-cosine needs an output of several float values a sample; this model's "
                      "hold integers, flags or one value a sample (compare their SQNR or match instead)")
                return 2
            worst = min(cosines)
            if math.isnan(worst) or worst < args.min_cosine:
                print(f"FAILED: mean cosine similarity {worst:.5f} is below --min-cosine {args.min_cosine}")
                return 1
        return 0


#: ``_not_derived`` reads both files again: only below this size together
NOT_DERIVED_MAX_BYTES = 1 << 30


def _not_derived(reference: str, test: str) -> str | None:
    """``quantkit.debug.layerwise.derivation_error`` of two ONNX files (None where either is not
    an ONNX file, they are over ``NOT_DERIVED_MAX_BYTES`` together, or the check itself fails: a
    note, not a refusal)."""
    from quantkit.debug.layerwise import derivation_error
    from quantkit.onnx.model import load_model

    try:
        if sum(Path(p).stat().st_size for p in (reference, test)) > NOT_DERIVED_MAX_BYTES:
            return None  # each read a second time: not for models of gigabytes
        return derivation_error(load_model(reference), load_model(test))
    except Exception:  # noqa: BLE001 (a plan file, a graph the check cannot read: no note)
        return None


def _paths(args: argparse.Namespace) -> dict[str, str]:
    """The compared files' resolved paths (``quantkit report`` tells models of one name apart by them)."""
    return {"reference_path": os.path.realpath(args.reference), "test_path": os.path.realpath(args.test)}


def _cosine(text: str) -> float:
    """A cosine similarity threshold: a number in [-1, 1] (2 was taken, and every run failed)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not -1.0 <= v <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"a cosine similarity is between -1 and 1, got {text}")
    return v
