"""TensorRT calibration caches: read and write, round trip exact.

Format (one text file):

    TRT-<version>-<Algorithm>          e.g. TRT-101300-EntropyCalibration2
    <tensor name>: <8 hex digits>      big-endian bytes of the float32 scale (amax / 127)

``3c010204`` is 1/127 (amax 1.0). TensorRT refuses a cache whose version differs from its own.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit._io import write_text_atomic
from quantkit.errors import CacheError, InputError, ModelError

DEFAULT_TRT_VERSION = 101300  # TensorRT 10.13.0

_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{8})$")


def trt_version_number(version: str) -> int:
    """'10.13.0.35' -> 101300 (major*10000 + minor*100 + patch), as in cache headers."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]] + [0, 0, 0]
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def check_trt_version(version: Any) -> int:
    """A cache header's version number: ``version`` as given (major*10000 + minor*100 + patch,
    TensorRT 1.0 or later) or as a version string ('10.13.0'); InputError otherwise (``10``
    wrote the header ``TRT-10-``, which TensorRT reads as a version 0.0.10 cache)."""
    if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+){1,3}", version.strip()):
        return trt_version_number(version)
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or not 10000 <= int(version) < 10**7:
        raise InputError(f"TensorRT version {version!r} is not a version number",
                         hint=f"give it as {DEFAULT_TRT_VERSION} (major*10000 + minor*100 + patch) or as '10.13.0'")
    return int(version)


def hex_from_scale(scale: float) -> str:
    return struct.pack(">f", np.float32(scale)).hex()


def scale_from_hex(text: str) -> float:
    return float(struct.unpack(">f", bytes.fromhex(text))[0])


@dataclass(frozen=True)
class CalibrationCache:
    """A parsed cache: TensorRT version number, algorithm name, and tensor -> float32 scale."""

    version: int
    algorithm: str
    scales: dict[str, float]

    def to_text(self) -> str:
        check_cache_names(self.scales)
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        lines += [f"{name}: {hex_from_scale(s)}" for name, s in self.scales.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_amax(cls, amax: dict[str, float], method: str, version: int = DEFAULT_TRT_VERSION) -> "CalibrationCache":
        from quantkit.calibrators.methods import cache_algorithm

        # TensorRT knows only its own algorithms; each method registers the one its scales are
        # written under (percentile, mse, auto: EntropyCalibration2)
        from quantkit.calibrators.weights import scale_from_amax

        algorithm = cache_algorithm(method)
        version = check_trt_version(version)
        # the Q/DQ model's scales: amax / 127 in float32, and the same placeholder (1) for a tensor
        # that was 0 on every sample (a 0 scale is no dynamic range TensorRT can use)
        scales = {n: float(scale_from_amax(a)) for n, a in amax.items()}
        return cls(version, algorithm, scales)


def cache_from_text(text: str, *, source: str = "<cache>") -> CalibrationCache:
    lines = text.splitlines()
    if not lines:
        raise CacheError(f"calibration cache {source!r} is empty")
    head = _HEADER.match(lines[0].strip())
    if head is None:
        raise CacheError(
            f"calibration cache {source!r}: first line {lines[0][:60]!r} is not 'TRT-<version>-<Algorithm>'"
        )
    scales: dict[str, float] = {}
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip())
        if m is None:
            raise CacheError(f"calibration cache {source!r}, line {no}: {line[:60]!r} is not '<tensor>: <8 hex digits>'")
        name, scale = m.group(1), scale_from_hex(m.group(2))
        if name in scales:  # which of the two TensorRT takes is its own business: a damaged or merged file
            raise CacheError(f"calibration cache {source!r}, line {no}: tensor {name!r} is given twice",
                             hint="write the cache again (quantkit calibrate, or merge-stats)")
        if not (math.isfinite(scale) and scale >= 0.0):
            raise CacheError(f"calibration cache {source!r}, line {no}: tensor {name!r} has scale {scale}, not a "
                             "finite number >= 0", hint="write the cache again (quantkit calibrate, or merge-stats)")
        scales[name] = scale
    return CalibrationCache(int(head.group(1)), head.group(2), scales)


#: a calibration cache is a line per tensor (~40 bytes): a file larger than this is not one
MAX_CACHE_BYTES = 64 << 20


def read_cache(path: str | os.PathLike[str]) -> CalibrationCache:
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.readline(256)
            if not head.startswith(b"TRT-"):  # the header first: a large file of something else is not read whole
                shown = head[:24].decode("ascii", "backslashreplace").strip()
                raise CacheError(f"calibration cache {str(p)!r}: first line {shown!r} is not 'TRT-<version>-<Algorithm>'")
            data = head + fh.read(MAX_CACHE_BYTES + 1 - len(head))
        if len(data) > MAX_CACHE_BYTES:
            raise CacheError(f"calibration cache {str(p)!r} is larger than {MAX_CACHE_BYTES >> 20} MiB: not a "
                             "calibration cache (a line per tensor)")
        text = data.decode("utf-8")  # as written: ONNX names are UTF-8, and TensorRT matches the bytes
    except FileNotFoundError:
        raise CacheError(f"calibration cache {str(p)!r} does not exist") from None
    except (UnicodeDecodeError, OSError) as err:
        raise CacheError(f"calibration cache {str(p)!r} cannot be read as text: {err}") from err
    return cache_from_text(text, source=str(p))


def check_cache_names(names: Iterable[str]) -> None:
    """Raise ModelError for a tensor name the cache's format cannot hold: one with a line break
    (one ``name: scale`` a line; a name ``"a\\nother: 7f7fffff"`` wrote a scale for another tensor)."""
    bad = next((n for n in names if "\n" in n or "\r" in n), None)
    if bad is not None:
        raise ModelError(f"tensor {bad!r} has a line break in its name, which a TensorRT calibration cache (one "
                         "'name: scale' a line) cannot hold", hint="rename the tensor (e.g. with onnx-graphsurgeon) "
                         "and calibrate again")


def write_cache(path: str | os.PathLike[str], cache: CalibrationCache) -> Path:
    return write_text_atomic(path, cache.to_text())


# ---------------------------------------------------------------- provenance sidecar
SIDECAR_SUFFIX = ".json"


def sidecar_path(cache_path: str | os.PathLike[str]) -> Path:
    """``calibration.cache`` -> ``calibration.cache.json``."""
    p = Path(cache_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class CacheProvenance:
    """What a cache was made from. A cache is valid only for the same model (by content hash)
    and the same preprocessing; TensorRT itself checks only its version header.

    Attributes:
        model_sha256: SHA-256 of the FP32 ONNX file the cache was calibrated on.
        preprocess: the preprocessing spec (``Preprocess.to_dict()``), or None when unknown.
        algorithm: the header's algorithm.
        trt_version: the header's version number.
        method: the quantkit method whose scales are in the cache.
    """

    model_sha256: str
    preprocess: dict | None
    algorithm: str
    trt_version: int
    method: str = ""

    def to_dict(self) -> dict:
        return {"model_sha256": self.model_sha256, "preprocess": self.preprocess, "algorithm": self.algorithm,
                "trt_version": self.trt_version, "method": self.method}


def write_sidecar(cache_path: str | os.PathLike[str], provenance: CacheProvenance) -> Path:
    from quantkit._io import write_json_atomic

    return write_json_atomic(sidecar_path(cache_path), provenance.to_dict())


def read_sidecar(cache_path: str | os.PathLike[str]) -> CacheProvenance | None:
    """The provenance next to a cache, or None when there is none (a cache from elsewhere)."""
    import json

    p = sidecar_path(cache_path)
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return CacheProvenance(str(d["model_sha256"]), d.get("preprocess"), str(d["algorithm"]),
                               int(d["trt_version"]), str(d.get("method", "")))
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CacheError(f"cache provenance {str(p)!r} is not valid: {type(err).__name__ if isinstance(err, RecursionError) else err}",
                         hint="delete it (and recalibrate) or restore it from the calibration output") from err


def check_cache_matches(
    cache_path: str | os.PathLike[str],
    *,
    model_sha256: str | None,
    preprocess: dict | None,
    trt_version: int | None = None,
    algorithm: str | None = None,
    require_provenance: bool = False,
) -> CalibrationCache:
    """Read a cache and refuse it, with the reason, when it was made for another model,
    preprocessing, TensorRT version or algorithm (None: not checked).

    Raises:
        CacheError: unreadable cache, or a mismatch (the message names both values and says
            how to recalibrate).
    """
    cache = read_cache(cache_path)
    where = str(cache_path)
    redo = "recalibrate for this model (quantkit calibrate ... -o DIR) or pass the matching cache"
    if trt_version is not None and cache.version != trt_version:
        raise CacheError(
            f"calibration cache {where!r} was written for TensorRT {cache.version}, this is TensorRT {trt_version}; "
            "TensorRT refuses caches of another version",
            hint="rewrite its header with `quantkit calibrate --trt-version` or recalibrate")
    if algorithm is not None and cache.algorithm != algorithm:
        raise CacheError(f"calibration cache {where!r} holds {cache.algorithm} scales, the calibrator asked for is {algorithm}",
                         hint="use the calibrator the cache was made with, or recalibrate")
    prov = read_sidecar(cache_path)
    if prov is None:
        if require_provenance:
            raise CacheError(f"calibration cache {where!r} has no provenance file {str(sidecar_path(cache_path))!r}",
                             hint=redo)
        return cache
    if model_sha256 is not None and prov.model_sha256 != model_sha256:
        raise CacheError(
            f"calibration cache {where!r} was made for another model (sha256 {prov.model_sha256[:12]}..., "
            f"this model is {model_sha256[:12]}...)", hint=redo)
    if preprocess is not None and prov.preprocess is not None and prov.preprocess != preprocess:
        diff = sorted(k for k in set(prov.preprocess) | set(preprocess) if prov.preprocess.get(k) != preprocess.get(k))
        raise CacheError(
            f"calibration cache {where!r} was made with other preprocessing (differs in: {', '.join(diff)})", hint=redo)
    return cache
