from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path


class Demo:
    """Run the whole flow on the bundled digits sample: calibrate once, compare every method.

    Writes the sample's digits as an image folder with class subfolders (a temporary folder,
    removed at the end; --keep-images keeps it in DIR/images), calibrates the bundled CNN on the
    training split (one pass, every method), checks each method's INT8 model against FP32 on
    the test split, and times FP32 and INT8 on ONNX Runtime (CPU). About 15 s on 2 cores.
    """

    name = "demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", metavar="DIR", help="output folder (default: a new temporary folder, "
                            "kept and printed at the end)")
        parser.add_argument("--force", action="store_true",
                            help="replace the artifacts of an earlier demo in DIR (never other files)")
        parser.add_argument("--keep-images", action="store_true",
                            help="keep the digits image folders in DIR/images (for running the steps by hand)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_dir, output_dir

        made = not args.output  # a new temporary folder: removed again when the demo does not finish
        out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="quantkit-demo-"))
        try:
            check_output_dir(out, force=args.force, command="quantkit demo")
            with output_dir(out, force=args.force, command="quantkit demo") as staging:
                if args.keep_images:
                    lines = _demo(staging, staging / "images", out, args, keep=True)
                else:
                    with tempfile.TemporaryDirectory(prefix="quantkit-demo-data-") as work:
                        lines = _demo(staging, Path(work), out, args, keep=False)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when still empty: it was made here
            raise
        for line in lines:  # after the files are in place: a closed stdout loses nothing
            print(line)
        return 0


def _demo(staging: Path, work: Path, out: Path, args: argparse.Namespace, *, keep: bool) -> list[str]:
    """Run the demo with images under ``work``, artifacts into ``staging`` (which becomes
    ``out``); the lines to print."""
    from quantkit import sample
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.bench import measure_latency
    from quantkit.calibrators.methods import method_names
    from quantkit.cli.common import progress
    from quantkit.datasets import Batcher, ImageFolder
    from quantkit.onnx.model import load_model
    from quantkit.ptq import quantize

    train_dir = sample.write_image_folder(work / "train", "train")
    test_dir = sample.write_image_folder(work / "test", "test")
    pp = sample.preprocess()
    model = load_model(sample.model_path())
    train, test = ImageFolder(train_dir, pp), ImageFolder(test_dir, pp)
    lines = [f"digits sample: {len(train)} training images (calibration), {len(test)} test images, "
             f"model {sample.model_path().name}"]

    with progress(len(train), "calibrating", disable=args.no_progress) as bar:
        cal = quantize(model, train, on_batch=bar.update, model_name="digits_cnn.onnx")
    methods = method_names()
    files = {m: "digits_cnn.int8.onnx" if m == "entropy" else f"digits_cnn.{m}.int8.onnx" for m in methods}
    rows = [(m, cal.evaluate(test, method=m, batch_size=64, reference_name="digits_cnn.onnx", test_name=files[m]))
            for m in methods]
    with OrtRunner(cal.model) as ref:
        feed = {"image": next(iter(Batcher(test, ["image"], 32))).feed["image"]}
        lat_fp32 = measure_latency(ref, feed, warmup=5, iterations=30)
        with OrtRunner(cal.int8_model("entropy"), integer_kernels=True) as q:  # ONNX Runtime's own speed
            lat_int8 = measure_latency(q, feed, warmup=5, iterations=30)

    lines.append(f"\n{'method':<12} {'FP32 acc':>8} {'INT8 acc':>8} {'agree':>7} {'cosine':>8} {'SQNR dB':>8}")
    for method, rep in rows:
        o = rep.outputs[0]
        lines.append(f"{method:<12} {rep.accuracy_reference:>8.4f} {rep.accuracy_test:>8.4f} {o.top1_agreement:>7.4f} "
                     f"{o.cosine_mean:>8.5f} {o.sqnr_db:>8.2f}")
    lines.append(f"\nONNX Runtime CPU latency, batch 32 (median of 30): FP32 {lat_fp32.median_ms:.2f} ms, "
                 f"INT8 Q/DQ {lat_int8.median_ms:.2f} ms")
    lines.append("  (TensorRT-style Q/DQ models are not faster on ONNX Runtime's CPU provider; they are made for TensorRT)")
    for e in cal.entropy_effect():
        lines.append(f"entropy on {e['tensor']!r} ({e['rule']}): TensorRT's KL would clip at {e['entropy_trt']:.3f} "
                     f"(max {max(abs(e['observed_min']), e['observed_max']):.3f}); quantkit uses {e['entropy']:.3f}")

    report = {
        "methods": {m: r.to_dict() for m, r in rows},
        "latency_batch32": {"fp32": {"model": "digits_cnn.onnx", **lat_fp32.to_dict()},
                            "int8": {"model": files["entropy"], **lat_int8.to_dict()}},
        "entropy_differs_from_trt": cal.entropy_effect(),
    }
    from quantkit.onnx.model import file_sha256

    # the model's SHA-256: calibration.cache.json, the cache's provenance `build` checks, as calibrate writes it
    names = cal.write_into(staging, model_stem="digits_cnn", report=report, extra_methods=methods,
                           metadata={"model": {"path": "quantkit/sample/digits_cnn.onnx",
                                               "sha256": file_sha256(sample.model_path())},
                                     "preprocess": pp.to_dict(),
                                     "data": str(out / "images" / "train") if keep else "digits training split"})
    images_note = f", the {len(train) + len(test)} digits images in images/" if keep else ""
    lines.append(f"\nwrote {len(names)} artifacts{images_note} and quantkit-manifest.json to {out}. Same flow by hand "
                 "(the same calibration: every training image, in file order):")
    images = str(out / "images") if keep else "IMAGES"
    lines.append(f"  quantkit calibrate {sample.model_path()} --images {images}/train --preprocess none --color gray "
                 f"--scale {pp.scale!r} --mean {pp.mean[0]} --std {pp.std[0]} --num-images {len(train)} "
                 f"--order sorted -o OUT --eval-dir {images}/test")
    if not keep:
        lines.append("  (IMAGES: run `quantkit demo --keep-images -o DIR` to keep the digits images in DIR/images)")
    return lines
