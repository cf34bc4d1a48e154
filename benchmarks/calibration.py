"""Calibration speed, memory and accuracy: quantkit vs ONNX Runtime's quantize_static.

    pip install torch==2.13.0 && pip install -e '.[test]'
    python benchmarks/calibration.py [--quick] [--out benchmarks/results/calibration.md]

Model: ResNet-18 with torchvision's architecture, defined below (random initialisation, so
speed and agreement only, no task accuracy), exported to ONNX opset 17 with dynamic batch.
Data: 224x224 crops (seeded) of scikit-image's bundled sample pictures, written as PNG files,
so every run decodes real images. Every configuration runs in a fresh child process (so its
peak resident memory is its own) with the same ONNX Runtime session options and the same
decoding; this process prints one table. Also the bundled digits sample.

Ratios are wall time divided by one plain FP32 ONNX Runtime inference pass over the same
images (decode + preprocess + inference), the floor any calibration must pay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
DATA = HERE / "data"
BATCH = 32


# ---------------------------------------------------------------- model and data
def resnet18_onnx() -> Path:
    """torchvision's ResNet-18 architecture (BasicBlock [2, 2, 2, 2]), random init, opset 17."""
    path = MODELS / "resnet18.onnx"
    if path.exists():
        return path
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + idt)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 1000)
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    model = ResNet18().eval()
    MODELS.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def photo_folder(count: int, seed: int = 0) -> Path:
    """``count`` 224x224 crops of scikit-image's sample pictures as PNG files (made once)."""
    folder = DATA / f"photos_{count}_{seed}"
    if folder.exists() and len(list(folder.glob("*.png"))) == count:
        return folder
    import cv2
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "motorcycle_left", "cat", "retina", "colorwheel", "logo", "page", "camera", "moon", "coins"]
    pics = []
    for n in names:
        try:
            img = getattr(data, n)()
        except Exception:  # a picture missing from this scikit-image version
            continue
        img = img[..., :3] if img.ndim == 3 else np.dstack([img] * 3)
        if min(img.shape[:2]) >= 224:
            pics.append(np.ascontiguousarray(img[..., ::-1]))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = pics[i % len(pics)]
        y, x = rng.integers(0, img.shape[0] - 223), rng.integers(0, img.shape[1] - 223)
        crop = img[y : y + 224, x : x + 224]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        cv2.imwrite(str(folder / f"{i:05d}.png"), np.ascontiguousarray(crop))
    return folder


# ---------------------------------------------------------------- child-process jobs
def _source(folder: Path, preprocess: dict | None):
    from quantkit.datasets import ImageFolder, Preprocess
    from quantkit.datasets.preprocess import IMAGENET_MEAN, IMAGENET_STD

    spec = Preprocess.from_dict(preprocess) if preprocess else Preprocess(
        crop=(224, 224), scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return ImageFolder(folder, spec)


def job_fp32(args: dict) -> dict:
    from quantkit.backends.onnxruntime import create_session
    from quantkit.datasets import Batcher

    src = _source(Path(args["images"]), args.get("preprocess"))
    sess = create_session(args["model"])
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    for b in Batcher(src, [name], BATCH):
        sess.run(None, b.feed)
    return {"seconds": time.perf_counter() - t0}


def job_quantkit(args: dict) -> dict:
    """What `quantkit calibrate` writes (the entropy Q/DQ model, calibration.cache, ranges.json
    with every method's amax) is timed; the other methods' Q/DQ models, needed only for the
    accuracy table below, are made from the same pass after the clock stops."""
    from quantkit.onnx.model import load_model, save_model
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig, quantize

    src = _source(Path(args["images"]), args.get("preprocess"))
    out = Path(args["out"])
    target = args.get("target", "tensorrt")
    t0 = time.perf_counter()
    model = load_model(args["model"])
    cal = quantize(model, src, QuantizeConfig(StatsConfig(target=target), RunConfig(batch_size=BATCH)))
    cal.save(out, model_stem="model", force=True)
    seconds = time.perf_counter() - t0
    paths = {"entropy": str(out / "model.int8.onnx")}
    if target == "tensorrt":
        for m in ("minmax", "percentile", "mse"):
            paths[m] = str(save_model(cal.int8_model(m), out / f"model.{m}.int8.onnx"))
    return {"seconds": seconds, "models": paths}


def job_ort(args: dict) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from quantkit.datasets import Batcher

    src = _source(Path(args["images"]), args.get("preprocess"))
    name = args["input_name"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(Batcher(src, [name], BATCH))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else b.feed

    method = args["method"]
    out = args["out"]
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                  weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if method == "Entropy-2048":
            calib = create_calibrator(args["model"], None, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                      calibrate_method=CalibrationMethod.Entropy,
                                      extra_options={"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True})
            calib.collect_data(Reader())
            cache = Path(tmp) / "cache.json"
            save_tensors_data(calib.compute_data(), cache)
            quantize_static(args["model"], out, None, calibration_cache_path=cache,
                            calibrate_method=CalibrationMethod.Entropy, **common)
        else:
            quantize_static(args["model"], out, Reader(), calibrate_method=getattr(CalibrationMethod, method), **common)
    return {"seconds": time.perf_counter() - t0, "models": {method: out}}


def job_eval(args: dict) -> dict:
    """Agreement / SQNR / accuracy of each INT8 model against FP32, and latency at batch 1 and 32."""
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.bench import measure_latency
    from quantkit.compare import compare_runners
    from quantkit.datasets import Batcher

    src = _source(Path(args["images"]), args.get("preprocess"))
    ref = OrtRunner(args["model"])
    name = ref.input_specs[0].name
    batch32 = next(iter(Batcher(src, [name], BATCH))).feed
    batch1 = {name: batch32[name][:1]}
    out = {}
    paths = dict([("fp32", args["model"]), *args["models"].items()])
    for label, path in paths.items():
        row = out[label] = {}
        if label != "fp32":
            with OrtRunner(path) as q:
                rep = compare_runners(ref, q, Batcher(src, [name], BATCH))
            o = rep.outputs[0]
            row.update(agreement=o.top1_agreement, sqnr_db=o.sqnr_db, cosine=o.cosine_mean,
                       accuracy=rep.accuracy_test, accuracy_fp32=rep.accuracy_reference)
    ref.close()
    del ref
    if args.get("latency", True):
        # rounds over the models, one live session at a time: an idle ONNX Runtime session's
        # spinning threads would otherwise steal the 2 cores from the one being timed; the
        # rounds spread the machine's drift over every model; the median of all runs is kept
        import gc

        iters = args.get("iters", 30)
        samples: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b32": []} for k in paths}
        for _ in range(5):
            for label, path in paths.items():
                q = OrtRunner(path)
                samples[label]["b1"] += [measure_latency(q, batch1, warmup=3, iterations=max(3, iters // 5)).median_ms]
                samples[label]["b32"] += [measure_latency(q, batch32, warmup=1, iterations=max(1, iters // 15)).median_ms]
                q.close()
                del q
                gc.collect()
        for label in paths:
            out[label]["lat_b1_ms"] = float(np.median(samples[label]["b1"]))
            out[label]["lat_b32_ms"] = float(np.median(samples[label]["b32"]))
    return out


JOBS = {"fp32": job_fp32, "quantkit": job_quantkit, "ort": job_ort, "eval": job_eval}


def run_child(job: str, **args) -> dict:
    """Run one job in a fresh interpreter; returns its result plus peak RSS (MiB)."""
    proc = subprocess.run([sys.executable, __file__, "--child", job, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(job: str, payload: str) -> None:
    result = JOBS[job](json.loads(payload))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# ---------------------------------------------------------------- the table
def bench_model(label: str, model: Path, calib: Path, evalset: Path, *, preprocess: dict | None, input_name: str,
                sizes: dict[int, Path], lines: list[str], work: Path, with_ort: bool) -> None:
    pp = {"preprocess": preprocess}
    n0 = min(sizes)
    fp32 = run_child("fp32", model=str(model), images=str(calib), **pp)
    base = fp32["seconds"]
    lines.append(f"\n### {label}: {n0} images, batch {BATCH}\n")
    lines.append(f"plain FP32 ONNX Runtime pass (decode + preprocess + inference): {base:.2f} s, "
                 f"peak RSS {fp32['peak_rss_mib']:.0f} MiB\n")
    lines.append("| calibration | wall s | × FP32 pass | peak RSS MiB | × FP32 RSS |")
    lines.append("|---|---|---|---|---|")
    qk = run_child("quantkit", model=str(model), images=str(calib), out=str(work / f"{label}-qk"), **pp)
    lines.append(f"| quantkit, all 4 methods from one pass + artifacts (`quantkit calibrate`) | {qk['seconds']:.2f} | {qk['seconds'] / base:.2f} | "
                 f"{qk['peak_rss_mib']:.0f} | {qk['peak_rss_mib'] / fp32['peak_rss_mib']:.2f} |")
    models = {f"quantkit {m}": p for m, p in qk["models"].items()}
    qo = run_child("quantkit", model=str(model), images=str(calib), out=str(work / f"{label}-qk-ort"),
                   target="onnxruntime", **pp)
    lines.append(f"| quantkit `--target onnxruntime` (Q/DQ on every activation) | {qo['seconds']:.2f} | "
                 f"{qo['seconds'] / base:.2f} | {qo['peak_rss_mib']:.0f} | {qo['peak_rss_mib'] / fp32['peak_rss_mib']:.2f} |")
    models["quantkit entropy, --target onnxruntime"] = qo["models"]["entropy"]
    ort_times = {}
    if with_ort:
        for method in ("Entropy", "Entropy-2048", "MinMax", "Percentile"):
            r = run_child("ort", model=str(model), images=str(calib), input_name=input_name, method=method,
                          out=str(work / f"{label}-ort-{method}.onnx"), **pp)
            ort_times[method] = r["seconds"]
            models[f"ORT {method}"] = r["models"][method]
            lines.append(f"| ONNX Runtime quantize_static {method} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / fp32['peak_rss_mib']:.2f} |")
        for m in ("Entropy", "Entropy-2048"):
            lines.append(f"\nquantkit (all methods) is {ort_times[m] / qk['seconds']:.1f}x faster than ONNX Runtime {m}.")
    if len(sizes) > 1:
        lines.append("\n| images | quantkit wall s | × FP32 pass at that size | peak RSS MiB |")
        lines.append("|---|---|---|---|")
        rss = {}
        for n, folder in sorted(sizes.items()):
            f = base if n == n0 else run_child("fp32", model=str(model), images=str(folder), **pp)["seconds"]
            r = qk if n == n0 else run_child("quantkit", model=str(model), images=str(folder), out=str(work / f"{label}-qk{n}"), **pp)
            rss[n] = r["peak_rss_mib"]
            lines.append(f"| {n} | {r['seconds']:.2f} | {r['seconds'] / f:.2f} | {r['peak_rss_mib']:.0f} |")
        lines.append(f"\npeak RSS growth {min(sizes)} -> {max(sizes)} images: {100 * (rss[max(sizes)] / rss[min(sizes)] - 1):+.1f}%")
    ev = run_child("eval", model=str(model), images=str(evalset), models=models, **pp)
    lines.append(f"\nINT8 vs FP32 on {label} held-out images (ONNX Runtime CPU; latency = median ms)\n")
    lines.append("| model | accuracy | top-1 agreement | cosine | SQNR dB | batch 1 ms | batch 32 ms |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, row in ev.items():
        if name == "peak_rss_mib":
            continue
        acc = "-" if row.get("accuracy") is None else f"{row['accuracy']:.4f}"
        if name == "fp32":
            acc = "-" if ev[next(k for k in ev if k not in ('fp32', 'peak_rss_mib'))].get("accuracy_fp32") is None else \
                f"{ev[next(k for k in ev if k not in ('fp32', 'peak_rss_mib'))]['accuracy_fp32']:.4f}"
            lines.append(f"| FP32 | {acc} | - | - | - | {row['lat_b1_ms']:.2f} | {row['lat_b32_ms']:.2f} |")
            continue
        lines.append(f"| {name} | {acc} | {row['agreement']:.4f} | {row['cosine']:.5f} | {row['sqnr_db']:.2f} | "
                     f"{row['lat_b1_ms']:.2f} | {row['lat_b32_ms']:.2f} |")
    if "ORT MinMax" in ev:
        ort_row = ev["ORT MinMax"]
        lines.append("")
        for name in ("quantkit entropy", "quantkit entropy, --target onnxruntime"):
            qk_row = ev[name]
            lines.append(f"{name} INT8 latency / quantize_static MinMax INT8 latency: batch 1 "
                         f"{qk_row['lat_b1_ms'] / ort_row['lat_b1_ms']:.2f}, batch 32 "
                         f"{qk_row['lat_b32_ms'] / ort_row['lat_b32_ms']:.2f} (at most 1: as fast or faster)  ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images, no memory-growth runs (smoke test)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantize_static")
    ap.add_argument("--out", default=str(HERE / "results" / "calibration.md"))
    args = ap.parse_args()
    n = 64 if args.quick else 256
    lines = [f"# Calibration benchmark\n\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, onnxruntime "
             f"{__import__('onnxruntime').__version__}, `python benchmarks/calibration.py{' --quick' if args.quick else ''}`"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from quantkit import sample

        dig = work / "digits"
        sample.write_image_folder(dig / "train", "train")
        sample.write_image_folder(dig / "test", "test")
        # ONNX Runtime's histogram calibrators cannot take a short last batch: use 39 x 32 images
        for extra in sorted((dig / "train").rglob("*.png"))[1248:]:
            extra.unlink()
        bench_model("digits sample", sample.model_path(), dig / "train", dig / "test",
                    preprocess=sample.preprocess().to_dict(), input_name="image", sizes={1248: dig / "train"},
                    lines=lines, work=work, with_ort=not args.no_ort)
        model = resnet18_onnx()
        sizes = {n: photo_folder(n)} if args.quick else {s: photo_folder(s) for s in (256, 1024, 2048)}
        bench_model("ResNet-18", model, sizes[n], photo_folder(64, seed=1), preprocess=None, input_name="input",
                    sizes=sizes, lines=lines, work=work, with_ort=not args.no_ort)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
