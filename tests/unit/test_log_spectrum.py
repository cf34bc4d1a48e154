"""A log-spectrum front end stays in float (``quantkit.onnx.qdq.log_spectrum_nodes``).

An audio model that computes its own log-mel features (a DFT written as a Conv, the power
spectrum, a filterbank MatMul, a clamp and a Log, as onnx-asr's and tf.signal's front ends do)
loses its quiet bands in INT8: one step for the whole tensor rounds them to 0, and the Log
reads log(epsilon). The model here is exported by torch's ONNX exporter; the front end's
weighted ops must keep float inputs, the network after it must still be quantized, and the
INT8 output must stay close to FP32 (it is not without the rule).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantkit.datasets import NumpySource
from quantkit.errors import ModelError
from quantkit.onnx import qdq
from quantkit.onnx.qdq import WEIGHTED_OPS, log_spectrum_nodes, plan_qdq
from quantkit.ptq import QuantizeConfig, StatsConfig, prepare, quantize

torch = pytest.importorskip("torch")

N_FFT, HOP, MELS, SAMPLES = 128, 64, 20, 4096


def _front_end(nn):
    class LogMel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n = torch.arange(N_FFT, dtype=torch.float64)
            k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
            basis = torch.cat([torch.cos(2 * torch.pi * k * n / N_FFT), -torch.sin(2 * torch.pi * k * n / N_FFT)])
            self.dft = nn.Conv1d(1, basis.shape[0], N_FFT, HOP, bias=False)
            self.dft.weight.data = (basis * torch.hann_window(N_FFT, dtype=torch.float64))[:, None].float()
            g = torch.Generator().manual_seed(0)
            fb = torch.rand(N_FFT // 2 + 1, MELS, generator=g) ** 4
            self.register_buffer("mel", fb / fb.sum(0, keepdim=True))

        def forward(self, wave):
            re, im = self.dft(wave[:, None]).chunk(2, 1)
            power = (re * re + im * im).transpose(1, 2)
            return torch.log(torch.clamp(power @ self.mel, min=1e-10))

    return LogMel()


def _export(module, path) -> onnx.ModelProto:
    torch.onnx.export(module.eval(), (torch.zeros(2, SAMPLES),), str(path), dynamo=False, opset_version=17,
                      input_names=["wave"], output_names=["out"], dynamic_axes={"wave": {0: "b"}, "out": {0: "b"}})
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto, str, np.ndarray]:
    """(front end + a small CNN classifier, the front end alone, an .npz of tones, the tones)."""
    nn = torch.nn
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.front = _front_end(nn)
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, wave):
            return self.net(self.front(wave)[:, None])

    tmp = tmp_path_factory.mktemp("logmel")
    full, front = _export(Classifier(), tmp / "full.onnx"), _export(_front_end(nn), tmp / "front.onnx")
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLES) / 16000
    waves = np.stack([a * np.sin(2 * np.pi * f * t) + 0.001 * rng.standard_normal(SAMPLES)
                      for a, f in zip(rng.uniform(0.01, 1, 96), rng.uniform(100, 6000, 96))]).astype(np.float32)
    np.savez(tmp / "wave.npz", wave=waves)
    return full, front, str(tmp / "wave.npz"), waves


def _weighted(model: onnx.ModelProto, names) -> list[str]:
    ops = {n.name: n.op_type for n in model.graph.node}
    return sorted(ops[n] for n in names if ops.get(n) in WEIGHTED_OPS)


def test_front_end_found_and_left_float_for_both_targets(audio) -> None:
    full = audio[0]
    front = log_spectrum_nodes(full)
    assert _weighted(full, front) == ["Conv", "MatMul"]  # the DFT and the filterbank, not the classifier
    consumers = {c for target in ("tensorrt", "onnxruntime")
                 for cons in plan_qdq(full, target).activations.values() for c in cons}
    assert not consumers & set(front)
    quantized = {n.op_type for n in full.graph.node if n.name in consumers}
    assert {"Conv", "Gemm"} <= quantized  # the network after the Log is still INT8


def test_int8_output_close_to_fp32_only_with_the_rule(audio, monkeypatch) -> None:
    full, _, npz, waves = audio
    ref = ort.InferenceSession(full.SerializeToString()).run(None, {"wave": waves[64:]})[0]

    def sqnr() -> float:
        cal = quantize(full, NumpySource(npz), QuantizeConfig(StatsConfig()), indices=range(64))
        out = ort.InferenceSession(cal.int8_model().SerializeToString()).run(None, {"wave": waves[64:]})[0]
        return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))

    kept = sqnr()
    monkeypatch.setattr(qdq, "FLOAT_LOG_SPECTRUM", False)
    quantized = sqnr()
    assert kept >= 35.0, kept  # 48.7 dB when written
    assert kept >= quantized + 20.0, (kept, quantized)  # 11.6 dB with the front end in INT8


def test_log_of_softmax_is_not_a_front_end() -> None:
    """A classifier's Log(Softmax(logits)): the walk stops at the Softmax, its Gemm is quantized."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Gemm", ["r", "w"], ["z"], name="fc"),
         helper.make_node("Softmax", ["z"], ["p"], name="softmax"), helper.make_node("Log", ["p"], ["y"], name="log")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not log_spectrum_nodes(model)
    assert plan_qdq(model).activations == {"r": ("fc",)}


def test_front_end_alone_is_refused_in_one_line(audio) -> None:
    with pytest.raises(ModelError, match="log-spectrum") as err:
        prepare(audio[1], name="front.onnx")
    assert "\n" not in str(err.value) and "Conv" in str(err.value)


def test_inspect_names_the_front_end(audio, tmp_path, capsys) -> None:
    from quantkit.cli import main
    from quantkit.onnx.qdq import float_by_rule

    onnx.save(audio[0], tmp_path / "full.onnx")
    assert main(["inspect", str(tmp_path / "full.onnx")]) == 0
    out = capsys.readouterr().out
    assert "kept in float (log-spectrum front end): 2 node(s)" in out
    assert set(float_by_rule(audio[0]).values()) == {"log-spectrum front end"}


def test_a_constant_q_front_end_with_downsampling_filters_stays_in_float(tmp_path):
    """basic-pitch's constant-Q transform (tf2onnx): per octave a DFT Conv1D, its magnitude
    (a square, a sum, a root), squared again into Log(|X|^2 + eps) with no filterbank between,
    and a lowpass Conv that halves the rate for the next octave. Only the DFT Convs were found
    (they end the walk), and the quantized downsampling filters alone cost 15-20 dB: the whole
    linear path from the audio to each transform stays in float; the network after it does not."""
    nn = torch.nn

    class Cqt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.dft = nn.ModuleList(nn.Conv1d(1, 16, 32, 8, bias=False) for _ in range(2))
            self.down = nn.Conv1d(1, 1, 9, 2, padding=4, bias=False)
            self.down.weight.data = torch.hann_window(11)[1:-1].reshape(1, 1, 9) / 5
            for d in self.dft:
                d.weight.data = torch.randn(16, 1, 32, generator=g)
            self.head = nn.Conv1d(16, 8, 3)

        def forward(self, wave):
            x, mags = wave[:, None], []
            for i, d in enumerate(self.dft):
                y = d(x)
                re, im = y[:, :8], -y[:, 8:]
                mags.append(torch.sqrt((torch.stack([re, im]) ** 2).sum(0)))
                if i + 1 < len(self.dft):
                    x = self.down(x)
            n = min(m.shape[-1] for m in mags)
            spec = torch.cat([m[..., :n] for m in mags], 1)
            return self.head(torch.relu(torch.log(spec * spec + 1e-6)))

    model = _export(Cqt(), tmp_path / "cqt.onnx")
    front = log_spectrum_nodes(model)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    convs = {n.name: shapes[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}
    head = [name for name, shape in convs.items() if shape == (8, 16, 3)]
    assert len(convs) == 4 and len(head) == 1
    # the two DFTs and the downsampling filter, not the head after the Log
    assert {name for name in convs if name in front} == set(convs) - set(head)
    plan = plan_qdq(model)
    assert plan.activations  # the head is quantized
