"""The runner interface has two executors: a PyTorch module and its ONNX export feed the same
collectors and run side by side on the same batches."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quantkit.backends.base import side_by_side  # noqa: E402
from quantkit.backends.onnxruntime import OrtRunner  # noqa: E402
from quantkit.calibrators.collectors import collect_histograms  # noqa: E402
from quantkit.compare import compare_runners  # noqa: E402
from quantkit.datasets import Batcher, SyntheticSource  # noqa: E402
from quantkit.errors import InputError  # noqa: E402
from quantkit.onnx.model import TensorSpec  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):  # noqa: ANN001
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = Net().eval()
    path = tmp_path_factory.mktemp("torch") / "net.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return net, path


SPEC = [TensorSpec("x", ("n", 3, 8, 8), np.dtype(np.float32))]


def test_torch_and_onnxruntime_side_by_side(exported):
    net, path = exported
    src = SyntheticSource((3, 8, 8), count=20, seed=1)
    with _torch(net) as t, OrtRunner(path) as o:
        pairs = list(side_by_side(t, o, Batcher(src, ["x"], 8)))
        assert [b.size for b, _, _ in pairs] == [8, 8, 4]
        for _, a, b in pairs:
            np.testing.assert_allclose(a["y"], b["y"], rtol=1e-4, atol=1e-5)
        rep = compare_runners(t, o, Batcher(src, ["x"], 8), reference_name="torch", test_name="onnx")
    assert rep.num_samples == 20 and rep.outputs[0].sqnr_db > 80


def test_torch_runner_feeds_the_same_collectors(exported):
    """The conv's output captured by a forward hook (PyTorch) and as a graph output (ONNX
    Runtime): the same statistics, so ONNX PTQ's collectors serve a PyTorch model too."""
    net, path = exported
    conv_out = next(n.output[0] for n in __import__("onnx").load(path).graph.node if n.op_type == "Conv")
    src = SyntheticSource((3, 8, 8), count=24, seed=2)
    with _torch(net, capture=["x", "conv"]) as t:
        th = collect_histograms(t, Batcher(src, ["x"], 8), sample_stride=1)
    with OrtRunner(path, capture=["x", conv_out]) as o:
        oh = collect_histograms(o, Batcher(src, ["x"], 8), sample_stride=1)
    a, b = th["conv"].compute(), oh[conv_out].compute()
    assert a.total == b.total == 24 * 8 * 8 * 8
    assert a.observed_max == pytest.approx(b.observed_max, rel=1e-5)
    assert a.observed_min == pytest.approx(b.observed_min, rel=1e-5, abs=1e-6)
    assert np.abs(a.counts - b.counts).sum() <= 0.001 * a.total  # float rounding at bin edges only
    assert th["x"].compute().counts.tolist() == oh["x"].compute().counts.tolist()


def test_torch_runner_refuses_unknown_capture(exported):
    with pytest.raises(InputError, match="no input or submodule 'conv9'"):
        _torch(exported[0], capture=["conv9"])


def _torch(net, capture=()):  # noqa: ANN001, ANN202
    from quantkit.backends.torch import TorchRunner

    return TorchRunner(net, SPEC, ["y"], capture=capture)
