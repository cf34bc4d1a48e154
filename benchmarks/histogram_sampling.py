"""Exact vs sampled histograms (``--histogram-stride``) on the calibration benchmark's ResNet-18:
calibration time, the largest relative change of any tensor's amax per method, and the INT8
model's output SQNR against FP32 on 64 held-out pictures.

    python benchmarks/calibration.py --quick   # once, makes the model and the pictures
    python benchmarks/histogram_sampling.py [--out benchmarks/results/histogram_sampling.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import calibration as bench

    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.compare import compare_runners
    from quantkit.datasets import Batcher
    from quantkit.onnx.model import load_model
    from quantkit.ptq import QuantizeConfig, StatsConfig, quantize

    model = load_model(bench.resnet18_onnx())
    calib = bench.photo_folder(256, 0)
    held = bench.photo_folder(64, 1)
    src, ev = bench._source(Path(calib), None), bench._source(Path(held), None)
    cals, secs = {}, {}
    for k in (1, 5):
        t0 = time.perf_counter()
        cals[k] = quantize(model, src, QuantizeConfig(StatsConfig(sample_stride=k)))
        secs[k] = time.perf_counter() - t0
    ref = OrtRunner(model)
    lines = [f"# Exact vs sampled histograms\n\nResNet-18, 256 calibration pictures, 64 held out; {platform.machine()}, "
             f"capture + histograms + ranges: exact {secs[1]:.2f} s, stride 5 {secs[5]:.2f} s\n",
             "| method | max relative amax change | SQNR dB exact | SQNR dB stride 5 |", "|---|---|---|---|"]
    for method in ("entropy", "minmax", "percentile", "mse"):
        exact, sampled = cals[1].amax(method, quantized_only=True), cals[5].amax(method, quantized_only=True)
        change = max(abs(sampled[t] - exact[t]) / exact[t] for t in exact)
        sqnr = [compare_runners(ref, OrtRunner(cals[k].int8_model(method)), Batcher(ev, ["input"], 32)).outputs[0].sqnr_db
                for k in (1, 5)]
        lines.append(f"| {method} | {change:.4f} | {sqnr[0]:.2f} | {sqnr[1]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
