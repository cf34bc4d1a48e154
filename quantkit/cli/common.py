"""Argument groups shared by the subcommands, and the helpers that turn them into objects."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantkit.errors import InputError

log = logging.getLogger(__name__)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):  # nan/inf would make every sample "have NaN values"
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _hw(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")


def trt_version(text: str) -> str:
    """A TensorRT version for a cache header: MAJOR.MINOR[.PATCH...] ('banana' wrote TRT-0-...)."""
    import re

    if not re.fullmatch(r"\d+\.\d+(\.\d+)*", text.strip()):
        raise argparse.ArgumentTypeError(f"expected a TensorRT version such as 10.13.0, got {text!r}")
    if not 8 <= int(text.strip().split(".")[0]) <= 11:  # 7.0 wrote TRT-70000-..., 99.0 TRT-990000-...
        raise argparse.ArgumentTypeError(f"expected a TensorRT version from 8 to 11 (the calibration cache's "
                                         f"format), got {text!r}")
    return text.strip()


def nonzero_float(text: str) -> float:
    """A finite number other than 0 (a pixel scale of 0 makes every sample the same constant)."""
    value = finite_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number other than 0 (0 makes every sample the same)")
    return value


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


#: ``--num-images all``: every sample
ALL_SAMPLES = -1


def count_or_all(text: str) -> int:
    """A positive number, or ``all`` (``ALL_SAMPLES``)."""
    return ALL_SAMPLES if text.strip().lower() == "all" else positive_int(text)


def thread_count(text: str) -> int:
    """``--threads``: a positive number, at most ``max_threads()`` (4 a core, at least 64)."""
    from quantkit.backends.onnxruntime import max_threads

    v = positive_int(text)
    if v > max_threads():
        raise argparse.ArgumentTypeError(f"expected at most {max_threads()} (4 a core on this machine, at least 64), "
                                         f"got {v}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {v}")
    return v


def _input_value(text: str) -> tuple[str, str]:
    name, sep, values = text.partition("=")
    if not sep or not name or not values.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=V[,V...], got {text!r}")
    return name, values


def _batch_axis(text: str) -> tuple[str, int | None]:
    name, sep, axis = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=AXIS (AXIS a number or none), got {text!r}")
    if axis.strip().lower() == "none":
        return name, None
    try:
        return name, non_negative_int(axis)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected NAME=AXIS (AXIS a number or none), got {text!r}") from None


def add_data_args(parser: argparse.ArgumentParser, *, required: bool = True,
                  num_images_help: str = "use the first N samples (default: all)") -> None:
    g = parser.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--images", metavar="DIR", help="image folder (recursive; class subfolders give labels)")
    src.add_argument("--npz", metavar="FILE", help=".npy array [N, ...] or .npz with one array per input name "
                     "(and optional 'labels'), already preprocessed")
    g.add_argument("--batch-axis", type=_batch_axis, action="append", metavar="NAME=AXIS",
                   help="--npz: the batch axis of input NAME (AXIS a number, or none: fed as is in every batch); "
                   "by default taken from the model's input shape (its dynamic dim), repeatable")
    g.add_argument("--input-value", type=_input_value, action="append", metavar="NAME=V[,V...]",
                   help="--images on a model with other inputs: the value of input NAME for every image (e.g. a "
                   "detector's scale_factor=1,1 or im_shape=640,640), one sample's values, comma-separated; "
                   "repeatable")
    g.add_argument("--batch-size", type=positive_int, default=32, help="samples per batch (default 32; "
                   "a model with a fixed batch size uses its own)")
    g.add_argument("--num-images", type=count_or_all, default=None, metavar="N", help=num_images_help)
    g.add_argument("--order", choices=["spread", "sorted", "shuffle"], default="spread",
                   help="sample order: spread = a seeded sample spread over the class folders (or sub-folders, "
                   "or .npz labels) in proportion to their sizes; sorted = files in sorted order (the first "
                   "classes only, when N is small); shuffle = a seeded random order (default spread)")
    g.add_argument("--shuffle", dest="order", action="store_const", const="shuffle",
                   help="same as --order shuffle")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed for --order spread and shuffle (default 0)")
    g.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    g.add_argument("--threads", type=thread_count, default=None, help="ONNX Runtime threads (default: one per core)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("preprocessing (image folders)")
    g.add_argument("--preprocess", choices=["imagenet", "yolo", "none"], default="imagenet",
                   help="preset: imagenet = resize to 256/224 of the crop, centre crop to the model's size, RGB, "
                   "ImageNet mean/std; yolo = letterbox to the model's size (640x640 when dynamic: the whole "
                   "image fitted, padded with 114), RGB, pixels / 255; none = pixels 0-255 as float, no resize "
                   "(default imagenet)")
    g.add_argument("--resize", type=positive_int, metavar="N", help="resize the shorter side to N pixels")
    g.add_argument("--crop", type=_hw, metavar="HxW", help="centre crop (N or HxW)")
    g.add_argument("--letterbox", type=_hw, metavar="HxW",
                   help="fit the whole image inside HxW keeping its aspect ratio, pad the rest with 114 (instead "
                   "of --resize/--crop; the yolo preset's default is the model's size)")
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="per-channel mean (after --scale), in the model's channel order: B,G,R with --color bgr "
                   "(a Caffe model's 104,117,123)")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help="per-channel std (after --scale), in the model's channel order as --mean")
    g.add_argument("--scale", type=nonzero_float, help="multiply 0-255 pixel values by this first (imagenet: 1/255)")
    g.add_argument("--color", choices=["rgb", "bgr", "gray"], help="channel order the model expects")
    g.add_argument("--layout", choices=["nchw", "nhwc"],
                   help="input layout (default: the one the input's static channel dim says, nchw when it says none)")


def preprocess_from_args(args: argparse.Namespace) -> Any:
    from quantkit.datasets.preprocess import preset

    spec = preset(args.preprocess)
    changes: dict[str, Any] = {}
    for key in ("resize", "crop", "letterbox", "mean", "std", "scale", "color", "layout"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    if "letterbox" in changes:  # instead of the preset's resize and crop (given ones are refused by the spec)
        changes.setdefault("resize", None)
        changes.setdefault("crop", None)
    if "color" in changes and changes["color"] == "gray" and "mean" not in changes and args.preprocess == "imagenet":
        changes["mean"], changes["std"] = (0.449,), (0.226,)
    if changes.get("color") == "bgr":  # the preset's R,G,B values go to the channels in the model's B,G,R order
        for key in ("mean", "std"):
            if key not in changes and len(getattr(spec, key)) == 3:
                changes[key] = tuple(reversed(getattr(spec, key)))
    return spec.replace(**changes) if changes else spec


def runner_for(args: argparse.Namespace, path: str, *, quiet: bool = False, integer_kernels: bool = False) -> Any:
    """The runner of a model file (``runner_from_path``; ``integer_kernels``: ``OrtRunner``'s); an
    ONNX model fed stacked samples without a batch axis runs wrapped (``with_sample_axis``)."""
    from quantkit.backends import check_model_file, runner_from_path

    if getattr(args, "npz", None) and check_model_file(path).suffix.lower() == ".onnx":
        import onnx

        from quantkit.onnx.model import load_model

        try:  # the graph only, to decide (a file ONNX cannot read is runner_from_path's one-line error)
            graph_only = onnx.load(str(path), load_external_data=False)
        except Exception:
            graph_only = None
        if graph_only is not None and _stacked(args, graph_only):
            from quantkit.backends.onnxruntime import OrtRunner

            wrapped = with_sample_axis(args, load_model(path), name=Path(path).name, quiet=quiet)
            return OrtRunner(wrapped, threads=args.threads, name=Path(path).name, integer_kernels=integer_kernels)
    return runner_from_path(path, threads=args.threads, integer_kernels=integer_kernels)


def _stacked(args: argparse.Namespace, model: Any) -> list[str]:
    """The inputs of ``model`` whose --npz arrays stack samples (``quantkit.onnx.sampleaxis.stacked_inputs``)."""
    if not getattr(args, "npz", None):
        return []
    from quantkit.onnx.sampleaxis import array_shapes, stacked_inputs

    return stacked_inputs(model, array_shapes(args.npz), dict(getattr(args, "batch_axis", None) or []))


def with_sample_axis(args: argparse.Namespace, model: Any, *, name: str, quiet: bool = False) -> Any:
    """``model`` with a sample axis added (``quantkit.onnx.sampleaxis``) when the --npz data stacks
    samples of a model without a batch axis (an array with one axis more than its input); the
    model as it is otherwise. The run then takes one sample a batch (--batch-size 1): the other
    inputs' arrays are read as before (batched on their batch axis, one sample of it, or fed as is)."""
    stacked = _stacked(args, model)
    if not stacked:
        return model
    from quantkit.onnx.model import dims_text, ensure_opset, input_specs
    from quantkit.onnx.sampleaxis import add_sample_axis, array_shapes

    shapes = array_shapes(args.npz)
    specs = {s.name: s for s in input_specs(model)}
    key = {n: ("" if "" in shapes else n) for n in stacked}
    for n in stacked:  # a sample that does not fit: said per sample, not in the wrapper's dims
        sample, dims = shapes[key[n]][1:], specs[n].shape
        if any(isinstance(d, int) and d != got for d, got in zip(dims, sample)):
            raise InputError(f"{Path(args.npz).name}: array {key[n] or n!r} {shapes[key[n]]} has one axis more than "
                             f"{name}'s input {n!r} {dims_text(dims)}, so it holds samples of shape {sample}, which the "
                             "input does not take",
                             hint="save the samples the model's input takes, stacked on a new first axis")
    log.log(logging.DEBUG if quiet else logging.WARNING,
            "%s has no batch axis for %s: %s's axis 0 counts samples (%s), each fed as the whole input; one "
            "sample a run; the files written keep the model's own inputs and outputs", name,
            ", ".join(f"{n!r} {dims_text(specs[n].shape)}" for n in stacked), Path(args.npz).name,
            ", ".join(f"{shapes[key[n]]}" for n in stacked))
    args.batch_size = 1  # the wrapper's inputs take one sample; an input batched as before one row of it
    return add_sample_axis(ensure_opset(model), stacked)


def source_for_model(args: argparse.Namespace, specs: list[Any], *, images: str | None = None) -> Any:
    """The data source the arguments describe, fitted to the model inputs."""
    import numpy as np

    from quantkit.datasets import ImageFolder, NumpySource, for_model

    from quantkit.errors import DatasetError

    folder = images if images is not None else args.images
    arrays = args.npz if folder is None else folder if Path(folder).suffix.lower() in (".npz", ".npy") \
        and not Path(folder).is_dir() else None  # --eval-dir may name an .npz/.npy file too
    if folder is not None and not str(folder):  # Path("") is the working folder: never read it unasked
        raise DatasetError("an empty path was given for the image folder", hint="give the folder of images")
    if arrays is None and not Path(folder).is_dir():  # before the preprocessing is checked against the model
        raise DatasetError(f"image folder {str(folder)!r} does not exist" if not Path(folder).exists()
                           else f"{str(folder)!r} is not a folder of images",
                           hint="pass a folder of images, or an .npz/.npy file (--npz; --eval-dir takes either)")
    axes = dict(getattr(args, "batch_axis", None) or [])
    unknown = sorted(set(axes) - {s.name for s in specs})
    if unknown:
        raise InputError(f"--batch-axis names {unknown[0]!r}, which is not an input of the model",
                         hint=f"its inputs: {', '.join(repr(s.name) for s in specs)}")
    if axes and arrays is None:
        raise InputError("--batch-axis says how the arrays of --npz hold samples; an image folder has one image a "
                         "sample", hint="drop --batch-axis, or use --npz")
    if arrays is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("resize", "crop", "letterbox", "scale", "mean", "std", "color",
                                                      "layout")
                 if getattr(args, k, None) is not None]
        if given:  # they shape images; an array is fed as it is
            log.warning("%s: preprocessing flags (%s) apply to image folders; the arrays are fed as they are",
                        Path(arrays).name, " ".join(given))
        if getattr(args, "input_value", None):
            raise InputError("--input-value gives other inputs a value next to an image folder; with --npz, put "
                             "every input's array in the .npz", hint="drop --input-value, or use --images")
        return NumpySource(arrays, dtypes={s.name: s.dtype for s in specs}, shapes={s.name: s.shape for s in specs},
                           batch_axes=dict(getattr(args, "batch_axis", None) or []))
    pairs = list(getattr(args, "input_value", None) or [])
    twice = next((k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])), None)
    if twice is not None:  # the last one was taken without a word
        raise InputError(f"--input-value gives {twice!r} more than one value",
                         hint=f"give --input-value {twice}=V once")
    given_values = dict(pairs)
    specs, values = _image_input(specs, given_values)
    pixels = np.dtype(specs[0].dtype) == np.uint8 and len(specs[0].shape) == 4  # the model normalizes itself
    if not np.issubdtype(specs[0].dtype, np.floating) and not pixels:
        raise InputError(
            f"input {specs[0].name!r} is {specs[0].dtype} (token ids, masks, ...); an image folder feeds float images "
            "(or uint8 pixels to a 4-D uint8 input)",
            hint="use --npz with one array per input name",
        )
    spec = preprocess_from_args(args)
    if pixels:
        given = [f"--{k}" for k in ("scale", "mean", "std") if getattr(args, k, None) is not None]
        if given:
            raise InputError(f"input {specs[0].name!r} takes uint8 pixels (0-255), which the model normalizes itself; "
                             f"{'/'.join(given)} cannot apply", hint=f"drop {' '.join(given)}")
        spec = spec.replace(scale=1.0, mean=(0.0,), std=(1.0,), dtype="uint8")
        log.info("input %r takes uint8 pixels: the images are fed as 0-255 values, resized/cropped only",
                 specs[0].name)
    if getattr(args, "layout", None) is None:  # the layout the input's static channel dim says
        spec = _layout_from_shape(spec, specs[0].shape)
    spec = for_model(spec, specs[0].shape, input_name=specs[0].name, preset_name=args.preprocess)
    shape = specs[0].shape
    h_axis, w_axis = (2, 3) if spec.layout == "nchw" else (1, 2)
    hw = (shape[h_axis], shape[w_axis])
    expected = hw if all(isinstance(d, int) for d in hw) else None
    source = ImageFolder(folder, spec, expected_hw=expected)  # type: ignore[arg-type]
    if values:
        from quantkit.datasets.sources import WithInputValues

        return WithInputValues(source, specs[0].name, values,
                               whole=tuple(s.name for s in specs[1:] if s.name in values and no_batch_axis(s, specs[0])))
    return source


def no_batch_axis(spec: Any, image: Any) -> bool:
    """Whether the input ``spec`` beside the image input ``image`` has no batch axis: 0-d (a loop
    count), or a first dim fixed above 1 where the image input's is not that number (an
    ``im_shape`` [2] beside images [N, 3, H, W]); such a value is fed as it is, not stacked per
    sample. A first dim of 1 is a batch of one (Paddle's fixed-batch exports: [1, 2])."""
    if not spec.shape:
        return True
    first, batch = spec.shape[0], image.shape[0] if image.shape else None
    return isinstance(first, int) and first > 1 and not (isinstance(batch, int) and batch == first)


def _image_input(specs: list[Any], given: dict[str, str]) -> tuple[list[Any], dict[str, Any]]:
    """For an image folder: the spec of the input it feeds (first in the list returned) and the
    arrays ``--input-value`` gives every other input (one sample's, cast to its dtype)."""
    import numpy as np

    from quantkit.datasets.dtypes import cast_for_input

    names = [s.name for s in specs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputError(f"--input-value names {unknown}, which the model does not have; its inputs are {names}")
    rest = [s for s in specs if s.name not in given]
    images = rest if len(rest) == 1 else [s for s in rest if len(s.shape) == 4]  # (one: checked by the caller)
    if len(rest) != 1 or len(images) != 1:
        missing = [s.name for s in rest if s not in images[:1]] if len(images) == 1 else [s.name for s in rest]
        raise InputError(
            f"the model has {len(specs)} inputs {names}; an image folder feeds one 4-D input, and "
            + (f"{missing} {'has' if len(missing) == 1 else 'have'} no value" if missing else
               "--input-value gave every input a value, the image input too (leave it to the folder)"),
            hint="give each other input a value with --input-value NAME=V[,V...] (the same for every image: "
            "a detector's scale_factor or im_shape), or use --npz with one array per input name")
    values: dict[str, Any] = {}
    for s in specs:
        if s.name not in given:
            continue
        try:
            flat = np.array([float(v) for v in given[s.name].split(",") if v.strip()], np.float64)
        except ValueError:
            raise InputError(f"--input-value {s.name}={given[s.name]}: the values must be numbers separated by "
                             "commas") from None
        if not np.isfinite(flat).all():  # else found in a tensor of the first batch, blamed on a sample
            raise InputError(f"--input-value {s.name}: value {int(np.flatnonzero(~np.isfinite(flat))[0]) + 1} of "
                             f"{flat.size} is {flat[~np.isfinite(flat)][0]}", hint="give finite numbers")
        # a sample: the batch dim left out; an input without a batch axis: its whole value
        whole = no_batch_axis(s, images[0])
        dims = list(s.shape if whole else s.shape[1:])
        free = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        fixed = int(np.prod([d for d in dims if isinstance(d, int)])) if dims else 1
        if len(free) == 1 and fixed and flat.size % fixed == 0:
            dims[free[0]] = flat.size // fixed
        if any(not isinstance(d, int) for d in dims) or int(np.prod(dims)) != flat.size:
            raise InputError(f"--input-value {s.name}: {flat.size} value(s), but "
                             + (f"input {s.name!r} (shape {list(s.shape)}, no batch axis) has shape {dims}" if whole else
                                f"one sample of input {s.name!r} (shape {list(s.shape)}, batch first) has shape {dims}"),
                             hint=f"give {int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else 'its'} "
                             "values, comma-separated")
        values[s.name] = cast_for_input(flat.reshape(dims), s.dtype, name=s.name, where="--input-value")
    return [images[0], *(s for s in specs if s is not images[0])], values


def _layout_from_shape(spec: Any, shape: Sequence[Any]) -> Any:
    """``spec`` in NHWC when the input's static dims say channels last ([N, H, W, C], C the
    colour's channel count, dim 1 not), as Keras/TensorFlow exports have; else as it is."""
    if len(shape) != 4:
        return spec
    c = spec.channels
    if shape[1] != c and shape[3] == c and spec.layout == "nchw":
        log.info("input layout NHWC (the model's shape %s has %d channels last; --layout nchw to override)",
                 list(shape), c)
        return spec.replace(layout="nhwc")
    return spec


def select(source: Any, args: argparse.Namespace, *, what: str = "samples", default: int | None = None) -> Any:
    """The samples per --order/--seed: the first --num-images (or ``default``, or all) and the
    rest (a ``quantkit.datasets.Sample``); asking for more samples than exist is an error."""
    from quantkit.datasets import draw_sample

    count, n = len(source), args.num_images
    if n == ALL_SAMPLES:
        n = count
    if n is not None and n > count:
        raise InputError(f"--num-images {n} asks for more {what} than the data has ({count})",
                         hint=f"pass --num-images {count} or less, or omit it")
    take = n or (min(default, count) if default else count)
    return draw_sample(source, take, order=getattr(args, "order", "spread"), seed=args.seed)


def describe_sample(sample: Any, what: str = "images") -> str:
    """How the sample was drawn, with the flag that changes it."""
    text = sample.describe(what)
    if sample.order == "spread" and sample.grouping.kind != "none":
        text += "; --order sorted takes the first files"
    elif sample.order == "sorted" and sample.groups_covered < len(sample.grouping.names):
        text += "; --order spread covers them all"
    return text


#: a ranking without a visible bar logs its progress at most this often (seconds)
RANK_LOG_SECONDS = 30.0


@contextmanager
def ranking_progress(*, disable: bool = False) -> Iterator[Any]:
    """An ``on_step(phase, done, total)`` for a sensitivity ranking (``debug --rank``, the
    rankings of ``--max-drop``): a bar of groups on a terminal; where stderr is not one, a line
    there at most every ``RANK_LOG_SECONDS``, since a ranking of a large model takes minutes;
    nothing with ``disable`` (--no-progress)."""
    import time

    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None, "total": None, "said": time.monotonic(), "start": time.monotonic()}

    def on_step(phase: str, done: int, total: int) -> None:
        if state["total"] != total or done < getattr(state["bar"], "n", 0):  # a new ranking (a re-ranking)
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=total, desc="ranking groups", unit="group", file=sys.stderr,
                                disable=True if disable else None, dynamic_ncols=True, leave=False)
            state["total"], state["start"] = total, time.monotonic()
        bar = state["bar"]
        bar.update(done - bar.n)
        now = time.monotonic()
        if bar.disable and not disable and now - state["said"] >= RANK_LOG_SECONDS:
            state["said"] = now
            print(f"ranking: {done} of {total} group(s) measured ({now - state['start']:.0f} s)", file=sys.stderr)

    try:
        yield on_step
    finally:
        if state["bar"] is not None:
            state["bar"].close()


class _LoggedProgress:
    """A progress bar's calls (``update``, ``set_description_str``) where stderr is not a terminal
    (a log file, a pipe): a line there at most every ``RANK_LOG_SECONDS``, so a long run in a log
    does not look hung; nothing for a run shorter than that."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        import time

        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._clock = time.monotonic
        self.start = self.said = self._clock()

    def _maybe_say(self) -> None:
        now = self._clock()
        if now - self.said >= RANK_LOG_SECONDS:
            self.said = now
            print(f"{self.desc}: {self.n} of {self.total} {self.unit} ({now - self.start:.0f} s)", file=sys.stderr,
                  flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_say()

    def set_description_str(self, desc: str) -> None:
        self.desc = desc
        self._maybe_say()

    def close(self) -> None:
        pass


@contextmanager
def progress(total: int, desc: str, *, disable: bool = False, unit: str = "img") -> Iterator[Any]:
    """A tqdm bar on stderr; where stderr is not a terminal, a line there at most every
    ``RANK_LOG_SECONDS`` (``_LoggedProgress``); nothing with ``disable`` (--no-progress)."""
    from tqdm import tqdm

    bar: Any = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if disable else None,
                    dynamic_ncols=True, leave=False)
    if bar.disable and not disable:
        bar = _LoggedProgress(total, desc, unit)
    try:
        yield bar
    finally:
        bar.close()


#: below this output SQNR (dB) against FP32 the summary says INT8 loses the output, and what to run
LOST_SQNR_DB = 10.0


def lost_note(report: Any) -> str | None:
    """The note under a comparison's table (``calibrate``'s and ``compare``'s) naming the outputs
    INT8 loses (SQNR below ``LOST_SQNR_DB``): a model INT8 does not hold (a diffusion UNet's
    activations up to 1e8: 0.4 dB by every method), and what to run next; None where none."""
    lost = [o for o in report.outputs if o.match is None and math.isfinite(o.sqnr_db) and o.sqnr_db < LOST_SQNR_DB]
    if not lost:
        return None
    return (f"  note: {', '.join(f'{o.name!r} at {o.sqnr_db:.1f} dB' for o in lost)}: INT8 loses most of "
            f"{'this output' if len(lost) == 1 else 'these outputs'}; `quantkit debug FP32 INT8 --rank` shows where "
            "the error enters, `calibrate --max-drop` keeps the worst groups in float")
