"""The QAT route on model shapes users bring (the twenty-sixth session's QAT probe): BatchNorm
subclasses, forwards that read self.training, the transformer fast path, several inputs, dict
examples and outputs, a prepared model's own attributes."""

import logging

import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import quantkit.qat as qq  # noqa: E402
from quantkit.errors import DatasetError, ModelError  # noqa: E402
from quantkit.qat.modules import QuantMixin  # noqa: E402


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: BatchNorm, then its activation, in its own forward."""

    def forward(self, x):  # noqa: ANN001
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, 0.1, self.eps))


def test_a_batchnorm_subclass_keeps_its_activation_in_the_export(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 4, 3, padding=1)).eval()
    m[1].running_mean.normal_()
    x = torch.randn(4, 3, 16, 16)
    q = qq.prepare(m, inplace=True)
    qq.calibrate(q, [x])
    path = qq.export_onnx(q, tmp_path / "m.onnx", x)
    got = _exact_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    # it dropped the ReLU: 1.5 apart; now the BatchNorm is folded into the quantized weight (a few
    # weights one INT8 step apart from the fake-quant model's, which quantizes them before the BatchNorm)
    assert abs(got - want).max() < 0.02
    assert any(n.op_type == "Relu" for n in onnx.load(str(path)).graph.node)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.stride = 8
        self.register_buffer("anchors", torch.ones(3))

    def forward(self, x):  # noqa: ANN001
        y = F.relu(self.a(x))
        y = F.relu(self.b(y) + y)
        return self.fc(F.dropout(y.mean((2, 3)), 0.5, training=self.training))

    def predict(self, x):  # noqa: ANN001
        return self(x).argmax(1)


def test_a_forward_that_reads_self_training_is_not_frozen_in_one_mode(caplog):
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    amax = []
    for mode in (True, False):
        m = Residual()
        torch.manual_seed(1)
        m.load_state_dict(Residual().state_dict())
        with caplog.at_level(logging.WARNING, logger="quantkit.qat.prepare"):
            q = qq.prepare(m.train(mode))
        qq.calibrate(q, data, method="minmax")
        amax.append(q.fc.input_quantizer.amax.item())
        q.eval()
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(q(x), q(x))  # eval is deterministic
        q.train()
        assert not torch.equal(q(x), q(x))  # dropout runs in training
    assert amax[0] == pytest.approx(amax[1])  # calibration ran without dropout either way (it was 2x)
    assert "self.training" in caplog.text


def test_modules_reading_self_training_are_leaves_and_the_model_keeps_its_surface():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):  # noqa: ANN001
            return self.d(self.c(x)) + x

    class Net(Residual):
        def __init__(self) -> None:
            super().__init__()
            self.blk, self.a = Block(), nn.Conv2d(3, 4, 3, padding=1)
            self.b, self.fc = nn.Identity(), nn.Linear(4, 4)

        def forward(self, x):  # noqa: ANN001
            y = self.blk(F.relu(self.a(x)))
            return self.fc(y.mean((2, 3)))

    q = qq.prepare(Net())
    assert any(n.startswith("residual_quantizer") for n, _ in q.named_modules())
    assert isinstance(q, Net) and q.stride == 8 and torch.equal(q.anchors, torch.ones(3))
    qq.calibrate(q, [torch.randn(4, 3, 8, 8)])
    assert q.predict(torch.randn(2, 3, 8, 8)).shape == (2,)


def test_the_transformer_fast_path_does_not_skip_calibration(tmp_path):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1, enable_nested_tensor=False)
    q = qq.prepare(nn.Sequential(nn.Linear(8, 16), enc, nn.Linear(16, 4)).eval())
    qq.calibrate(q, [torch.randn(16, 10, 8)])
    assert all(qz.calibrated for _, qz in qq.quantizers(q, inputs_only=True))  # linear1/linear2 were skipped
    qq.export_onnx(q, tmp_path / "t.onnx", torch.randn(2, 10, 8))


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, y):  # noqa: ANN001
        return {"feat": self.a(x), "logits": self.b(y)}


def test_several_inputs_dict_examples_and_dict_outputs(tmp_path):
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    q = qq.prepare(Two())
    qq.calibrate(q, [((x, y), torch.zeros(8))])
    assert qq.quantizer_errors(q, [{"x": x, "y": y}])
    with pytest.raises(DatasetError, match="does not take the batch's inputs"):
        qq.calibrate(qq.prepare(Two()), [(x, y)])  # (x, y) reads as (inputs, labels)
    for example in ({"x": x[:2], "y": y[:2]}, (x[:2], {"y": y[:2]})):
        path = qq.export_onnx(q, tmp_path / "two.onnx", example)
        model = onnx.load(str(path))
        assert [o.name for o in model.graph.output] == ["feat", "logits"]


def test_preparing_twice_says_so():
    q = qq.prepare(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ModelError, match="already prepared"):
        qq.prepare(q)


def test_attention_left_in_float_is_named(caplog):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.att = nn.Linear(8, 16), nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):  # noqa: ANN001
            h = self.inp(x)
            return self.att(h, h, h)[0]

    with caplog.at_level(logging.WARNING, logger="quantkit.qat.prepare"):
        qq.prepare(M())
    assert "MultiheadAttention" in caplog.text and "att" in caplog.text


class ForwardFailsWhenTraced(nn.Module):
    """transformers 5's BERT under torch's TorchScript exporter: its forward raises a TypeError
    ("got multiple values for keyword argument 'use_cache'") only while traced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):  # noqa: ANN001
        if torch.jit.is_tracing():
            raise TypeError("forward() got multiple values for keyword argument 'use_cache'")
        return self.fc(x)


def test_a_forward_that_fails_in_the_exporter_is_one_readable_error(tmp_path):
    from quantkit.errors import InputError

    x = torch.randn(4, 8)
    q = qq.prepare(ForwardFailsWhenTraced().eval())
    qq.calibrate(q, [x])
    with pytest.raises(InputError, match=r"could not trace the model's forward on the example input \(TypeError\): "
                                         r".*'use_cache'") as err:
        qq.export_onnx(q, tmp_path / "m.onnx", x)
    assert "quantized=False" in err.value.hint
    assert list(tmp_path.iterdir()) == []  # nothing written


class ConvBnAct(nn.Module):
    """ultralytics' Conv: the BatchNorm is called in the module's own forward."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x):  # noqa: ANN001
        return self.act(self.bn(self.conv(x)))


class Detector(nn.Module):
    """A model fx cannot trace (a loop over its own output's shape), ConvBnAct blocks, and one
    BatchNorm whose convolution's output is read elsewhere too (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ConvBnAct(3, 8), ConvBnAct(8, 8)
        self.c, self.c_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):  # noqa: ANN001
        y = self.b(self.a(x))
        for _ in range(int(y.shape[1]) // 8):  # data-dependent for fx
            z = self.c(y)
            y = self.c_bn(z) + z
        return y.mean((2, 3))


def _exact_session(path):  # noqa: ANN001, ANN202
    """ONNX Runtime without its graph optimizations: the Q/DQ arithmetic as written (its fused
    integer kernels on a CPU without VNNI saturate: README, "Accuracy on the bundled sample")."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_batchnorm_called_in_a_modules_own_forward_is_folded_in_both_exports(tmp_path, caplog):
    """The QAT probe's F4: BatchNorms that fx could not see (ultralytics' Conv module) stayed
    BatchNormalization nodes beside Q/DQ weights, and the float twin's exporter folded them, so
    `debug` refused the pair; they are found by running the example and folded in both."""
    import numpy as np

    from quantkit.cli import main

    torch.manual_seed(0)
    q = qq.prepare(_stats(Detector()))
    qq.calibrate(q, [torch.randn(8, 3, 16, 16) for _ in range(2)])
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING):
        qat = qq.export_onnx(q, tmp_path / "qat.onnx", x)
        fp32 = qq.export_onnx(q, tmp_path / "fp32.onnx", x, quantized=False)
    assert "BatchNorm c_bn is not folded into c" in caplog.text
    for path in (qat, fp32):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("BatchNormalization") == 1, (path, ops)  # c_bn alone (its input is read twice)
        got = _exact_session(path).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            if path == fp32:
                for _, qz in qq.quantizers(q):
                    qz.enabled = False
            want = q(x).numpy()
        assert abs(got - want).max() <= 1e-3 * abs(want).max(), path
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    assert main(["debug", str(fp32), str(qat), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "dbg"),
                 "--no-progress"]) == 0


def test_debug_pairs_a_linear_on_3d_inputs_through_its_weights_transpose(tmp_path):
    """The QAT probe's F5: torch exports a Linear on [N, T, C] as DQ -> Transpose -> MatMul, and the
    float twin with the transpose folded into the constant; debug refused the weight as having no
    counterpart. It is read through the layout op, its figures the weight's own."""
    import json

    import numpy as np

    from quantkit.cli import main

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = qq.prepare(m)
    x = torch.randn(4, 10, 16)
    qq.calibrate(q, [x])
    qat, fp32 = qq.export_onnx(q, tmp_path / "qat.onnx", x), qq.export_onnx(q, tmp_path / "fp32.onnx", x, quantized=False)
    assert "Transpose" in [n.op_type for n in onnx.load(str(qat)).graph.node]
    assert "Transpose" not in [n.op_type for n in onnx.load(str(fp32)).graph.node]
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((8, 10, 16)).astype(np.float32))
    assert main(["debug", str(fp32), str(qat), "--npz", str(tmp_path / "d.npz"), "-o", str(tmp_path / "dbg"),
                 "--no-progress"]) == 0
    weights = json.loads((tmp_path / "dbg" / "debug.json").read_text())["layerwise"]["weights"]
    assert len(weights) == 2 and all(30 < w["sqnr_db"] < 80 for w in weights), weights


def test_a_disable_pattern_that_matches_no_layer_and_zero_batches_are_refused():
    from quantkit.errors import InputError

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(InputError, match=r"pattern '3' matches no quantizable layer") as err:
        qq.prepare(m, qq.QatConfig(disable=("3",)))  # the last Conv is '2'
    assert "'2'" in err.value.hint
    assert qq.prepare(m, qq.QatConfig(disable=("2",)))[2].__class__ is nn.Conv2d
    q = qq.prepare(m)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="num_batches must be a positive whole number"):
            qq.calibrate(q, [torch.randn(2, 3, 8, 8)], num_batches=bad)


class UpsampleTo(nn.Module):
    """A decoder's ConvTranspose told its output size (torch picks the output padding from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.up = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1)

    def forward(self, x):  # noqa: ANN001
        return self.up(self.down(x), output_size=x.shape[-2:])


def test_weight_norm_layers_are_quantized_and_conv_transpose_takes_output_size(tmp_path):
    """The QAT probe's F20/F21: a ConvTranspose called with output_size raised NotImplementedError;
    weight-normed layers (PyTorch's ParametrizedConv2d) stayed float and a model made only of them
    was refused as having no Conv layer."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 17)
    m = nn.Sequential(weight_norm(nn.Conv2d(3, 3, 3, padding=1)), nn.ReLU(), UpsampleTo()).train()
    q = qq.prepare(m)
    g = q[0].parametrizations.weight.original0  # the weight-norm magnitude
    assert [n for n, mod in q.named_modules() if isinstance(mod, QuantMixin)] == ["0", "2.down", "2.up"]
    qq.calibrate(q, [x])
    assert q(x).shape == x.shape  # 17 x 17: the output size told, not 18 x 18 or 16 x 16
    before = g.detach().clone()
    torch.optim.SGD(q.parameters(), lr=0.1).zero_grad()
    q(x).square().mean().backward()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert not torch.equal(g.detach(), before)  # trained through the quantized layer
    path = qq.export_onnx(q.eval(), tmp_path / "m.onnx", x)
    got = _exact_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    assert got.shape == want.shape and abs(got - want).max() <= 1e-3 * abs(want).max()
    assert sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node) >= 6  # 3 weights, 3 inputs


class NestedOutputs(nn.Module):
    """A detector's eval forward: a dict of nested outputs with an aux head's None and a count."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # noqa: ANN001
        y = torch.relu(self.c(x))
        p = y.mean((2, 3))
        return {"feat": y, "head": {"logits": self.fc(p), "aux": [p, None]}, "count": 3}


class TupleWithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):  # noqa: ANN001
        y = self.c(x)
        return y, (y * 2, None)


def test_nested_outputs_are_named_by_their_keys_and_non_tensors_left_out(tmp_path):
    """The QAT probe's F6: None beside the tensors made the exporter's names outnumber its outputs
    (a raw error), a number in the output failed the trace, nested dicts were output_0.."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    q = qq.prepare(NestedOutputs().eval())
    qq.calibrate(q, [x])
    path = qq.export_onnx(q, tmp_path / "m.onnx", x)
    session = _exact_session(path)
    assert [o.name for o in session.get_outputs()] == ["feat", "head.logits", "head.aux.0"]
    with torch.no_grad():
        want = q(x)
    got = dict(zip(["feat", "head.logits", "head.aux.0"], session.run(None, {"input": x.numpy()})))
    assert abs(got["head.logits"] - want["head"]["logits"].numpy()).max() < 1e-4
    path = qq.export_onnx(TupleWithNone().eval(), tmp_path / "t.onnx", x, quantized=False)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output_0", "output_1"]


class Aliased(nn.Module):
    """A layer under two names (``self.head = self.fc``), the alias the one the forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.head = self.fc

    def forward(self, x):  # noqa: ANN001
        return self.head(torch.relu(self.c(x)).mean((2, 3)))


def test_a_layer_under_two_names_is_one_quantized_layer(tmp_path):
    """The QAT probe's F7: the alias kept the float layer (named_children yields a module once),
    export then refused its never-calibrated quantizers; a disable pattern may name either."""
    x = torch.randn(2, 3, 8, 8)
    q = qq.prepare(Aliased().eval())
    assert q.head is q.fc and isinstance(q.head, QuantMixin)
    qq.calibrate(q, [x])
    path = qq.export_onnx(q, tmp_path / "m.onnx", x)
    assert sum(n.op_type == "MatMul" or n.op_type == "Gemm" for n in onnx.load(str(path)).graph.node) == 1
    kept = qq.prepare(Aliased().eval(), qq.QatConfig(disable=["head"]))
    assert kept.fc is kept.head and not isinstance(kept.fc, QuantMixin)


def test_debug_pairs_the_exports_of_a_batchnorm_subclass_after_a_conv(tmp_path):
    """timm's EfficientNet/MobileNetV3 (BatchNormAct2d): torch's exporter fused the BatchNorm into
    the Conv of the float twin (a constant weight) and not after the Q/DQ export's quantized
    weight, so `quantkit debug` refused the pair as not derived from each other. Now both fold
    its normalization into the Conv (its activation kept)."""
    import numpy as np

    from quantkit.cli import main

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 4, 3, padding=1)).eval()
    m[1].running_mean.normal_()
    x = torch.randn(4, 3, 16, 16)
    q = qq.prepare(m)
    qq.calibrate(q, [x])
    int8 = qq.export_onnx(q, tmp_path / "m.qat.onnx", x)
    fp32 = qq.export_onnx(q, tmp_path / "m.fp32.onnx", x, quantized=False)
    np.save(tmp_path / "x.npy", torch.randn(8, 3, 16, 16).numpy())
    for path in (int8, fp32):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert "BatchNormalization" not in ops and "Relu" in ops, ops
    with torch.no_grad():
        assert abs(_exact_session(int8).run(None, {"input": x.numpy()})[0] - q(x).numpy()).max() < 1e-4
    assert main(["debug", str(fp32), str(int8), "--npz", str(tmp_path / "x.npy"), "--no-progress",
                 "-o", str(tmp_path / "dbg")]) == 0


class ReadTwice(nn.Module):
    """A BatchNorm subclass whose Conv output is read elsewhere too: its fold would change the model."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.free = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics in eval too

    def forward(self, x):  # noqa: ANN001
        y = self.c(x)
        return self.bn(y) + y + self.free(self.c2(x))


def test_a_batchnorm_subclass_is_folded_only_where_the_outputs_stay(tmp_path, caplog):
    torch.manual_seed(0)
    m = ReadTwice().eval()
    m.bn.running_mean.normal_()
    x = torch.randn(4, 3, 16, 16)
    q = qq.prepare(m)
    qq.calibrate(q, [x])
    from quantkit.errors import InputError

    with pytest.raises(InputError, match="dynamic batch axis") as info:  # the exporter's assert, in one line
        qq.export_onnx(q, tmp_path / "m.onnx", x, quantized=False)
    assert "dynamic_batch=False" in info.value.hint
    with caplog.at_level(logging.WARNING):
        path = qq.export_onnx(q, tmp_path / "m.onnx", x, quantized=False, dynamic_batch=False)
    assert "BatchNorm bn is not folded into c" in caplog.text
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 2  # bn kept, free (batch statistics) never a candidate
    with torch.no_grad():
        assert abs(_exact_session(path).run(None, {"input": x.numpy()})[0] - m(x).numpy()).max() < 1e-4


class FunctionalQkv(nn.Module):
    """BEiT's / EVA's attention: the Linear's weight read through F.linear with a bias built in the
    forward, so the quantized Linear's own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # noqa: ANN001
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.q_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return self.proj((q.softmax(-1) * k).sum(-1, keepdim=True) * v)


def test_a_layer_the_forward_never_calls_stays_in_float(tmp_path, caplog):
    """timm's BEiT and EVA-02: export refused 'blocks.0.attn.qkv.input_quantizer was never calibrated'."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    q = qq.prepare(FunctionalQkv().eval())
    with caplog.at_level(logging.WARNING):
        qq.calibrate(q, [x])
    assert "1 quantized layer(s) or quantizer(s) were not called in the calibration pass" in caplog.text
    assert "qkv" in caplog.text and not q.qkv.input_quantizer.enabled and q.proj.input_quantizer.enabled
    path = qq.export_onnx(q, tmp_path / "m.onnx", x)
    with torch.no_grad():
        assert abs(_exact_session(path).run(None, {"input": x.numpy()})[0] - q(x).numpy()).max() < 1e-4


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT, NFNet): the weight standardized in the forward, then F.conv2d."""

    def forward(self, x):  # noqa: ANN001
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame (TF-ported EfficientNets): pads, then the Conv2d's own forward."""

    def forward(self, x):  # noqa: ANN001
        return super().forward(F.pad(x, [1, 1, 1, 1]))


class HeadLinear(nn.Linear):
    """timm's Linear: F.linear in its own forward."""

    def forward(self, x):  # noqa: ANN001
        return F.linear(x, self.weight, self.bias)


def test_conv_and_linear_subclasses_with_their_own_forward_are_quantized(tmp_path):
    """They stayed in float (a BiT model exported 2 QuantizeLinear nodes of 108): their forward now
    runs as written, its F.conv2d/F.linear call reads input and weight through the quantizers, and
    a computed (standardized) weight's quantizer is fixed to what the forward computes."""
    import copy
    import io

    import numpy as np

    from quantkit.cli import main

    torch.manual_seed(0)
    m = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU(), Conv2dSame(8, 8, 3), nn.ReLU(), nn.Flatten(),
                      HeadLinear(8 * 16 * 16, 10)).eval()
    x = torch.randn(4, 3, 16, 16)
    q = qq.prepare(m)
    assert all(isinstance(q[i], QuantMixin) and isinstance(q[i], type(m[i])) for i in (0, 2, 5))
    qq.calibrate(q, [x, torch.randn(4, 3, 16, 16)])
    assert all(q[i].input_quantizer.calibrated for i in (0, 2, 5))
    int8 = qq.export_onnx(q, tmp_path / "m.qat.onnx", x)
    fp32 = qq.export_onnx(q, tmp_path / "m.fp32.onnx", x, quantized=False)
    assert [n.op_type for n in onnx.load(str(int8)).graph.node].count("QuantizeLinear") == 6
    with torch.no_grad():
        want = q(x).numpy()
        assert torch.equal(copy.deepcopy(q)(x), q(x))
        buf = io.BytesIO()
        torch.save(q, buf)  # the generated classes pickle as the user's classes they wrap
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), q(x))
    # the standardized weight's scale from the weight the forward computes (from the parameter: 1.5 apart)
    assert abs(_exact_session(int8).run(None, {"input": x.numpy()})[0] - want).max() < 1e-3
    assert F.conv2d is torch.conv2d and F.linear is torch._C._nn.linear  # the patch is undone after each forward
    np.save(tmp_path / "x.npy", torch.randn(8, 3, 16, 16).numpy())
    assert main(["debug", str(fp32), str(int8), "--npz", str(tmp_path / "x.npy"), "--no-progress",
                 "-o", str(tmp_path / "dbg")]) == 0


def test_a_batchnorm_after_a_weight_standardizing_conv_stays_and_says_why(tmp_path, caplog):
    torch.manual_seed(0)
    m = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(0.5, 2), m[1].weight.data.uniform_(0.5, 1.5)
    m.eval()
    x = torch.randn(4, 3, 16, 16)
    q = qq.prepare(m)
    qq.calibrate(q, [x])
    with caplog.at_level(logging.WARNING):
        path = qq.export_onnx(q, tmp_path / "m.onnx", x, quantized=False)
    assert "BatchNorm 1 is not folded into 0: the outputs change (its forward transforms its weight" in caplog.text
    with torch.no_grad():
        assert abs(_exact_session(path).run(None, {"input": x.numpy()})[0] - m(x).numpy()).max() < 1e-4
