"""Turn the JSON results of ``calibrate``, ``compare``, ``bench`` and ``qat-demo`` into plots
(PNG and SVG) and one self-contained HTML page.

    files -> load_results (each classified by its keys) -> figures -> write_report(outdir)

Plots: accuracy (or top-1 agreement with FP32 where no labels exist) against latency for every
model that has both a comparison and a benchmark (matched by file name), FP32 as the
reference point; per-tensor amax by method (ranges.json); per-output SQNR (comparisons); QAT
training curves (qat-demo). Needs matplotlib (``pip install 'quantkit[notebooks]'``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit._deps import require
from quantkit._io import MANIFEST, MAX_RESULT_BYTES, input_file
from quantkit.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Results:
    """Result documents by kind, each keeping the file it came from (``_file``)."""

    compares: list[dict[str, Any]] = field(default_factory=list)
    benches: list[dict[str, Any]] = field(default_factory=list)
    ranges: list[dict[str, Any]] = field(default_factory=list)
    qat: list[dict[str, Any]] = field(default_factory=list)
    debug: list[dict[str, Any]] = field(default_factory=list)

    def add(self, doc: dict[str, Any], source: str = "<dict>") -> None:
        """Add one result document, classified by its keys and checked field by field (a damaged or
        hand-edited file is refused naming itself, never half drawn).

        Raises:
            InputError: not a quantkit result, or one whose fields are not what quantkit writes.
        """
        kind = result_kind(doc)
        if kind is None:
            raise InputError(f"{source}: not a quantkit result (calibrate ranges/report, compare --json, "
                             "bench --json, debug.json or qat-demo results.json)")
        try:
            _CHECKS[kind](doc)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            what = f"field {err.args[0]!r} missing" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            raise InputError(f"{source}: a damaged {kind} result ({what})",
                             hint="give the file as quantkit wrote it, or write it again") from None
        if kind == "demo":  # `quantkit demo`'s report.json
            for compare in doc["methods"].values():
                self.add(compare, source)
            for bench in doc["latency_batch32"].values():
                if "model" in bench:
                    self.add(bench, source)
            return
        if kind == "debug":  # `quantkit debug`'s debug.json (its ranking, with --rank, drawn too)
            ranking = doc.get("sensitivity")
            self.debug.append({**doc["layerwise"], "_file": source,
                               **({"sensitivity": ranking} if isinstance(ranking, dict) else {})})
            return
        getattr(self, {"bench": "benches", "compare": "compares", "ranges": "ranges", "qat": "qat"}[kind]).append(
            {**doc, "_file": source})


def result_kind(doc: Any) -> str | None:
    """Which quantkit result ``doc`` is, by its keys: demo, debug, bench, compare, ranges, qat;
    None for anything else."""
    if not isinstance(doc, dict):
        return None
    if "methods" in doc and "latency_batch32" in doc:
        return "demo"
    if isinstance(doc.get("layerwise"), dict):
        return "debug"
    if "median_ms" in doc:
        return "bench"
    if "outputs" in doc and "test" in doc:
        return "compare"
    if "tensors" in doc and "method" in doc:
        return "ranges"
    if "rows" in doc and "qat_curve" in doc:
        return "qat"
    return None


def _number(v: Any, *, optional: bool = False) -> None:
    """A number as quantkit writes one (non-finite ones as "inf"/"nan" strings); raises otherwise."""
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"{v!r} is not a number")
    x = float(v)
    if math.isfinite(x) and abs(x) > MAX_NUMBER:  # no axis can be drawn to it (matplotlib failed)
        raise TypeError(f"{v!r} is beyond any figure quantkit writes")


#: the largest magnitude a result's number may have (a latency of 1e308 ms is a damaged file)
MAX_NUMBER = 1e15


def _clean_text(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8 (a model file named in another
    encoding reaches the JSON as lone surrogates, which matplotlib and the page cannot take)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_clean_text(k): _clean_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_text(v) for v in value]
    return value


def _text(v: Any) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{v!r} is not text")


def _check_bench(d: dict[str, Any]) -> None:
    _text(d["model"])
    for key in ("median_ms", "p99_ms"):
        _number(d[key])
    _number(d.get("throughput_per_s"), optional=True)
    if isinstance(d["batch"], bool) or not isinstance(d["batch"], int):
        raise TypeError(f"batch {d['batch']!r} is not an integer")


def _check_compare(d: dict[str, Any]) -> None:
    _text(d["test"])
    _text(d["reference"])
    if not isinstance(d["outputs"], list) or not d["outputs"]:
        raise ValueError("outputs is not a list of outputs")
    for o in d["outputs"]:
        _text(o["name"])
        _number(o["cosine_mean"])
        _number(o["sqnr_db"])
        _number(o.get("top1_agreement"), optional=True)
    _number(d.get("accuracy_test"), optional=True)
    if d.get("accuracy_test") is not None:
        _number(d["accuracy_reference"])


def _check_ranges(d: dict[str, Any]) -> None:
    _text(d["method"])
    if not isinstance(d["tensors"], dict) or not all(isinstance(t, dict) for t in d["tensors"].values()):
        raise TypeError("tensors is not a mapping of tensor name to its ranges")


def _check_qat(d: dict[str, Any]) -> None:
    for key in ("fp32_curve", "qat_curve"):
        for r in d.get(key, []):
            _number(r["epoch"])
            _number(r["test_accuracy"])


def _check_debug(d: dict[str, Any]) -> None:
    if not isinstance(d["layerwise"]["activations"], list):
        raise TypeError("activations is not a list")
    for a in d["layerwise"]["activations"]:
        _text(a["tensor"])
        for key in ("depth", "local_sqnr_db", "accumulated_sqnr_db"):
            _number(a[key])
    ranking = d.get("sensitivity")
    if ranking is not None:  # `debug --rank`
        _number(ranking["int8_error"])
        for r in ranking["rows"]:
            _text(r["name"])
            _number(r["only_float_error"])


def _check_demo(d: dict[str, Any]) -> None:
    if not isinstance(d["methods"], dict) or not isinstance(d["latency_batch32"], dict):
        raise TypeError("methods / latency_batch32 are not mappings")
    for part in (*d["methods"].values(), *d["latency_batch32"].values()):
        if not isinstance(part, dict):
            raise TypeError(f"{part!r} is not a result")


_CHECKS = {"bench": _check_bench, "compare": _check_compare, "ranges": _check_ranges, "qat": _check_qat,
           "debug": _check_debug, "demo": _check_demo}


def load_results(paths: Iterable[str | os.PathLike[str]]) -> Results:
    """Read result files (JSON); folders are searched for ``*.json``."""
    res = Results()
    files: list[tuple[Path, bool]] = []  # (file, found in a folder)
    for raw in paths:
        p = Path(raw)
        if str(raw) and p.is_dir():
            files += [(f, True) for f in sorted(p.rglob("*.json"))]
        else:
            files.append((input_file(raw, "result file"), False))
    for f, found in files:
        if f.name.endswith(".cache.json") or f.name == MANIFEST:
            continue  # calibration cache provenance / the list of written files, not results
        if f.stat().st_size > MAX_RESULT_BYTES:  # quantkit's results are kilobytes to a few megabytes
            raise InputError(f"{str(f)!r} is {f.stat().st_size / 2**20:.0f} MiB, not a quantkit result (those are at "
                             f"most a few MiB; {MAX_RESULT_BYTES >> 20} MiB is the limit)",
                             hint="pass the JSON files calibrate, compare, bench and debug write")
        try:
            doc = _clean_text(json.loads(f.read_text(encoding="utf-8")))
        except RecursionError:
            raise InputError(f"{str(f)!r} is JSON nested too deeply to be a quantkit result") from None
        except (OSError, ValueError) as err:
            raise InputError(f"{str(f)!r} is not readable JSON: {err}") from err
        if found and result_kind(doc) is None:  # a folder's other JSON (calibrate's sensitivity.json)
            log.info("%s: not a result quantkit draws; skipped", f)
            continue
        if isinstance(doc, dict) or not found:
            res.add(doc if isinstance(doc, dict) else {}, str(f))
    _tell_apart(res.compares, "test")
    if not (res.compares or res.benches or res.ranges or res.qat or res.debug):
        raise InputError("no quantkit results found in the given files",
                         hint="pass the JSON files of calibrate (ranges.json, report.json), compare --json, bench --json")
    return res


@dataclass(frozen=True)
class Point:
    """One model on the accuracy-latency plane."""

    label: str
    latency_ms: float
    score: float
    score_name: str  # "accuracy" or "top-1 agreement"
    backend: str
    reference: bool = False


def _stem(name: str) -> str:
    base = Path(str(name).split(" (")[0]).name
    for suffix in (".onnx", ".plan", ".engine", ".trt"):
        base = base.removesuffix(suffix)
    return base


def by_model(docs: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One document per model (the last one read wins): the same model named by several files
    (calibrate's report.json and a compare --json of it) is one model, one point. A model is its
    file (``<key>_path``, recorded since the twenty-fourth session: every `calibrate -o DIR` names
    its model ``<stem>.int8.onnx``, and four calibrations of one model were shown as one), or, in
    older documents, its name."""
    return list({_path(d, key) or _stem(d[key]): d for d in docs}.values())


def _path(doc: dict[str, Any], key: str) -> str | None:
    """``doc``'s recorded file of ``key`` (a string), or None (older documents, or an edited value)."""
    value = doc.get(f"{key}_path")
    return value if isinstance(value, str) and value else None


def _tell_apart(docs: Sequence[dict[str, Any]], key: str) -> None:
    """Documents of different files (``<key>_path``) of one name get their folder's name in it:
    ``m.int8 [out-a]``, so the page's rows, bars and points say which is which."""
    paths: dict[str, set[str]] = {}
    for d in docs:
        if _path(d, key):
            paths.setdefault(_stem(d[key]), set()).add(str(_path(d, key)))
    for d in docs:
        stem, path = _stem(d[key]), _path(d, key)
        if path and len(paths.get(stem, ())) > 1:
            d[key] = f"{stem} [{Path(path).parent.name}].onnx"


def accuracy_latency_points(res: Results) -> list[Point]:
    """Join comparisons and benchmarks by model file name, one point per model; FP32 from the
    comparisons' reference accuracy (agreement 1.0 where there are no labels)."""
    bench = {_stem(b["model"]): b for b in res.benches}
    points: list[Point] = []
    refs: dict[str, tuple[float, str]] = {}  # reference -> (its score, the score's name)
    for c in by_model(res.compares, "test"):
        labels = c.get("accuracy_test") is not None
        agreements = [float(o["top1_agreement"]) for o in c["outputs"] if o.get("top1_agreement") is not None]
        score = c["accuracy_test"] if labels else min(agreements, default=None)  # the worst output's
        if score is None:
            continue
        refs.setdefault(_stem(c["reference"]), (c["accuracy_reference"], "accuracy") if labels
                        else (1.0, "top-1 agreement"))
        b = bench.get(_stem(c["test"]))
        if b is not None:
            points.append(Point(_stem(c["test"]), b["median_ms"], float(score),
                                "accuracy" if labels else "top-1 agreement", b.get("backend", "?")))
    for stem, (score, name) in refs.items():  # (its own comparisons' kind: an unlabelled one is agreement 1.0)
        b = bench.get(stem)
        if b is not None:
            label = stem if "fp32" in stem.lower() else f"{stem} (FP32)"
            points.append(Point(label, b["median_ms"], score, name, b.get("backend", "?"), reference=True))
    return points


# ---------------------------------------------------------------- figures
def _plt() -> Any:
    require("matplotlib", extra="notebooks")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_latency(points: Sequence[Point], title: str = "accuracy vs latency") -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p in points:  # a legend, not annotations: close points would overprint their labels
        if p.reference:
            ax.scatter(p.latency_ms, p.score, marker="*", s=220, color="black", zorder=3, label=p.label)
        else:
            ax.scatter(p.latency_ms, p.score, s=70, alpha=0.85, zorder=3, label=p.label)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("median latency, ms (" + ", ".join(sorted({p.backend for p in points})) + ")")
    ax.set_ylabel(" / ".join(sorted({p.score_name for p in points})) if points else "accuracy")  # (mixed: both)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def model_name(doc: dict[str, Any]) -> str:
    """The model a result document is about (its file name), else the folder it came from."""
    model = doc.get("model")
    path = model.get("path") if isinstance(model, dict) else model
    if path:
        return Path(str(path)).name
    return Path(doc.get("_file", "")).parent.name or "model"


#: one marker per method, drawn side by side, so that equal values (minmax and entropy-trt on
#: one-sided tensors, auto and mse) still show every method
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _positive(v: Any) -> float:
    """``v`` as a float when it is a finite positive number (a point on a log axis), else NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) and f > 0 else math.nan


def plot_amax_by_method(ranges: dict[str, Any], *, max_tensors: int = 40, title: str | None = None) -> Any:
    plt = _plt()
    tensors = [n for n, t in ranges["tensors"].items() if t.get("quantized", True)][:max_tensors]
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(tensors) + 3), 4.5))
    from quantkit.calibrators.methods import method_names

    methods = [m for m in method_names() if all(ranges["tensors"][t].get(m) is not None for t in tensors)]
    width = 0.7 / max(1, len(methods))
    drawn = False
    for i, m in enumerate(methods):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(tensors))]
        ys = [_positive(ranges["tensors"][t][m]) for t in tensors]  # a 0, NaN or damaged amax: no point
        drawn = drawn or any(math.isfinite(y) for y in ys)
        ax.plot(xs, ys, linestyle="none", marker=_MARKERS[i % len(_MARKERS)],
                markersize=5, markerfacecolor="none", markeredgewidth=1.2, label=m)
    ax.set_xticks(range(len(tensors)))
    ax.set_xticklabels([t[-28:] for t in tensors], rotation=90, fontsize=6)
    if drawn:
        ax.set_yscale("log")
    ax.set_ylabel("amax")
    ax.set_title(title or f"per-tensor amax by method: {model_name(ranges)}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_output_error(compares: Sequence[dict[str, Any]], title: str = "output SQNR against FP32") -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(4, len(compares)) + 1.5))
    labels, values = [], []
    for c in by_model(compares, "test"):
        for o in c["outputs"]:
            labels.append(f"{_stem(c['test'])}: {o['name']}" if len(c["outputs"]) > 1 else _stem(c["test"]))
            values.append(float(o["sqnr_db"]) if o.get("sqnr_db") is not None else math.nan)  # "inf": identical
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=40.0) + 5.0  # an identical output's bar to the right edge, marked "exact"
    ax.barh(range(len(values)), [top if v == math.inf else (0.0 if math.isnan(v) else v) for v in values])
    for i, v in enumerate(values):
        if not math.isfinite(v):
            ax.text(top if v == math.inf else 0.0, i, " exact" if v == math.inf else " no SQNR (not float)",
                    va="center", fontsize=7)
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("SQNR, dB (higher is closer to FP32)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_training_curves(qat: dict[str, Any]) -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    fp32, q = qat.get("fp32_curve", []), qat.get("qat_curve", [])
    ax.plot([r["epoch"] for r in fp32], [r["test_accuracy"] for r in fp32], label="FP32 training")
    n = len(fp32)
    ax.plot([n + r["epoch"] for r in q], [r["test_accuracy"] for r in q], marker="o", label="QAT fine-tuning")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (PyTorch)")
    ax.set_title("digits: FP32 training, then QAT")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_error_along_depth(debug: dict[str, Any]) -> Any:
    """``quantkit debug``: local and accumulated SQNR of every quantized activation, in graph
    order, so one sees where error enters (a low local point) and how it grows downstream."""
    plt = _plt()
    acts = sorted(debug["activations"], key=lambda a: a["depth"])
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(acts) + 3), 4.5))
    xs = range(len(acts))
    ax.plot(xs, [float(a["local_sqnr_db"]) for a in acts], marker="o", label="local (this pair alone)")
    ax.plot(xs, [float(a["accumulated_sqnr_db"]) for a in acts], marker="s", label="accumulated (FP32 vs INT8 model)")
    weighted = [a.get("weighted_local_sqnr_db") for a in acts]
    if any(isinstance(w, (int, float)) for w in weighted):  # debug files of this version: as the weights see it
        ax.plot(xs, [float(w) if isinstance(w, (int, float)) else float("nan") for w in weighted], marker=".",
                linestyle=":", label="local, as the readers' weights see it")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([a["tensor"][-28:] for a in acts], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR, dB (higher is closer to FP32)")
    ax.set_title(f"error along the network: {_stem(debug.get('test', 'int8'))}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sensitivity(debug: dict[str, Any], *, groups: int = 20) -> Any:
    """``quantkit debug --rank``: the most sensitive groups' output error with only that group in
    float, against the INT8 model's (the lower a bar, the more that group alone costs)."""
    plt = _plt()
    ranking = debug["sensitivity"]
    rows = ranking["rows"][:groups]
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.3 * len(rows) + 1.5)))
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [_positive(r["only_float_error"]) for r in rows], color="#4c72b0",
            label="output error, only this group in float")
    ax.axvline(_positive(ranking["int8_error"]), color="#c44e52", linestyle="--", label="output error, INT8 model")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([str(r["name"])[-36:] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("noise / signal power of the output against FP32 (lower is closer)")
    ax.set_title(f"sensitivity ranking: {_stem(debug.get('test', 'int8'))} ({ranking.get('estimator', 'exact')})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def figures(res: Results) -> dict[str, Any]:
    """Every figure the results support, by file stem."""
    figs: dict[str, Any] = {}
    pts = accuracy_latency_points(res)
    if pts:
        figs["accuracy_vs_latency"] = plot_accuracy_latency(pts)
    seen: dict[str, int] = {}
    for r in res.ranges:  # named by model; a second range set of one model gets a number
        stem = _stem(model_name(r))
        seen[stem] = seen.get(stem, 0) + 1
        figs[f"amax_by_method_{stem}{'_' + str(seen[stem]) if seen[stem] > 1 else ''}"] = plot_amax_by_method(r)
    if res.compares:
        figs["output_sqnr"] = plot_output_error(res.compares)
    for d in res.debug:
        figs[f"error_along_depth_{_stem(d.get('test', 'int8'))}"] = plot_error_along_depth(d)
        if d.get("sensitivity", {}).get("rows"):
            figs[f"sensitivity_{_stem(d.get('test', 'int8'))}"] = plot_sensitivity(d)
    for i, q in enumerate(res.qat):
        figs[f"qat_training{'_' + str(i) if i else ''}"] = plot_training_curves(q)
    return figs


def _table(res: Results) -> str:
    rows = []
    for c in by_model(res.compares, "test"):  # every output: a model's first one may be its exact one
        acc = "-" if c.get("accuracy_test") is None else f"{float(c['accuracy_test']):.4f}"
        for i, o in enumerate(c["outputs"]):
            agree = "-" if o.get("top1_agreement") is None else f"{float(o['top1_agreement']):.4f}"
            cos = "-" if o.get("cosine_mean") is None else f"{float(o['cosine_mean']):.5f}"
            db = "-" if o.get("sqnr_db") is None else f"{float(o['sqnr_db']):.2f}"
            rows.append(f"<tr><td>{html.escape(_stem(c['test'])) if i == 0 else ''}</td>"
                        f"<td>{html.escape(str(o.get('name', '')))}</td><td>{acc if i == 0 else ''}</td>"
                        f"<td>{agree}</td><td>{cos}</td><td>{db}</td></tr>")
    head = ("<tr><th>model</th><th>output</th><th>accuracy</th><th>top-1 agreement</th><th>cosine</th>"
            "<th>SQNR dB</th></tr>")
    bench_rows = "".join(
        f"<tr><td>{html.escape(_stem(b['model']))}</td><td>{html.escape(str(b.get('backend')))} "
        f"({html.escape(str(b.get('device')))})</td><td>{int(b['batch'])}</td><td>{float(b['median_ms']):.3f}</td>"
        f"<td>{float(b['p99_ms']):.3f}</td><td>{float(b.get('throughput_per_s') or 0):.1f}</td></tr>"
        for b in by_model(res.benches, "model"))
    bench_head = "<tr><th>model</th><th>backend</th><th>batch</th><th>median ms</th><th>p99 ms</th><th>samples/s</th></tr>"
    out = ""
    if rows:
        out += f"<h2>INT8 against FP32</h2><table>{head}{''.join(rows)}</table>"
    if bench_rows:
        out += f"<h2>Latency</h2><table>{bench_head}{bench_rows}</table>"
    return out


def write_report(res: Results, outdir: str | os.PathLike[str], *, title: str = "quantkit report",
                 force: bool = False, inputs: Sequence[Any] = ()) -> dict[str, Path]:
    """Write every figure as PNG and SVG plus ``index.html`` (figures inlined, no external
    files needed) into ``outdir``, atomically, never over or into ``inputs`` (the result files it
    read). Returns the written paths by name."""
    from quantkit._io import output_dir

    plt = _plt()
    title = _clean_text(title)  # a title or a file name in another encoding: lone surrogates
    figs = figures(res)
    written: dict[str, Path] = {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>", _table(res)]
    with output_dir(outdir, force=force, inputs=inputs, command="quantkit report") as tmp:
        for name, fig in figs.items():
            png, svg = io.BytesIO(), io.BytesIO()
            fig.savefig(png, format="png", dpi=120)
            fig.savefig(svg, format="svg")
            plt.close(fig)
            (tmp / f"{name}.png").write_bytes(png.getvalue())
            (tmp / f"{name}.svg").write_bytes(svg.getvalue())
            written[f"{name}.png"] = Path(outdir) / f"{name}.png"
            written[f"{name}.svg"] = Path(outdir) / f"{name}.svg"
            parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2>"
                         f"<img alt='{html.escape(name, quote=True)}' src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>")
        files = dict.fromkeys(d["_file"] for d in [*res.compares, *res.benches, *res.ranges, *res.qat, *res.debug])
        parts.append("<p>sources: " + ", ".join(html.escape(f) for f in files) + "</p>")
        parts.append("</body></html>")
        (tmp / "index.html").write_text(_clean_text("\n".join(parts)), encoding="utf-8")
        written["index.html"] = Path(outdir) / "index.html"
    return written
