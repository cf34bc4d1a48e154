"""Write notebooks/*.ipynb from the cells below and execute them, so they are committed with
their outputs (and the README's figure comes from the same run).

    pip install -e '.[torch,test,notebooks]' && python scripts/make_notebooks.py [--small]

The tests (tests/unit/test_notebooks.py) re-execute every notebook with QUANTKIT_NB_SMALL=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}

SETUP = '''import os, json, tempfile
from pathlib import Path
import numpy as np
from IPython.display import Image, display

SMALL = os.environ.get("QUANTKIT_NB_SMALL") == "1"   # the tests run every notebook with small settings
WORK = Path(tempfile.mkdtemp(prefix="quantkit-nb-"))
FIGURES = Path(os.environ.get("QUANTKIT_NB_FIGURES", WORK / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
print("small settings" if SMALL else "full settings", "| outputs in", WORK)'''

HELPERS = '''from quantkit.backends.onnxruntime import OrtRunner
from quantkit.bench import measure_latency
from quantkit.compare import compare_runners
from quantkit.datasets import Batcher

def evaluate(label, ref_name, fp32_model, int8_model, source, input_name, results, indices=None, batch=32, iters=20):
    """Compare an INT8 model with FP32 on `indices` of `source` and time it at batch 32;
    writes the same JSON as `quantkit compare --json` and `quantkit bench --json`."""
    results.mkdir(parents=True, exist_ok=True)
    with OrtRunner(fp32_model) as ref, OrtRunner(int8_model) as test:
        rep = compare_runners(ref, test, Batcher(source, [input_name], batch, indices=indices),
                              reference_name=ref_name, test_name=label)
        (results / f"compare-{label}.json").write_text(json.dumps(rep.to_dict()))
        feed = next(iter(Batcher(source, [input_name], batch, indices=indices))).feed
        stats = measure_latency(test, feed, warmup=3, iterations=iters)
        (results / f"bench-{label}.json").write_text(json.dumps({"model": label, **stats.to_dict()}))
    return rep, stats

def bench_reference(ref_name, model, source, input_name, results, indices=None, batch=32, iters=20):
    with OrtRunner(model) as r:
        feed = next(iter(Batcher(source, [input_name], batch, indices=indices))).feed
        stats = measure_latency(r, feed, warmup=3, iterations=iters)
    (results / f"bench-{ref_name}.json").write_text(json.dumps({"model": ref_name, **stats.to_dict()}))
    return stats'''


def nb01() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell("# 01 · PTQ calibrators: which range method to ship\n\n"
                          "One calibration pass collects every statistic; each method's INT8 model is then "
                          "compared with FP32 (accuracy, agreement, SQNR) and timed on ONNX Runtime (CPU). "
                          "Two models: the bundled digits CNN (real handwritten digits, labels) and a ResNet-18 "
                          "with torchvision's architecture and **random weights** — for speed and agreement only, "
                          "its 'accuracy' means nothing, so its plot shows top-1 agreement with FP32."),
        new_code_cell(SETUP),
        new_code_cell(HELPERS),
        new_markdown_cell("## The digits sample\n\nCalibrate once on the training split (written as PNG class "
                          "folders and decoded with OpenCV, like any image folder), then build the four models."),
        new_code_cell('''from quantkit import sample, report as qr
from quantkit.datasets import ImageFolder
from quantkit.onnx.model import load_model
from quantkit.onnx.model import save_model
from quantkit.ptq import quantize

train = sample.write_image_folder(WORK / "digits" / "train", "train")
test = sample.write_image_folder(WORK / "digits" / "test", "test")
pp = sample.preprocess()
cal_src, test_src = ImageFolder(train, pp), ImageFolder(test, pp)
fp32 = load_model(sample.model_path())
n = 256 if SMALL else len(cal_src)
cal = quantize(fp32, cal_src, indices=range(n))   # one pass, every method; entropy by default
(WORK / "digits" / "ranges.json").write_text(json.dumps(cal.ranges_document()))
print(f"calibrated on {cal.num_samples} images, {len(cal.plan.activations)} activation tensors")'''),
        new_code_cell('''results = WORK / "digits" / "results"
rows = []
for method in ("entropy", "minmax", "percentile", "mse"):
    path = save_model(cal.int8_model(method), WORK / "digits" / f"{method}.onnx")
    rep, stats = evaluate(f"digits {method}", "digits FP32", fp32, path, test_src, "image", results)
    rows.append((method, rep.accuracy_test, rep.outputs[0].sqnr_db, stats.median_ms))
base = bench_reference("digits FP32", fp32, test_src, "image", results)
print(f"FP32 accuracy {rep.accuracy_reference:.4f}, {base.median_ms:.2f} ms per batch of 32")
for m, acc, sqnr, ms in rows:
    print(f"{m:>10}: accuracy {acc:.4f}  SQNR {sqnr:5.2f} dB  {ms:.2f} ms")'''),
        new_markdown_cell("Every sound method lands within an image or two of FP32 on this easy task; SQNR separates "
                          "them. On ONNX Runtime's CPU provider the TensorRT-style Q/DQ models are *slower* than FP32 "
                          "(only Convs whose outputs are quantized become integer kernels there): latency here says "
                          "nothing about TensorRT."),
        new_code_cell('''res = qr.load_results([results, WORK / "digits" / "ranges.json"])
fig = qr.plot_accuracy_latency(qr.accuracy_latency_points(res), title="digits: accuracy vs latency (ONNX Runtime, CPU)")
fig.savefig(FIGURES / "digits_accuracy_vs_latency.png", dpi=110)
display(Image(filename=str(FIGURES / "digits_accuracy_vs_latency.png")))
qr.plot_amax_by_method(res.ranges[0], title="digits: per-tensor amax by method").savefig(FIGURES / "digits_amax.png", dpi=110)
display(Image(filename=str(FIGURES / "digits_amax.png")))'''),
        new_markdown_cell("## A larger CNN: ResNet-18 (random weights)\n\n"
                          "Defined here in PyTorch with torchvision's architecture (no torchvision CPU build on our "
                          "machines), exported to ONNX, calibrated on 224x224 crops of scikit-image's sample photographs."),
        new_code_cell('''import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return torch.relu(idt + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        chans, layers, cin = [64, 128, 256, 512], [], 64
        for i, c in enumerate(chans):
            layers += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
            cin = c
        self.layers, self.fc = nn.Sequential(*layers), nn.Linear(512, 1000)
    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))

torch.manual_seed(0)
net = ResNet18().eval()
onnx_path = WORK / "resnet18.onnx"
torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(onnx_path), dynamo=False, opset_version=17,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
print(onnx_path, onnx_path.stat().st_size // 2**20, "MiB")'''),
        new_code_cell('''import cv2
from skimage import data
from quantkit.datasets import Preprocess
from quantkit.datasets.preprocess import IMAGENET_MEAN, IMAGENET_STD

rng = np.random.default_rng(0)
pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
count = 64 if SMALL else 320
photos = WORK / "photos"
photos.mkdir()
for i in range(count):
    im = pics[i % len(pics)]
    y, x = rng.integers(0, im.shape[0] - 224), rng.integers(0, im.shape[1] - 224)
    cv2.imwrite(str(photos / f"{i:04d}.png"), cv2.cvtColor(im[y:y + 224, x:x + 224], cv2.COLOR_RGB2BGR))
src = ImageFolder(photos, Preprocess(crop=(224, 224), scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD))
n_cal = count - 32 if SMALL else 256
rcal = quantize(load_model(onnx_path), src, indices=range(n_cal))
(WORK / "resnet_ranges.json").write_text(json.dumps(rcal.ranges_document()))'''),
        new_code_cell('''rresults = WORK / "resnet" / "results"
held = range(n_cal, count)   # the pictures not used for calibration
for method in ("entropy", "minmax", "percentile", "mse"):
    path = save_model(rcal.int8_model(method), WORK / f"resnet18.{method}.onnx")
    rep, stats = evaluate(f"resnet18 {method}", "resnet18 FP32", onnx_path, path, src, "input", rresults,
                          indices=held, iters=3 if SMALL else 8)
    print(f"{method:>10}: agreement {rep.outputs[0].top1_agreement:.4f}  SQNR {rep.outputs[0].sqnr_db:5.2f} dB  {stats.median_ms:.1f} ms")
base = bench_reference("resnet18 FP32", onnx_path, src, "input", rresults, indices=held, iters=3 if SMALL else 8)
print(f"FP32: {base.median_ms:.1f} ms per batch of 32")'''),
        new_code_cell('''rres = qr.load_results([rresults, WORK / "resnet_ranges.json"])
fig = qr.plot_accuracy_latency(qr.accuracy_latency_points(rres),
                               title="ResNet-18 (random weights): agreement with FP32 vs latency (ONNX Runtime, CPU)")
fig.savefig(FIGURES / "resnet18_agreement_vs_latency.png", dpi=110)
display(Image(filename=str(FIGURES / "resnet18_agreement_vs_latency.png")))
qr.plot_output_error(rres.compares, title="ResNet-18: output SQNR against FP32").savefig(FIGURES / "resnet18_sqnr.png", dpi=110)
display(Image(filename=str(FIGURES / "resnet18_sqnr.png")))
qr.write_report(rres, WORK / "resnet_report")  # the same as `quantkit report`: PNG, SVG and one HTML page
print(sorted(p.name for p in (WORK / "resnet_report").iterdir()))'''),
        new_markdown_cell("**Reading the plots.** Pick the method with the best agreement/SQNR at equal latency "
                          "(all four share one graph structure, so their ONNX Runtime latency differs only by "
                          "noise). quantkit's `entropy` is TensorRT's KL method on one-sided tensors and least-MSE "
                          "on two-sided ones; `mse` and `minmax` are close seconds here."),
    ]
    return new_notebook(cells=cells, metadata=METADATA)


def nb02() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell("# 02 · QAT: FP32 vs best PTQ vs quantization-aware training\n\n"
                          "`quantkit.qat.demo.run` trains the digits CNN in FP32, calibrates once and exports a Q/DQ "
                          "model per PTQ method, then fine-tunes the fake-quantized model for a couple of epochs "
                          "(distilling the FP32 model's predictions) and exports it. Every accuracy below is measured "
                          "by ONNX Runtime on the exported ONNX files."),
        new_code_cell(SETUP),
        new_code_cell('''from quantkit.qat.demo import run
from quantkit import report as qr

result = run(WORK / "qat", epochs=4 if SMALL else 40, qat_epochs=1 if SMALL else 2, echo=lambda s: None)
print(result.table())'''),
        new_markdown_cell("The training curve: FP32 epochs, then the QAT epochs (accuracy of the PyTorch fake-quant model)."),
        new_code_cell('''fig = qr.plot_training_curves(result.to_dict())
fig.savefig(FIGURES / "qat_training.png", dpi=110)
display(Image(filename=str(FIGURES / "qat_training.png")))'''),
        new_code_cell('''import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(7, 3.5))
labels = [r.label for r in result.rows]
ax.barh(labels, [100 * r.accuracy for r in result.rows])
ax.set_xlim(100 * min(r.accuracy for r in result.rows) - 1, 100)
ax.set_xlabel("test accuracy, % (ONNX Runtime on the exported models)")
fig.tight_layout()
fig.savefig(FIGURES / "qat_accuracy.png", dpi=110)
display(Image(filename=str(FIGURES / "qat_accuracy.png")))'''),
        new_markdown_cell("On this easy task PTQ already matches FP32, so QAT's job is not to lose anything: fitting "
                          "the labels again moved the test accuracy by a few images either way, while distilling the "
                          "FP32 outputs keeps it and raises the SQNR against FP32 above every PTQ method's."),
    ]
    return new_notebook(cells=cells, metadata=METADATA)


def nb03() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell("# 03 · TensorRT engines: FP32, FP16, INT8 (implicit, explicit Q/DQ, QAT)\n\n"
                          "Each engine is built with `quantkit.backends.tensorrt.builder.build_engine`, compared with "
                          "the FP32 ONNX model and timed with the engine runner (`quantkit bench` does the same). "
                          "Where TensorRT is not installed every TensorRT cell says so and is skipped; the notebook "
                          "still runs to the end, and the ONNX Runtime reference points are measured either way."),
        new_code_cell(SETUP),
        new_code_cell(HELPERS),
        new_code_cell('''from quantkit.backends.tensorrt.load import tensorrt_available
from quantkit import sample, report as qr
from quantkit.datasets import ImageFolder
from quantkit.onnx.model import load_model
from quantkit.onnx.model import save_model
from quantkit.ptq import quantize

HAVE_TRT = tensorrt_available()
print("TensorRT:", "available" if HAVE_TRT else
      "not installed here (our machines cannot install it: PyPI's TensorRT wheels download their libraries "
      "from a host we cannot reach); every TensorRT cell below is skipped")
train = sample.write_image_folder(WORK / "train", "train")
test = sample.write_image_folder(WORK / "test", "test")
pp = sample.preprocess()
cal_src, test_src = ImageFolder(train, pp), ImageFolder(test, pp)
fp32_path = sample.model_path()
cal = quantize(load_model(fp32_path), cal_src, indices=range(256 if SMALL else len(cal_src)))
qdq_path = save_model(cal.int8_model("entropy"), WORK / "digits.int8.onnx")
cache_path = WORK / "calibration.cache"
from quantkit.calibrators.cache import write_cache
write_cache(cache_path, cal.cache("entropy"))'''),
        new_markdown_cell("## ONNX Runtime reference points (always measured)"),
        new_code_cell('''ref_name = "digits FP32"
results = WORK / "results"
rep, stats = evaluate("digits Q-DQ (ORT)", ref_name, fp32_path, qdq_path, test_src, "image", results)
bench_reference(ref_name, fp32_path, test_src, "image", results)
print(f"Q/DQ on ONNX Runtime: accuracy {rep.accuracy_test:.4f} (FP32 {rep.accuracy_reference:.4f}), {stats.median_ms:.2f} ms")'''),
        new_markdown_cell("## TensorRT engines"),
        new_code_cell('''engines = {}   # label -> (engine, FP32 reference ONNX, input name)
if not HAVE_TRT:
    print("skipped: FP32 / FP16 / INT8 (implicit, explicit Q/DQ, QAT) engine builds need TensorRT (not installed here)")
else:
    from quantkit.backends.tensorrt.builder import BuildOptions, build_engine
    from quantkit.backends.tensorrt.calibrator import CalibratorCore
    from quantkit.qat.demo import run as qat_run
    engines["FP32 engine"] = (build_engine(fp32_path, WORK / "fp32.plan", BuildOptions(precision="fp32")).engine, fp32_path, "image")
    try:
        engines["FP16 engine"] = (build_engine(fp32_path, WORK / "fp16.plan", BuildOptions(precision="fp16")).engine, fp32_path, "image")
    except Exception as err:  # TensorRT 11 has no FP16 flag
        print("FP16 skipped:", err)
    engines["INT8 explicit Q/DQ engine"] = (build_engine(qdq_path, WORK / "qdq.plan", BuildOptions()).engine, fp32_path, "image")
    try:
        core = CalibratorCore(Batcher(cal_src, ["image"], 32, last_batch="drop"), 32, cache_path=WORK / "trt.cache")
        engines["INT8 implicit (entropy calibrator) engine"] = (build_engine(
            fp32_path, WORK / "implicit.plan", BuildOptions(precision="int8"), calibrator=core).engine, fp32_path, "image")
    except Exception as err:  # TensorRT 11 removed implicit INT8
        print("implicit INT8 skipped:", err)
    qat = qat_run(WORK / "qat", epochs=4 if SMALL else 40, qat_epochs=1 if SMALL else 2, echo=lambda s: None)
    engines["INT8 QAT engine"] = (build_engine(qat.rows[-1].path, WORK / "qat.plan", BuildOptions()).engine,
                                  qat.rows[0].path, "input")
print(sorted(engines))'''),
        new_code_cell('''if not HAVE_TRT:
    print("skipped: comparing and timing engines needs TensorRT and a GPU")
else:
    from quantkit.backends.tensorrt.runner import TrtRunner
    for label, (plan, reference, name) in engines.items():
        with OrtRunner(reference) as ref, TrtRunner(plan) as eng:
            r = compare_runners(ref, eng, Batcher(test_src, [name], 32), reference_name=ref_name, test_name=label)
            feed = next(iter(Batcher(test_src, [name], 32))).feed
            times = eng.time_device(feed, iterations=200, warmup=50, cuda_graph=True)
        (results / f"compare-{label}.json").write_text(json.dumps(r.to_dict()))
        (results / f"bench-{label}.json").write_text(json.dumps({"model": label, "backend": "tensorrt",
            "median_ms": float(np.median(times)), "batch": 32, "p99_ms": float(np.percentile(times, 99))}))
        print(f"{label}: accuracy {r.accuracy_test:.4f}, {np.median(times):.3f} ms")'''),
        new_code_cell('''res = qr.load_results([results])
title = "digits: accuracy vs latency" + ("" if HAVE_TRT else " (ONNX Runtime only: no TensorRT here)")
fig = qr.plot_accuracy_latency(qr.accuracy_latency_points(res), title=title)
fig.savefig(FIGURES / "engines_accuracy_vs_latency.png", dpi=110)
display(Image(filename=str(FIGURES / "engines_accuracy_vs_latency.png")))'''),
        new_markdown_cell("With TensorRT, expect the INT8 engines well below FP32 latency at the same accuracy, "
                          "explicit Q/DQ (from `quantkit calibrate` or QAT) being the route that also works on "
                          "TensorRT 11. Nothing on this page claims a TensorRT number unless the cells above ran."),
    ]
    return new_notebook(cells=cells, metadata=METADATA)


def nb04() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell("# 04 · Debugging INT8 accuracy: where the error enters, and the fewest layers back in float\n\n"
                          "A model on which plain PTQ clearly loses accuracy (`benchmarks/lossy_models.py`): an 11-conv "
                          "CNN trained on the bundled digits, with one channel of `conv6`'s output made 256x larger and "
                          "`conv7`'s matching weights 256x smaller — the FP32 function is unchanged, but the tensor "
                          "between them now has an outlier channel, as transformers and BN-folded CNNs do. quantkit's "
                          "default (pointwise equalization: the channels of a tensor read by a 1x1 or 3x3 Conv scaled "
                          "to one range, the Conv's weights divided to match) resolves this one by itself; the PTQ "
                          "without it stands for a loss the default leaves. Then: the layer-wise error (`quantkit debug`), the sensitivity ranking, and the budgeted fallback "
                          "(`quantkit calibrate --max-drop`), with accuracy against the number of groups in float."),
        new_code_cell(SETUP),
        new_code_cell('''import sys
sys.path.insert(0, "benchmarks")
from lossy_models import outlier_cnn, digits_npz   # the benchmark's model builder (trains once, ~20 s)
from quantkit.datasets import NumpySource
from quantkit.onnx.model import load_model
from quantkit.ptq import QuantizeConfig, StatsConfig, quantize

model = load_model(outlier_cnn())
train = NumpySource(digits_npz(WORK / "train.npz", "train", limit=256))
test = NumpySource(digits_npz(WORK / "test.npz", "test", limit=256 if SMALL else None))
default = quantize(model, train).evaluate(test)   # one pass, every method; entropy by default
NO_PW = dict(equalize_pointwise=False)            # the PTQ to debug: without pointwise equalization
cal = quantize(model, train, QuantizeConfig(stats=StatsConfig(**NO_PW)))
plain = cal.evaluate(test)
print(f"FP32 accuracy {100 * plain.accuracy_reference:.2f}%; INT8 (entropy) with quantkit's default "
      f"{100 * default.accuracy_test:.2f}%, without pointwise equalization {100 * plain.accuracy_test:.2f}% "
      f"on {len(test)} held-out digits")'''),
        new_markdown_cell("## Where does the error enter?\n\n`layerwise_error` runs the FP32 and the Q/DQ model side by "
                          "side and, at every quantized tensor, measures the error that pair adds on its own (local) and "
                          "the error accumulated from everything upstream. The local SQNR is lowest at the outlier "
                          "tensor, and the accumulated SQNR collapses right after it."),
        new_code_cell('''from quantkit import report as qr
from quantkit.debug import layerwise_error
from quantkit.ptq import RunConfig, evaluation_batches

dbg = layerwise_error(cal.model, cal.int8_model(), evaluation_batches(test, cal.specs, range(len(test)), RunConfig()),
                      test_name="outlier_cnn.int8")
print(dbg.table(6))
fig = qr.plot_error_along_depth(dbg.to_dict()["layerwise"])
fig.savefig(FIGURES / "outlier_cnn_error_along_depth.png", dpi=110)
display(Image(filename=str(FIGURES / "outlier_cnn_error_along_depth.png")))'''),
        new_markdown_cell("## Which groups matter?\n\nEvery quantization group (the Q/DQ pairs that go back to float "
                          "together: an op's activation and weight, shared-scale groups) is ranked by the output error "
                          "when only that group is left in float, on the 32 samples where INT8 and FP32 differ most."),
        new_code_cell('''from quantkit.debug.sensitivity import quant_groups, rank_sensitivity

groups = quant_groups(cal.model, cal.plan)
ranking = rank_sensitivity(cal, test, range(len(test)), subset=32)
print(f"{len(groups)} groups; ranking cost {ranking.cost_fp32_passes:.2f} FP32-pass equivalents, {ranking.seconds:.1f} s")
print(ranking.table(6))'''),
        new_markdown_cell("## Fallback to a 0.5-point budget\n\nThe worst groups first try their best method, then "
                          "groups go back to float in sensitivity order, each step re-validated on the held-out data, "
                          "until the budget holds."),
        new_code_cell('''import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from quantkit.debug.fallback import FallbackConfig, fallback

res = fallback(cal, test, range(len(test)), FallbackConfig(max_drop=0.5, drop_metric="accuracy"))
print(f"budget met: {res.met}; groups in float: {res.float_groups} of {res.num_groups}; "
      f"method switches: {res.method_overrides or 'none'}; drop {res.drop_before:.2f} -> {res.drop_after:.2f} points; "
      f"{res.seconds:.1f} s")
floats, xs, ys = set(), [], []
for s in res.steps:            # accuracy after each step against the groups then in float
    if s["action"] == "float":
        floats.update(s["groups"])
    elif s["action"] == "int8 again" and s.get("kept"):
        floats.difference_update(s["groups"])
    print(f"  step {s['step']}: {s['action']:<10} {','.join(s['groups'])[:40]:<40} drop {s['drop']:6.2f}  {s['seconds']:.2f} s")
    xs.append(len(floats)); ys.append(100 * plain.accuracy_reference - s["drop"])   # drop: points of accuracy
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(xs, ys, marker="o")
ax.axhline(100 * plain.accuracy_reference - 0.5, ls="--", color="grey", label="FP32 - 0.5 points")
ax.set_xticks(range(max(xs) + 1))
ax.set_xlabel("groups in float"); ax.set_ylabel("held-out accuracy, %"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title("the fallback's steps (method switches at 0 groups in float)")
fig.tight_layout()
fig.savefig(FIGURES / "outlier_cnn_fallback.png", dpi=110)
display(Image(filename=str(FIGURES / "outlier_cnn_fallback.png")))'''),
        new_markdown_cell("## Accuracy against the number of groups in float, in ranking order\n\nThe k most sensitive "
                          "groups excluded (`--exclude` with their nodes: no Q/DQ, float in TensorRT), the rest "
                          "calibrated as usual, for every k."),
        new_code_cell('''import re
from quantkit.ptq import QuantizeConfig, StatsConfig

by_name = {g.name: g for g in groups}
order = [r.name for r in ranking.rows]
ks = list(range(0, len(order) + 1, 3 if SMALL else 1))
accs = []
for k in ks:
    nodes = tuple(re.escape(n) for name in order[:k] for n in by_name[name].nodes)   # patterns: names escaped
    if k == len(order):
        accs.append(100 * plain.accuracy_reference)   # everything in float: the FP32 model
        continue
    c = quantize(model, train, QuantizeConfig(stats=StatsConfig(exclude=nodes, **NO_PW)))
    accs.append(100 * c.evaluate(test).accuracy_test)
    print(f"{k:2d} in float{f' (+ {order[k - 1]})' if k else ''}: {accs[-1]:.2f}%")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ks, accs, marker="o")
ax.axhline(100 * plain.accuracy_reference - 0.5, ls="--", color="grey", label="FP32 - 0.5 points")
ax.set_xlabel("most sensitive groups in float"); ax.set_ylabel("held-out accuracy, %"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title(f"accuracy vs groups in float ({len(order)} groups)")
fig.tight_layout()
fig.savefig(FIGURES / "outlier_cnn_accuracy_vs_float_groups.png", dpi=110)
display(Image(filename=str(FIGURES / "outlier_cnn_accuracy_vs_float_groups.png")))'''),
        new_markdown_cell("One group in float (`conv7`: the outlier tensor and the weight that reads it) restores FP32 "
                          "accuracy; every other layer stays INT8. In TensorRT 10/11 an op without Q/DQ in an explicitly "
                          "quantized network runs in FP16/FP32. `benchmarks/debug_fallback.py` measures the same "
                          "against NNCF's `quantize_with_accuracy_control`."),
    ]
    return new_notebook(cells=cells, metadata=METADATA)


NOTEBOOKS = {"01_ptq_calibrators.ipynb": nb01, "02_qat.ipynb": nb02, "03_tensorrt_engines.ipynb": nb03,
             "04_debug_accuracy.ipynb": nb04}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small settings (as the tests run them)")
    ap.add_argument("--only", default=None, help="one notebook file name")
    args = ap.parse_args()
    NB.mkdir(exist_ok=True)
    env_small = "1" if args.small else "0"
    os.environ["QUANTKIT_NB_SMALL"] = env_small
    os.environ["QUANTKIT_NB_FIGURES"] = str(ROOT / "docs" / "figures")
    for name, make in NOTEBOOKS.items():
        if args.only and name != args.only:
            continue
        nb = make()
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        nbformat.write(nb, NB / name)
        print("executed and wrote", NB / name, file=sys.stderr)


if __name__ == "__main__":
    main()
