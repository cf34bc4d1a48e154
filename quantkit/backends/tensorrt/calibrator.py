"""TensorRT 10 INT8 calibrators (``IInt8EntropyCalibrator2``, ``IInt8MinMaxCalibrator``).

The body lives in ``CalibratorCore``, which knows nothing of TensorRT; ``calibrator_class``
wraps it in a subclass of the TensorRT base class, made on first use so that importing quantkit
never imports TensorRT. TensorRT calls, in this order:

    get_batch_size()
    read_calibration_cache()         -> bytes: calibration is skipped, the cache is used
                                     -> None: calibrate:
    get_batch(names) ...             -> one device pointer per name, in the order of ``names``,
                                        valid until the next get_batch call; None when done
    write_calibration_cache(cache)

An exception raised inside a callback would be swallowed by TensorRT (it crosses C++), so the
core records it, ends calibration, and ``raise_if_failed()`` raises it after the build.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantkit._io import write_bytes_atomic
from quantkit.calibrators.cache import (
    CacheProvenance,
    cache_from_text,
    check_cache_matches,
    write_sidecar,
)
from quantkit.errors import CacheError, DatasetError, InputError, QuantkitError

log = logging.getLogger(__name__)

#: quantkit's calibrator name -> TensorRT base class and the algorithm in its cache header
CALIBRATORS = {
    "entropy": ("IInt8EntropyCalibrator2", "EntropyCalibration2"),
    "minmax": ("IInt8MinMaxCalibrator", "MinMaxCalibration"),
}


class Stager(Protocol):
    """Gives device pointers per input name for successive batches (None when exhausted)."""

    def next_pointers(self) -> dict[str, int] | None: ...

    def close(self) -> None: ...


def gpu_stager(batches: Iterable[Any]) -> Stager:
    """A double-buffered GPU stager sized by the first batch (later ones may be smaller)."""
    from quantkit.cuda import BatchStager

    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise DatasetError("the calibration data yielded no batch", hint="check the image folder and --num-images")
    feed = first.feed if hasattr(first, "feed") else first
    specs: dict[str, tuple[Any, Sequence[int]]] = {
        str(name): (np.asarray(a).dtype, np.asarray(a).shape) for name, a in feed.items()}
    return BatchStager(itertools.chain([first], it), specs)


class CalibratorCore:
    """What quantkit's TensorRT calibrators do, testable without TensorRT.

    Args:
        batches: calibration batches (a quantkit Batcher or any iterable of feed dicts).
        batch_size: what ``get_batch_size`` reports (the batch dimension of every batch).
        cache_path: where the cache is read from and written to (None: never cached).
        provenance: recorded beside the written cache (``<cache>.json``) and required to
            match when a cache is read, so a cache of another model or preprocessing is
            refused instead of reused.
        algorithm: the TensorRT algorithm name in the cache header.
        trt_version: TensorRT's version number; a cache of another version is refused.
        stager: makes the stager from ``batches`` (default: GPU buffers via cuda-python).
        on_batch: called with each batch handed to TensorRT (progress bars).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        batch_size: int,
        *,
        cache_path: str | os.PathLike[str] | None = None,
        provenance: CacheProvenance | None = None,
        algorithm: str = "EntropyCalibration2",
        trt_version: int | None = None,
        stager: Callable[[Iterable[Any]], Stager] = gpu_stager,
        on_batch: Callable[[Any], None] | None = None,
    ):
        if batch_size <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}")
        self.batches = batches
        self.batch_size = batch_size
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.provenance = provenance
        self.algorithm = algorithm
        self.trt_version = trt_version
        self._make_stager = stager
        self._stager: Stager | None = None
        self.on_batch = on_batch
        self.error: BaseException | None = None
        self.batches_served = 0
        self.cache_was_read = False

    # ---------------------------------------------------------------- TensorRT's callbacks
    def get_batch_size(self) -> int:
        return self.batch_size

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        if self.error is not None:
            return None
        try:
            if self._stager is None:
                self._stager = self._make_stager(self.batches)
            pointers = self._stager.next_pointers()
            if pointers is None:
                if self.batches_served == 0:
                    raise DatasetError("the calibration data yielded no batch",
                                       hint="check the image folder and --num-images")
                return None
            missing = [n for n in names if n not in pointers]
            if missing:
                raise InputError(f"TensorRT asks for inputs {missing}, the calibration batches have {sorted(pointers)}",
                                 hint="name the data arrays after the network inputs")
            self.batches_served += 1
            if self.on_batch is not None:
                self.on_batch(getattr(self._stager, "last_batch", None))
            return [pointers[n] for n in names]
        except BaseException as err:  # noqa: BLE001 - must not cross into TensorRT
            self._record(err, "get_batch")
            return None

    def read_calibration_cache(self) -> bytes | None:
        if self.cache_path is None or not self.cache_path.exists():
            return None
        try:
            prov = self.provenance
            check_cache_matches(self.cache_path, model_sha256=prov.model_sha256 if prov else None,
                                preprocess=prov.preprocess if prov else None,
                                trt_version=self.trt_version, algorithm=self.algorithm)
            data = self.cache_path.read_bytes()
        except BaseException as err:  # noqa: BLE001
            self._record(err, "read_calibration_cache")
            return None
        self.cache_was_read = True
        log.info("using calibration cache %s", self.cache_path)
        return data

    def write_calibration_cache(self, cache: Any) -> None:
        if self.cache_path is None:
            return
        try:
            data = bytes(memoryview(cache))
            parsed = cache_from_text(data.decode("ascii"), source="TensorRT's cache")
            write_bytes_atomic(self.cache_path, data)
            if self.provenance is not None:
                write_sidecar(self.cache_path, CacheProvenance(
                    self.provenance.model_sha256, self.provenance.preprocess, parsed.algorithm, parsed.version,
                    self.provenance.method))
        except BaseException as err:  # noqa: BLE001
            self._record(err, "write_calibration_cache")

    # ---------------------------------------------------------------- after the build
    def raise_if_failed(self) -> None:
        """Raise the first error recorded inside a callback, with its message."""
        if self.error is None:
            return
        err = self.error
        if isinstance(err, QuantkitError):
            raise err
        raise QuantkitError(f"calibration failed inside TensorRT's callback: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _record(self, err: BaseException, where: str) -> None:
        log.debug("error in %s", where, exc_info=err)
        if self.error is None:
            self.error = err


def calibrator_class(kind: str, base: type | None = None) -> type:
    """A TensorRT calibrator class for ``kind`` (``entropy`` or ``minmax``) whose methods
    delegate to a ``CalibratorCore``.

    Args:
        kind: quantkit's calibrator name.
        base: the base class; default TensorRT's (``IInt8EntropyCalibrator2`` or
            ``IInt8MinMaxCalibrator``). Tests pass a stand-in only where TensorRT is absent.
    """
    if kind not in CALIBRATORS:
        raise InputError(f"unknown TensorRT calibrator {kind!r}; available: {sorted(CALIBRATORS)}",
                         hint="percentile and mse scales reach TensorRT through `quantkit calibrate` "
                              "(Q/DQ model or cache), not a TensorRT calibrator")
    base_name, _ = CALIBRATORS[kind]
    if base is None:
        from quantkit.backends.tensorrt.load import calibrator_base

        base = calibrator_base(kind)
    trt_base: Any = base

    class QuantkitCalibrator(trt_base):  # type: ignore[misc, valid-type]
        def __init__(self, core: CalibratorCore):
            trt_base.__init__(self)  # pybind11 classes need their own __init__ called
            self.core = core

        def get_batch_size(self) -> int:
            return self.core.get_batch_size()

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            return self.core.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.core.read_calibration_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.core.write_calibration_cache(cache)

    QuantkitCalibrator.__name__ = QuantkitCalibrator.__qualname__ = f"Quantkit{base_name[1:]}"
    return QuantkitCalibrator


def make_calibrator(kind: str, core: CalibratorCore, base: type | None = None) -> Any:
    """An instance of ``calibrator_class(kind, base)`` around ``core``."""
    core.algorithm = CALIBRATORS[kind][1] if kind in CALIBRATORS else core.algorithm
    return calibrator_class(kind, base)(core)


def cache_only_core(cache_path: str | os.PathLike[str], *, batch_size: int = 1, **kwargs: Any) -> CalibratorCore:
    """A core that serves an existing cache and has no data: TensorRT reads the cache and
    skips calibration (a build from ``--calibration-cache``)."""
    if not Path(cache_path).exists():
        raise CacheError(f"calibration cache {str(cache_path)!r} does not exist")

    def no_data(_: Iterable[Any]) -> Stager:
        raise CacheError(f"TensorRT did not accept the calibration cache {str(cache_path)!r} and asked for data",
                         hint="check that the cache header's TensorRT version matches this TensorRT")

    return CalibratorCore([], batch_size, cache_path=cache_path, stager=no_data, **kwargs)
