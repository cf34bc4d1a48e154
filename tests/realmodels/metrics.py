"""Task metrics of the corpus, each simple enough to check by hand (tests/realmodels/test_metrics.py)."""
from __future__ import annotations

import numpy as np


def exact_match(predicted: list[str], truth: list[str]) -> float:
    """Percent of strings recognised exactly (spaces ignored: CTC decoders differ on them)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} references")
    hits = sum(p.replace(" ", "") == t.replace(" ", "") for p, t in zip(predicted, truth))
    return 100.0 * hits / max(1, len(truth))


def accuracy(predicted: list, truth: list) -> float:
    """Percent of equal labels."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} references")
    return 100.0 * sum(p == t for p, t in zip(predicted, truth)) / max(1, len(truth))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of axis-aligned boxes x0 y0 x1 y1."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def box_f1(predicted: list[np.ndarray], truth: list[np.ndarray], iou: float = 0.5, *,
           predicted_labels: list[list[str]] | None = None, true_labels: list[list[str]] | None = None) -> float:
    """Detection F1 (percent) over images: greedy one-to-one matching by IoU >= ``iou`` (and,
    with labels given, only between boxes of the same label)."""
    tp = n_pred = n_true = 0
    for k, (p, t) in enumerate(zip(predicted, truth, strict=True)):
        p, t = np.asarray(p).reshape(-1, 4), np.asarray(t).reshape(-1, 4)
        n_pred, n_true = n_pred + len(p), n_true + len(t)
        if not len(p) or not len(t):
            continue
        m = box_iou(p, t)
        if predicted_labels is not None and true_labels is not None:
            same = np.equal.outer(np.asarray(predicted_labels[k], object), np.asarray(true_labels[k], object))
            m = np.where(same, m, -1.0)
        while True:
            i, j = np.unravel_index(np.argmax(m), m.shape)
            if m[i, j] < iou:
                break
            tp += 1
            m[i, :], m[:, j] = -1.0, -1.0
    if n_pred + n_true == 0:
        return 100.0
    return 100.0 * 2 * tp / (n_pred + n_true)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    ref, err = np.asarray(reference, np.float64), np.asarray(reference, np.float64) - np.asarray(test, np.float64)
    noise = float(np.sum(err * err))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(ref * ref)) / noise)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity (percent) of matching rows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 100.0 * float(np.mean(num / np.maximum(den, 1e-12)))
