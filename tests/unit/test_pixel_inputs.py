"""Image models with preprocessing inside: uint8 pixel inputs, and channels-last (NHWC) inputs.

TensorFlow/Keras exports often take uint8 [N, H, W, 3] and normalize in the graph (a Cast, a
Mul and an Add); `--images` refused every non-float input ("token ids, masks"), and an NHWC
input needed `--layout nhwc`. A 4-D uint8 input now gets the images as 0-255 pixels (resized
and cropped only), and the layout follows the input's static channel dim when --layout is not
given.
"""

import logging

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main
from quantkit.datasets.preprocess import Preprocess


def _model(dtype: int) -> onnx.ModelProto:
    """x [N, 40, 40, 3] (uint8 or float) -> Cast -> x/127.5 - 1 -> NCHW -> Conv -> Relu -> GAP -> MatMul."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1 / 127.5], np.float32), "sc"),
             numpy_helper.from_array(np.array([-1.0], np.float32), "of"),
             numpy_helper.from_array(r.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(r.normal(0, 0.3, (8, 10)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["f", "sc"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "of"], ["a"], name="add"),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2], name="nchw"),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["fl"], name="flat"),
             helper.make_node("MatMul", ["fl", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "pixels", [helper.make_tensor_value_info("img", dtype, ["N", 40, 40, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat"):
        im = getattr(data, name)()
        im = im if im.ndim == 3 else np.stack([im] * 3, -1)
        cv2.imwrite(str(folder / f"{name}.png"), im[:, :, ::-1])
    return folder


def test_uint8_preprocessing_gives_rounded_pixels():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = Preprocess(resize=40, crop=(40, 40), layout="nhwc", dtype="uint8").apply(img)
    ref = Preprocess(resize=40, crop=(40, 40), layout="nhwc").apply(img)
    assert out.dtype == np.uint8 and out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out, np.clip(np.rint(ref), 0, 255).astype(np.uint8))


def test_uint8_nhwc_model_calibrates_on_an_image_folder(photos, tmp_path, caplog, capsys):
    onnx.save(_model(TensorProto.UINT8), tmp_path / "u8.onnx")
    with caplog.at_level(logging.INFO):
        rc = main(["calibrate", str(tmp_path / "u8.onnx"), "--images", str(photos), "-o", str(tmp_path / "out"),
                   "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "uint8 pixels" in said and "layout NHWC" in said
    int8 = onnx.load(str(tmp_path / "out" / "u8.int8.onnx"))
    assert int8.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    sqnr = float(out.split("logits")[1].split()[3])
    assert sqnr > 30, out


def test_uint8_input_refuses_normalization_flags(photos, tmp_path, capsys):
    onnx.save(_model(TensorProto.UINT8), tmp_path / "u8.onnx")
    rc = main(["calibrate", str(tmp_path / "u8.onnx"), "--images", str(photos), "--scale", "0.0039",
               "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "uint8 pixels" in err and "--scale" in err
    assert not (tmp_path / "out").exists()


def test_float_nhwc_input_needs_no_layout_flag(photos, tmp_path, capsys):
    onnx.save(_model(TensorProto.FLOAT), tmp_path / "f.onnx")
    rc = main(["calibrate", str(tmp_path / "f.onnx"), "--images", str(photos), "--preprocess", "none",
               "--resize", "40", "--crop", "40x40", "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["calibrate", str(tmp_path / "f.onnx"), "--images", str(photos), "--preprocess", "none",
               "--resize", "40", "--crop", "40x40", "--layout", "nchw", "-o", str(tmp_path / "out2"), "--no-progress"])
    assert rc == 2 and "--layout nhwc" in capsys.readouterr().err  # an explicit layout is kept, and checked


def test_imagenet_preset_covers_a_non_square_input():
    """A captcha model [N, 3, 50, 155]: the preset resized the shorter side to 57 (256/224 of 50),
    leaving a 4:3 photo 57x76, narrower than the crop (exit 2 on every image). It now resizes
    to cover 57x177 and crops the centre."""
    from quantkit.datasets.preprocess import for_model, preset

    spec = for_model(preset("imagenet"), ("N", 3, 50, 155), input_name="x", preset_name="imagenet")
    assert spec.crop == (50, 155) and spec.resize is None and spec.cover == (57, 177)
    img = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert spec.apply(img).shape == (3, 50, 155)
    tall = np.random.default_rng(0).integers(0, 256, (640, 300, 3), dtype=np.uint8)
    assert spec.apply(tall).shape == (3, 50, 155)
    assert Preprocess.from_dict(spec.to_dict()) == spec
    square = for_model(preset("imagenet"), ("N", 3, 224, 224), input_name="x", preset_name="imagenet")
    assert square.resize == 256 and square.cover is None  # unchanged for square inputs
