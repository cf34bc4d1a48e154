"""The corpus's own plumbing, without any wheel: the cache location and the task metrics."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.realmodels import corpus, metrics


def test_wheel_cache_dir_from_env(tmp_path):
    assert corpus.wheel_cache_dir({}) == corpus.REPO / ".cache" / "wheels"
    assert corpus.wheel_cache_dir({corpus.CACHE_ENV: "  "}) == corpus.REPO / ".cache" / "wheels"
    assert corpus.wheel_cache_dir({corpus.CACHE_ENV: str(tmp_path)}) == tmp_path


def test_missing_wheel_says_how_to_fetch(tmp_path):
    with pytest.raises(corpus.WheelMissing, match=r"pip download --no-deps --ignore-requires-python rapidocr-onnxruntime==1\.4\.4"):
        corpus.find_wheel(corpus.RAPIDOCR, tmp_path)


def test_unpacked_once_and_importable(tmp_path, monkeypatch):
    wheel = corpus.Wheel("toy-pkg", "1.0", "toy_pkg")
    with zipfile.ZipFile(tmp_path / "toy_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("toy_pkg/__init__.py", "VALUE = 7\n")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    root = corpus.unpacked(wheel, tmp_path)
    assert (root / ".complete").exists() and (root / "toy_pkg" / "__init__.py").read_text() == "VALUE = 7\n"
    (root / "toy_pkg" / "__init__.py").write_text("VALUE = 8\n")  # a second call does not unpack again
    assert corpus.unpacked(wheel, tmp_path) == root
    assert (root / "toy_pkg" / "__init__.py").read_text() == "VALUE = 8\n"


def test_box_f1_against_hand_counts():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 4, 4]])]
    pred = [np.array([[1, 1, 10, 10], [50, 50, 60, 60]]), np.zeros((0, 4))]
    # image 1: one match (IoU 0.81), one false positive, one miss; image 2: one miss -> tp 1, 2 pred, 3 true
    assert metrics.box_f1(pred, truth) == pytest.approx(100 * 2 * 1 / 5)
    # a box at IoU 0.47 is no match
    assert metrics.box_f1([np.array([[0, 0, 10, 4.7]])], [np.array([[0, 0, 10, 10]])]) == 0.0
    # one prediction cannot match two references
    assert metrics.box_f1([np.array([[0, 0, 10, 10]])], [np.array([[0, 0, 10, 10], [0, 0, 10, 10]])]) == \
        pytest.approx(100 * 2 / 3)


def test_box_f1_with_labels_matches_same_label_only():
    box = np.array([[0, 0, 10, 10]])
    assert metrics.box_f1([box], [box], predicted_labels=[["text"]], true_labels=[["text"]]) == 100.0
    assert metrics.box_f1([box], [box], predicted_labels=[["title"]], true_labels=[["text"]]) == 0.0
    two = np.array([[0, 0, 10, 10], [0, 0, 10, 9]])
    # the better-overlapping box has the wrong label: the other one matches
    assert metrics.box_f1([two], [box], predicted_labels=[["title", "text"]], true_labels=[["text"]]) == \
        pytest.approx(100 * 2 / 3)


def test_exact_match_accuracy_sqnr_cosine():
    assert metrics.exact_match(["ab c", "x"], ["abc", "y"]) == 50.0
    assert metrics.accuracy(["0", "180", "0"], ["0", "0", "0"]) == pytest.approx(200 / 3)
    ref = np.array([3.0, 4.0])
    assert metrics.sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert metrics.mean_cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [2.0, 2.0]])) == \
        pytest.approx(50.0)
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])
