from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


class Demo:
    """Run the whole flow on the bundled digits sample: calibrate once, compare every method.

    Writes the sample's digits as an image folder with class subfolders, calibrates the bundled
    CNN on the training split (one pass, every method), checks each method's INT8 model against
    FP32 on the test split, and times FP32 and INT8 on ONNX Runtime (CPU).
    """

    name = "demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", metavar="DIR", help="output folder (default: a new temporary folder)")
        parser.add_argument("--force", action="store_true", help="replace an existing non-empty DIR")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit import sample
        from quantkit._io import check_output_dir
        from quantkit.backends.onnxruntime import OrtRunner
        from quantkit.bench import measure_latency
        from quantkit.cli.common import progress
        from quantkit.compare import compare_runners
        from quantkit.datasets import Batcher, ImageFolder
        from quantkit.onnx.model import load_model
        from quantkit.pipeline import METHODS, CalibConfig, calibrate, entropy_effect, write_artifacts

        out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="quantkit-demo-"))
        if args.output:
            check_output_dir(out, force=args.force)
        work = Path(tempfile.mkdtemp(prefix="quantkit-demo-data-"))
        train_dir = sample.write_image_folder(work / "train", "train")
        test_dir = sample.write_image_folder(work / "test", "test")
        pp = sample.preprocess()
        model = load_model(sample.model_path())
        train, test = ImageFolder(train_dir, pp), ImageFolder(test_dir, pp)
        print(f"digits sample: {len(train)} training images (calibration), {len(test)} test images, "
              f"model {sample.model_path().name}")

        with progress(len(train), "calibrating", disable=args.no_progress) as bar:
            cal = calibrate(model, train, config=CalibConfig(method="entropy"), on_batch=lambda b: bar.update(b.size),
                            model_name="digits_cnn.onnx")
        rows, models = [], {}
        with OrtRunner(cal.model) as ref:
            for method in METHODS:
                models[method] = cal.int8_model(method)
                with OrtRunner(models[method]) as q:
                    rep = compare_runners(ref, q, Batcher(test, ["image"], 64), test_name=method)
                rows.append((method, rep))
            feed = {"image": next(iter(Batcher(test, ["image"], 32))).feed["image"]}
            lat_fp32 = measure_latency(ref, feed, warmup=5, iterations=30)
            with OrtRunner(models["entropy"]) as q:
                lat_int8 = measure_latency(q, feed, warmup=5, iterations=30)

        print(f"\n{'method':<12} {'FP32 acc':>8} {'INT8 acc':>8} {'agree':>7} {'cosine':>8} {'SQNR dB':>8}")
        for method, rep in rows:
            o = rep.outputs[0]
            print(f"{method:<12} {rep.accuracy_reference:>8.4f} {rep.accuracy_test:>8.4f} {o.top1_agreement:>7.4f} "
                  f"{o.cosine_mean:>8.5f} {o.sqnr_db:>8.2f}")
        print(f"\nONNX Runtime CPU latency, batch 32 (median of 30): FP32 {lat_fp32.median_ms:.2f} ms, "
              f"INT8 Q/DQ {lat_int8.median_ms:.2f} ms")
        print("  (TensorRT-style Q/DQ models are not faster on ONNX Runtime's CPU provider; they are made for TensorRT)")
        for e in entropy_effect(cal):
            print(f"entropy on two-sided tensor {e['tensor']!r}: TensorRT's KL would clip at {e['entropy_trt']:.3f} "
                  f"(max {max(abs(e['observed_min']), e['observed_max']):.3f}); quantkit uses {e['entropy']:.3f}")

        report = {
            "methods": {m: r.to_dict() for m, r in rows},
            "latency_batch32": {"fp32": lat_fp32.to_dict(), "int8": lat_int8.to_dict()},
            "entropy_two_sided_tensors": entropy_effect(cal),
        }
        extra = {f"digits_cnn.{m}.int8.onnx": models[m] for m in METHODS if m != "entropy"}
        paths = write_artifacts(cal, out, model_stem="digits_cnn", int8_model=models["entropy"], report=report,
                                metadata={"model": {"path": "quantkit/sample/digits_cnn.onnx"},
                                          "preprocess": pp.to_dict(), "data": str(train_dir)},
                                force=args.force or not args.output, extra=extra)
        print(f"\nwrote {len(paths)} files to {out}; the images are in {work}. Same flow by hand:")
        print(f"  quantkit calibrate {sample.model_path()} --images {train_dir} --preprocess none --color gray "
              f"--scale {pp.scale!r} --mean {pp.mean[0]} --std {pp.std[0]} -o {out}/by-hand --eval-dir {test_dir}")
        return 0
