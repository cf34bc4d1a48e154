from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantkit.cli.common import (add_data_args, add_preprocess_args, describe_sample, lost_note, non_negative_int,
                                 positive_int, progress, ranking_progress, select, source_for_model, trt_version,
                                 with_sample_axis)

log = logging.getLogger(__name__)

#: images used for calibration when --num-images is not given (the rest are held out)
DEFAULT_CALIBRATION_IMAGES = 512


class Calibrate:
    """Calibrate an ONNX model on images; write a Q/DQ INT8 model, a TensorRT cache, ranges and a report.

    One pass over the data computes every registered method's ranges (see --method); --method
    picks the one written into the Q/DQ model and the cache.
    The INT8 model is then compared with the FP32 model on held-out images.

    example:
      quantkit calibrate resnet.onnx --images ./val_images --preprocess imagenet --method entropy -o out/
    """

    name = "calibrate"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from quantkit.calibrators.methods import get_method, method_names

        parser.add_argument("model", metavar="MODEL.onnx", help="the FP32 ONNX model")
        parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
        parser.add_argument("--force", action="store_true", help="replace the artifacts of an earlier run in OUTDIR (never other files)")
        g = parser.add_argument_group("calibration")
        g.add_argument("--method", choices=method_names(), default=None, metavar="METHOD",
                       help="scales written to the model and cache; every method is computed from the one pass and "
                       "written to ranges.json. Default: entropy, checked against percentile (both bias-corrected on "
                       "the first 32 samples, compared on the next up-to-32: the one whose outputs agree with "
                       "FP32's better by more than 0.5 dB is written; ranges.json says which; no check with fewer "
                       "than 48 samples, nor with --max-drop, whose fallback measures the methods on the "
                       "evaluation data); a method named here is written as it is. "
                       + "; ".join(f"{m}: {get_method(m).description}" for m in method_names()))
        g.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
        g.add_argument("--num-bins", type=positive_int, default=2048, help="histogram bins (default 2048)")
        g.add_argument("--trt-version", default="10.13.0", type=trt_version, help="TensorRT version for the cache header (default 10.13.0)")
        g.add_argument("--cache-all-tensors", action="store_true",
                       help="calibrate every float tensor so the cache covers the whole network (slower)")
        g.add_argument("--target", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                       help="Q/DQ placement: tensorrt (default; inputs of Conv/Gemm/MatMul and residual Adds, what "
                            "TensorRT fuses) or onnxruntime (every activation, so ONNX Runtime's CPU provider runs "
                            "integer kernels; for deploying on ONNX Runtime; without equalization and bias correction, "
                            "TensorRT-side steps: several dB lower on depthwise networks)")
        g.add_argument("--exclude", action="append", metavar="NODE_OR_REGEX",
                       help="keep this node's inputs in float (no Q/DQ; TensorRT runs it in FP16/FP32): a node "
                       "name or a regular expression matched against whole names; repeatable")
        g.add_argument("--exclude-op-type", action="append", metavar="TYPE",
                       help="keep the inputs of every node of this op type in float (e.g. Softmax); repeatable")
        g.add_argument("--no-equalize", action="store_true",
                       help="no equalization at all, depthwise nor pointwise (by default a tensor that feeds a "
                            "depthwise Conv and whose "
                            "channels' ranges differ is scaled per channel, the Conv's weights divided to match: "
                            "the same FP32 function, one per-tensor scale that resolves every channel)")
        g.add_argument("--equalize-pointwise", action="store_true", help=argparse.SUPPRESS)  # the old opt-in: now the default
        g.add_argument("--no-equalize-pointwise", action="store_true",
                       help="equalize only the tensors that feed depthwise Convs (by default also those that feed "
                            "group-1 Convs and no depthwise Conv: factors sqrt(max/max_c), the weights divided per input "
                            "channel; e.g. a hard-swish or squeeze-and-excite output into a 1x1 Conv)")
        g.add_argument("--bias-correction", action="store_true", help=argparse.SUPPRESS)  # the old opt-in: now the default
        g.add_argument("--no-bias-correction", action="store_true",
                       help="no bias correction (by default each Conv's bias cancels the shift INT8 adds to its "
                            "output, measured Conv by Conv on the Q/DQ model over the first 32 samples, the Convs "
                            "before it already corrected: a shift that later layers amplify cost PP-OCR's "
                            "recogniser up to 45 points without it; costs ~2 passes over 32 samples); also turns "
                            "pointwise equalization off (it is applied only together with bias correction)")
        g.add_argument("--quantize-attention-probs", action="store_true",
                       help="also quantize the MatMul that reads attention's Softmax output (probabilities x V), "
                            "for TensorRT's fused INT8 attention kernels (speed); by default it stays in FP16/FP32: "
                            "INT8's 7 bits for [0, 1] round most probabilities to 0 (a ViT-S: 25.5 -> 20.3 dB output SQNR)")
        g.add_argument("--histogram-stride", type=positive_int, default=5, metavar="K",
                       help="large activations: histogram body from every K-th value (weight K), tail and "
                            "min/max from every value; 1 counts every value (exact: ~1.8x slower histograms without "
                            "the native kernel, as fast with it). Default 5")
        g.add_argument("--save-stats", metavar="FILE",
                       help="also save the collected statistics to FILE, for `quantkit merge-stats` (calibration "
                            "spread over machines); histograms then start on a power-of-two range, so that such "
                            "files merge exactly, and the model written is the one a merge makes: without "
                            "equalization, bias correction and the method check, which need the samples themselves "
                            "(several dB lower on depthwise networks)")
        g.add_argument("--eval-images", type=non_negative_int, default=1000, metavar="N",
                       help="held-out images (after the calibration ones) for the report; 0 skips it (default 1000)")
        g.add_argument("--eval-dir", metavar="DIR", help="evaluate on this folder instead of held-out images (or on "
                       "an .npz/.npy file, as --npz reads it: with 'labels' for --drop-metric accuracy)")
        b = parser.add_argument_group("accuracy budget (mixed precision)")
        b.add_argument("--max-drop", type=float, metavar="D",
                       help="meet this accuracy budget on the evaluation data (--eval-dir or the held-out images): "
                            "switch the worst quantization groups to their best method, then return groups to float "
                            "in sensitivity order until the drop is at most D points; writes the model that meets it "
                            "(and sensitivity.json, when it had to rank the groups); a budget that cannot be met "
                            "writes nothing (exit 2)")
        b.add_argument("--drop-metric", choices=["accuracy", "top1-agreement", "sqnr", "cosine"],
                       help="unit of --max-drop: accuracy (points, needs labels), top1-agreement (100 - %% agreeing "
                            "with FP32), sqnr (100 x noise/signal: 1 = 20 dB; of an output a Concat joins, its worst part's), "
                            "cosine (100 x (1 - mean cosine)); "
                            "default: accuracy when the data has labels, else top1-agreement, for an output of shape [N, classes] "
                            "(two classes or more); cosine for an L2-normalized embedding; sqnr otherwise: another "
                            "rank, a named axis 1 ([N, T]), per-position classes ([N, T, classes]), or fewer than 10 "
                            "values a sample that no Softmax writes (scores, a box) without labels")
        b.add_argument("--max-float-groups", type=non_negative_int, metavar="N",
                       help="with --max-drop: at most N quantization groups in float (default: no limit)")
        b.add_argument("--subset", type=positive_int, default=32, metavar="N",
                       help="with --max-drop: samples in the sensitivity ranking subset, those with the largest "
                            "INT8 error (default 32)")
        b.add_argument("--rank-estimator", choices=["exact", "gradient"], default="exact",
                       help="with --max-drop: the sensitivity ranking's estimator: exact (default) or gradient "
                            "(first-order, one forward + backward pass in torch; every step is still validated)")
        b.add_argument("--error-output", metavar="NAME",
                       help="with --max-drop: the output whose error the budget and the ranking read (default: the "
                            "first float output not ordered by value; a detector whose first output is its boxes: "
                            "name its class scores)")
        b.add_argument("--exclude-from", metavar="FILE",
                       help="keep the --top K most sensitive quantization groups of a saved ranking in float: "
                            "sensitivity.json of --max-drop, or debug.json of `quantkit debug --rank`")
        b.add_argument("--top", type=positive_int, metavar="K", help="with --exclude-from: how many groups")
        add_data_args(parser, num_images_help=f"calibrate on the first N samples, or all (default {DEFAULT_CALIBRATION_IMAGES}; "
                      "the rest are held out for --eval-images)")
        add_preprocess_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_dir
        from quantkit.calibrators.cache import trt_version_number
        from quantkit.datasets import draw_sample
        from quantkit.datasets.classes import check_classes, label_output
        from quantkit.onnx.model import file_sha256, load_model, opset_version, output_specs
        from quantkit.ptq import (ARTIFACTS, DEFAULT_METHOD, ExportConfig, QuantizeConfig, RunConfig, StatsConfig,
                                   artifact_names, prepare_for, quantize)

        model_path = Path(args.model)
        inputs = [p for p in (args.model, args.images, args.npz, args.eval_dir, args.exclude_from) if p]
        model = load_model(model_path)
        opset = opset_version(model)  # said in the summary where the written model's is later
        model = with_sample_axis(args, model, name=model_path.name)
        # before any work: the output must be writable, outside the inputs, with room for the
        # INT8 model (float weights kept: about the FP32 model's size) and the small files
        from quantkit._io import external_data_files

        weights = model_path.stat().st_size + sum(f.stat().st_size for f in external_data_files(model_path))
        stem = model_path.stem.removesuffix(".fp32")
        check_output_dir(args.output, force=args.force, inputs=inputs, command="quantkit calibrate",
                         need_bytes=weights + (1 << 22),
                         names=artifact_names(stem, report=args.eval_images > 0, sensitivity=args.max_drop is not None))
        exclude = [*(args.exclude or ()), *_exclude_from(args, model)]
        stats_inside = stats_target(args.save_stats, args.output, force=args.force, inputs=inputs)
        config = QuantizeConfig(
            StatsConfig(num_bins=args.num_bins, sample_stride=args.histogram_stride, target=args.target,
                        cache_all_tensors=args.cache_all_tensors, pow2_grid=bool(args.save_stats),
                        exclude=tuple(exclude), exclude_op_types=tuple(args.exclude_op_type or ()),
                        equalize=not args.no_equalize, bias_correction=not args.no_bias_correction,
                        equalize_pointwise=not args.no_equalize_pointwise,
                        quantize_attention_probs=args.quantize_attention_probs),
            RunConfig(batch_size=args.batch_size, threads=args.threads, strict=args.strict),
            ExportConfig(method=args.method or DEFAULT_METHOD, params={"percentile": args.percentile},
                         method_check=_method_check(args)))
        if args.save_stats:  # a merge has no samples: the mergeable model is made without what needs them
            log.warning("--save-stats: the model written is the one `quantkit merge-stats` makes from such files: "
                        "without equalization, bias correction and the method check (they need the samples "
                        "themselves; several dB lower on depthwise networks); calibrate without --save-stats for "
                        "the best model from one run")
        prepared = prepare_for(model, config.stats, str(model_path))
        from quantkit.calibrators.cache import check_cache_names

        check_cache_names(prepared.plan.activation_names)  # before the work: the cache could not hold them
        if (args.eval_images > 0 or args.max_drop is not None) and not output_specs(prepared.model):
            from quantkit.errors import ModelError

            raise ModelError(f"{str(model_path)!r} has no tensor outputs to compare (its outputs are sequences or maps)",
                             hint="calibrate with --eval-images 0 (no comparison, no --max-drop)")
        source = source_for_model(args, prepared.specs)
        _say_yolo_preprocessing(args, model)
        outputs = output_specs(prepared.model)
        mismatch = check_classes(source, outputs, args.error_output)  # warns
        drawn = select(source, args, what="images", default=DEFAULT_CALIBRATION_IMAGES)
        eval_source, eval_idx, held_out = source, [], False
        if args.eval_images > 0:
            if args.eval_dir:
                where = _within(args.eval_dir, args.images or args.npz)
                if where is not None:  # report.json says held_out: false
                    log.warning("--eval-dir %r is the calibration data%s: the comparison is on calibration samples, "
                                "not held out", args.eval_dir, where)
                eval_source = source_for_model(args, prepared.specs, images=args.eval_dir)
                # spread over its classes as --images is (the first files are the first classes)
                eval_idx = draw_sample(eval_source, min(args.eval_images, len(eval_source)),
                                       order=args.order, seed=args.seed).indices
                held_out = where is None
                mismatch = check_classes(eval_source, outputs, args.error_output)  # warns
            else:
                held_out = bool(drawn.rest)
                eval_idx = (drawn.rest or drawn.indices)[: args.eval_images]
        budget = _budget(args, prepared.model, eval_source, eval_idx)  # before the work: labels, metric
        if budget is not None:  # an error output of data-dependent shape: refused before the calibration
            from quantkit.debug.fallback import check_fixed_output

            check_fixed_output(prepared.model, prepared.specs, eval_source, eval_idx, config.run, budget.output)
        if budget is not None and budget.drop_metric == "accuracy" and mismatch:
            from quantkit.errors import InputError

            raise InputError(f"{'--eval-dir: ' if args.eval_dir else ''}{mismatch}; --max-drop would budget on it",
                             hint="give a folder with one sub-folder per output class, or --drop-metric top1-agreement")

        timing = _Stages()
        with progress(len(drawn.indices), "calibrating", disable=args.no_progress) as bar:
            cal = quantize(prepared, source, config, indices=drawn.indices, on_batch=bar.update,
                           sampling=drawn.to_dict(), on_stage=lambda what: timing.stage(what, bar))
            cal.int8_model()  # its bias correction under the bar too (made once; written and compared below)
        timing.stop()
        cal.on_stage = None

        method = cal.config.method  # the method check's choice where --method was not given
        # printed after the artifacts are written (a closed stdout loses nothing)
        report, lines = None, [f"calibration sample: {describe_sample(drawn, 'images' if args.images else 'samples')}"]
        left_out = len(drawn.indices) - len(cal.skipped) - cal.num_samples
        if left_out > 0:  # a fixed batch takes whole batches (warned once as the pass ran)
            lines[0] += f"; {cal.num_samples} calibrated, the last {left_out} do not fill the model's fixed batch"
        spec = getattr(getattr(source, "source", source), "preprocess", None)  # an image folder's
        if spec is not None:  # the preset's values a flag did not replace are in it: say them
            lines.append(f"preprocessing: {spec.summary()} (--preprocess {args.preprocess}; --resize, --crop, "
                         "--scale, --mean, --std, --color replace its values)")
        result = None
        if budget is not None:
            from quantkit.debug.fallback import fallback

            with ranking_progress(disable=args.no_progress) as on_rank:
                result = fallback(cal, eval_source, eval_idx, budget, on_step=_print_step, on_rank=on_rank)
            if not result.met:
                from quantkit.errors import InputError

                raise InputError(result.message + "; nothing was written",
                                 hint="raise --max-drop" + (" or --max-float-groups" if args.max_float_groups is not None
                                                             else "") + ", or check the evaluation data")
            cal.apply_fallback(result)  # the model written and compared below, and the cache
            if result.num_groups and len(result.float_groups) >= result.num_groups:
                log.warning("--max-drop %g kept every one of the %d group(s) in float: the written .int8.onnx has no "
                            "INT8 layer (TensorRT builds it in FP16/FP32); a larger budget keeps some in INT8",
                            budget.max_drop, result.num_groups)
            parts = f", the worst of the {result.output_parts} parts a Concat joins" if result.output_parts else ""
            lines.append(f"{result.message} ({result.drop_metric} of output {result.output!r}{parts}"
                         + ("" if args.error_output else "; --error-output NAME reads another") + ")")
        if args.eval_images > 0:
            known = [] if args.eval_dir else [f for f, _ in cal.skipped]  # warned about once already
            with progress(len(eval_idx), "comparing", disable=args.no_progress) as bar:
                cmp = cal.evaluate(eval_source, eval_idx, reference_name=model_path.name, known_skips=known,
                                   test_name=f"{model_path.stem}.int8.onnx ({method}{_switches_note(result)})",
                                   on_batch=bar.update, label_output=label_output(eval_source, outputs,
                                                                                  args.error_output))
            # files the calibration pass already reported are summed up once, below
            lines.append(replace(cmp, skipped=[s for s in cmp.skipped if s[0] not in known]).table())
            if not held_out:
                what = "samples" if getattr(args, "npz", None) else "images"
                lines.append("  note: " + ("--eval-dir is the calibration data" if args.eval_dir else
                                           f"no {what} left after calibration") + f"; compared on calibration "
                             f"{what}, where the figures read higher than on {what} the calibration has not seen "
                             "(--num-images below the data's count leaves some out, or --eval-dir gives others)")
            note = lost_note(cmp)
            if note:
                lines.append(note + _raw_input_hint(cal, method))
            report = {"method": method, "held_out": held_out, **cmp.to_dict(),
                      "reference_path": os.path.realpath(model_path),
                      "test_path": os.path.realpath(Path(args.output) / f"{model_path.stem.removesuffix('.fp32')}.int8.onnx"),
                      "entropy_differs_from_trt": cal.entropy_effect(),
                      **({"bias_correction": cal.bias_checks[method]} if method in cal.bias_checks else {}),
                      **({"method_check": cal.method_check} if cal.method_check else {}),
                      **({"pointwise_check": cal.pointwise_check} if cal.pointwise_check else {}),
                      **({"equalization_refit": cal.equalization_refit} if cal.equalization_refit else {}),
                      **({"excluded": cal.excluded} if cal.excluded else {}),
                      **({"fallback": result.to_dict()} if result is not None else {})}
        if args.target == "onnxruntime":
            from quantkit.backends.onnxruntime import cpu_has_vnni

            if cpu_has_vnni() is False:
                lines.append("  note: this CPU has no VNNI: ONNX Runtime's integer kernels here multiply with 16-bit "
                             "sums that saturate, and the model can lose much more there than quantkit's figures say "
                             "(quantkit computes as TensorRT does); `quantkit compare ... --ort-kernels` shows what "
                             "they give")

        preprocess = getattr(source, "preprocess", None)
        meta = {
            "model": {"path": str(model_path), "sha256": file_sha256(model_path)},
            "preprocess": preprocess.to_dict() if preprocess is not None else None,
            "data": str(args.images or args.npz),
            **({"fallback": {k: v for k, v in result.to_dict().items() if k != "steps"}} if result is not None else {}),
        }
        stats = None
        if args.save_stats:
            stats = cal.to_stats(model={**meta["model"], "path": str(model_path.resolve())},
                                 preprocess=meta["preprocess"], data=meta["data"])

        paths = save_with_stats(cal, args.output, args.save_stats, stats_inside, stats,
                                model_stem=model_path.stem.removesuffix(".fp32"), metadata=meta, report=report,
                                trt_version=trt_version_number(args.trt_version), force=args.force, inputs=inputs,
                                command="quantkit calibrate",
                                extra={"sensitivity": (ARTIFACTS["sensitivity"], result.ranking.to_dict())}
                                if result is not None and result.ranking is not None else None)
        for line in lines:
            print(line)
        if cal.skipped:
            print(f"skipped {len(cal.skipped)} unreadable file(s) during calibration (listed in ranges.json)")
        from quantkit.onnx.equalize import equalization_summary
        from quantkit.onnx.qdq import float_by_rule

        front = [w for w in float_by_rule(cal.model, cal.config.stats.target).values() if w == "log-spectrum front end"]
        copies = len({e.scaled for e in cal.equalized} & set(cal.plan.activations))  # `inspect` plans without them
        print(f"calibrated {cal.num_samples} samples, {len(cal.plan.activations)} activations"
              + (f" ({copies} of them equalization Mul outputs)" if copies else "")
              + f" and {len(cal.plan.weights)} weights quantized ({method}{_method_note(cal.method_check)}"
              + f"{_switches_note(result)})"
              + _float_note(result)
              + (f"; {len(cal.excluded)} node(s) kept in float by "
                 + "/".join(f for f, v in (("--exclude", args.exclude), ("--exclude-op-type", args.exclude_op_type),
                                           ("--exclude-from", args.exclude_from)) if v) if cal.excluded else "")
              + (f"; {len(front)} Conv/Gemm/MatMul of a log-spectrum front end kept in float" if front else "")
              + _recurrent_note(cal.model)
              + _opset_note(opset, opset_version(cal.model))
              + (f"; equalized {equalization_summary(cal.equalized)} (--no-equalize: none)" if cal.equalized else "")
              + _refit_note(cal.equalization_refit)
              + _pointwise_note(cal.pointwise_check) + _bias_note(cal.bias_checks.get(method)))
        note = timing.note(cal.method_check is not None, bool(cal.bias_checks))
        if note:
            print(note)
        for p in paths.values():
            print(f"  wrote {p}")
        return 0


#: ``_Stages.note``: said where the work after the calibration pass took at least this long (s) and
#: this many times the pass
SLOW_STAGES_S = 30.0
SLOW_STAGES_RATIO = 2.0


class _Stages:
    """When the calibration pass ended (the first stage after it began) and the work after it did
    (bias corrections, the checks): their seconds, for a note where that work dominates (a probe's
    head-pose net: 29 s against one FP32 pass of 0.3 s, and nothing said what took it)."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.start = self._clock()
        self.after: float | None = None
        self.end: float | None = None
        self.names: list[str] = []

    def stage(self, what: str, bar: Any) -> None:
        if self.after is None:
            self.after = self._clock()
        self.names.append(what.split(" (")[0])
        bar.set_description_str(f"calibrating: {what}")

    def stop(self) -> None:
        self.end = self._clock()

    def note(self, checked: bool, corrected: bool) -> str | None:
        if self.after is None or self.end is None:
            return None
        passed, after = self.after - self.start, self.end - self.after
        if after < SLOW_STAGES_S or after < SLOW_STAGES_RATIO * passed:
            return None
        skips = ([" `--method entropy` (or another) skips the method check's other models"] if checked else []) + (
            [" `--no-bias-correction` the corrections (and the check)"] if corrected else [])
        return (f"  note: the calibration pass took {passed:.0f} s and the work after it {after:.0f} s "
                f"({', '.join(dict.fromkeys(self.names))})" + (";" + ";".join(skips) if skips else ""))


#: a quantized graph input whose amax is this many times its median |x| holds raw units (sensor counts,
#: electrons, int16 audio) that INT8's 255 steps cannot resolve where most values lie
RAW_INPUT_RATIO = 100.0


def _raw_input_hint(cal: Any, method: str) -> str:
    """Words for the lost-output note naming a quantized graph input of raw units and the
    ``--exclude`` that keeps its readers' input in float: deepCR's cosmic-ray UNet reads electrons
    (median 77, up to 21,000; its first Conv's input INT8 lost the output, -2.4 dB; that one
    Conv in float, 16.6 dB; the sixteenth probe); "" where no input looks so."""
    import numpy as np

    inputs = {i.name for i in cal.model.graph.input}
    found = []
    for t in cal.plan.activation_names:
        h = cal.histograms.get(t)
        if t not in inputs or h is None or not h.counts.any():
            continue
        cum = np.cumsum(h.counts)
        median = (int(np.searchsorted(cum, cum[-1] / 2.0)) + 0.5) * h.bin_width
        amax = cal.ranges[t].amax.get(method, 0.0)
        if median > 0 and amax / median >= RAW_INPUT_RATIO:
            readers = [n.name for n in cal.model.graph.node if t in n.input and n.name]
            found.append((t, median, amax, readers))
    if not found:
        return ""
    t, median, amax, readers = found[0]
    excl = " ".join(f"--exclude '{r}'" for r in readers[:3])
    return (f"; input {t!r} looks like raw units (its INT8 range {amax:.4g} is {amax / median:.0f}x its median "
            f"|x| {median:.3g}: most values get a step or two); if the model scales it inside, keep its first layer "
            f"in float" + (f": {excl}" if excl else ""))


def _opset_note(before: int, after: int) -> str:
    """The summary's words on an opset upgrade (exact: ONNX's version converter), with its reason."""
    from quantkit.onnx.model import MIN_QDQ_OPSET, MIN_QDQ_OPSET_FLOAT16

    if after <= before:
        return ""
    why = (f"Q/DQ of float16 tensors needs {MIN_QDQ_OPSET_FLOAT16}" if after >= MIN_QDQ_OPSET_FLOAT16 > before
           and before >= MIN_QDQ_OPSET else f"Q/DQ per channel needs {MIN_QDQ_OPSET} or later")
    return f"; opset {before} upgraded to {after} ({why})"


def _recurrent_note(model: Any) -> str:
    """The summary's note on the recurrent layers that stay in float (``recurrent_summary``)."""
    from quantkit.onnx.qdq import recurrent_summary

    what = recurrent_summary(model)
    return f"; in float: {what} (no INT8 recurrent layers: TensorRT runs them in FP16/FP32)" if what else ""


def _switches_note(result: Any) -> str:
    """The words on --max-drop's method switches (``result``: the fallback's, or None): "entropy"
    alone read wrong where every group had been switched to percentile."""
    overrides = dict(getattr(result, "method_overrides", None) or {})
    if not overrides:
        return ""
    methods = "/".join(sorted(set(overrides.values())))
    which = "every group" if len(overrides) == result.num_groups else f"{len(overrides)} group(s)"
    return f"; {which} switched to {methods} by --max-drop"


def _float_note(result: Any) -> str:
    """The summary's words on the groups --max-drop returned to float (``result``: the
    fallback's, or None): the counts before them are the calibration's, not the written model's."""
    groups = list(getattr(result, "float_groups", None) or [])
    if not groups:
        return ""
    model = result.int8_model
    consts = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    of_weights = sum(1 for n in quantize if n.input[0] in consts)  # float weights, Q/DQ; or int8 ones, DQ alone
    stored = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts)
    return (f"; {len(groups)} of {result.num_groups} group(s) then kept in float by --max-drop (the model written: "
            f"{len(quantize) - of_weights} activations and {of_weights + stored} weights quantized)")


def _within(path: str, other: str | None) -> str | None:
    """Where ``path`` lies against ``other`` (both with their links resolved): "" where it is
    ``other``, " (a folder inside it)" where it lies inside, None elsewhere."""
    if not other:
        return None
    a, b = Path(os.path.realpath(path)), Path(os.path.realpath(other))
    return "" if a == b else " (a folder inside it)" if b in a.parents else None


def _method_check(args: argparse.Namespace) -> bool | None:
    """``ExportConfig.method_check`` for these arguments: the default's (None) unless a method is
    named, or ``--max-drop`` is given. The fallback's first step measures every method on the
    whole model against the budget, on the evaluation data and in the budget's own metric, where
    the check reads 32 calibration samples; ahead of it the check only added its cost (the outlier
    CNN of ``benchmarks/debug_fallback.py``: 0.23 of the run's 0.8 s, and the method it kept)."""
    if args.method is not None:
        return False
    if args.max_drop is not None:
        log.info("no method check: --max-drop's fallback measures the methods on the evaluation data")
        return False
    return None


def _method_note(check: dict[str, Any] | None) -> str:
    """The summary's words on the method check's verdict (none where it did not run)."""
    if check is None:
        return ""
    db, configured, chosen = check["output_sqnr_db"], check["configured"], check["chosen"]
    switched = chosen != configured
    others = ", ".join(f"{m} {db[m]:.1f} dB" for m in db if m != chosen)
    on = f" on {check['samples']} calibration samples after the bias correction's" if check.get("samples") else ""
    return (f": the method check's choice, the outputs' mean per-channel SQNR against FP32{on} "
            f"{db[chosen]:.1f} dB, {others}" + (f"; --method {configured} writes {configured} unchecked" if switched else ""))


def _refit_note(refit: dict[str, Any] | None) -> str:
    """The summary's words on the equalization refit (``Calibration.equalization_refit``)."""
    if not refit:
        return ""
    return (f"; {refit['channels']} equalized channel(s) kept at factor 1: the later samples reached more than "
            f"{refit['ratio']:g}x the first ones' maximum there")


def _pointwise_note(check: dict[str, Any] | None) -> str:
    """The summary's words on a pointwise equalization the check left out (none when kept)."""
    if check is None or check["kept"]:
        return ""
    on = f" on the bias correction's {check['samples']} samples" if check.get("samples") else ""
    return (f"; pointwise equalization left out: the outputs' mean per-channel SQNR against FP32{on} was "
            f"{check['output_sqnr_db']:.1f} dB with it, {check['unequalized_output_sqnr_db']:.1f} without")


def _bias_note(check: dict[str, Any] | None) -> str:
    """The summary's words on a bias correction the guard left out (none when it was applied)."""
    if check is None or check["applied"]:
        return ""
    on = f" on its {check['samples']} samples" if check.get("samples") else ""
    return (f"; bias correction left out: the outputs' per-channel SQNR against FP32{on} was "
            f"{check['output_sqnr_db']:.1f} dB with it, {check['uncorrected_output_sqnr_db']:.1f} without")


def stats_target(save_stats: str | None, output: str, *, force: bool, inputs: list[Any]) -> str | None:
    """Check ``--save-stats`` before the work (calibrate's and merge-stats'): its name inside
    ``output`` (then written as one of the artifacts, never through a symlink nor under another
    artifact's name), or None for a file of its own (never an input nor -o itself; with ``force``
    it replaces only an earlier statistics file)."""
    from quantkit._io import OutputError, check_output_file, inside
    from quantkit.calibrators.stats import is_stats_file

    if not save_stats:
        return None
    stats_inside = _inside(save_stats, output)
    if stats_inside is None:
        if os.path.abspath(save_stats) == os.path.abspath(output):
            raise OutputError(f"--save-stats {save_stats!r} is the output folder",
                              hint="give a file name, e.g. -o OUT --save-stats OUT/stats.qkstats")
        check_output_file(save_stats, force=force, inputs=inputs, replaceable=is_stats_file,
                          what="a quantkit statistics file")
    elif not inside(Path(output), stats_inside):
        raise OutputError(f"--save-stats {save_stats!r} lies behind a symlink inside {output!r}; "
                          "quantkit does not write through it", hint="give a path without the symlink")
    elif _artifact_name(stats_inside):
        raise OutputError(f"--save-stats {save_stats!r} has the name of one of the artifacts in {output!r}",
                          hint="give it another name, e.g. -o OUT --save-stats OUT/stats.qkstats")
    return stats_inside


def save_with_stats(cal: Any, output: str, save_stats: str | None, stats_inside: str | None, stats: Any,
                    **save: Any) -> dict[str, Path]:
    """``cal.save(output, **save)`` with ``stats`` (or None) saved as ``--save-stats`` asks
    (``stats_target``): inside the folder as one of its artifacts, or as a file of its own that is
    written beside its place first and renamed there once the folder is committed, so that a full
    disk there fails before the folder is in place (an error leaves both as they were)."""
    import contextlib

    from quantkit._io import staged_file
    from quantkit.calibrators.stats import encode_stats

    outside = stats is not None and stats_inside is None
    with staged_file(save_stats, encode_stats(stats)) if outside and save_stats else contextlib.nullcontext() as commit:
        paths: dict[str, Path] = cal.save(output, stats=(stats_inside, stats) if stats is not None and stats_inside
                                          is not None else None, **save)
        if commit is not None:
            paths["stats"] = commit()
    return paths


def _artifact_name(name: str) -> bool:
    """``name`` (inside -o) is, or may be, one of calibrate's own files: the statistics written
    there would replace it."""
    from quantkit._io import MANIFEST
    from quantkit.ptq import artifact_names

    fixed = {MANIFEST, *artifact_names("", report=True, sensitivity=True)}
    return name in fixed or name.endswith((".int8.onnx", ".int8.onnx.data"))


def _inside(path: str, folder: str) -> str | None:
    """``path`` relative to ``folder`` when it lies inside it (then it is written as one of the
    artifacts), else None."""
    import os

    p, f = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return p.relative_to(f).as_posix() if f in p.parents else None


def _exclude_from(args: argparse.Namespace, model: Any) -> list[str]:
    """--exclude-from FILE --top K: the nodes of the K most sensitive groups (exact names, each a
    node of ``model`` as calibrate prepares it)."""
    import re

    from quantkit.errors import InputError

    if args.top is not None and not args.exclude_from:
        raise InputError("--top needs --exclude-from FILE", hint="e.g. --exclude-from out/sensitivity.json --top 3")
    if not args.exclude_from:
        return []
    if args.top is None:
        raise InputError("--exclude-from needs --top K: how many of the most sensitive groups to keep in float")
    from quantkit.debug.sensitivity import ranking_from_file

    rows = ranking_from_file(args.exclude_from)
    names = [n for r in rows[: args.top] for n in r["nodes"]]
    nodes = {m.name for m in model.graph.node}
    missing = next((n for n in names if n not in nodes), None)
    if missing is not None:  # a name the preparation gives (an unnamed node's)?
        from quantkit.onnx.model import einsum_as_matmul, ensure_opset, with_node_names

        prepared = {m.name for m in with_node_names(einsum_as_matmul(ensure_opset(model))).graph.node}
        missing = next((n for n in names if n not in prepared), None)
    if missing is not None:
        raise InputError(f"--exclude-from {args.exclude_from!r} names node {missing!r}, which this model does not have",
                         hint="use a ranking of this model (calibrate --max-drop's sensitivity.json, debug --rank's "
                              "debug.json)")
    return [re.escape(n) for n in names]


def _budget(args: argparse.Namespace, model: object, source: object, indices: list[int]) -> object:
    """The fallback's configuration for --max-drop (None without it), checked before any work."""
    from quantkit.errors import InputError

    if args.max_drop is None:
        extra = [f for f, v in (("--drop-metric", args.drop_metric), ("--max-float-groups", args.max_float_groups),
                                ("--rank-estimator", None if args.rank_estimator == "exact" else args.rank_estimator),
                                ("--error-output", args.error_output),
                                ("--subset", None if args.subset == 32 else args.subset))
                 if v is not None]
        if extra:
            raise InputError(f"{extra[0]} needs --max-drop D", hint="e.g. --max-drop 0.5")
        return None
    from quantkit.debug.fallback import FallbackConfig, drop_metric_for

    if not indices:
        raise InputError("--max-drop needs evaluation data, and --eval-images is 0",
                         hint="give --eval-dir DIR or --eval-images N > 0")
    from quantkit.onnx.model import error_output

    output = chosen = error_output(model, args.error_output)  # type: ignore[arg-type]
    if args.error_output is None and args.drop_metric in (None, "accuracy"):
        from quantkit.datasets.classes import label_output
        from quantkit.debug.fallback import has_labels
        from quantkit.onnx.model import output_specs

        scored = label_output(source, output_specs(model))  # type: ignore[arg-type]
        if scored is not None and scored != output and has_labels(source, indices):  # type: ignore[arg-type]
            output = scored  # the output whose classes the labels are (the features come first)
    metric = drop_metric_for(model, output, args.drop_metric, source, indices)  # type: ignore[arg-type]
    return FallbackConfig(max_drop=args.max_drop, drop_metric=metric, subset=args.subset,
                          max_float_groups=args.max_float_groups, estimator=args.rank_estimator,
                          output=args.error_output if output == chosen else output)


def _print_step(step: dict) -> None:
    """One line per fallback step on stderr (the progress of --max-drop)."""
    import sys

    metric = step.get("metric")
    what = f"{step['action']} {', '.join(step['groups'])}".strip()
    if "method" in step:
        what += f" -> {step['method']}"
    kept = "" if step.get("kept", True) else " (undone)"
    print(f"fallback step {step['step']}: {what}: drop {step['drop']:.3g}"
          + (f", metric {metric:.4g}" if isinstance(metric, float) else "")
          + f", {step['float_groups']} group(s) in float{kept} ({step['seconds']:.1f} s)", file=sys.stderr)


def _say_yolo_preprocessing(args: argparse.Namespace, model: Any) -> None:
    """An ultralytics export (its metadata says so) calibrated from images with the default imagenet
    preset gets ImageNet's crop and mean/std, which it was never trained on: said once (a face
    detector's INT8 kept 39 of 86 boxes so, 0.55 of them with --preprocess yolo)."""
    if not args.images or args.preprocess != "imagenet" or any(
            getattr(args, k, None) is not None for k in ("resize", "crop", "letterbox", "mean", "std", "scale")):
        return
    meta = {p.key.lower(): p.value for p in model.metadata_props}
    if "ultralytics" in meta.get("author", "").lower() or {"stride", "imgsz", "task"} <= set(meta):
        log.warning("%s is an ultralytics export: its own preprocessing is a letterbox, RGB, pixels / 255; the "
                    "imagenet preset (the default) crops and normalizes otherwise: give --preprocess yolo",
                    Path(args.model).name)
