"""Shared fixtures: seeded randomness, tiny ONNX models built in code, image folders.

Markers: ``gpu`` tests need CUDA (run them on the GPU machine), ``trt`` tests need TensorRT;
both are skipped with the reason when that is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _has_cuda() -> bool:
    """A CUDA device reachable through cuda-python (what quantkit's GPU code uses) or torch."""
    from quantkit.cuda import device_count

    if device_count() > 0:
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from quantkit.backends.tensorrt.load import tensorrt_available

    no_trt = not tensorrt_available()  # the stubs package's bare `tensorrt` namespace does not count
    no_gpu = None
    for item in items:
        if "trt" in item.keywords and no_trt:
            item.add_marker(pytest.mark.skip(reason="TensorRT is not installed (pip install 'quantkit[tensorrt10]' for TensorRT 10)"))
        if "gpu" in item.keywords:
            if no_gpu is None:
                no_gpu = not _has_cuda()
            if no_gpu:
                item.add_marker(pytest.mark.skip(reason="no CUDA device (run `pytest -m gpu` on a GPU machine)"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make_residual_model(opset: int = 17, *, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv -> Add(residual from Relu) -> Relu -> ConvTranspose
    -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> MatMul -> y[N,4]."""
    r = np.random.default_rng(seed)
    w = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        helper.make_node("ConvTranspose", ["r2", "wt"], ["ct"], name="convt", strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["ct"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    inits = [_init("w1", w(8, 3, 3, 3)), _init("b1", w(8)), _init("w2", w(8, 8, 3, 3)),
             _init("wt", w(8, 6, 1, 1)), _init("wg", w(5, 6)), _init("bg", w(5)), _init("wm", w(5, 4))]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def residual_model() -> onnx.ModelProto:
    return make_residual_model()


@pytest.fixture(scope="session")
def residual_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("models") / "residual.onnx"
    onnx.save(make_residual_model(), p)
    return p


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The bundled digits written as PNG folders: (train, test)."""
    from quantkit import sample

    root = tmp_path_factory.mktemp("digits")
    return sample.write_image_folder(root / "train", "train"), sample.write_image_folder(root / "test", "test")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photographs (scikit-image's bundled samples), JPEG and PNG, two classes."""
    import cv2
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    pics = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
            "rocket": data.rocket(), "camera": data.camera()}
    for i, (name, img) in enumerate(pics.items()):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(exist_ok=True)
        bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"{name}.{'jpg' if i % 2 else 'png'}"), bgr)
    return root
