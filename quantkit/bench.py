"""Latency and throughput of a runner (trtexec-style statistics)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from quantkit.backends.base import Runner
from quantkit.errors import InputError
from quantkit.onnx.model import TensorSpec


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
    """Time ``runner.infer(feed)``: ``warmup`` untimed runs, then timed runs, at least
    ``iterations`` of them and for at least ``duration_s`` seconds (trtexec's rule)."""
    if duration_s is not None and not 0.0 <= duration_s < float("inf"):  # NaN or inf: would never stop
        raise InputError(f"duration must be a finite number of seconds >= 0, got {duration_s}",
                         hint="pass --duration S with S >= 0, or omit it")
    for _ in range(warmup):
        runner.infer(feed)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - t0) * 1000.0)
        if len(times) >= iterations and (duration_s is None or time.perf_counter() - start >= duration_s):
            break
    return stats_from_times(times, backend=runner.backend, device=runner.device, batch=feed_batch(feed))


def feed_batch(feed: dict[str, np.ndarray]) -> int:
    """The batch size a feed runs: its first input's first dim; 1 for a model without inputs (or
    whose first input is a scalar)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def stats_from_times(times: list[float], *, backend: str, device: str, batch: int) -> LatencyStats:
    """Statistics of per-run latencies in milliseconds."""
    arr = np.asarray(times, dtype=np.float64)
    return LatencyStats(
        backend, device, batch, int(arr.size), float(arr.min()), float(np.median(arr)),
        float(arr.mean()), float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
    )


def random_feed(specs: Sequence[TensorSpec], *, batch: int = 1, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: normal floats, small non-negative integers, false booleans.

    A dynamic first dim takes ``batch`` (a fixed one keeps its size); other dynamic dims need
    an entry in ``shapes``, which must agree with the model's fixed dims.
    """
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise InputError(f"shapes given for {unknown}, the model inputs are {[s.name for s in specs]}")
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = shapes.get(spec.name)
        model_shape = "x".join(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in spec.shape)
        if shape is None:
            dims = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else None) for i, d in enumerate(spec.shape)]
            if any(d is None for d in dims):
                free = [str(d).upper() if isinstance(d, str) and d.isidentifier() else f"D{i}"
                        for i, d in enumerate(spec.shape) if i and dims[i] is None]
                # an example in numbers (a placeholder in it was refused when given as it read): 224 for an
                # image's free sides, 128 for any other free length
                spatial = (1, 2, 3) if len(dims) == 4 else ()
                example = "x".join(str(d) if d is not None else ("224" if i in spatial else "128")
                                   for i, d in enumerate(dims))
                raise InputError(f"input {spec.name!r} has dynamic dimensions besides the batch: {model_shape}",
                                 hint=f"give its shape with numbers for {', '.join(free)} (the sizes you run it "
                                      f"at), e.g. --shapes {spec.name}={example}")
            shape = tuple(int(d) for d in dims if d is not None)
        elif len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, shape)):
            raise InputError(
                f"--shapes {spec.name}={'x'.join(map(str, shape))} does not fit input {spec.name!r} of the model, "
                f"{model_shape}", hint="give the model's fixed dimensions as they are")
        dt = np.dtype(spec.dtype)
        size = float(np.prod([float(d) for d in shape])) * dt.itemsize
        if size > 2.0**40:  # NumPy would fail on the dims, or the machine on the memory: say which flag
            raise InputError(f"input {spec.name!r} of shape {'x'.join(map(str, shape))} would take "
                             f"{size / 2**30:,.0f} GiB", hint="give a smaller --batch or --shapes")
        if dt.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feed[spec.name] = rng.integers(0, 10, size=shape).astype(dt)
        else:
            feed[spec.name] = np.zeros(shape, dtype=dt)
    return feed
