"""What the sensitivity ranking costs on ResNet-18, in FP32-pass equivalents (issue 14's target: 3).

    python benchmarks/rank_cost.py [--subset 32] [--fallback] [--repeat 1] [--estimator exact|gradient|both]

Model and data as benchmarks/calibration.py (ResNet-18 architecture, random initialisation,
opset 17; 224x224 crops of scikit-image's pictures): calibrated on 128 crops with the entropy
method, ranked on the next 128 (the ranking subset: the ``--subset`` samples with the largest
FP32-vs-INT8 error). The machine may be shared, so the FP32 pass that the cost is divided by is
also timed in this process right before and right after each ranking (the same ONNX Runtime
session options, the same preprocessed batches of the subset), next to the ranking's own figure
(timed inside its side-by-side pass): 5 passes right before and 5 right after, the median is the
unit. Prints the phase table. ``PYTHONPATH`` picks the quantkit it measures (an older checkout
gives the before figures).

``--estimator both`` ranks with the exact and the gradient estimator in turn (same subset) and
prints the gradient ranking's quality against the exact one: Spearman rank correlation of the
only-float errors, and how many of the exact top 5 / top 10 groups are in the gradient top 5 /
top 10. ``--method-groups`` sets the best-method trials (default 3, as the API).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def fp32_pass(cal, source, indices, repeat: int = 1) -> list[float]:
    """Seconds of ``repeat`` FP32 inference passes over ``indices`` (batches prepared beforehand)."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.ptq import evaluation_batches

    batches = list(evaluation_batches(source, cal.specs, list(indices), cal.config.run))
    with OrtRunner(cal.model, threads=cal.config.run.threads) as r:
        r.infer(batches[0].feed)  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for b in batches:
                r.infer(b.feed)
            times.append(time.perf_counter() - t0)
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", type=int, default=32)
    ap.add_argument("--fallback", action="store_true",
                    help="rank as the fallback does: without the only-quantized runs (quantized=False)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--estimator", choices=["exact", "gradient", "both"], default="exact")
    ap.add_argument("--method-groups", type=int, default=3)
    args = ap.parse_args()

    from calibration import _source, photo_folder, resnet18_onnx

    from quantkit.debug.sensitivity import rank_sensitivity
    from quantkit.ptq import ExportConfig, QuantizeConfig, quantize

    source = _source(photo_folder(256), None)
    t0 = time.perf_counter()
    cal = quantize(onnx.load(resnet18_onnx()), source, QuantizeConfig(export=ExportConfig("entropy")), indices=range(128))
    print(f"calibrated on 128 images in {time.perf_counter() - t0:.1f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    kwargs: dict = {"quantized": False} if args.fallback else {}
    kwargs["method_groups"] = args.method_groups
    estimators = ["exact", "gradient"] if args.estimator == "both" else [args.estimator]
    # the subset the ranking will pick (one side-by-side pass; the ranking repeats it)
    from quantkit.debug.sensitivity import QdqScales, per_sample_errors, pick_subset

    errors, _, _ = per_sample_errors(QdqScales.from_calibration(cal), source, list(range(128, 256)))
    subset = pick_subset(errors, args.subset)
    reports = {}
    for estimator in [e for _ in range(args.repeat) for e in estimators]:
        before = fp32_pass(cal, source, subset, 5)
        rep = rank_sensitivity(cal, source, list(range(128, 256)), subset=args.subset, estimator=estimator, **kwargs)
        reports[estimator] = rep
        print(f"\n## estimator {estimator}")
        after = fp32_pass(cal, source, subset, 5)
        assert rep.subset_indices == subset
        fp32 = float(np.median(before + after))
        work = sum(v for k, v in rep.costs.items() if k != "fp32_pass_s")
        print(f"\n{len(rep.rows)} groups, subset {len(rep.subset_indices)}; FP32 pass over the subset: "
              f"{rep.costs['fp32_pass_s']:.2f} s in the side-by-side pass; timed 5x right before and 5x right after "
              f"the ranking: median {fp32:.2f} s (min {min(before + after):.2f}, max {max(before + after):.2f}), the "
              f"unit below")
        print("| phase | seconds | FP32-pass equivalents |\n|---|---:|---:|")
        for k, v in rep.costs.items():
            if k != "fp32_pass_s":
                print(f"| {k} | {v:.2f} | {v / fp32:.2f} |")
        print(f"| **total** | **{work:.2f}** | **{work / fp32:.2f}** |")
        print(f"cost_fp32_passes (the report's own): {rep.cost_fp32_passes:.2f}; wall {rep.seconds:.1f} s incl. "
              f"the side-by-side pass; {getattr(rep, 'counts', {})}; top 5: {[r.name for r in rep.rows[:5]]}")
    if len(reports) == 2:
        print(quality(reports["exact"], reports["gradient"]))


def quality(exact, estimate) -> str:
    """Spearman rank correlation of the only-float errors and the top-5/top-10 overlap."""
    names = [r.name for r in exact.rows]
    a = np.array([r.only_float_error for r in exact.rows])
    est = {r.name: r.only_float_error for r in estimate.rows}
    b = np.array([est[n] for n in names])
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    rho = float(np.corrcoef(ra, rb)[0, 1])
    top = {k: len({r.name for r in exact.rows[:k]} & {r.name for r in estimate.rows[:k]}) for k in (5, 10)}
    lines = [f"\ngradient vs exact over {len(names)} groups: Spearman {rho:.3f}; top 5 overlap {top[5]}/5, "
             f"top 10 overlap {top[10]}/10",
             "| exact rank | group | exact only-float | gradient only-float | gradient rank |", "|---:|---|---:|---:|---:|"]
    grank = {r.name: i + 1 for i, r in enumerate(estimate.rows)}
    for i, r in enumerate(exact.rows[:10]):
        lines.append(f"| {i + 1} | {r.name} | {r.only_float_error:.4g} | {est[r.name]:.4g} | {grank[r.name]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
