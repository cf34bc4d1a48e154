"""Host-to-device staging on the GPU: pinned vs pageable copies, and the double-buffered
calibration stager against decoding alone.

    python benchmarks/gpu_staging.py [--out benchmarks/results/gpu_staging.md]

Needs cuda-python and a CUDA GPU. One process, one table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    from quantkit import cuda
    from quantkit.datasets import Batcher, SyntheticSource

    rt = cuda.cudart()
    props = cuda.check(rt.cudaGetDeviceProperties(0), "props")
    gpu = props.name.decode().rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    x = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)  # 38.5 MB
    lines = [f"# GPU staging\n\n{gpu}, {platform.machine()}, batch 64x3x224x224 float32 ({x.nbytes / 1e6:.1f} MB), "
             f"median of {args.repeats}\n", "| copy | ms per batch | GB/s |", "|---|---|---|"]
    with cuda.Stream() as s, cuda.DeviceBuffer(x.nbytes) as d, cuda.PinnedBuffer(x.nbytes) as p:
        p.view(np.float32, x.shape)[...] = x
        for label, fn in [
            ("pageable (cudaMemcpy from a NumPy array)", lambda: d.copy_from_host(x)),
            ("pinned, async on a stream", lambda: (d.copy_from_host(p, s), s.synchronize())),
        ]:
            fn()
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            ms = float(np.median(ts)) * 1e3
            lines.append(f"| {label} | {ms:.2f} | {x.nbytes / ms / 1e6:.1f} |")

    # the stager over a synthetic source: the time to hand 20 batches to a consumer that
    # itself takes 2 ms per batch (as a GPU calibration step might), against decoding alone
    src = SyntheticSource((3, 224, 224), count=64 * 20, seed=0)
    t0 = time.perf_counter()
    for _ in Batcher(src, ["x"], 64):
        time.sleep(0.002)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    with cuda.BatchStager(Batcher(src, ["x"], 64), {"x": (np.float32, (64, 3, 224, 224))}) as st:
        while st.next_pointers() is not None:
            time.sleep(0.002)
    staged = time.perf_counter() - t0
    lines += ["", "| 20 batches of 64, consumer 2 ms/batch | s |", "|---|---|",
              f"| data loader only (host arrays) | {plain:.3f} |",
              f"| data loader + pinned staging + H2D, double-buffered | {staged:.3f} ({staged / plain:.2f}x) |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
