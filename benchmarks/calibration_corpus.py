"""Calibration wall time on the real-model corpus, against one FP32 ONNX Runtime pass.

    python benchmarks/calibration_corpus.py [--models rapidocr-rec ...] [--sizes 64 512] [--out FILE]

Per model of the corpus (tests/realmodels, its wheels cached as the tests cache them) and per
calibration-set size, in this one process:

- FP32 pass: one ONNX Runtime pass over the calibration data (session creation + every batch,
  the benchmark's batch size), the floor any calibration pays; the faster of two runs;
- quantkit: ``quantkit.quantize`` (one pass, every method) and the default method's Q/DQ model
  (bias correction included): what ``quantkit calibrate`` computes before writing its files;
  once with NumPy statistics (``QUANTKIT_NATIVE=0``'s code) and once with the native kernel
  (``quantkit.calibrators.native``), when it is built.

The issue's target is calibration at most 1.5x one FP32 pass. A size larger than the corpus's
generated data repeats it (the samples cycle), which is timing-only.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import real_models as rm  # noqa: E402
from tests.realmodels import corpus  # noqa: E402
from tests.realmodels.adapters import FULL, Adapter  # noqa: E402


def sized(a: Adapter, feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``feeds`` cut or cycled to ``n`` samples along each input's batch axis."""
    out = {}
    for k, v in feeds.items():
        axis = a.batch_axes.get(k, 0)
        if axis is None or not v.ndim:
            out[k] = v
            continue
        idx = np.arange(n) % v.shape[axis]
        out[k] = np.take(v, idx, axis=axis)
    return out


def quantkit_seconds(a: Adapter, model: onnx.ModelProto, npz: Path, native_on: bool) -> float:
    import quantkit
    from quantkit.calibrators import native
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig

    lib = native._LIB
    if not native_on:
        native._LIB = None
    try:
        t = time.perf_counter()
        cal = quantkit.quantize(model, rm.numpy_source(a, model, npz),
                                QuantizeConfig(StatsConfig(), RunConfig(batch_size=rm.BATCH)),
                                model_name=a.model_path().name)
        cal.int8_model()
        return time.perf_counter() - t
    finally:
        native._LIB = lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="adapter names (default: every corpus model)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 512], help="calibration samples (default 64 512)")
    ap.add_argument("--native-only", action="store_true", help="skip the NumPy-statistics run")
    ap.add_argument("--out", type=Path, help="write the table here too (markdown)")
    ap.add_argument("--machine", default=f"a {os.cpu_count()}-core CPU machine", help="how to describe the machine")
    args = ap.parse_args(argv)
    from quantkit.calibrators import native

    import onnxruntime

    adapters = [a for a in FULL if not args.models or a.name in args.models]
    lines = [f"Calibration wall time vs one FP32 pass, {args.machine} ({os.cpu_count()} cores), "
             f"ONNX Runtime {onnxruntime.__version__}, Python {platform.python_version()}, native kernel "
             f"{'built' if native.available() else 'NOT built'}", "",
             "| model | samples | FP32 pass s | quantkit, NumPy statistics s (x FP32) | "
             "quantkit, native kernel s (x FP32) | NumPy / native |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="qk-calcorpus-") as tmp:
        for a in adapters:
            try:
                base = a.calibration_feeds()
                model = onnx.load(a.model_path())
            except (corpus.WheelMissing, ImportError) as err:  # an adapter's optional package (tokenizers)
                lines.append(f"| {a.name} | | not run: {err} | | | |")
                continue
            if a.name == "silero-vad":  # weights inside an If: refused (exit 2); its op15 export is the corpus's
                continue
            for n in args.sizes:
                feeds = sized(a, base, n)
                npz = a.write_npz(Path(tmp) / f"{a.name}-{n}.npz", feeds)
                fp32 = min(rm.fp32_pass_seconds(a.model_path(), feeds, a) for _ in range(2))
                slow = None if args.native_only else quantkit_seconds(a, model, npz, native_on=False)
                fast = quantkit_seconds(a, model, npz, native_on=True) if native.available() else None
                cells = [f"{slow:.2f} ({slow / fp32:.2f}x)" if slow else "not run",
                         f"{fast:.2f} ({fast / fp32:.2f}x)" if fast else "not built",
                         f"{slow / fast:.2f}" if fast and slow else "—"]
                lines.append(f"| {a.name} | {n} | {fp32:.2f} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
