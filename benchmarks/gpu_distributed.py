"""Calibration and QAT under torch.distributed on every GPU of one host (NCCL), against one GPU.

    python benchmarks/gpu_distributed.py [--out benchmarks/results/gpu_distributed.md]

torchvision ResNet-50 (random weights, BatchNorm in place as in benchmarks/gpu_calibration.py),
224x224, batch 64 per GPU, FP32. One table:

- calibration: 8 batches of synthetic images (each batch its own seed and scale), sharded over
  the ranks (batch g on rank g % world); quantkit.qat.calibrate merges the statistics. The
  largest difference of any amax (every method, every quantizer) across ranks, and against one
  process calibrating on all 8 batches (minmax: exact; the other methods: largest relative);
- QAT training step (forward + cross-entropy + backward + SGD) and FP32 step, in the spawned
  ranks (NCCL), alternating rounds: each rank training its own copy without DDP (the one-GPU
  figures) and under DistributedDataParallel (broadcast_buffers=False; the weight bank as one
  segment, quantkit's default, and in 25 MB segments). Per-GPU throughput is batch / step time;
  the DDP/one-GPU ratio of the QAT step's throughput and the QAT/FP32 step ratio in both
  settings. For reference, the same steps first in this process without torch.distributed.
  Medians of timed iterations after warm-up, CUDA-synchronised.

Keep NCCL_NVLS_ENABLE=0 (no NVLink multicast) in the environment on shared hosts.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import socket
import statistics
import time
from pathlib import Path

import torch
from torch import nn

BATCH = 64
CALIB_BATCHES = 8
ROUNDS = 12


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


def resnet50(dev: torch.device) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).to(dev).eval()


def calib_batch(g: int, dev: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + g)
    return (torch.randn(BATCH, 3, 224, 224, generator=gen) * (0.6 + 0.15 * g)).to(dev)


def step_of(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def steps(fp32: nn.Module, qat: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> tuple[float, float]:
    """Median FP32 and QAT step times (ms), interleaved in ROUNDS rounds."""
    times: dict[str, list[float]] = {"fp32": [], "qat": []}
    for _ in range(ROUNDS):
        times["fp32"].append(timed(step_of(fp32, x, y), 5, iters))
        times["qat"].append(timed(step_of(qat, x, y), 5, iters))
    return statistics.median(times["fp32"]), statistics.median(times["qat"])


def _rank(rank: int, world: int, port: int, iters: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import quantkit.qat as qq
    from quantkit.calibrators.methods import method_names

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=dev)
    try:
        model = resnet50(dev)
        q = qq.prepare(model)
        mine = [calib_batch(g, dev) for g in range(rank, CALIB_BATCHES, world)]
        t0 = time.perf_counter()
        cal = qq.calibrate(q, mine)
        torch.cuda.synchronize()
        calib_s = time.perf_counter() - t0
        amax = {m: cal.amax(m) for m in method_names()}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, amax)
        result = {"calib_s": calib_s}
        if rank == 0:
            result["rank_diff"] = max(abs(g[m][n] - amax[m][n]) for g in gathered for m in amax for n in amax[m])
            single = qq.calibrate(qq.prepare(resnet50(dev)), [calib_batch(g, dev) for g in range(CALIB_BATCHES)],
                                  distributed=False)
            result["minmax_diff"] = max(abs(amax["minmax"][n] - a) for n, a in single.amax("minmax").items())
            rel = {m: max(abs(amax[m][n] - a) / a for n, a in single.amax(m).items()) for m in method_names()}
            result["rel"] = rel
        dist.barrier()
        torch.manual_seed(rank)
        x = torch.randn(BATCH, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (BATCH,), device=dev)
        # every variant a copy of the same calibrated model, timed in alternating rounds in these
        # processes, so that the one-GPU and the DDP figures see the same conditions:
        # fp32_one / qat_one: no DDP, each rank on its own GPU (one-GPU training, twice);
        # fp32 / qat: DDP with broadcast_buffers=False (the quantizers' buffers are fixed after
        # calibration, so DDP need not broadcast them from rank 0 before each forward; the
        # README's example), qat with quantkit's default (the weight bank as one segment);
        # qat_25mb: the bank in segments of DDP's bucket size (WeightBank.segment_bytes)
        def segments(m: nn.Module, size: int) -> nn.Module:
            for sub in m.modules():
                bank = getattr(getattr(sub, "weight_quantizer", None), "bank_", None)
                if bank is not None:
                    bank.segment_bytes = size
            return m

        def ddp(m: nn.Module, **options: bool) -> nn.Module:
            return DistributedDataParallel(m.train(), device_ids=[rank], broadcast_buffers=False, **options)

        lean = {"static_graph": True, "gradient_as_bucket_view": True}

        variants = {
            "fp32_one": copy.deepcopy(model).train(),
            "qat_one": copy.deepcopy(q).train(),
            "fp32": ddp(copy.deepcopy(model)),
            "qat": ddp(copy.deepcopy(q)),
            "qat_25mb": ddp(segments(copy.deepcopy(q), 25 << 20)),
            "fp32_lean": ddp(copy.deepcopy(model), **lean),
            "qat_lean": ddp(copy.deepcopy(q), **lean),
        }
        step_fns = {k: step_of(m, x, y) for k, m in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rnd in range(ROUNDS):  # each round the variants in another order, the same on every rank
            for k in random.Random(rnd).sample(list(step_fns), len(step_fns)):
                times[k].append(timed(step_fns[k], 3, iters))
        for k, t in times.items():
            result[f"{k}_ms"] = statistics.median(t)
        result["rounds_ms"] = times
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import platform

    import torch.multiprocessing as mp

    import quantkit.qat as qq

    world = torch.cuda.device_count()
    dev = torch.device("cuda", 0)
    gpu = torch.cuda.get_device_name(0)
    # one GPU, no process group: today's QAT step (the weight bank on)
    model = resnet50(dev)
    q = qq.prepare(model)
    qq.calibrate(q, [calib_batch(g, dev) for g in range(CALIB_BATCHES)])
    x = torch.randn(BATCH, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (BATCH,), device=dev)
    one_fp32, one_qat = steps(copy.deepcopy(model).train(), q.train(), x, y, args.iters)
    del model, q, x, y
    torch.cuda.empty_cache()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res_path = "/tmp/gpu_distributed_rank0.pt"
    mp.spawn(_rank, args=(world, port, args.iters, res_path), nprocs=world, join=True)
    r = torch.load(res_path, weights_only=False)
    os.remove(res_path)

    per_gpu_one = BATCH / r["qat_one_ms"] * 1e3
    per_gpu_ddp = BATCH / r["qat_ms"] * 1e3
    others = {m: v for m, v in r["rel"].items() if m != "minmax"}
    lines = [
        "# Calibration and QAT under torch.distributed (NCCL)\n",
        f"{world}x {gpu}, torch {torch.__version__}, {platform.machine()}, ResNet-50 (random weights), 224x224, "
        f"FP32, batch {BATCH} per GPU; calibration on {CALIB_BATCHES} synthetic batches sharded over the ranks; "
        f"step times: median over {ROUNDS} rounds (variants in a new order each round) of each round's median of {args.iters} steps after warm-up. One GPU and DDP are timed in the "
        "same rank processes in alternating rounds (one GPU: each rank trains its own copy without DDP); DDP "
        "with broadcast_buffers=False\n",
        "| row | value | target |", "|---|---|---|",
        f"| calibration: largest amax difference across ranks (every method, every quantizer) | {r['rank_diff']:.3g} | 0 |",
        f"| calibration vs one process on all batches: minmax, largest absolute difference | {r['minmax_diff']:.3g} | 0 |",
        f"| calibration vs one process: largest relative difference, other methods | {max(others.values()):.4%} "
        f"({', '.join(f'{m} {v:.3%}' for m, v in others.items())}) | < 1% |",
        f"| calibration pass on {world} GPUs (each rank {CALIB_BATCHES // world} batches + merge), s | {r['calib_s']:.2f} | |",
        f"| FP32 step, one GPU / DDP on {world}, ms | {r['fp32_one_ms']:.2f} / {r['fp32_ms']:.2f} | |",
        f"| QAT step, one GPU / DDP on {world}, ms | {r['qat_one_ms']:.2f} / {r['qat_ms']:.2f} | |",
        f"| QAT per-GPU throughput, DDP / one GPU (img/s: {per_gpu_ddp:.0f} / {per_gpu_one:.0f}) | "
        f"{per_gpu_ddp / per_gpu_one:.3f} (FP32 itself: {r['fp32_one_ms'] / r['fp32_ms']:.3f}) | >= 0.90 |",
        f"| QAT/FP32 step ratio: DDP / one GPU | {r['qat_ms'] / r['fp32_ms']:.3f} / "
        f"{r['qat_one_ms'] / r['fp32_one_ms']:.3f} | DDP no worse than one GPU |",
        f"| the same, the weight bank in 25 MB segments under DDP: QAT step ms, QAT/FP32 | "
        f"{r['qat_25mb_ms']:.2f}, {r['qat_25mb_ms'] / r['fp32_ms']:.3f} | |",
        f"| DDP with static_graph=True, gradient_as_bucket_view=True (FP32 and QAT): step ms FP32 / QAT, "
        f"QAT/FP32 | {r['fp32_lean_ms']:.2f} / {r['qat_lean_ms']:.2f}, {r['qat_lean_ms'] / r['fp32_lean_ms']:.3f} "
        f"| DDP no worse than one GPU |",
        f"| QAT per-GPU throughput with those options, DDP / one GPU | {r['qat_one_ms'] / r['qat_lean_ms']:.3f} | >= 0.90 |",
        f"| for reference: one GPU in a process without torch.distributed, FP32 / QAT ms, QAT/FP32 | "
        f"{one_fp32:.2f} / {one_qat:.2f}, {one_qat / one_fp32:.3f} | |",
    ]
    lines.append("\nPer variant, each round's median step (ms), min / median / max over the rounds: " + "; ".join(
        f"{k} {min(t):.2f} / {statistics.median(t):.2f} / {max(t):.2f}" for k, t in r["rounds_ms"].items()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
