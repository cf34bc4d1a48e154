"""Entropy and percentile against NVIDIA Model Optimizer's histogram calibrator (0.47).

ModelOpt runs in a subprocess: importing it patches onnxruntime.quantization process-wide.
Its mse is not compared (0.47's _compute_amax_mse passes num_bits into fake_tensor_quant's
new ``bias`` parameter); mse is checked against brute force in test_methods.py.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from quantkit.calibrators import HistogramCollector
from quantkit.calibrators.methods import entropy_amax, percentile_amax

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("modelopt") is None, reason="nvidia-modelopt is not installed (pip install nvidia-modelopt==0.47.0)"
)

SCRIPT = r"""
import json, sys, numpy as np, torch
from modelopt.torch.quantization.calib.histogram import HistogramCalibrator
out = {}
for name, path in json.loads(sys.argv[1]).items():
    calib = HistogramCalibrator(num_bits=8, unsigned=False, num_bins=2048)
    for batch in np.load(path):
        calib.collect(torch.from_numpy(batch))
    out[name] = {m: float(calib.compute_amax(m)) for m in ("entropy",)}
    out[name]["percentile"] = float(calib.compute_amax("percentile", percentile=99.9))
print(json.dumps(out))
"""


def datasets(rng):
    n = 4 * 50_000
    digits_like = np.concatenate([
        np.full(n * 3 // 4, -0.8) + rng.normal(0, 0.02, n * 3 // 4),
        2.15 - np.abs(rng.normal(0, 0.15, n // 4)),
    ])
    rng.shuffle(digits_like)
    return {
        "relu": np.maximum(rng.standard_normal(n), 0),
        "laplace": rng.laplace(size=n),
        "digits_like_input": digits_like,
    }


@pytest.mark.slow  # imports and runs NVIDIA Model Optimizer: ~18 s
def test_entropy_and_percentile_match_modelopt(tmp_path, rng):
    data = {k: v.astype(np.float32).reshape(4, -1) for k, v in datasets(rng).items()}
    # the largest value in the first batch, so both histograms span the same range
    for arr in data.values():
        i = np.argmax(np.abs(arr))
        arr.flat[[0, i]] = arr.flat[[i, 0]]
    paths = {}
    for k, v in data.items():
        paths[k] = str(tmp_path / f"{k}.npy")
        np.save(paths[k], v)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(paths)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, arr in data.items():
        c = HistogramCollector(2048)
        for batch in arr:
            c.update(batch)
        h = c.compute()
        assert abs(entropy_amax(h) - ref[name]["entropy"]) <= h.bin_width * 1.001, name
        assert abs(percentile_amax(h, percentile=99.9) - ref[name]["percentile"]) <= h.bin_width * 1.001, name
    # the failure the guard exists for: ModelOpt's entropy also clips the two-sided input
    assert ref["digits_like_input"]["entropy"] < 0.6 * 2.15
