"""Graph import: what real exporters produce (issue 13, part 1).

Dynamic dims written as -1/0/symbolic/unnamed, old opsets, external data, subgraphs, shared
weights, weights behind a Transpose/Reshape, float16 models, optional and unused inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit import sample
from quantkit.cli import main
from tests.unit.test_cli import DIGITS


def _dims_model(dims: list) -> onnx.ModelProto:
    """The bundled digits CNN with its input dims replaced by ``dims`` (int, str or None)."""
    m = onnx.load(sample.model_path())
    shape = m.graph.input[0].type.tensor_type.shape
    for d, value in zip(shape.dim, dims):
        d.Clear()
        if isinstance(value, int):
            d.dim_value = value
        elif isinstance(value, str):
            d.dim_param = value
    return m


# ------------------------------------------------------------------ dynamic dims
@pytest.mark.parametrize("dims", [[-1, 1, -1, -1], [0, 1, 0, 0], [None, 1, None, None], ["n", 1, "h", "w"]])
def test_dynamic_dims_are_dynamic(dims):
    from quantkit.backends.base import check_feed
    from quantkit.bench import random_feed
    from quantkit.onnx.model import input_specs

    spec = input_specs(_dims_model(dims))[0]
    assert spec.static_batch is None
    assert all(d is None or isinstance(d, str) for i, d in enumerate(spec.shape) if i != 1)
    check_feed({"image": np.zeros((5, 1, 32, 32), np.float32)}, [spec])  # any batch, any HxW
    feed = random_feed([spec], batch=3, shapes={"image": (3, 1, 16, 16)})
    assert feed["image"].shape == (3, 1, 16, 16)


def test_minus_one_batch_calibrate_and_compare(digits_dirs, tmp_path, capsys):
    """An input declared [-1, 1, -1, -1] (a valid dynamic dim) was taken for a fixed batch of -1:
    'batch size must be positive, got -1' (exit 2) and compare refused the FP32 model."""
    train, test = digits_dirs
    path = tmp_path / "m.onnx"
    onnx.save(_dims_model([-1, 1, -1, -1]), path)
    out = tmp_path / "out"
    rc = main(["calibrate", str(path), "--images", str(train), *DIGITS, "--num-images", "40", "--batch-size", "16",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    rc = main(["compare", str(path), str(out / "m.int8.onnx"), "--images", str(test), *DIGITS, "--num-images", "20"])
    assert rc == 0, capsys.readouterr().err
