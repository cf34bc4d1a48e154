"""Calibration and QAT under torch.distributed: two Gloo processes on the CPU (loopback only).

Each rank calibrates the digits network on its shard (every other batch), merges the
statistics, then trains a few steps under DistributedDataParallel; the parent process checks
the ranks against each other and against one process on all the data.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import quantkit.qat as qq  # noqa: E402
from quantkit.calibrators.methods import method_names  # noqa: E402

WORLD = 2
CALIB = 512  # images calibrated on (256 a rank)
BATCH = 32
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(fp32: str | Path | None) -> torch.nn.Module:
    from quantkit.sample.digits_net import DigitsNet

    torch.manual_seed(0)
    model = DigitsNet()
    if fp32 is not None:
        model.load_state_dict(torch.load(fp32))
    qmodel = qq.prepare(model.eval(), qq.QatConfig())
    qq.fold_batchnorm(qmodel)  # as in the QAT recipe: no BatchNorm statistics to drift between ranks
    return qmodel


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    from quantkit.sample.digits_net import digits_tensors

    x, y, _, _ = digits_tensors()
    return x[:CALIB], y[:CALIB]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        # batch g on rank g % WORLD: rank 0's first batch is the first batch of one process
        # reading them all in order, so that process's grid starts where the ranks' does
        loader = [(x[g * BATCH : (g + 1) * BATCH], y[g * BATCH : (g + 1) * BATCH])
                  for g in range(rank, CALIB // BATCH, WORLD)]
        qmodel = _model(f"{out}/fp32.pt")
        # statistics: collect, read the merged histograms, then calibrate (which collects again)
        qq.collect(qmodel, loader)
        hists = {n: q.histogram_.compute() for n, q in qq.quantizers(qmodel, inputs_only=True) if q.enabled}
        starts = {n: q.start_range_ for n, q in qq.quantizers(qmodel, inputs_only=True) if q.enabled}
        cal = qq.calibrate(qmodel, loader, method="entropy")
        amax = {m: cal.amax(m) for m in method_names()}
        # QAT under DDP: a few steps, each rank on its own shard
        ddp = DistributedDataParallel(qmodel)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        ddp.train()
        for step, (xb, yb) in zip(range(STEPS), loader):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(xb), yb).backward()
            opt.step()
        grads = {n: p.grad.clone() for n, p in qmodel.named_parameters() if p.grad is not None}
        torch.save({"hists": hists, "starts": starts, "amax": amax, "batches": cal.batches,
                    "state": qmodel.state_dict(), "grads": grads}, f"{out}/rank{rank}.pt")
        if rank == 0:
            qmodel.eval()
            qq.export_onnx(qmodel, f"{out}/rank0.onnx", x[:1])
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
def ranks(tmp_path_factory: pytest.TempPathFactory, digits_net_state: dict) -> tuple[list[dict], Path]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    torch.save(digits_net_state, out / "fp32.pt")  # DigitsNet after one quick epoch (conftest.py)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@pytest.mark.slow  # two spawned processes: ~25 s on two free cores
def test_every_rank_computes_bit_identical_amax_for_every_method(ranks):
    (r0, r1), _ = ranks
    assert r0["batches"] == r1["batches"] == CALIB // BATCH  # batches of both ranks
    assert r0["amax"] == r1["amax"]  # every method, every quantizer: exact float equality
    assert len(r0["amax"]["entropy"]) >= 5


@pytest.mark.slow  # two spawned processes: ~25 s on two free cores
def test_merged_histograms_equal_one_process_on_the_same_grid(ranks):
    """The merge is exact: one process over all the data, its histograms started at the
    ranks' agreed range, counts every bin the same (hand-made pass: collect sets its own start)."""
    (r0, r1), out = ranks
    x, _ = _data()
    model = _model(out / "fp32.pt")
    qs = dict(qq.quantizers(model, inputs_only=True))
    for name, q in qs.items():
        q.start_range_, q.calibrating = r0["starts"][name], True
    for _, q in qq.quantizers(model):
        if q.dynamic:
            q.enabled = False
    with torch.no_grad():
        for i in range(0, CALIB, BATCH):
            model(x[i : i + BATCH])
    for name, q in qs.items():
        ref, got, other = q.histogram_.compute(), r0["hists"][name], r1["hists"][name]
        assert got.bin_width == other.bin_width == ref.bin_width, name
        _assert_same_counts(got, ref, name)
        _assert_same_counts(other, ref, name)
        assert (got.observed_min, got.observed_max) == (ref.observed_min, ref.observed_max), name


@pytest.mark.slow  # two spawned processes: ~25 s on two free cores
def test_amax_against_one_process_on_all_the_data(ranks):
    (r0, _), out = ranks
    x, _ = _data()
    single = qq.calibrate(_model(out / "fp32.pt"), [x[i : i + BATCH] for i in range(0, CALIB, BATCH)])
    assert r0["amax"]["minmax"] == single.amax("minmax")
    # the same grid as the ranks' (rank 0's first batch is its first): the same amax, every method
    assert {m: single.amax(m) for m in method_names()} == r0["amax"]


@pytest.mark.slow  # two spawned processes: ~25 s on two free cores
def test_ddp_qat_keeps_ranks_identical_and_rank0_export_equals_single_process(ranks):
    import onnx
    from onnx import numpy_helper

    from quantkit.backends.onnxruntime import OrtRunner

    (r0, r1), out = ranks
    for name, v in r0["state"].items():
        assert torch.equal(v, r1["state"][name]), name
    for name, g in r0["grads"].items():
        assert torch.equal(g, r1["grads"][name]), name
    start = _model(out / "fp32.pt").state_dict()
    moved = [n for n, v in r0["state"].items() if n in start and v.shape == start[n].shape
             and not torch.equal(v, start[n])]
    assert any(n.endswith("weight") for n in moved)  # training did move the weights
    # one process, the same weights: the same Q/DQ model
    single = _model(out / "fp32.pt")
    single.load_state_dict(copy.deepcopy(r0["state"]))
    single.eval()
    x, _ = _data()
    path = qq.export_onnx(single, out / "single.onnx", x[:1])
    a, b = onnx.load(out / "rank0.onnx"), onnx.load(path)
    inits_a = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    inits_b = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert inits_a.keys() == inits_b.keys()
    for name in inits_a:
        np.testing.assert_array_equal(inits_a[name], inits_b[name], err_msg=name)
    feed = {"input": x[:64].numpy()}
    np.testing.assert_array_equal(OrtRunner(out / "rank0.onnx").infer(feed)["output"],
                                  OrtRunner(path).infer(feed)["output"])


def test_folded_model_has_no_unused_parameters():
    """DistributedDataParallel needs every parameter in the loss: folding BatchNorm into a
    prepared (torch.fx) model must not leave the folded BatchNorms' parameters behind."""
    model = _model(None)
    x, _ = _data()
    qq.calibrate(model, [x[:BATCH]])
    model(x[:BATCH]).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def _failing_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's data has a NaN: every rank must raise (none hangs in a collective)."""
    import datetime

    import torch.distributed as dist

    from quantkit.errors import NonFiniteError, QuantkitError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, _ = _data()
        batches = [x[i : i + BATCH].clone() for i in range(rank * 2 * BATCH, (rank + 1) * 2 * BATCH, BATCH)]
        if rank == 1:
            batches[1][0, 0, 0, 0] = float("nan")
        try:
            qq.calibrate(_model(None), batches)
            outcome = "no error"
        except NonFiniteError:
            outcome = "NonFiniteError"
        except QuantkitError as err:
            outcome = str(err)
        Path(f"{out}/outcome{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_failing_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "outcome1.txt").read_text() == "NonFiniteError"
    assert "failed on rank(s) [1]" in (tmp_path / "outcome0.txt").read_text()
