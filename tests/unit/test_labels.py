"""Labels and class folders: where accuracy comes from (found by a probe of the labelled paths).

Numbered class folders past 9 are taken in text order, as torchvision's ImageFolder takes them,
and that is now said; an empty class folder or a stray image beside the class folders is named;
--eval-dir's --eval-images spreads over its classes (it took the first files: the first classes);
held-out images whose classes do not match the model are refused for an accuracy budget as
--eval-dir's are; labels score the output whose classes they are (features written first took
the accuracy); labels covering some classes score those; an output of one value a sample has no
argmax and no accuracy."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from quantkit import sample
from quantkit.cli import main
from quantkit.datasets import NumpySource, scan_images
from quantkit.datasets.classes import check_classes, label_output
from quantkit.errors import DatasetError
from quantkit.onnx.model import TensorSpec
from tests.helpers import DIGITS


def _folders(root, names, per=2, loose=0):
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per):
            cv2.imwrite(str(root / name / f"{k}.png"), np.full((32, 32), 10 * i + k, np.uint8))
    for k in range(loose):
        cv2.imwrite(str(root / f"loose{k}.png"), np.zeros((8, 8), np.uint8))
    return root


def test_numbered_class_folders_past_nine_are_said_to_be_in_text_order(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, labels, classes = scan_images(_folders(tmp_path / "a", [str(i) for i in range(12)]))
    assert classes[:4] == ["0", "1", "10", "11"]  # torchvision's ImageFolder order, kept
    said = [r.getMessage() for r in caplog.records if "text order" in r.getMessage()]
    assert len(said) == 1 and "folder '2' is class 4, not 2" in said[0] and "00, 01" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scan_images(_folders(tmp_path / "b", [f"{i:02d}" for i in range(12)]))  # zero-padded: the same either way
        scan_images(_folders(tmp_path / "c", [str(i) for i in range(10)]))
    assert not caplog.records


def test_an_empty_class_folder_and_loose_images_are_named(tmp_path, caplog):
    root = _folders(tmp_path / "a", ["0", "1", "3"])
    (root / "2").mkdir()
    with caplog.at_level(logging.WARNING):
        _, labels, classes = scan_images(root)
    assert classes == ["0", "1", "3"]
    assert any("'2' hold no image" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, labels, _ = scan_images(_folders(tmp_path / "b", ["0", "1"], loose=1))
    assert labels is None and any("loose0.png" in r.getMessage() and "no labels" in r.getMessage()
                                  for r in caplog.records)


def test_a_uint64_label_too_large_is_not_called_negative(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), labels=np.array([1, 2**63 + 5], np.uint64))
    with pytest.raises(DatasetError, match="too large"):
        NumpySource(tmp_path / "d.npz").label(0)


class _Folder:  # what check_classes reads of an image folder
    def __init__(self, classes):
        self.classes, self.labels, self.root = classes, list(range(len(classes))), "f"


class _Labels:  # of an .npz
    def __init__(self, labels):
        self.labels = np.asarray(labels)


def test_labels_score_the_output_whose_classes_they_are():
    outs = [TensorSpec("features", (None, 32), np.dtype(np.float32)), TensorSpec("logits", (None, 12), np.dtype(np.float32))]
    twelve = _Folder([chr(ord("a") + i) for i in range(12)])
    assert label_output(twelve, outs) == "logits" and check_classes(twelve, outs) is None
    assert label_output(twelve, outs, "features") == "features" and check_classes(twelve, outs, "features")
    assert label_output(_Folder(["a", "b"]), outs) == "features"  # nothing matches: the first, and its warning


def test_labels_that_cover_some_classes_are_scored_and_one_value_has_no_argmax(caplog):
    outs = [TensorSpec("y", (None, 12), np.dtype(np.float32))]
    with caplog.at_level(logging.WARNING):
        assert check_classes(_Labels([0, 3, 4, 3]), outs) is None  # said, not refused
        assert check_classes(_Folder([str(i) for i in range(10)]), outs) is None  # folders 0..9 of 12
    assert sum("covers those classes only" in r.getMessage() for r in caplog.records) == 2
    assert check_classes(_Labels([0, 12]), outs)  # a label past the classes: meaningless
    assert check_classes(_Folder(["a", "b", "c"]), outs)
    assert "one value a sample" in check_classes(_Labels([0, 1]), [TensorSpec("p", (None, 1), np.dtype(np.float32))])


def _sigmoid_model():
    g = h.make_graph([h.make_node("Flatten", ["image"], ["f"]), h.make_node("MatMul", ["f", "w"], ["m"]),
                      h.make_node("Sigmoid", ["m"], ["p"])], "bin",
                     [h.make_tensor_value_info("image", T.FLOAT, ["N", 1, 32, 32])],
                     [h.make_tensor_value_info("p", T.FLOAT, ["N", 1])],
                     [nh.from_array(np.random.default_rng(0).normal(0, 0.01, (1024, 1)).astype(np.float32), "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def test_an_output_of_one_value_gets_no_accuracy(tmp_path):
    """argmax over one column is always 0: the 'accuracy' was the share of samples labelled 0."""
    onnx.save(_sigmoid_model(), tmp_path / "m.onnx")
    root = _folders(tmp_path / "d", ["0", "1"], per=4)
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--images", str(root), *DIGITS,
                 "--json", str(tmp_path / "c.json")]) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["accuracy_reference"] is None


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    return sample.write_image_folder(d / "train", "train"), sample.write_image_folder(d / "test", "test")


def test_eval_dir_images_are_spread_over_its_classes(digits_dirs, tmp_path, monkeypatch):
    """--eval-images 40 of --eval-dir took its first 40 files: classes 0 and 1 only."""
    from quantkit.ptq import Calibration

    seen = {}
    real = Calibration.evaluate

    def spy(self, source, indices=None, **kw):
        seen["labels"] = {source.label(i) for i in indices}
        return real(self, source, indices, **kw)

    monkeypatch.setattr(Calibration, "evaluate", spy)
    train, test = digits_dirs
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "--num-images", "64", "--eval-dir",
                 str(test), "--eval-images", "40", "--method", "minmax", *DIGITS, "-o", str(tmp_path / "o")]) == 0
    assert seen["labels"] == set(range(10))


def test_an_accuracy_budget_on_held_out_images_whose_classes_do_not_match_is_refused(digits_dirs, tmp_path, capsys):
    """With --eval-dir it was refused; with held-out images of --images it ran and was met."""
    import shutil

    train, _ = digits_dirs
    nine = tmp_path / "nine"
    shutil.copytree(train, nine)
    shutil.rmtree(nine / "5")  # folders 6..9 read as classes 5..8
    rc = main(["calibrate", str(sample.model_path()), "--images", str(nine), "--num-images", "64", "--max-drop", "0.5",
               "--drop-metric", "accuracy", *DIGITS, "-o", str(tmp_path / "o")])
    assert rc == 2 and "--max-drop would budget on it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
