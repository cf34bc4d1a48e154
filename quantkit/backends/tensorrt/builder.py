"""Build a TensorRT engine from ONNX: FP32, FP16, INT8 (implicit with a calibrator or cache on
TensorRT 10; explicit from a Q/DQ model on 10 and 11).

    ONNX --OnnxParser--> network --config (precision, profiles, workspace, timing cache,
    calibrator)--> serialized engine --atomic write--> model.plan (+ layer information JSON)

The decisions that do not need TensorRT (which mode a request means, shape profiles, parser
error text) are plain functions, tested everywhere; the TensorRT calls stay in
``build_engine``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from quantkit._io import write_bytes_atomic, write_text_atomic
from quantkit.errors import InputError, ModelError, QuantkitError
from quantkit.onnx.model import TensorSpec, input_specs, load_model

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
Shape = tuple[int, ...]


class TensorRT11ImplicitInt8Error(InputError):
    """Implicit INT8 (a calibrator or a calibration cache) asked of TensorRT 11."""


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of one input (an optimisation profile entry)."""

    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class BuildOptions:
    """Settings of one engine build.

    Attributes:
        precision: fp32, fp16 or int8. For a Q/DQ model, int8 is implied.
        shapes: optimisation profile per dynamic input; missing dynamic batch dims default to
            1 / ``batch`` / ``batch``.
        batch: the default opt/max batch for inputs whose only dynamic dim is the batch.
        workspace_mb: limit of TensorRT's workspace pool (None: TensorRT's default).
        timing_cache: a file read before and written after the build (faster rebuilds).
        layer_info: write TensorRT's per-layer information (JSON) here.
        detailed_profiling: ProfilingVerbosity.DETAILED (layer names and tactics in the
            layer information and in profiles).
        strongly_typed: build a strongly typed network (always on TensorRT 11).
    """

    precision: str = "fp32"
    shapes: dict[str, ShapeProfile] = field(default_factory=dict)
    batch: int = 32
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    layer_info: Path | None = None
    detailed_profiling: bool = True
    strongly_typed: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.batch <= 0:
            raise InputError(f"batch must be positive, got {self.batch}")


# ---------------------------------------------------------------- decisions without TensorRT
def parse_shapes(text: str | Sequence[str] | None) -> dict[str, ShapeProfile]:
    """``"x=1x3x224x224/8x3x224x224/32x3x224x224,y=..."`` -> profiles. One shape means
    min = opt = max. Several inputs are separated by commas (or given as a list). trtexec's
    ``x:1x3x224x224`` is read too, when there is no ``=``."""
    if not text:
        return {}
    items = [text] if isinstance(text, str) else list(text)
    out: dict[str, ShapeProfile] = {}
    for item in (p.strip() for chunk in items for p in chunk.split(",") if p.strip()):
        name, sep, dims = item.rpartition("=" if "=" in item else ":")
        if not sep or not name:
            raise InputError(f"shape {item!r} is not NAME=MIN[/OPT/MAX] with shapes like 1x3x224x224")
        try:
            shapes = [tuple(int(d) for d in s.lower().split("x")) for s in dims.split("/")]
        except ValueError:
            raise InputError(f"shape {item!r}: every dimension must be a number, joined by 'x' "
                             f"(e.g. {name}=1x3x224x224)") from None
        if len(shapes) == 1:
            shapes *= 3
        if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise InputError(f"shape {item!r}: give one shape or min/opt/max of the same rank")
        lo, opt, hi = shapes
        if any(d <= 0 for d in lo) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise InputError(f"shape {item!r}: need 0 < min <= opt <= max in every dimension")
        if name in out:
            raise InputError(f"shape {item!r}: input {name!r} is given a shape twice", hint="give each input once")
        out[name] = ShapeProfile(lo, opt, hi)
    return out


def resolve_profiles(specs: Sequence[TensorSpec], shapes: dict[str, ShapeProfile], batch: int) -> dict[str, ShapeProfile]:
    """A profile for every input with dynamic dims: the user's, else 1/batch/batch on a
    dynamic batch dim when that is the only dynamic dim.

    Raises:
        InputError: a profile names an unknown input or contradicts a static dim, or an input
            has dynamic dims other than the batch and no profile.
    """
    names = {s.name for s in specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise InputError(f"--shapes names {unknown}, the model inputs are {sorted(names)}")
    out: dict[str, ShapeProfile] = {}
    for spec in specs:
        dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int) or d <= 0]
        given = shapes.get(spec.name)
        if given is not None:
            for label, shp in (("min", given.min), ("opt", given.opt), ("max", given.max)):
                bad = len(shp) != len(spec.shape) or any(
                    isinstance(d, int) and d > 0 and d != v for d, v in zip(spec.shape, shp))
                if bad:
                    raise InputError(f"--shapes {spec.name}: {label} shape {shp} does not fit the model's {spec.shape}")
            out[spec.name] = given
        elif dynamic:
            if dynamic != [0]:
                raise InputError(
                    f"input {spec.name!r} has dynamic dimensions {spec.shape}; give its profile",
                    hint=f"--shapes {spec.name}=MIN/OPT/MAX, e.g. {spec.name}=1x3x224x224/8x3x224x224/32x3x224x224")
            static = tuple(int(d) for d in spec.shape[1:])  # type: ignore[arg-type]
            out[spec.name] = ShapeProfile((1, *static), (batch, *static), (batch, *static))
    return out


def has_qdq(model: onnx.ModelProto) -> bool:
    """True for an explicitly quantized model (QuantizeLinear/DequantizeLinear nodes)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def build_mode(trt_major: int, *, precision: str, explicit: bool, calibrating: bool) -> str:
    """``fp32``, ``fp16``, ``int8-implicit`` or ``int8-explicit``; refuses what this TensorRT
    cannot do with one message that says what to do instead."""
    if explicit:
        if calibrating:
            raise InputError("the model already holds Q/DQ scales; a calibrator or calibration cache would be ignored",
                             hint="drop --calibrator/--calibration-cache, or build from the FP32 model")
        return "int8-explicit"
    if calibrating or precision == "int8":
        if trt_major >= 11:
            raise TensorRT11ImplicitInt8Error(
                "TensorRT 11 removed implicit INT8 (calibrators and calibration caches); "
                "INT8 there comes from Q/DQ nodes in the model",
                hint="quantkit calibrate MODEL.onnx --images DIR --method entropy -o out/ && "
                     "quantkit build out/MODEL.int8.onnx -o MODEL.plan")
        if not calibrating:
            raise InputError("INT8 from an FP32 model needs calibration data or a cache",
                             hint="add --calibrator entropy --images DIR, or --calibration-cache FILE, "
                                  "or build the Q/DQ model from `quantkit calibrate`")
        return "int8-implicit"
    if precision == "fp16" and trt_major >= 11:
        raise InputError("TensorRT 11 builds in the types the ONNX model declares; there is no FP16 flag",
                         hint="convert the model to FP16 first (e.g. onnxconverter-common's float16 converter)")
    return precision


def parser_errors(parser: Any) -> str:
    """All of the ONNX parser's errors, each with the node's index and name."""
    lines = []
    for i in range(int(parser.num_errors)):
        e = parser.get_error(i)
        node, name = e.node(), ""
        try:
            name = e.node_name()
        except AttributeError:  # before TensorRT 10.1
            pass
        where = f"node {node}" + (f" ({name})" if name else "") if node >= 0 else "model"
        lines.append(f"{where}: {e.desc()}")
    return "; ".join(lines) or "no details reported"


# ---------------------------------------------------------------- the build
@dataclass
class BuildResult:
    engine: Path
    mode: str
    seconds: float
    layer_info: Path | None = None
    timing_cache: Path | None = None
    calibration_cache_used: bool = False


def build_engine(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    *,
    calibrator: Any = None,
) -> BuildResult:
    """Build and write an engine.

    Args:
        model_path: the ONNX model (FP32, or Q/DQ from ``quantkit calibrate`` / QAT export).
        output: the engine file, written atomically.
        options: see BuildOptions.
        calibrator: a ``CalibratorCore`` (data or cache) for implicit INT8 on TensorRT 10;
            wrapped in the TensorRT calibrator class of its algorithm here.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        ModelError: the ONNX parser refused the model (its errors, with node names).
        TensorRT11ImplicitInt8Error: a calibrator asked of TensorRT 11.
        QuantkitError: the build failed, or a calibrator callback failed (its own error).
    """
    import time

    from quantkit.backends.tensorrt.calibrator import make_calibrator
    from quantkit.backends.tensorrt.load import load_tensorrt

    load_tensorrt()  # a clear error when TensorRT (not just its stubs) is missing
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    path = Path(model_path)
    model = load_model(path)
    explicit = has_qdq(model)
    mode = build_mode(major, precision=options.precision, explicit=explicit, calibrating=calibrator is not None)
    profiles = resolve_profiles(input_specs(model), options.shapes, options.batch)
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11 or options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes(), str(path)):
        raise ModelError(f"TensorRT's ONNX parser refused {str(path)!r}: {parser_errors(parser)}")

    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not flags:  # weakly typed (TensorRT 10): precisions are builder flags
        if mode == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if mode.startswith("int8"):
            config.set_flag(trt.BuilderFlag.INT8)

    profile = None
    if profiles:
        profile = builder.create_optimization_profile()
        for name, p in profiles.items():
            profile.set_shape(name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        config.add_optimization_profile(profile)

    trt_calibrator = None
    if mode == "int8-implicit":
        kind = "minmax" if calibrator.algorithm == "MinMaxCalibration" else "entropy"
        trt_calibrator = make_calibrator(kind, calibrator)
        config.int8_calibrator = trt_calibrator
        if profile is not None:
            config.set_calibration_profile(profile)

    timing = None
    if options.timing_cache is not None:
        data = options.timing_cache.read_bytes() if options.timing_cache.exists() else b""
        timing = config.create_timing_cache(data)
        config.set_timing_cache(timing, False)

    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
    if calibrator is not None:
        calibrator.raise_if_failed()
    if serialized is None:
        raise QuantkitError(f"TensorRT could not build an engine from {str(path)!r} (its log above says why)",
                            hint="run with --verbose for TensorRT's full log")
    engine_path = write_bytes_atomic(output, bytes(memoryview(serialized)))
    result = BuildResult(engine_path, mode, time.perf_counter() - t0,
                         calibration_cache_used=bool(calibrator is not None and calibrator.cache_was_read))

    if timing is not None and options.timing_cache is not None:
        result.timing_cache = write_bytes_atomic(options.timing_cache, bytes(memoryview(timing.serialize())))
    if options.layer_info is not None:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(serialized)
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        result.layer_info = write_text_atomic(options.layer_info, json.dumps(json.loads(info), indent=1))
    return result

