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



def test_kernel_equals_torch_path():
    """quantkit's one-read CUDA histogram kernel against the torch-operations path: range growth by
    several powers of two, a first batch of zeros, a two-sided tiny tensor, an unaligned one."""
    from quantkit.qat.histogram import TorchHistogram

    hists = {}
    for k in ("cuda", "torch"):
        g = torch.Generator(device="cuda").manual_seed(0)
        h = TorchHistogram(2048, "t", "cuda")
        h.kernel = k
        h.update(torch.zeros(5000, device="cuda"))
        for scale in (1.0, 3.0, 0.5, 7.0, 300.0):
            h.update(torch.relu(torch.randn(64, 64, 56, 56, device="cuda", generator=g) * scale))
        h.update(torch.randn(1001, device="cuda", generator=g))  # two-sided, tiny
        h.update(torch.randn(1001, device="cuda", generator=g)[1:] * 1000)  # not 16-byte aligned, grows
        assert (h._params is not None) == (k == "cuda")  # the CUDA kernels really ran (no silent fallback)
        hists[k] = h.compute()
    a, b = hists["cuda"], hists["torch"]
    assert a.counts.sum() == b.counts.sum() == 5000 + 5 * 64 * 64 * 56 * 56 + 1001 + 1000
    assert a.bin_width == b.bin_width and a.observed_max == b.observed_max and a.observed_min == b.observed_min
    assert np.abs(a.counts - b.counts).sum() <= 1e-5 * a.counts.sum()  # bin-edge rounding only


@pytest.mark.parametrize("kernel", ["cuda", "torch"])
def test_kernel_flags_nan(kernel):
    from quantkit.errors import NonFiniteError
    from quantkit.qat.histogram import TorchHistogram

    for bad in (float("nan"), float("inf")):
        h = TorchHistogram(2048, "layer1.0.conv1.input_quantizer", "cuda")
        h.kernel = kernel
        h.update(torch.ones(10, device="cuda"))
        h.update(torch.tensor([1.0, bad, 2.0], device="cuda"))
        h.update(torch.ones(10, device="cuda"))
        with pytest.raises(NonFiniteError, match="layer1.0.conv1.input_quantizer"):
            h.compute()


class _Block(torch.nn.Module):
    """A residual block whose input feeds conv1, the downsampling conv and the Add."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.side = torch.nn.Conv2d(8, 8, 1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        x = self.relu(x)
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + x) + self.side(x)


def test_quantizers_reading_one_tensor_share_a_histogram_in_graph_mode():
    import quantkit.qat as qq

    torch.manual_seed(0)
    model = _Block().cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(16, 8, 12, 12, device="cuda", generator=gen) * (1 + i) for i in range(6)]
    results, shared = {}, {}
    for graph in (False, True):
        q = qq.prepare(model)
        qq.collect(q, batches, cuda_graph=graph)
        qs = dict(qq.quantizers(q, inputs_only=True))
        shared[graph] = sorted(n for n, m in qs.items() if m.shares_)
        if graph:
            owners = {id(m.histogram_) for m in qs.values()}
            assert len(owners) == len(qs) - len(shared[graph])
        results[graph] = {n: m.histogram_.compute() for n, m in qs.items()}
    assert shared[False] == []  # eager calls: every quantizer reads its input
    # conv1, side and the residual Add read the relu output: two of them share the first's histogram
    assert len(shared[True]) == 2, shared[True]
    for name, h in results[False].items():
        g = results[True][name]
        assert np.array_equal(g.counts, h.counts) and g.bin_width == h.bin_width, name


def test_weight_kernel_equals_torch_path_with_identity_gradient():
    from quantkit.qat._cuda_fq import fake_quantize_weight
    from quantkit.qat.quantizer import TensorQuantizer, _fake_quantize_weight

    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(64, 3, 7, 7), (512, 256, 3, 3), (1000, 2048), (7, 5)]:
        w = torch.randn(shape, device="cuda", generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1),
                                                                          device="cuda", generator=gen)
        w[0] = 0.0  # an all-zero channel
        amax = torch.linalg.vector_norm(w, ord=float("inf"), dim=list(range(1, w.dim())))
        ref = _fake_quantize_weight(w, amax, 0)
        p = w.clone().requires_grad_()
        out = fake_quantize_weight(p)
        assert out is not None  # the kernel ran (no silent fallback)
        assert torch.equal(out, ref), shape
        g = torch.randn_like(out)
        out.backward(g)
        assert torch.equal(p.grad, g)
    q = TensorQuantizer(axis=0, dynamic=True)
    assert torch.equal(q(w), ref)  # the quantizer takes the kernel path on CUDA


def _block_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), _Block(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10)).cuda().eval()


def test_weight_bank_equals_per_layer_path_and_follows_the_weights():
    """One launch for every weight of the model: the per-layer kernel's values, identity
    gradients, recomputed after an optimizer step, usable for gradient accumulation, copied
    cleanly, and stepped aside during CUDA graph capture."""
    import copy

    import quantkit.qat as qq
    from quantkit.qat._cuda_fq import fake_quantize_weight

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(16, 8, 12, 12, device="cuda", generator=gen)
    y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
    q = qq.prepare(_block_model())
    qq.calibrate(q, [x])
    q.train()
    plain = copy.deepcopy(q)
    for _, m in qq.quantizers(plain):
        m.bank_ = None  # per-layer kernels
    bank = next(m for _, m in qq.quantizers(q) if m.dynamic).bank_
    assert len(bank.members) == 5
    opt = {m: torch.optim.SGD(m.parameters(), lr=0.1) for m in (q, plain)}
    for step in range(3):
        for m in (q, plain):
            for _ in range(2):  # two micro-batches accumulate before the step
                torch.nn.functional.cross_entropy(m(x), y).backward()
        for a, b in zip(q.parameters(), plain.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), step
        for (wq, layer) in bank.members:
            assert torch.equal(wq(layer.weight), fake_quantize_weight(layer.weight))
        for m in (q, plain):
            opt[m].step()
            opt[m].zero_grad()
    twin = copy.deepcopy(q)  # the bank's autograd results are not copied
    assert torch.equal(twin(x), q(x))
    # a captured forward must read the weights at replay time, not a bank result from before
    with torch.no_grad():
        static = x.clone()
        q(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = q(static)
        for p in q.parameters():
            p.mul_(0.5)
        graph.replay()
        assert torch.allclose(out, q(static), rtol=1e-5, atol=1e-6)


def test_followers_quantize_a_shared_tensor_once_with_the_same_gradients():
    import copy

    import quantkit.qat as qq

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(16, 8, 12, 12, device="cuda", generator=gen)
    y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
    q = qq.prepare(_block_model())
    result = qq.calibrate(q, [x, x * 2])  # CUDA graph pass: the block's readers share a histogram
    assert len(result.shared) == 2, result.shared
    q.train()
    alone = copy.deepcopy(q)
    for _, m in qq.quantizers(alone, inputs_only=True):
        m.follows_ = None
    outputs = {}
    for name, m in qq.quantizers(q, inputs_only=True):
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out))
    loss = torch.nn.functional.cross_entropy(q(x), y)
    for follower, leader in result.shared.items():
        assert outputs[follower] is outputs[leader]
    loss.backward()
    torch.nn.functional.cross_entropy(alone(x), y).backward()
    for a, b in zip(q.parameters(), alone.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    result.apply(q, "minmax")  # new ranges: the links are made again
    assert all(dict(qq.quantizers(q))[f].follows_ is not None for f in result.shared)


class _InPlace(torch.nn.Module):
    """Scales a quantized input in place right after a convolution read it."""

    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        y = self.conv1(h)
        h.mul_(7.0)
        return self.conv2(h) + y


def test_overlapped_graph_updates_stay_exact_and_detect_in_place_writes(caplog):
    """In the captured pass the histograms run on a side stream; a model that writes a quantized
    input in place within the lag keeps them on its own stream, with exact statistics."""
    import logging

    import quantkit.qat as qq

    gen = torch.Generator(device="cuda").manual_seed(4)
    model = _InPlace().cuda().eval()
    batches = [torch.randn(32, 4, 40, 40, device="cuda", generator=gen) * (1 + i) for i in range(5)]
    results = {}
    for graph in (False, True):
        with caplog.at_level(logging.INFO, logger="quantkit.qat.calibrate"):
            results[graph] = qq.calibrate(qq.prepare(model), [b.clone() for b in batches], cuda_graph=graph)
    assert "modified in place" in caplog.text and "conv1.input_quantizer" in caplog.text
    for name, r in results[False].ranges.items():
        for m in ("minmax", "entropy", "percentile", "mse"):
            assert results[True].ranges[name].amax[m] == pytest.approx(r.amax[m], rel=1e-6), (name, m)
