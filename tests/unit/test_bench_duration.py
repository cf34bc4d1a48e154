"""measure_latency refuses a duration it could never reach (NaN waited forever: found by the fuzz suite)."""

import math

import numpy as np
import pytest

from quantkit.backends.onnxruntime import OrtRunner
from quantkit.bench import measure_latency
from quantkit.errors import InputError


@pytest.mark.parametrize("duration", [math.nan, math.inf, -1.0])
def test_unreachable_duration_refused(residual_model, duration):
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    with OrtRunner(residual_model, threads=1) as runner, pytest.raises(InputError, match="duration"):
        measure_latency(runner, feed, warmup=0, iterations=1, duration_s=duration)
