"""quantkit.bench: trtexec-style statistics against NumPy on known times, the timing loop's rules
(warmup untimed, at least N runs and at least D seconds) on a fake clock, and random_feed's dims."""

from __future__ import annotations

import numpy as np
import pytest

import quantkit.bench as bench
from quantkit.backends.base import Runner
from quantkit.bench import LatencyStats, measure_latency, random_feed, stats_from_times
from quantkit.errors import InputError
from quantkit.onnx.model import TensorSpec


def test_statistics_equal_numpy_on_known_times(rng):
    times = rng.gamma(2.0, 1.5, 101).tolist()  # skewed, like latencies
    s = stats_from_times(times, backend="b", device="d", batch=8)
    a = np.array(times)
    assert (s.iterations, s.min_ms, s.median_ms, s.mean_ms) == (101, a.min(), np.median(a), pytest.approx(a.mean()))
    assert (s.p90_ms, s.p99_ms) == (np.percentile(a, 90), np.percentile(a, 99))
    assert s.throughput == pytest.approx(8 * 1000.0 / np.median(a))
    d = s.to_dict()
    assert d["throughput_per_s"] == s.throughput and d["p99_ms"] == s.p99_ms and d["backend"] == "b"


def test_statistics_of_a_hand_made_series():
    s = stats_from_times([4.0, 1.0, 3.0, 2.0, 10.0], backend="b", device="d", batch=2)
    assert (s.min_ms, s.median_ms, s.mean_ms) == (1.0, 3.0, 4.0)
    assert s.p90_ms == pytest.approx(4.0 + 0.6 * 6.0)  # linear between the 4th and 5th value
    assert s.throughput == pytest.approx(2000.0 / 3.0)
    assert LatencyStats("b", "d", 1, 1, 0.0, 0.0, 0.0, 0.0, 0.0).throughput == float("inf")


class _Clocked(Runner):
    """Each infer takes ``cost`` ms of a fake clock; counts its calls."""

    backend, device = "fake", "cpu"

    def __init__(self, clock: list[float], cost: list[float]):
        self.clock, self.cost, self.calls = clock, cost, 0

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec("x", ("N", 2), np.dtype(np.float32))]

    @property
    def output_names(self) -> list[str]:
        return ["y"]

    def _infer_impl(self, feed):
        self.clock[0] += self.cost[self.calls % len(self.cost)] / 1000.0
        self.calls += 1
        return {"y": feed["x"]}


@pytest.fixture
def fake_clock(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    return clock


def test_warmup_is_untimed_and_iterations_are_counted(fake_clock):
    r = _Clocked(fake_clock, [50.0, 1.0, 2.0, 3.0])  # the warmup runs take the slow first slot
    s = measure_latency(r, {"x": np.zeros((3, 2), np.float32)}, warmup=1, iterations=6)
    assert r.calls == 7 and s.iterations == 6 and s.batch == 3
    assert s.min_ms == pytest.approx(1.0) and s.median_ms == pytest.approx(2.0)
    assert s.mean_ms == pytest.approx((1 + 2 + 3 + 50 + 1 + 2) / 6)
    assert (s.backend, s.device) == ("fake", "cpu")


def test_duration_extends_the_run(fake_clock):
    r = _Clocked(fake_clock, [10.0])
    s = measure_latency(r, {"x": np.zeros((1, 2), np.float32)}, warmup=0, iterations=3, duration_s=0.25)
    assert s.iterations == 25 and r.calls == 25  # 25 x 10 ms reach 0.25 s; 3 alone would not
    s = measure_latency(r, {"x": np.zeros((1, 2), np.float32)}, warmup=0, iterations=40, duration_s=0.05)
    assert s.iterations == 40  # the count rules when it takes longer than the duration


def spec(name: str, shape: tuple, dtype=np.float32) -> TensorSpec:
    return TensorSpec(name, shape, np.dtype(dtype))


def test_random_feed_dims_and_dtypes():
    feed = random_feed([spec("x", ("N", 3, 8, 8)), spec("fixed", (2, 5)), spec("ids", (None, 4), np.int64),
                        spec("mask", (-1, 4), np.bool_)], batch=6)
    assert {k: v.shape for k, v in feed.items()} == {"x": (6, 3, 8, 8), "fixed": (2, 5), "ids": (6, 4), "mask": (6, 4)}
    assert feed["x"].dtype == np.float32 and feed["ids"].dtype == np.int64 and not feed["mask"].any()
    assert feed["ids"].min() >= 0 and feed["ids"].max() <= 9 and len(np.unique(feed["ids"])) > 1
    assert abs(float(feed["x"].mean())) < 0.3 and 0.7 < float(feed["x"].std()) < 1.3  # standard normal
    again = random_feed([spec("x", ("N", 3, 8, 8))], batch=6)
    np.testing.assert_array_equal(again["x"], feed["x"])  # seeded
    assert not np.array_equal(random_feed([spec("x", ("N", 3, 8, 8))], batch=6, seed=1)["x"], feed["x"])
    given = random_feed([spec("x", ("N", 3, "H", "W"))], shapes={"x": (2, 3, 16, 24)})
    assert given["x"].shape == (2, 3, 16, 24)


def test_random_feed_refusals_name_the_input_and_the_fix():
    with pytest.raises(InputError, match=r"'x' has dynamic dimensions besides the batch: Nx3xHxW") as err:
        random_feed([spec("x", ("N", 3, "H", "W"))])
    # numbers in the example: the placeholders it showed were refused when given as they read
    assert err.value.hint == "give its shape with numbers for H, W (the sizes you run it at), e.g. --shapes x=1x3x224x224"
    assert random_feed([spec("x", ("N", 3, "H", "W"))], shapes={"x": (1, 3, 224, 224)})["x"].shape == (1, 3, 224, 224)
    with pytest.raises(InputError) as err:
        random_feed([spec("x", ("N", 3, None))])
    assert err.value.hint == "give its shape with numbers for D2 (the sizes you run it at), e.g. --shapes x=1x3x128"
    with pytest.raises(InputError, match=r"--shapes x=1x4x8x8 does not fit input 'x' of the model, Nx3x8x8"):
        random_feed([spec("x", ("N", 3, 8, 8))], shapes={"x": (1, 4, 8, 8)})
    with pytest.raises(InputError, match="does not fit"):
        random_feed([spec("x", ("N", 3, 8, 8))], shapes={"x": (1, 3, 8)})
    with pytest.raises(InputError, match=r"shapes given for \['y'\], the model inputs are \['x'\]"):
        random_feed([spec("x", ("N", 3))], shapes={"y": (1, 3)})


def test_bench_of_a_model_without_inputs_and_of_an_impossible_batch(tmp_path, capsys):
    """No inputs: StopIteration (exit 1); a batch NumPy cannot make: ValueError (exit 1)."""
    import onnx
    from onnx import TensorProto, helper

    from quantkit import sample
    from quantkit.cli import main

    node = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0]))
    graph = helper.make_graph([node], "noinput", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    assert main(["bench", str(tmp_path / "c.onnx"), "--iterations", "2", "--warmup", "0"]) == 0
    capsys.readouterr()
    assert main(["bench", str(sample.model_path()), "--batch", "99999999999999999999", "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "--batch" in err and "Traceback" not in err


def test_a_model_file_name_that_is_not_utf8(tmp_path):
    """ONNX Runtime takes a str path only: bytes that are not UTF-8 (a lone surrogate after
    os.fsdecode) gave "incompatible constructor arguments" in bench and compare."""
    import os
    import shutil

    from quantkit import sample
    from quantkit.cli import main

    path = tmp_path / os.fsdecode(b"mod\xfe.onnx")
    shutil.copy(sample.model_path(), path)
    assert main(["bench", str(path), "--iterations", "2", "--warmup", "0"]) == 0
