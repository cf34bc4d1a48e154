"""`calibrate --images` says the preprocessing it applied: a flag replaces one value of the preset
(--scale alone keeps ImageNet's mean/std, which fed a probe's gray text detector values in [-2, 2.4]
where it expected [0, 1])."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main


def _model(path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                           helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 30, 30])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_calibrate_prints_the_preprocessing(tmp_path, capsys):
    _model(tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        cv2.imwrite(str(tmp_path / "imgs" / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for extra, want in ((["--scale", "0.00392157"], "x 0.003922, mean 0.485,0.456,0.406, std 0.229,0.224,0.225"),
                        (["--preprocess", "none", "--resize", "32", "--crop", "32", "--scale", "0.00392157"],
                         "x 0.003922, mean 0, std 1"),
                        # the preset's R,G,B mean and std follow the channels to a BGR model; given ones are its own
                        (["--color", "bgr"], "bgr, x 0.003922, mean 0.406,0.456,0.485, std 0.225,0.224,0.229"),
                        (["--color", "bgr", "--mean", "0.1,0.2,0.3"], "bgr, x 0.003922, mean 0.1,0.2,0.3, std 0.225,")):
        assert main(["calibrate", str(tmp_path / "m.onnx"), "--images", str(tmp_path / "imgs"), "-o",
                     str(tmp_path / "out"), "--force", "--eval-images", "0", "--no-progress", *extra]) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if ln.startswith("preprocessing: "))
        assert want in line, line
