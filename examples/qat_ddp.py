"""Calibration and QAT on several GPUs (or CPU processes) with torch.distributed, on the bundled digits.

    torchrun --nproc_per_node 2 examples/qat_ddp.py [--epochs 10] [--qat-epochs 2] [-o out/qat_ddp]

(NCCL on GPUs, one per process; Gloo on CPU when there is no GPU.)

1. train DigitsNet in FP32 under DistributedDataParallel (each rank on its shard);
2. quantkit.qat.prepare + fold BatchNorm, then quantkit.qat.calibrate on each rank's shard: the
   histograms are merged across the ranks, so every rank gets the same ranges, those of the
   whole calibration set;
3. QAT: the calibrated model under DistributedDataParallel for a couple of epochs;
4. rank 0 writes the checkpoint and the Q/DQ ONNX model, and measures it with ONNX Runtime.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import quantkit.qat as qq
from quantkit.sample.digits_net import DigitsNet, digits_tensors


def epochs(model, loader, sampler, opt, n, device):
    for e in range(n):
        sampler.set_epoch(e)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="out/qat_ddp")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=512)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        xtr, ytr, xte, yte = digits_tensors()
        train = TensorDataset(xtr, ytr)
        sampler = DistributedSampler(train, shuffle=True, seed=0)
        loader = DataLoader(train, batch_size=64, sampler=sampler)

        model = DigitsNet().to(device)
        ddp = DistributedDataParallel(model)
        loss = epochs(ddp, loader, sampler, torch.optim.AdamW(ddp.parameters(), lr=3e-3), args.epochs, device)
        if rank == 0:
            print(f"FP32: {args.epochs} epochs on {dist.get_world_size()} ranks, last loss {loss:.4f}")

        qmodel = qq.prepare(model.eval(), qq.QatConfig(method="entropy"))
        qq.fold_batchnorm(qmodel)  # no BatchNorm statistics to drift apart between the ranks
        calib = TensorDataset(xtr[: args.calib_images])
        calib_loader = DataLoader(calib, batch_size=64, sampler=DistributedSampler(calib, shuffle=False))
        cal = qq.calibrate(qmodel, calib_loader)  # every rank: the ranges of all calib images
        if rank == 0:
            print(f"calibrated on {cal.batches} batches over all ranks ({cal.method})")

        # the quantizers' buffers (amax, scale) are fixed after calibration and BatchNorm is folded:
        # no buffer needs broadcasting from rank 0 before every forward (DDP's default)
        qddp = DistributedDataParallel(qmodel, broadcast_buffers=False)
        loss = epochs(qddp, loader, sampler, torch.optim.SGD(qddp.parameters(), lr=1e-3, momentum=0.9),
                      args.qat_epochs, device)
        if rank == 0:  # the ranks hold the same weights: one writes
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(qmodel.state_dict(), out / "digits.qat.pt")
            qmodel.eval()
            path = qq.export_onnx(qmodel, out / "digits.qat.onnx", xte[:1].to(device))
            from quantkit.backends.onnxruntime import OrtRunner

            logits = OrtRunner(path).infer({"input": xte.numpy()})["output"]
            acc = float((logits.argmax(1) == yte.numpy()).mean())
            print(f"QAT: {args.qat_epochs} epochs, last loss {loss:.4f}; wrote {path}; "
                  f"test accuracy (ONNX Runtime, Q/DQ) {acc:.4f}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
