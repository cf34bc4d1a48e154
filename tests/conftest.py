"""Shared fixtures: seeded randomness, tiny ONNX models built in code, image folders, a trained
DigitsNet. Plain constants and model builders shared by several files are in tests/helpers.py.

Markers: ``gpu`` tests need CUDA (run them on the GPU machine), ``trt`` tests need TensorRT;
both are skipped with the reason when that is missing. ``slow`` tests (over ~10 s) are left out
of the default run (pyproject.toml) and run with ``pytest -m slow``; CI runs both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import make_residual_model


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


@pytest.fixture(scope="session")
def residual_model() -> onnx.ModelProto:
    return make_residual_model()


@pytest.fixture(scope="session")
def residual_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("models") / "residual.onnx"
    onnx.save(make_residual_model(), p)
    return p


@pytest.fixture(scope="session")
def digits_net_state() -> dict:
    """The state dict of DigitsNet after one quick epoch on the bundled digits (Adam, seed 0):
    non-trivial weights and BatchNorm statistics, trained once per session for the QAT and
    distributed tests."""
    torch = pytest.importorskip("torch")
    from quantkit.sample.digits_net import DigitsNet, digits_tensors

    torch.manual_seed(0)
    x, y, _, _ = digits_tensors()
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for s in range(0, len(x), 64):
        loss = torch.nn.functional.cross_entropy(model(x[s : s + 64]), y[s : s + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
