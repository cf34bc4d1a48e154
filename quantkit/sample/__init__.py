"""The bundled sample: a small CNN (residual Adds, a depthwise convolution) trained on the
handwritten digits that scikit-learn bundles (UCI optdigits, 8x8, upsampled to 32x32).

``scripts/train_sample.py`` reproduces ``digits_cnn.onnx`` and ``digits.npz`` from
scikit-learn's copy of the data; the demo writes the digits out as an image folder with one
subfolder per class, so calibration decodes real PNG files.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.datasets.preprocess import Preprocess

HERE = Path(__file__).parent
IMAGE_SIZE = 32


def model_path() -> Path:
    return HERE / "digits_cnn.onnx"


@cache
def metadata() -> dict[str, Any]:
    return json.loads((HERE / "sample.json").read_text())


def preprocess() -> Preprocess:
    """The preprocessing the sample model was trained with (gray, 32x32, normalised)."""
    return Preprocess.from_dict(metadata()["preprocess"])


def upsample(images: np.ndarray) -> np.ndarray:
    """8x8 digits with values 0-16 -> uint8 32x32 images (the pictures the model sees)."""
    import cv2

    u8 = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return np.stack([cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR) for im in u8])


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32], labels int64 [N], test mask bool [N]) of the bundled copy."""
    with np.load(HERE / "digits.npz") as d:
        return upsample(d["images"]), d["labels"].astype(np.int64), d["test"].astype(bool)


def write_image_folder(root: str | os.PathLike[str], split: str = "test") -> Path:
    """Write the ``train``, ``test`` or ``all`` split as PNGs in class subfolders ``0`` .. ``9``."""
    import cv2

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    images, labels, test = load_digits()
    keep = np.ones_like(test) if split == "all" else (test if split == "test" else ~test)
    out = Path(root)
    for i in np.nonzero(keep)[0]:
        folder = out / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), images[i])
    return out
