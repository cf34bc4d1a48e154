"""QAT on CUDA: histograms on the GPU without host synchronisation, same ranges as on CPU."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def test_gpu_calibration_matches_cpu_and_never_syncs(tmp_path, monkeypatch):
    import quantkit.qat as qq
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    torch.manual_seed(0)
    # full FP32 convolutions on the GPU, so that the activations match the CPU's
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    xtr, _, xte, _ = digits_tensors()
    model = DigitsNet().eval()
    batches = [xtr[i : i + 64] for i in range(0, 512, 64)]
    cpu = qq.prepare(model)
    cal_cpu = qq.calibrate(cpu, batches, method="entropy")

    gpu = qq.prepare(model).cuda()
    qs = [q for _, q in qq.quantizers(gpu, inputs_only=True)]
    for q in qs:
        q.calibrating = True
    for _, q in qq.quantizers(gpu):
        if q.dynamic:
            q.enabled = False  # as in qq.collect: statistics of the floating-point network
    dev_batches = [b.cuda() for b in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        with torch.no_grad():
            for b in dev_batches:
                gpu(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for q in qs:
        q.calibrating = False
    for _, q in qq.quantizers(gpu):
        q.enabled = True
    # the same statistics through the public call (one transfer per quantizer at the end)
    for q in qs:
        q.histogram_ = None
    cal_gpu = qq.calibrate(gpu, dev_batches, method="entropy")
    for name, r in cal_cpu.ranges.items():
        g = cal_gpu.ranges[name]
        assert g.amax["minmax"] == pytest.approx(r.amax["minmax"], rel=1e-5), name
        for m in ("entropy", "percentile", "mse"):
            width = r.amax["minmax"] / 1024  # within two bins
            assert abs(g.amax[m] - r.amax[m]) <= width, (name, m, g.amax[m], r.amax[m])
    path = qq.export_onnx(gpu, tmp_path / "g.onnx", xte[:2].cuda())
    out = OrtRunner(path).infer({"input": xte[:64].numpy()})["output"]
    with torch.no_grad():
        ref = gpu(xte[:64].cuda()).cpu().numpy()
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cos.min() > 0.9999


def test_qat_step_on_gpu_trains():
    import quantkit.qat as qq
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    torch.manual_seed(0)
    xtr, ytr, _, _ = digits_tensors()
    x, y = xtr[:512].cuda(), ytr[:512].cuda()
    model = DigitsNet().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # a rough FP32 start
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = qq.prepare(model.eval())
    qq.calibrate(q, [x[:256], x[256:]])
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8, losses


def test_cuda_graph_pass_equals_eager_pass():
    import quantkit.qat as qq
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    torch.manual_seed(0)
    xtr, _, _, _ = digits_tensors()
    model = DigitsNet().eval().cuda()
    batches = [xtr[i : i + 64].cuda() for i in range(0, 640, 64)]
    results = {}
    for graph in (False, True):
        q = qq.prepare(model)
        results[graph] = qq.calibrate(q, batches, method="entropy", cuda_graph=graph)
    for name, r in results[False].ranges.items():
        for m in ("minmax", "entropy", "percentile", "mse"):
            assert results[True].ranges[name].amax[m] == pytest.approx(r.amax[m], rel=1e-6), (name, m)



def test_fused_kernel_equals_histc_path():
    """The one-pass Triton histogram against the torch.histc path, range growth included."""
    from quantkit.qat.histogram import TorchHistogram

    hists = {}
    for fused in (True, False):
        g = torch.Generator(device="cuda").manual_seed(0)
        h = TorchHistogram(2048, "t", "cuda")
        h.fused = fused
        for scale in (1.0, 3.0, 0.5, 7.0):
            h.update(torch.relu(torch.randn(64, 64, 56, 56, device="cuda", generator=g) * scale))
        h.update(torch.randn(1000, device="cuda", generator=g))  # two-sided, tiny
        assert (h._slabs is not None) == fused  # the Triton kernels really ran (no silent fallback)
        hists[fused] = h.compute()
    a, b = hists[True], hists[False]
    assert a.counts.sum() == b.counts.sum() == 4 * 64 * 64 * 56 * 56 + 1000
    assert a.bin_width == b.bin_width and a.observed_max == b.observed_max and a.observed_min == b.observed_min
    assert np.abs(a.counts - b.counts).sum() <= 1e-5 * a.counts.sum()  # bin-edge rounding only


def test_fused_kernel_flags_nan():
    from quantkit.errors import NonFiniteError
    from quantkit.qat.histogram import TorchHistogram

    h = TorchHistogram(2048, "layer1.0.conv1.input_quantizer", "cuda")
    h.update(torch.ones(10, device="cuda"))
    h.update(torch.tensor([1.0, float("nan")], device="cuda"))
    with pytest.raises(NonFiniteError, match="layer1.0.conv1.input_quantizer"):
        h.compute()
