"""Calibration and QAT under torch.distributed with NCCL: two processes, one GPU each.

Checks on the GPU path (the CUDA histogram kernel, CUDA-graph replay, NCCL collectives) what
tests/unit/test_distributed.py checks on the CPU with Gloo.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

WORLD = 2
CALIB = 512
BATCH = 32
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(dev: torch.device, *, bank: bool = False) -> torch.nn.Module:
    import quantkit.qat as qq
    from quantkit.sample.digits_net import DigitsNet

    torch.manual_seed(0)
    qmodel = qq.prepare(DigitsNet().eval(), qq.QatConfig(weight_bank_distributed=bank))
    qq.fold_batchnorm(qmodel)
    return qmodel.to(dev)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import quantkit.qat as qq
    from quantkit.calibrators.methods import method_names
    from quantkit.sample.digits_net import digits_tensors

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            device_id=dev)
    try:
        x, y, _, _ = digits_tensors()
        x, y = x[:CALIB], y[:CALIB]
        shards = [[(x[i : i + BATCH], y[i : i + BATCH]) for i in range(r * CALIB // WORLD, (r + 1) * CALIB // WORLD, BATCH)]
                  for r in range(WORLD)]
        mine = shards[rank]
        qmodel = _model(dev)
        qq.collect(qmodel, mine)  # first batch eager, then CUDA-graph replay; merged after
        hists = {n: q.histogram_.compute() for n, q in qq.quantizers(qmodel, inputs_only=True) if q.enabled}
        starts = {n: q.start_range_ for n, q in qq.quantizers(qmodel, inputs_only=True) if q.enabled}
        cal = qq.calibrate(qmodel, mine)
        result = {"amax": {m: cal.amax(m) for m in method_names()}, "hists": hists}
        if rank == 0:
            # one process, all the batches, histograms started where the ranks agreed: the same counts
            ref = _model(dev)
            qs = dict(qq.quantizers(ref, inputs_only=True))
            for name, q in qs.items():
                q.start_range_, q.calibrating = starts[name], True
            for _, q in qq.quantizers(ref):
                if q.dynamic:
                    q.enabled = False
            with torch.no_grad():
                for xb, _ in shards[0] + shards[1]:
                    ref(xb.to(dev))
            result["same_grid"] = {n: q.histogram_.compute() for n, q in qs.items()}
            # one process, all the data, its own grid (qq.calibrate without merging)
            single = qq.calibrate(_model(dev), [b for s in shards for b in s], distributed=False)
            result["single"] = {m: single.amax(m) for m in method_names()}
        banked = _model(dev, bank=True)  # the weight bank kept under DDP (QatConfig.weight_bank_distributed)
        qq.calibrate(banked, mine)
        bank = next(q.bank_ for _, q in qq.quantizers(banked) if q.dynamic)
        bank.segment_bytes = 4096  # DigitsNet's weights in several segments, as a large model's under DDP
        for key, model in (("", qmodel), ("bank_", banked)):
            ddp = DistributedDataParallel(model, device_ids=[rank])
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            ddp.train()
            for xb, yb in mine[:STEPS]:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xb.to(dev)), yb.to(dev)).backward()
                opt.step()
            result[key + "state"] = {k: v.cpu() for k, v in model.state_dict().items()}
            result[key + "grads"] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        result["bank_segments"] = len(bank.segments_)
        torch.save(result, f"{out}/rank{rank}.pt")
        if rank == 0:
            qmodel.eval()
            qq.export_onnx(qmodel, f"{out}/rank0.onnx", x[:1].to(dev))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _assert_same_counts(got, ref, name):
    """Equal counts, but for values lying exactly on a range that later doubled (the last bin is
    closed, so such a value's bin depends on the order of the updates): one count one bin over,
    at a power-of-two boundary."""
    d = got.counts - ref.counts
    assert d.sum() == 0, name
    edges = {b for j in range(1, 12) for b in (got.num_bins >> j, (got.num_bins >> j) - 1)}
    assert set(np.flatnonzero(d).tolist()) <= edges and np.abs(d).sum() <= 4, (name, np.flatnonzero(d))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    out = tmp_path_factory.mktemp("nccl")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def test_nccl_ranks_compute_bit_identical_amax(ranks):
    (r0, r1), _ = ranks
    assert r0["amax"] == r1["amax"]


def test_nccl_merge_is_exact_and_close_to_one_process(ranks):
    from quantkit.calibrators.methods import method_names

    (r0, r1), _ = ranks
    for name, ref in r0["same_grid"].items():
        for got in (r0["hists"][name], r1["hists"][name]):
            assert got.bin_width == ref.bin_width, name
            _assert_same_counts(got, ref, name)
            assert (got.observed_min, got.observed_max) == (ref.observed_min, ref.observed_max), name
    assert r0["amax"]["minmax"] == r0["single"]["minmax"]
    worst = max(abs(r0["amax"][m][n] - a) / a for m in method_names() for n, a in r0["single"][m].items())
    assert worst < 0.01, worst


def test_nccl_ddp_qat_keeps_ranks_identical_and_exports_like_one_process(ranks):
    import onnx
    from onnx import numpy_helper

    import quantkit.qat as qq
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.sample.digits_net import digits_tensors

    (r0, r1), out = ranks
    for name, v in r0["state"].items():
        assert torch.equal(v, r1["state"][name]), name
    for name, g in r0["grads"].items():
        assert torch.equal(g, r1["grads"][name]), name
    dev = torch.device("cuda", 0)
    single = _model(dev)
    single.load_state_dict({k: v.to(dev) for k, v in r0["state"].items()})
    single.eval()
    x = digits_tensors()[0]
    path = qq.export_onnx(single, out / "single.onnx", x[:1].to(dev))
    a, b = onnx.load(out / "rank0.onnx"), onnx.load(path)
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert ia.keys() == ib.keys()
    for name in ia:
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)
    feed = {"input": x[:64].numpy()}
    np.testing.assert_array_equal(OrtRunner(out / "rank0.onnx").infer(feed)["output"], OrtRunner(path).infer(feed)["output"])


def test_nccl_ddp_qat_with_the_weight_bank_matches_per_layer_kernels(ranks):
    """QatConfig(weight_bank_distributed=True): one launch per segment of weights under DDP; ranks stay
    identical and the weights equal those trained with a kernel per layer."""
    (r0, r1), _ = ranks
    for name, v in r0["bank_state"].items():
        assert torch.equal(v, r1["bank_state"][name]), name
        assert torch.allclose(v, r0["state"][name], rtol=1e-5, atol=1e-6), name
    assert set(r0["bank_grads"]) == set(r0["grads"])
    assert r0["bank_segments"] >= 2  # the bank split into segments under DDP, and still exact
