"""Latency and throughput of a runner (trtexec-style statistics)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from quantkit.backends.base import Runner


@dataclass(frozen=True)
class LatencyStats:
    """Latency in milliseconds over ``iterations`` timed runs of one batch."""

    backend: str
    device: str
    batch: int
    iterations: int
    min_ms: float
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput_per_s": self.throughput}


def measure_latency(
    runner: Runner, feed: dict[str, np.ndarray], *, warmup: int = 10, iterations: int = 50,
    duration_s: float | None = None,
) -> LatencyStats:
    """Time ``runner.infer(feed)``: ``warmup`` untimed runs, then ``iterations`` timed runs
    (or as many as fit in ``duration_s`` seconds, at least 3)."""
    for _ in range(warmup):
        runner.infer(feed)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - t0) * 1000.0)
        if duration_s is not None:
            if time.perf_counter() - start >= duration_s and len(times) >= 3:
                break
        elif len(times) >= iterations:
            break
    arr = np.asarray(times)
    batch = int(next(iter(feed.values())).shape[0])
    return LatencyStats(
        runner.backend, runner.device, batch, len(times), float(arr.min()), float(np.median(arr)),
        float(arr.mean()), float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
    )
