"""Calibration statistics saved to a file and merged: PTQ of one ONNX model spread over machines.

    machine A: quantkit calibrate model.onnx --images part-a/ --save-stats a.qkstats -o out-a/
    machine B: quantkit calibrate model.onnx --images part-b/ --save-stats b.qkstats -o out-b/
    anywhere:  quantkit merge-stats a.qkstats b.qkstats -o out/    (artifacts of all the data)

A stats file is an ``.npz`` (no pickle) holding every calibrated tensor's histogram record
(counts, bin width, signed min and max) and a JSON header: the model's path and SHA-256, the
preprocessing, the settings that shape the statistics (bins, Q/DQ target, which tensors,
histogram sampling) and the number of samples.

Merging: min and max are reduced, counts are added after re-binning both histograms to the
larger range. ``--save-stats`` starts every histogram on a power-of-two range
(``HistogramCollector(pow2_grid=True)``), so two runs' ranges differ by a power of two and the
re-binning sums neighbouring bins: exact, and the merged histogram equals that of one run over
all the data with the same settings (with ``--histogram-stride 1``; with sampling, each run
samples its own values, so the bodies of the histograms are estimates either way). Files
without a power-of-two grid are merged by splitting bins in proportion to their overlap.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.calibrators.collectors import MAX_BINS, Histogram, merge_histogram
from quantkit.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "quantkit-calibration-stats"
VERSION = 1


class StatsError(InputError):
    """A statistics file that cannot be read, or files that cannot be merged."""


@dataclass(frozen=True)
class CalibrationStats:
    """What one calibration pass collected, enough to compute every method's ranges again.

    Attributes:
        histograms: tensor name -> its |x| histogram record.
        num_samples: samples the statistics come from.
        model: {"path": ..., "sha256": ...} of the FP32 model.
        settings: what shapes the statistics and must agree to merge: num_bins, target,
            cache_all_tensors, sample_stride, pow2_grid.
        preprocess: the preprocessing (must agree to merge), or None.
        data: where the samples came from, one entry per merged run.
    """

    histograms: dict[str, Histogram]
    num_samples: int
    model: dict[str, Any]
    settings: dict[str, Any]
    preprocess: dict[str, Any] | None = None
    data: list[str] = field(default_factory=list)


def save_stats(path: str | os.PathLike[str], stats: CalibrationStats) -> Path:
    """Write ``stats`` to ``path`` atomically (``.npz``, no pickle)."""
    from quantkit._io import write_bytes_atomic

    return write_bytes_atomic(path, encode_stats(stats))


def encode_stats(stats: CalibrationStats) -> bytes:
    """The bytes of a statistics file (``save_stats``)."""
    names = list(stats.histograms)
    header = {"format": FORMAT, "version": VERSION, "tensors": names, "num_samples": stats.num_samples,
              "model": stats.model, "settings": stats.settings, "preprocess": stats.preprocess, "data": stats.data}
    arrays: dict[str, np.ndarray] = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for i, name in enumerate(names):
        h = stats.histograms[name]
        arrays[f"counts_{i}"] = np.asarray(h.counts, dtype=np.int64)
        arrays[f"scalars_{i}"] = np.array([h.bin_width, h.observed_min, h.observed_max], dtype=np.float64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
    return buf.getvalue()


def is_stats_file(path: str | os.PathLike[str]) -> bool:
    """``path`` is a statistics file ``save_stats`` wrote (its header says so): what ``--force``
    may replace, unlike any other file given as ``--save-stats``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return bool(json.loads(bytes(z["header"]).decode()).get("format") == FORMAT)
    except Exception:  # not a zip, no header, not JSON: not ours
        return False


def load_stats(path: str | os.PathLike[str]) -> CalibrationStats:
    """Read a file written by ``save_stats``.

    Raises:
        StatsError: the file is missing, unreadable or not a quantkit statistics file.
    """
    hint = "give a file written by `quantkit calibrate --save-stats FILE`"
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise StatsError(f"{str(path)!r} is not a quantkit statistics file", hint=hint)
            if header.get("version") != VERSION:
                raise StatsError(f"{str(path)!r}: statistics format version {header.get('version')}, "
                                 f"this quantkit reads {VERSION}", hint="write it again with this quantkit")
            _check_header(path, header, hint)
            bins = header["settings"].get("num_bins")
            hists = {}
            for i, name in enumerate(header["tensors"]):
                _check_member_size(z, path, name, f"counts_{i}", bins, hint)  # before it is read: no made-up giant
                hists[name] = _checked_histogram(path, name, z[f"scalars_{i}"], z[f"counts_{i}"], bins, hint)
            stats = CalibrationStats(hists, int(header["num_samples"]), header["model"], header["settings"],
                                     header.get("preprocess"), list(header.get("data") or []))
    except StatsError:
        raise
    except FileNotFoundError:
        raise StatsError(f"statistics file {str(path)!r} not found", hint=hint) from None
    except Exception as err:  # zip, JSON or key errors: not our file, or a damaged one
        if "pickle" in str(err):  # NumPy's text would advise loading it unsafely: quantkit never unpickles
            raise StatsError(f"{str(path)!r} is not a quantkit statistics file (not an .npz archive; a file of "
                             "Python objects is never loaded)", hint=hint) from None
        raise StatsError(f"cannot read statistics file {str(path)!r}: {type(err).__name__}: {err}",
                         hint=hint) from err
    return stats


#: a histogram's counts above this total would overflow int64 sums when merged (a damaged or made-up file)
MAX_TOTAL = 2**53
_F32_MAX = float(np.finfo(np.float32).max)


def _check_header(path: Any, header: Any, hint: str) -> None:
    """The header's fields have the types ``save_stats`` writes."""
    def bad(what: str) -> StatsError:
        return StatsError(f"{str(path)!r}: a damaged statistics header ({what})", hint=hint)

    if not isinstance(header, dict):
        raise bad("not a mapping")
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise bad("'tensors' is not a list of names")
    if len(set(tensors)) != len(tensors):
        raise bad("a tensor is listed twice")
    for key in ("model", "settings"):
        if not isinstance(header.get(key), dict):
            raise bad(f"{key!r} is not a mapping")
    for key in ("path", "sha256"):  # what merge-stats reads to find and check the model
        if header["model"].get(key) is not None and not isinstance(header["model"][key], str):
            raise bad(f"the model's {key} is not a string")
    n = header.get("num_samples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOTAL:
        raise bad(f"num_samples {n!r} is not a positive whole number")
    bins = header["settings"].get("num_bins")
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS):
        raise bad(f"num_bins {bins!r}, not 1..{MAX_BINS}")
    if header.get("data") is not None and not isinstance(header["data"], list):
        raise bad("'data' is not a list")


def _check_member_size(z: Any, path: Any, name: str, member: str, bins: int | None, hint: str) -> None:
    """A tensor's counts array, from the size the archive declares for it (not the compressed
    size: 2**27 zero counts compress to a few MB and took 8 GB to read), fits one row of ``bins``
    8-byte counts and the array's header."""
    try:
        size = z.zip.getinfo(f"{member}.npy").file_size
    except (KeyError, AttributeError):  # missing: the read below says so
        return
    if size > 8 * (bins or MAX_BINS) + 4096:
        raise StatsError(f"{str(path)!r}: tensor {name!r} has a damaged histogram (its counts take {size} bytes, "
                         f"more than {bins or MAX_BINS} bins)", hint=hint)


def _checked_histogram(path: Any, name: str, scalars: np.ndarray, counts: np.ndarray, bins: int | None,
                       hint: str) -> Histogram:
    """The histogram of tensor ``name``, refused when it cannot be one ``save_stats`` wrote:
    counts that are not whole non-negative numbers in one row of ``bins``, a range that float32
    scales cannot hold, totals that overflow, a min above the max or beyond the bins."""
    def bad(what: str) -> StatsError:
        return StatsError(f"{str(path)!r}: tensor {name!r} has a damaged histogram ({what})", hint=hint)

    if scalars.shape != (3,) or not np.issubdtype(scalars.dtype, np.floating):
        raise bad("its bin width, min and max are not 3 numbers")
    width, lo, hi = (float(v) for v in scalars)
    if not np.isfinite([width, lo, hi]).all() or width < 0 or lo > hi:
        raise bad(f"bin width {width}, range {lo}..{hi}")
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or counts.size == 0:
        raise bad(f"counts of shape {list(counts.shape)} and type {counts.dtype}, not one row of whole numbers")
    if bins is not None and counts.size != bins:
        raise bad(f"{counts.size} bins where the settings say {bins}")
    counts = counts.astype(np.int64)
    if (counts < 0).any() or float(counts.astype(np.float64).sum()) > MAX_TOTAL:
        raise bad("negative counts or a total beyond 2**53")
    top = width * counts.size
    if top > _F32_MAX or max(abs(lo), abs(hi)) > _F32_MAX:
        raise bad(f"a range of {top:g} that float32 scales cannot hold")
    if max(abs(lo), abs(hi)) > top * (1 + 1e-6) + 1e-30 and counts.sum() > 0:
        raise bad(f"its values reach {max(abs(lo), abs(hi)):g} beyond its bins' {top:g}")
    return Histogram(counts, width, lo, hi)


def merge_stats(stats: Sequence[CalibrationStats], names: Sequence[str] | None = None) -> CalibrationStats:
    """Merge the statistics of several runs on the same model (one run over all their data).

    Args:
        stats: two or more (one is returned as it is).
        names: the files, for messages.

    Raises:
        StatsError: the runs used another model, preprocessing, settings or tensors.
    """
    if not stats:
        raise StatsError("no statistics to merge")
    names = list(names) if names is not None else [f"statistics #{i + 1}" for i in range(len(stats))]
    first = stats[0]
    merged = dict(first.histograms)
    for s, name in zip(stats[1:], names[1:]):
        what = None
        if s.model.get("sha256") != first.model.get("sha256"):
            what = (f"another model ({s.model.get('path')}, not {first.model.get('path')})"
                    if s.model.get("path") != first.model.get("path") else
                    f"another model at the same path ({s.model.get('path')}: its SHA-256 differs, a file changed "
                    "between the runs)")
        elif s.preprocess != first.preprocess:
            what = "another preprocessing"
        elif s.settings != first.settings:
            diff = {k: (first.settings.get(k), s.settings.get(k)) for k in {*s.settings, *first.settings}
                    if s.settings.get(k) != first.settings.get(k)}
            what = f"other settings {diff}"
        elif set(s.histograms) != set(first.histograms):
            what = "other tensors"
        if what is not None:
            raise StatsError(f"{name} was collected with {what} than {names[0]}; cannot merge them",
                             hint="merge statistics of the same model, preprocessing and calibrate options")
        try:
            merged = {t: merge_histogram(h, s.histograms[t]) for t, h in merged.items()}
        except ValueError as err:  # another number of bins (settings written by hand)
            raise StatsError(f"{name} cannot be merged with {names[0]}: {err}",
                             hint="merge statistics of the same model, preprocessing and calibrate options") from None
        if any(h.total > MAX_TOTAL for h in merged.values()):
            raise StatsError(f"merging {name} takes a histogram's count beyond 2**53: a damaged statistics file",
                             hint="give files written by `quantkit calibrate --save-stats FILE`")
    data = [d for s in stats for d in s.data]
    twice = sorted(d for d, times in Counter(data).items() if times > 1)
    if twice:  # the same data calibrated in two runs (or a merged file merged again with one of its parts)
        log.warning("the data path %s is in more than one of the merged statistics: where those runs read the same "
                    "samples (one folder calibrated twice, or a merged file merged again with one of its parts), "
                    "they are counted once a file (%d samples in all); merge statistics of different data",
                    ", ".join(map(repr, twice[:3])), sum(s.num_samples for s in stats))
    return replace(first, histograms=merged, num_samples=sum(s.num_samples for s in stats), data=data)
