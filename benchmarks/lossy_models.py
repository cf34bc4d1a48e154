"""Models on which plain INT8 PTQ loses accuracy, for the debug/fallback benchmark and notebook 04.

    python benchmarks/lossy_models.py          # builds (or reuses) the outlier CNN, prints its numbers

**The outlier CNN.** A plain 11-conv CNN (+ a linear head: 12 quantization groups) trained with
torch on the bundled digits (32x32, the sample's 70/30 split, seeded, one thread: deterministic),
exported to ONNX (BatchNorm folded into the convs). Then the graph is changed the way real
networks already are: one output channel of the conv ``conv6`` is multiplied by ``OUTLIER``
(weight row and bias) and the matching input channel of its consumer ``conv7`` by
``1 / OUTLIER``. ReLU is positively homogeneous, so the FP32 function is unchanged (up to float
rounding: the test checks the outputs), but the tensor between them now has one channel 256x
larger than it was — the outlier channels of transformers and of BN-folded / depthwise
CNNs (a BatchNorm with a tiny variance does exactly this when folded). A per-tensor INT8 scale
for that tensor must either cover the outlier (the other channels get a few levels) or clip it
(the outlier channel is lost); and ``conv7``'s per-output-channel weight scale is set by the
unscaled columns, so the 1/256 column rounds to almost nothing. 256 is the smallest power of two
at which NNCF's own PTQ (unsigned INT8 after ReLU, bias correction) also loses more than 2
points, so both tools' accuracy control has work to do; quantkit's default (signed INT8, what
TensorRT builds) loses far more (99.4% -> 10.2%), and ``quantkit debug`` puts the tensor
first (lowest local SQNR; the accumulated SQNR collapses right after it). Returning that one
group (``conv7``'s activation and weight) to float restores FP32 accuracy exactly.

Data for quantkit and the peers as ``.npz`` (the input, float32 NCHW normalised, and ``labels`` int64):
``digits_npz``; ``rapidocr_cls_npz`` for the real pretrained model (RapidOCR's PP-OCR text
orientation classifier from the real-model corpus, its own preprocessing, labels 0 = upright,
1 = rotated by 180 degrees, which is the order of the package's label list).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
CACHE = HERE / "models"
OUTLIER = 256.0
#: the conv whose output gets the outlier channel, and the conv that reads it
OUTLIER_PRODUCER, OUTLIER_CONSUMER = "conv6", "conv7"
OUTLIER_CHANNEL = 5


def _train_outlier_net(epochs: int = 12, seed: int = 0):
    """The plain CNN, trained in FP32 (about 20 s on two cores)."""
    import torch
    from torch import nn

    from quantkit.sample.digits_net import digits_tensors

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic
    widths = [16, 16, 32, 32, 32, 48, 48, 48, 64, 64, 64]
    strides = [1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1]
    layers: list[nn.Module] = []
    cin = 1
    for i, (c, s) in enumerate(zip(widths, strides)):
        layers += [nn.Conv2d(cin, c, 3, s, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c

    class OutlierNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    model = OutlierNet()
    xtr, ytr, xte, yte = digits_tensors()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for s in range(0, len(xtr), 64):
            b = perm[s:s + 64]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            xb = torch.roll(xtr[b], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    torch.set_num_threads(threads)
    return model, xte


def _conv_names(model: onnx.ModelProto) -> None:
    """Name the Conv nodes conv1..convN and the Gemm fc (stable names for the groups)."""
    k = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            k += 1
            node.name = f"conv{k}"
        elif node.op_type == "Gemm":
            node.name = "fc"


def add_outlier_channel(model: onnx.ModelProto, producer: str = OUTLIER_PRODUCER, consumer: str = OUTLIER_CONSUMER,
                        channel: int = OUTLIER_CHANNEL, factor: float = OUTLIER) -> onnx.ModelProto:
    """A copy of ``model`` whose ``producer`` conv outputs channel ``channel`` ``factor`` times
    larger and whose ``consumer`` conv reads that channel ``factor`` times weaker (the two must
    be joined by ReLUs only): the same function, an outlier channel in between."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    inits = {i.name: i for i in out.graph.initializer}
    p, c = nodes[producer], nodes[consumer]

    def scale(name: str, fn) -> None:
        arr = numpy_helper.to_array(inits[name]).copy()
        fn(arr)
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    def rows(a: np.ndarray) -> None:
        a[channel] *= factor

    def cols(a: np.ndarray) -> None:
        a[:, channel] /= factor

    scale(p.input[1], rows)
    if len(p.input) > 2 and p.input[2]:
        scale(p.input[2], rows)
    scale(c.input[1], cols)
    return out


def outlier_cnn(cache: Path = CACHE) -> Path:
    """The outlier CNN as ONNX (built once, then read from ``cache``); its plain FP32 twin is
    ``outlier_cnn_plain.onnx`` beside it."""
    path = cache / "outlier_cnn.onnx"
    if path.exists():
        return path
    import torch

    model, xte = _train_outlier_net()
    cache.mkdir(parents=True, exist_ok=True)
    plain = cache / "outlier_cnn_plain.onnx"
    tmp = cache / f".outlier_cnn_export{__import__('os').getpid()}.onnx"
    torch.onnx.export(model, (xte[:1],), str(tmp), dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
    m = onnx.load(str(tmp))
    tmp.unlink()
    _conv_names(m)
    onnx.save(m, str(plain))
    onnx.save(add_outlier_channel(m), str(tmp))
    tmp.replace(path)
    return path


def digits_npz(path: Path, split: str, limit: int | None = None) -> Path:
    """The bundled digits ``train`` or ``test`` split (its first ``limit`` samples) as an .npz:
    ``image`` float32 [N, 1, 32, 32] normalised as the sample model expects, ``labels``."""
    from quantkit.sample.digits_net import digits_tensors

    xtr, ytr, xte, yte = digits_tensors()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    x, y = x[:limit], y[:limit]
    np.savez(path, image=x.numpy().astype(np.float32), labels=y.numpy().astype(np.int64))
    return path


def rapidocr_cls(n_calib: int = 64, n_eval: int = 384):
    """The real-model corpus adapter of RapidOCR's text orientation classifier, with a larger
    evaluation set than the corpus test's (64 samples make one sample 1.6 points: too coarse
    for a 0.5-point budget)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.realmodels import corpus
    from tests.realmodels.adapters import RapidOcrCls

    return RapidOcrCls("rapidocr-cls", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text orientation (classifier)",
                       "accuracy %", n_calib=n_calib, n_eval=n_eval)


def rapidocr_cls_npz(adapter, folder: Path) -> tuple[Path, Path]:
    """(calibration .npz, evaluation .npz) of ``adapter`` with labels (0 upright, 1 rotated)."""
    samples = adapter._samples
    labels = np.array([0 if lab == "0" else 1 for _, lab in samples], dtype=np.int64)
    cal, ev = folder / "cls-calib.npz", folder / "cls-eval.npz"
    np.savez(cal, x=adapter.calibration_feeds()["x"], labels=labels[:adapter.n_calib])
    np.savez(ev, x=adapter.eval_feeds()["x"], labels=labels[adapter.n_calib:])
    return cal, ev


def rapidocr_rec(n_calib: int = 32, n_eval: int = 400):
    """The real-model corpus adapter of RapidOCR's PP-OCR text recogniser (SVTR-LCNet, CTC head),
    with 400 evaluation lines (one line = 0.25 points)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.realmodels import corpus
    from tests.realmodels.adapters import RapidOcrRec

    return RapidOcrRec("rapidocr-rec", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text recognition",
                       "exact match %", n_calib=n_calib, n_eval=n_eval)


def rapidocr_rec_npz(adapter, folder: Path) -> tuple[Path, Path, Path]:
    """(calibration .npz, evaluation .npz, the evaluation lines' true texts .npy: a unicode
    array, no pickle) of ``adapter``."""
    texts = np.array([t for _, t in adapter._lines])
    cal, ev, truth = folder / "rec-calib.npz", folder / "rec-eval.npz", folder / "rec-eval-texts.npy"
    np.savez(cal, x=adapter.calibration_feeds()["x"])
    np.savez(ev, x=adapter.eval_feeds()["x"])
    np.save(truth, texts[adapter.n_calib:])
    return cal, ev, truth


def ctc_decoder(model_path: Path, package_root: Path):
    """RapidOCR's own CTC decoder (``ch_ppocr_rec/utils.py`` of the unpacked wheel, loaded by file:
    it needs numpy only) with the character list the model carries in its metadata, as the
    package's ``TextRecognizer`` builds it: ``decode(preds [N, T, C]) -> [text, ...]``."""
    import importlib.util

    path = next(Path(package_root).rglob("ch_ppocr_rec/utils.py"))
    spec = importlib.util.spec_from_file_location("qk_rapidocr_rec_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    dec = mod.CTCLabelDecode(character=meta["character"].splitlines())
    return lambda preds: [text for text, _score in dec(preds)]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    import quantkit
    from quantkit.datasets.sources import NumpySource

    p = outlier_cnn()
    with tempfile.TemporaryDirectory() as tmp:
        src_cal = NumpySource(digits_npz(Path(tmp) / "train.npz", "train"))
        src_ev = NumpySource(digits_npz(Path(tmp) / "test.npz", "test"))
        for name in ("outlier_cnn_plain.onnx", "outlier_cnn.onnx"):
            cal = quantkit.quantize(onnx.load(str(p.parent / name)), src_cal, indices=range(256))
            rep = cal.evaluate(src_ev)
            print(f"{name}: FP32 {100 * rep.accuracy_reference:.2f}%  INT8 {100 * rep.accuracy_test:.2f}%  "
                  f"groups {len(cal.plan.activations)}")
