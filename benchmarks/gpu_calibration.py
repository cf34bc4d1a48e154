"""GPU calibration and QAT step cost against plain FP32, on torchvision ResNet-18 and ResNet-50
(random initialisation, batch 64, 224x224, CUDA), with NVIDIA Model Optimizer as the peer.

    python benchmarks/gpu_calibration.py [--out benchmarks/results/gpu_calibration.md]

Rows, each the median over timed iterations after warm-up, CUDA-synchronised:
- plain FP32 forward (eval, no_grad);
- the same forward replayed as a CUDA graph (reference);
- quantkit calibration forward, eager: every input quantizer of quantkit.qat.prepare collecting
  its |x| histogram on the GPU (quantkit.qat.histogram), the statistics of every method; run
  under torch.cuda.set_sync_debug_mode("error"), so any host synchronisation would stop it;
- quantkit calibration pass, quantkit.qat.collect over N batches (first batch eager, then the whole
  calibration forward captured once as a CUDA graph and replayed), timed batch by batch through
  its on_batch callback: the steady-state calibration forward (median of batches 2..N, the graph
  replays), the first batch (eager forward + capture: paid once per call), and the whole call
  per batch;
- a naive baseline: forward pre-hooks calling torch.histc on each conv/linear input;
- Model Optimizer's mtq.quantize histogram calibration forward, when it imports;
- QAT training step (forward + cross-entropy + backward + SGD step) against the FP32 step, each
  the median of its rounds, the two measured in alternation (the host CPU's speed drifts).
Needs torchvision and a CUDA GPU; one process, one table.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    import torchvision

    import quantkit.qat as qq

    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    lines = [f"# GPU calibration and QAT step\n\n{gpu}, torch {torch.__version__}, {platform.machine()}, batch {args.batch}, "
             f"224x224, FP32, median of {args.iters} after warm-up\n",
             "| model | row | ms | × FP32 |", "|---|---|---|---|"]
    try:
        import modelopt.torch.quantization as mtq
        peer = f"modelopt {__import__('modelopt').__version__}"
    except Exception as err:  # noqa: BLE001
        mtq, peer = None, f"Model Optimizer did not import: {type(err).__name__}: {err}"
    for name in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).to(dev).eval()
        with torch.no_grad():
            fp32 = timed(lambda: model(x), 10, args.iters)
        rows = [("plain FP32 forward", fp32)]

        g = torch.cuda.CUDAGraph()
        static = x.clone()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(static)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                model(static)
        rows.append(("plain FP32 forward replayed as a CUDA graph (reference)", timed(g.replay, 5, args.iters)))
        del g

        q = qq.prepare(model)
        qs = [m for _, m in qq.quantizers(q, inputs_only=True)]
        for m in qs:
            m.calibrating = True

        def calib_step() -> None:
            with torch.no_grad():
                q(x)

        calib_step()  # histogram state created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            eager = timed(calib_step, 5, args.iters)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for m in qs:
            m.calibrating = False
        rows.append(("quantkit calibration forward, eager (all statistics, no host sync)", eager))
        n = args.iters
        qq.collect(q, [x] * 3)  # warm-up of the whole call
        torch.cuda.synchronize()
        marks = [time.perf_counter()]

        def on_batch(_: int) -> None:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

        qq.collect(q, [x] * n, on_batch=on_batch)  # first batch eager + capture, then graph replays
        per_batch = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        kernel = ("quantkit CUDA kernel" if all(m.histogram_._params is not None for m in qs if m.histogram_)
                  else "torch operations: the CUDA kernel did not build")
        shared = sum(m.shares_ for m in qs)
        rows.append((f"quantkit calibration forward: qq.collect's steady state (CUDA graph replay; {kernel}; "
                     f"{len(qs) - shared} histograms for {len(qs)} quantizers, beside the layers)",
                     statistics.median(per_batch[1:])))
        rows.append(("qq.collect's first batch: eager forward + graph capture (once per call)", per_batch[0]))
        rows.append((f"qq.collect of {n} batches, everything included, per batch", sum(per_batch) / n))
        qq.calibrate(q, [x], method="entropy")

        naive = copy.deepcopy(model)
        hists: dict[nn.Module, torch.Tensor] = {}

        def hook(mod: nn.Module, inp: tuple) -> None:
            a = inp[0].detach().abs()
            hists[mod] = torch.histc(a, bins=2048, min=0, max=float(a.max()))  # .max() syncs

        for m in naive.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_pre_hook(hook)
        with torch.no_grad():
            rows.append(("naive: pre-hooks with torch.histc per input", timed(lambda: naive(x), 5, args.iters)))

        if mtq is not None:
            try:
                mo = copy.deepcopy(model)
                cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
                for entry in cfg["quant_cfg"]:  # modelopt 0.47: a list of {quantizer_name, cfg}
                    if entry.get("quantizer_name") == "*input_quantizer":
                        entry["cfg"]["calibrator"] = "histogram"
                mo_times: list[float] = []

                def forward_loop(m: nn.Module) -> None:  # runs in Model Optimizer's calibration mode
                    with torch.no_grad():
                        mo_times.append(timed(lambda: m(x), 3, args.iters))

                note = ""
                try:
                    mtq.quantize(mo, cfg, forward_loop)
                except Exception as err:  # noqa: BLE001 - the timed collection already ran
                    if not mo_times:
                        raise
                    note = f"; its amax step then failed: {type(err).__name__}: {str(err)[:70]}"
                rows.append((f"Model Optimizer mtq.quantize histogram collection forward ({peer}{note})", mo_times[0]))
            except Exception as err:  # noqa: BLE001
                rows.append((f"Model Optimizer failed: {type(err).__name__}: {str(err)[:80]}", float("nan")))

        # training steps
        def step_of(m: nn.Module):
            opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

            def step() -> None:
                loss = nn.functional.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step

        f = copy.deepcopy(model).train()
        q.train()
        steps: dict[str, list[float]] = {"fp32": [], "qat": []}
        for _ in range(3):
            steps["fp32"].append(timed(step_of(f), 5, args.iters))
            steps["qat"].append(timed(step_of(q), 5, args.iters))
        fp32_step, qat_step = statistics.median(steps["fp32"]), statistics.median(steps["qat"])
        for label, ms in rows:
            lines.append(f"| {name} | {label} | {ms:.2f} | {ms / fp32:.2f} |")
        lines.append(f"| {name} | FP32 training step | {fp32_step:.2f} | 1.00 (step) |")
        lines.append(f"| {name} | QAT training step (fake quant, STE) | {qat_step:.2f} | {qat_step / fp32_step:.2f} (step) |")
    lines.append(f"\npeer: {peer}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
