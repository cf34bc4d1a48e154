"""Finding and fixing INT8 accuracy loss (issue 14): quantkit's budgeted fallback against NNCF's
``quantize_with_accuracy_control``, the sensitivity ranking's cost, and ``quantkit debug``'s memory.

    pip install -e '.[test,realmodels]' && python benchmarks/debug_fallback.py [--quick]
        [--out benchmarks/results/debug_fallback.md]

One process, one markdown table (printed and written to ``--out``). Per model, with the same
calibration data, the same held-out evaluation data and the same budget (``--max-drop`` points
of accuracy, default 0.5):

- FP32 accuracy, and plain PTQ (``quantkit.quantize``, default method) accuracy;
- quantkit fallback (``quantkit.debug.fallback``: ``calibrate --max-drop``): accuracy, drop,
  groups left in float / all groups, wall seconds (calibration pass + fallback), the ranking's
  cost in FP32-pass equivalents over the ranking subset (as the ranking reports it);
- NNCF 3.4 ``quantize_with_accuracy_control`` (ONNX, ``preset`` performance = symmetric, what
  TensorRT builds; ``subset_size`` = every calibration sample) run by ``/tmp/venv-nncf/bin/python``
  in a subprocess with the data passed as .npz: accuracy, drop, operations it reverted to float
  (from its log) and weighted ops without Q/DQ on their input (counted in its model, the same
  count as for quantkit's), wall seconds with its process start and of the call alone;
- the ratios and the issue's targets: fallback meets the budget with <= 10% of groups in float;
  at most NNCF's layers in float; >= 5x less wall time than NNCF.

Models: the outlier CNN (``benchmarks/lossy_models.py``: trained on the bundled digits, one
channel rescaled by 96 with the inverse in its consumer, FP32 function unchanged) and RapidOCR's
PP-OCR text orientation classifier from the real-model corpus (its wheel from the wheel cache,
``QUANTKIT_WHEEL_CACHE``; a row says "not run" when it is missing). Second table: the ranking's
cost on a ResNet-18-size model (``benchmarks/calibration.py``'s, random weights, photo crops),
in the ranking's own FP32-pass equivalents and measured against a timed FP32 pass over the same
subset. Third table: peak RSS of ``quantkit debug FP32 INT8 --images DIR -n N`` in a fresh
process for N = 256 and 2048 on that ResNet-18 (target: flat within 10%).

``--quick``: the outlier CNN only, 128 evaluation samples for NNCF's side as well, debug memory
at 64 and 256 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lossy_models  # noqa: E402

NNCF_PY = Path("/tmp/venv-nncf/bin/python")
BATCH = 32
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- counting float layers the same way for both
def float_weighted_ops(model: onnx.ModelProto) -> list[str]:
    """Weighted ops (Conv, ConvTranspose, Gemm, MatMul) whose first input is not the output of a
    DequantizeLinear: the ops that run in FP16/FP32 in TensorRT's explicit quantization. Counted
    the same way in quantkit's and NNCF's models."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name or n.output[0] for n in model.graph.node if n.op_type in WEIGHTED and n.input[0] not in dq]


def accuracy_of(path_or_model: Any, npz: Path, input_name: str, task: "Task | None" = None) -> float:
    """The task metric in percent of an ONNX model on an .npz: accuracy (argmax of the first
    output against ``labels``), or with ``task`` its exact match (``task.scores``)."""
    import onnxruntime as ort

    data = np.load(npz)
    x = data[input_name]
    blob = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {input_name: x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)]
    if task is not None:
        return float(np.concatenate([task.scores(o, range(i, i + len(o)))
                                     for i, o in zip(range(0, len(x), BATCH), outs)]).mean())
    return 100.0 * float((np.concatenate([o.argmax(1) for o in outs]) == data["labels"]).mean())


@dataclass
class Task:
    """A recogniser's task metric: exact match (100 or 0 per line) of the text that RapidOCR's own
    CTC decoder reads from the first output, against the true texts (.npy), spaces ignored as in
    the corpus's ``exact_match``."""

    model: Path
    package_root: Path
    texts_npy: Path

    def __post_init__(self) -> None:
        self.decode = lossy_models.ctc_decoder(self.model, self.package_root)
        self.texts = np.load(self.texts_npy)

    def scores(self, out: np.ndarray, indices: Any) -> np.ndarray:
        from tests.realmodels.metrics import exact_match  # spaces ignored (CTC decoders differ on them)

        return np.array([exact_match([g], [str(self.texts[i])]) for g, i in zip(self.decode(out), indices)])


# ---------------------------------------------------------------- NNCF in its own venv
NNCF_SCRIPT = r"""
import json, logging, re, sys, time
t_start = time.perf_counter()
import numpy as np, onnx, onnxruntime as ort, nncf
from nncf.common.logging import nncf_logger
model_path, calib_npz, eval_npz, name, max_drop, out, ctc_utils, texts_npy = sys.argv[1:9]
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
        # progress on stderr, so that a run stopped by the timeout still says how far it got
        print(f"{time.perf_counter() - t_start:.0f} s: {lines[-1]}", file=sys.stderr, flush=True)
nncf_logger.addHandler(Keep())
nncf_logger.setLevel(logging.INFO)
cal = np.load(calib_npz)[name]
ev = np.load(eval_npz)
ex = ev[name]
if ctc_utils:  # a recogniser: exact match of the text RapidOCR's own CTC decoder reads
    import importlib.util
    spec = importlib.util.spec_from_file_location("rec_utils", ctc_utils)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    dec = mod.CTCLabelDecode(character=meta["character"].splitlines())
    texts = np.load(texts_npy)
    def correct_of(out, b):
        return [100.0 * float(t.replace(" ", "") == str(texts[i]).replace(" ", "")) for (t, _), i in zip(dec(out), b)]
else:
    ey = ev["labels"]
    def correct_of(out, b):
        return [100.0 * float(v) for v in (out.argmax(1) == ey[b])]
def validate(model, items):
    # items: the samples (index, ...) NNCF asks for; run in batches of 32, per-sample correctness back
    items = list(items)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    idx = np.array([int(i) for i in items])
    correct = []
    for s in range(0, len(idx), 32):
        b = idx[s:s + 32]
        correct += correct_of(sess.run(None, {name: ex[b]})[0], b)
    return float(np.mean(correct)), correct
cal_items = [{name: cal[i:i + 1]} for i in range(len(cal))]
t = time.perf_counter()
q = nncf.quantize_with_accuracy_control(
    onnx.load(model_path), nncf.Dataset(cal_items), nncf.Dataset(list(range(len(ex)))), validate,
    max_drop=float(max_drop), drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.PERFORMANCE,
    subset_size=len(cal))
seconds = time.perf_counter() - t
onnx.save(q, out)
reverted = [l for l in lines if "were reverted back" in l]
m = re.search(r"(\d+) out of (\d+)", reverted[-1]) if reverted else None
print(json.dumps({"seconds": seconds, "seconds_in_process": time.perf_counter() - t_start,
                  "reverted": int(m.group(1)) if m else 0, "quantized_ops": int(m.group(2)) if m else None,
                  "log": [l for l in lines if "Accuracy drop" in l or "reverted" in l.lower() or "Algorithm" in l
                          or "Total number" in l][-12:]}))
"""


def run_nncf(case: "Case", max_drop: float, work: Path, timeout: float) -> dict:
    if not NNCF_PY.exists():
        return {"error": f"not run: no NNCF interpreter at {NNCF_PY} (--nncf-python)"}
    out = work / "nncf-qwac.onnx"
    ctc = str(next(case.task.package_root.rglob("ch_ppocr_rec/utils.py"))) if case.task else ""
    t = time.perf_counter()
    try:
        r = subprocess.run([str(NNCF_PY), "-c", NNCF_SCRIPT, str(case.model), str(case.calib_npz), str(case.eval_npz),
                            case.input_name, str(max_drop), str(out), ctc,
                            str(case.task.texts_npy) if case.task else ""], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        said = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        progress = [ln for ln in said.splitlines() if ln.strip() and " s: " in ln][-12:]
        return {"error": f"not finished in {timeout:.0f} s (stopped)", "timeout": timeout,
                "log": ["(stopped; NNCF's last log lines:)", *progress]}
    wall = time.perf_counter() - t
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return {"error": f"failed: {last[0][:200]}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    q = onnx.load(str(out))
    res.update(wall=wall, metric=accuracy_of(q, case.eval_npz, case.input_name, case.task), float_ops=len(float_weighted_ops(q)),
               weighted_ops=sum(n.op_type in WEIGHTED for n in q.graph.node))
    return res


# ---------------------------------------------------------------- quantkit
@dataclass
class Case:
    """One model of the table and its data."""

    name: str
    model: Path
    input_name: str
    calib_npz: Path
    eval_npz: Path
    note: str = ""
    task: Task | None = None  # None: accuracy against the labels
    stats: dict[str, Any] = field(default_factory=dict)  # StatsConfig fields over the defaults
    peer: bool = True  # also run NNCF (once per model and data)
    method: str = "entropy"  # the PTQ's range method (--method)


def _config(case: "Case") -> Any:
    from quantkit.ptq import ExportConfig, QuantizeConfig, StatsConfig

    return QuantizeConfig(StatsConfig(**case.stats), export=ExportConfig(case.method))


@dataclass
class Row:
    case: Case
    fp32: float | None = None
    ptq: float | None = None
    ptq_float_ops: int | None = None
    qk: dict[str, Any] = field(default_factory=dict)
    nncf: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_quantkit_fallback(case: Case, max_drop: float, estimator: str = "exact") -> dict[str, Any]:
    """Calibration pass + ``fallback`` to the budget, timed together (NNCF's time includes its own
    quantization too), through the API contract of ``quantkit.debug.fallback``."""
    try:
        from quantkit.debug.fallback import FallbackConfig, fallback
        from quantkit.debug.sensitivity import quant_groups
    except ImportError as err:
        return {"error": f"not available: ImportError: {err}"}
    import quantkit
    from quantkit.datasets.sources import NumpySource

    cal_src, ev_src = NumpySource(case.calib_npz), NumpySource(case.eval_npz)
    t = time.perf_counter()
    config = _config(case)  # no method check, as `calibrate --max-drop` (the fallback measures the methods)
    config = replace(config, export=replace(config.export, method_check=False))
    cal = quantkit.quantize(onnx.load(str(case.model)), cal_src, config)
    if case.task is None:
        res = fallback(cal, ev_src, range(len(ev_src)), FallbackConfig(max_drop=max_drop, drop_metric="accuracy",
                                                                       estimator=estimator), on_step=_log_step)
    else:
        res = fallback(cal, ev_src, range(len(ev_src)), FallbackConfig(max_drop=max_drop, estimator=estimator),
                       task_metric=case.task.scores, on_step=_log_step)
    seconds = time.perf_counter() - t
    groups = quant_groups(cal.model, cal.plan)
    ranking = getattr(res, "ranking", None)
    out = {"met": res.met, "metric": accuracy_of(res.int8_model, case.eval_npz, case.input_name, case.task),
           "reported_metric": res.int8_metric_after, "drop": res.drop_after, "float_groups": list(res.float_groups),
           "num_groups": res.num_groups, "all_groups": len(groups), "overrides": dict(res.method_overrides),
           "seconds": seconds, "fallback_seconds": res.seconds, "steps": res.steps,
           "float_ops": len(float_weighted_ops(res.int8_model))}
    if ranking is None:  # ranked again on the evaluation data, to report its cost (not in the time above)
        from quantkit.debug.sensitivity import rank_sensitivity

        ranking = rank_sensitivity(cal, ev_src, range(len(ev_src)))
    out.update(ranking_cost=ranking.cost_fp32_passes, ranking_seconds=ranking.seconds,
               ranking_top=[r.name if hasattr(r, "name") else r["name"] for r in ranking.rows[:3]])
    return out


def _log_step(step: dict[str, Any]) -> None:
    log(f"     step {step['step']}: {step['action']} {','.join(step['groups'])} -> drop {step['drop']:.3g} "
        f"({step['seconds']:.1f} s)")


def run_case(case: Case, max_drop: float, work: Path, peers: bool, nncf_timeout: float = 7200,
             estimator: str = "exact") -> Row:
    import quantkit
    from quantkit.datasets.sources import NumpySource

    row = Row(case)
    try:
        row.fp32 = accuracy_of(case.model, case.eval_npz, case.input_name, case.task)
        cal = quantkit.quantize(onnx.load(str(case.model)), NumpySource(case.calib_npz), _config(case))
        ptq = cal.int8_model()
        row.ptq = accuracy_of(ptq, case.eval_npz, case.input_name, case.task)
        row.ptq_float_ops = len(float_weighted_ops(ptq))
    except Exception as err:
        row.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        return row
    log(f"   FP32 {row.fp32:.2f}, plain PTQ {row.ptq:.2f}")
    try:
        row.qk = run_quantkit_fallback(case, max_drop, estimator)
    except Exception as err:
        row.qk = {"error": f"failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        log(traceback.format_exc(limit=4))
    log(f"   quantkit: {row.qk.get('error') or 'done'}")
    if peers and case.peer:
        try:
            row.nncf = run_nncf(case, max_drop, work, nncf_timeout)
        except Exception as err:
            row.nncf = {"error": f"failed: {type(err).__name__}: {err}"}
        log(f"   NNCF: {row.nncf.get('error') or 'done'}")
    else:
        row.nncf = {"error": "not run (--no-peers)" if not peers else "not run: the same model and data as the row above"}
    return row


# ---------------------------------------------------------------- ranking cost on a ResNet-18-size model
def ranking_cost(subset: int, work: Path) -> dict[str, Any]:
    """``rank_sensitivity`` on ResNet-18 (random weights) over ``subset`` photo crops: its own
    FP32-pass equivalents and its seconds against a timed FP32 pass over the same subset (the
    side-by-side pass over the evaluation data that picks the subset is counted by the ranking)."""
    try:
        from quantkit.debug.sensitivity import quant_groups, rank_sensitivity
    except ImportError as err:
        return {"error": f"not available: ImportError: {err}"}
    import calibration  # benchmarks/calibration.py: the model and the photos

    import quantkit
    from quantkit.backends.onnxruntime import OrtRunner
    from quantkit.datasets import Batcher, ImageFolder, Preprocess
    from quantkit.datasets.preprocess import IMAGENET_MEAN, IMAGENET_STD

    model = calibration.resnet18_onnx()
    src = ImageFolder(calibration.photo_folder(256), Preprocess(crop=(224, 224), scale=1 / 255, mean=IMAGENET_MEAN,
                                                                std=IMAGENET_STD))
    cal = quantkit.quantize(onnx.load(str(model)), src, indices=range(128))
    ev = list(range(128, 256))
    rep = rank_sensitivity(cal, src, ev, subset=subset)
    with OrtRunner(cal.model) as r:
        t = time.perf_counter()
        for b in Batcher(src, [cal.specs[0].name], BATCH, indices=list(rep.subset_indices)):
            r.infer(b.feed)
        fp32_subset = time.perf_counter() - t
        t = time.perf_counter()
        for b in Batcher(src, [cal.specs[0].name], BATCH, indices=ev):
            r.infer(b.feed)
        fp32_eval = time.perf_counter() - t
    return {"groups": len(quant_groups(cal.model, cal.plan)), "subset": len(rep.subset_indices),
            "eval": len(ev), "cost": rep.cost_fp32_passes, "seconds": rep.seconds, "fp32_subset_s": fp32_subset,
            "fp32_eval_s": fp32_eval}


# ---------------------------------------------------------------- debug memory
def debug_memory(sizes: tuple[int, ...], work: Path) -> dict[int, dict[str, float]]:
    """Peak RSS (MiB) and wall seconds of ``quantkit debug`` on ResNet-18 for each N, each in a
    fresh process (the CLI, as a user runs it)."""
    import calibration

    model = calibration.resnet18_onnx()
    photos = calibration.photo_folder(2048) if max(sizes) > 256 else calibration.photo_folder(256)
    int8 = work / "r18" / "resnet18.int8.onnx"
    if not int8.exists():
        subprocess.run([sys.executable, "-m", "quantkit", "calibrate", str(model), "--images", str(photos),
                        "--num-images", "256", "-o", str(work / "r18"), "--no-progress"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    out = {}
    for n in sizes:
        # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
        code = ("import re, time; from quantkit.cli import main; t = time.perf_counter(); "
                f"rc = main(['debug', {str(model)!r}, {str(int8)!r}, '--images', {str(photos)!r}, '--num-images', '{n}', "
                f"'-o', {str(work / f'dbg{n}')!r}, '--no-progress', '--force']); "
                "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                "print('RESULT', rc, hwm / 1024, time.perf_counter() - t)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
        if r.returncode != 0 or line is None:
            out[n] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
            continue
        _, rc, rss, secs = line.split()
        out[n] = {"rss_mib": float(rss), "seconds": float(secs)}
        log(f"   debug -n {n}: {float(rss):.0f} MiB, {float(secs):.1f} s")
    return out


# ---------------------------------------------------------------- the table
def f(x: Any, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def yes(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def table(rows: list[Row], max_drop: float) -> list[str]:
    out = [f"## Fallback to a {max_drop}-point accuracy budget: quantkit against NNCF `quantize_with_accuracy_control`",
           "",
           "| model | FP32 % | plain PTQ % (drop) | quantkit fallback %, drop | groups in float / all (%) | quantkit s "
           "| ranking cost (FP32-pass eq.) | NNCF QwAC %, drop | NNCF reverted ops (weighted ops in float) | NNCF s "
           "(call alone) | NNCF s / quantkit s | float layers quantkit / NNCF |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    targets = []
    for r in rows:
        c = r.case
        if r.error:
            out.append(f"| {c.name} | " + " | ".join(["—"] * 11) + f" |\n\n{c.name}: {r.error}")
            continue
        q, n = r.qk, r.nncf
        ptq = f"{r.ptq:.2f} ({r.fp32 - r.ptq:+.2f})" if r.ptq is not None else "—"
        if "error" in q:
            qcells = [q["error"], "—", "—", "—"]
        else:
            pct = 100 * len(q["float_groups"]) / max(q["num_groups"], 1)
            qcells = [f"{q['metric']:.2f}, {r.fp32 - q['metric']:+.2f}" + ("" if q["met"] else " (budget not met)"),
                      f"{len(q['float_groups'])} / {q['num_groups']} ({pct:.0f}%)", f"{q['seconds']:.1f}",
                      f"{q['ranking_cost']:.2f}"]
        if "error" in n:
            ncells = [n["error"], "—", "—"]
        else:
            ncells = [f"{n['metric']:.2f}, {r.fp32 - n['metric']:+.2f}",
                      (f"{n['reverted']} of {n['quantized_ops']}" if n["quantized_ops"] is not None else
                       "0 (its PTQ met the budget)") + f" ({n['float_ops'] - (r.ptq_float_ops or 0)})",
                      f"{n['wall']:.1f} ({n['seconds']:.1f})"]
        both = "error" not in q and "error" not in n
        ratio = f"{n['wall'] / q['seconds']:.1f}x" if both else "—"
        stopped = "error" not in q and "timeout" in n  # NNCF did not finish: its time is at least the limit
        if stopped:
            ratio = f"> {n['timeout'] / q['seconds']:.1f}x"
        layers = f"{q['float_ops'] - r.ptq_float_ops} / {n['float_ops'] - r.ptq_float_ops}" if both else "—"
        out.append(f"| {c.name} | {r.fp32:.2f} | {ptq} | " + " | ".join(qcells) + " | " + " | ".join(ncells)
                   + f" | {ratio} | {layers} |")
        met_budget = None if "error" in q else bool(q["met"] and len(q["float_groups"]) <= 0.10 * q["num_groups"])
        fewer = None if not both else q["float_ops"] <= n["float_ops"]
        faster = (n["timeout"] >= 5 * q["seconds"]) if stopped else None if not both else n["wall"] >= 5 * q["seconds"]
        targets.append(f"| {c.name} | {yes(met_budget)} | {yes(fewer)} | {yes(faster)} |")
    out += ["", "Accuracy: argmax of the first output against the labels (the recogniser: exact match of the text "
            "RapidOCR's own CTC decoder reads, the budget set in those points through `fallback(task_metric=...)` and "
            "NNCF's validation function alike), held-out data, recomputed here with ONNX "
            "Runtime on each tool's final model. Groups: `quant_groups` (the Q/DQ pairs returned to float together). "
            "Float layers: weighted ops (Conv/Gemm/MatMul) without a DequantizeLinear on their input, beyond plain "
            "PTQ's, counted the same way in both tools' models. quantkit s: calibration pass + fallback; NNCF s: its "
            "process (interpreter + imports + data load) and, in brackets, the `quantize_with_accuracy_control` call "
            "alone (its own quantization included).", "",
            "## Targets (issue 14)", "",
            f"| model | meets {max_drop} points with <= 10% of groups in float | layers in float <= NNCF's | >= 5x less "
            "wall time than NNCF |", "|---|---|---|---|", *targets]
    for r in rows:
        if r.qk.get("steps"):
            out += ["", f"quantkit fallback steps, {r.case.name}:", "",
                    "| step | action | groups | accuracy | drop | s |", "|---|---|---|---|---|---|"]
            for s in r.qk["steps"]:
                g = s.get("groups")
                g = ", ".join(g) if isinstance(g, (list, tuple)) else g
                out.append(f"| {s.get('step')} | {s.get('action')} | {g} | {f(s.get('metric'))} | {f(s.get('drop'))} "
                           f"| {f(s.get('seconds'), 1)} |")
        if r.nncf.get("log"):
            out += ["", f"NNCF log, {r.case.name}:", "", "```", *r.nncf["log"], "```"]
    return out


def cost_table(rc: dict[str, Any]) -> list[str]:
    out = ["", "## Sensitivity ranking cost on a ResNet-18-size model (random weights, photo crops)", ""]
    if "error" in rc:
        return out + [rc["error"]]
    measured = rc["seconds"] / rc["fp32_subset_s"]
    budget = 3 + rc["fp32_eval_s"] / rc["fp32_subset_s"] * 2  # + one side-by-side pass (2 models) over the eval data
    out += ["| groups | ranking subset | eval samples | cost reported (FP32-pass eq. over the subset) | ranking s | "
            "FP32 pass over the subset s | measured ratio | target: <= 3 + one side-by-side eval pass |",
            "|---|---|---|---|---|---|---|---|",
            f"| {rc['groups']} | {rc['subset']} | {rc['eval']} | {rc['cost']:.2f} | {rc['seconds']:.1f} | "
            f"{rc['fp32_subset_s']:.2f} | {measured:.1f} | {yes(measured <= budget)} (budget {budget:.1f} in "
            "subset-pass units) |"]
    return out


def memory_table(mem: dict[int, dict[str, float]]) -> list[str]:
    out = ["", "## `quantkit debug` peak memory against the number of images (ResNet-18, 224x224 PNG crops)", "",
           "| images | peak RSS MiB | wall s |", "|---|---|---|"]
    for n, m in sorted(mem.items()):
        out.append(f"| {n} | {f(m.get('rss_mib'), 0)} | {f(m.get('seconds'), 1)} |" if "error" not in m
                   else f"| {n} | {m['error']} | — |")
    ok = [m for m in mem.values() if "rss_mib" in m]
    if len(ok) == len(mem) >= 2:
        lo, hi = mem[min(mem)]["rss_mib"], mem[max(mem)]["rss_mib"]
        growth = 100 * (hi / lo - 1)
        # the target is that memory does not grow with the number of images; the peak itself is one
        # batch's captured tensors and float64 statistics plus ONNX Runtime's arenas, and varies by
        # about 10% from run to run at any N (allocation timing), so a lower peak is not "growth"
        out.append(f"\npeak RSS {min(mem)} -> {max(mem)} images: {growth:+.1f}% — target: no growth beyond 10%: "
                   f"{yes(growth <= 10)} (the peak varies by about 10% between runs of one N)")
    return out


def cases(work: Path, quick: bool, rec_eval: int = 400) -> list[Case]:
    # pointwise equalization (quantkit's default) resolves the outlier channel by itself: the
    # fallback's case is the PTQ without it (NNCF quantizes the same FP32 model either way)
    out = [Case("outlier CNN (digits, 12 groups; pointwise equalization off)", lossy_models.outlier_cnn(), "image",
                lossy_models.digits_npz(work / "digits-calib.npz", "train", limit=256),
                lossy_models.digits_npz(work / "digits-eval.npz", "test", limit=128 if quick else None),
                stats={"equalize_pointwise": False})]
    if not quick:
        try:
            a = lossy_models.rapidocr_cls()
            cal, ev = lossy_models.rapidocr_cls_npz(a, work)
            out.append(Case("rapidocr-cls (PP-OCR orientation, real)", a.model_path(), "x", cal, ev))
            # TensorRT's own entropy calibration (IInt8EntropyCalibrator2's KL search, unguarded)
            # loses ~20 points on this model: the fallback's real-model case where PTQ loses
            out.append(Case("rapidocr-cls (PP-OCR orientation, real; PTQ with entropy-trt, TensorRT's calibrator)",
                            a.model_path(), "x", cal, ev, method="entropy-trt", peer=False))
        except Exception as err:  # the wheel is not in the cache
            log(f"rapidocr-cls not run: {err}")
        try:
            a = lossy_models.rapidocr_rec(n_eval=rec_eval)
            cal, ev, texts = lossy_models.rapidocr_rec_npz(a, work)
            # the PTQ without bias correction (and so without pointwise equalization) loses 4 points;
            # with bias correction but without pointwise equalization, 2.5 (both on: the default)
            variants = [("PTQ without bias correction", {"bias_correction": False}),
                        ("PTQ without pointwise equalization", {"equalize_pointwise": False}),
                        ("default PTQ", {})]
            for i, (label, stats) in enumerate(variants):
                out.append(Case(f"rapidocr-rec (PP-OCR recogniser, real; exact match %; {label})", a.model_path(), "x",
                                cal, ev, task=Task(a.model_path(), a.root, texts), stats=stats, peer=i == 0))
        except Exception as err:
            log(f"rapidocr-rec not run: {err}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the outlier CNN only, small evaluation set and debug runs")
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget in points (default 0.5)")
    ap.add_argument("--no-peers", action="store_true", help="skip NNCF")
    ap.add_argument("--nncf-timeout", type=float, default=1800.0,
                    help="stop NNCF's run of one model after this many seconds (default 1800)")
    ap.add_argument("--machine", default="shared", help="how to describe the machine in the table's head")
    ap.add_argument("--nncf-python", type=Path, default=Path("/tmp/venv-nncf/bin/python"),
                    help="the Python that has NNCF 3.4 (default /tmp/venv-nncf/bin/python)")
    ap.add_argument("--cases", nargs="*", default=None, metavar="WORD",
                    help="only the models whose name contains one of these words (e.g. outlier rec)")
    ap.add_argument("--rec-eval", type=int, default=400, help="evaluation lines of the recogniser (default 400)")
    ap.add_argument("--skip-cost", action="store_true", help="skip the ranking cost and debug memory tables")
    ap.add_argument("--rank-estimator", choices=["exact", "gradient"], default="exact",
                    help="the fallback's sensitivity estimator (default exact)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown file (default benchmarks/results/debug_fallback[-quick].md)")
    args = ap.parse_args(argv)
    globals()["NNCF_PY"] = args.nncf_python
    out_path = args.out or HERE / "results" / ("debug_fallback-quick.md" if args.quick else "debug_fallback.md")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="qk-fbbench-") as tmp:
        work = Path(tmp)
        rows = []
        for c in cases(work, args.quick, args.rec_eval):
            if args.cases and not any(w in c.name for w in args.cases):
                continue
            log(f"== {c.name}")
            rows.append(run_case(c, args.max_drop, work, peers=not args.no_peers, nncf_timeout=args.nncf_timeout,
                                 estimator=args.rank_estimator))
        rc: dict[str, Any] = {"error": "not run (--skip-cost)"}
        mem: dict[int, dict[str, float]] = {}
        if not args.skip_cost:
            log("== ranking cost (ResNet-18)")
            try:
                rc = ranking_cost(32, work)
            except Exception as err:
                rc = {"error": f"failed: {type(err).__name__}: {err}"}
            log("== debug memory (ResNet-18)")
            mem = debug_memory((64, 256) if args.quick else (256, 2048), work)
    import onnxruntime

    import quantkit

    head = [f"# Debug and budgeted fallback (issue 14): quantkit {getattr(quantkit, '__version__', '?')} against "
            f"NNCF 3.4", "",
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"({args.machine}), Python {platform.python_version()}, ONNX Runtime {onnxruntime.__version__} CPU. "
            f"`python benchmarks/debug_fallback.py{' --quick' if args.quick else ''}`, {time.time() - t0:.0f} s, "
            f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.", ""]
    text = "\n".join(head + table(rows, args.max_drop) + cost_table(rc) + memory_table(mem)) + "\n"
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
