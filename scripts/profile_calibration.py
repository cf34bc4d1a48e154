"""Where a corpus model's calibration spends its time: cProfile of ``quantkit.quantize`` and the
default method's Q/DQ model, the capture's statistics run in the calling thread (so the profile
sees them; the wall time is then the sum of the parts, not the overlapped time `calibrate` takes).

    python scripts/profile_calibration.py rapidocr-rec [SAMPLES] [--lines N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


class _InlinePool:
    """ThreadPoolExecutor's surface, running each job at once in the caller."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args, **kwargs):
        f: Future = Future()
        f.set_result(fn(*args, **kwargs))
        return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a corpus adapter's name (tests/realmodels/adapters.py)")
    ap.add_argument("samples", nargs="?", type=int, default=64)
    ap.add_argument("--lines", type=int, default=45)
    args = ap.parse_args()
    import onnx

    import calibration_corpus as cc
    import quantkit
    import quantkit.backends.onnxruntime as backend
    import real_models as rm
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig
    from tests.realmodels.adapters import FULL

    a = next(x for x in FULL if x.name == args.model)
    feeds = cc.sized(a, a.calibration_feeds(), args.samples)
    print(f"FP32 pass: {min(rm.fp32_pass_seconds(a.model_path(), feeds, a) for _ in range(2)):.3f} s")
    model = onnx.load(a.model_path())
    src = rm.numpy_source(a, model, a.write_npz(Path("/tmp") / f"qk-profile-{a.name}.npz", feeds))
    backend.ThreadPoolExecutor = _InlinePool
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    cal = quantkit.quantize(model, src, QuantizeConfig(StatsConfig(), RunConfig(batch_size=rm.BATCH)))
    cal.int8_model()
    prof.disable()
    print(f"quantkit (statistics inline): {time.perf_counter() - t:.3f} s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats("quantkit|onnxruntime_pybind11|SerializeToString",
                                                            args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
