"""Polygraphy data loader fed by quantkit's image pipeline: the batches `quantkit calibrate` feeds.

Polygraphy's ``--data-loader-script FILE.py[:FUNC]`` imports FILE.py and calls ``FUNC()`` (default
``load_data``) with no arguments; it must return an iterable of feed dicts
``{input name: numpy array}``, one per inference (``polygraphy run``) or calibration batch
(``polygraphy convert --int8``). The settings are quantkit's data and preprocessing flags, the
same as ``quantkit calibrate``'s, plus ``--model`` (for the input name and size). Two ways to
give them:

* write a loader script with the settings baked in, and pass it to Polygraphy::

    python -m quantkit.interop.polygraphy --model m.onnx --images DIR --preprocess imagenet \\
        --write-script calib_data.py
    polygraphy run m.onnx --onnxrt --data-loader-script calib_data.py

* from Python (Polygraphy's API, your own script): ``load_data()`` reads the flags from the
  environment variable ``QUANTKIT_DATA_ARGS`` (``args_from_env``), ``feeds_from_args(argv)`` takes
  them as a list.

This module cannot be passed to ``--data-loader-script`` itself: Polygraphy imports a script by its
file name, and ``polygraphy`` is Polygraphy's own package.
"""

from __future__ import annotations

import argparse
import keyword
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from quantkit.errors import InputError, OutputExistsError, QuantkitError

log = logging.getLogger(__name__)

ENV_VAR = "QUANTKIT_DATA_ARGS"
_PATH_DESTS = ("model", "images", "npz")


class _RaisingParser(argparse.ArgumentParser):
    """Flags read by a library function: a bad one is an InputError, never sys.exit."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"quantkit data flags: {message}",
                         hint="use the data and preprocessing flags of `quantkit calibrate`, plus --model")


def build_parser(*, prog: str = "python -m quantkit.interop.polygraphy", raising: bool = True) -> argparse.ArgumentParser:
    """The loader's flags: ``--model``, ``--drop-last`` and quantkit calibrate's data/preprocess groups."""
    from quantkit.cli.common import add_data_args, add_preprocess_args

    cls = _RaisingParser if raising else argparse.ArgumentParser
    parser = cls(prog=prog, allow_abbrev=False,
                 description="Write a Polygraphy data loader script that feeds the batches `quantkit calibrate` "
                 "feeds (`polygraphy run/convert ... --data-loader-script OUT.py`).")
    parser.add_argument("--model", required=True, metavar="MODEL.onnx",
                        help="the ONNX model Polygraphy runs (its input name and size fit the preprocessing)")
    parser.add_argument("--drop-last", action="store_true",
                        help="leave out a short last batch (for `polygraphy convert --int8`: TensorRT calibrates "
                        "with one batch shape, the calibration profile's)")
    add_data_args(parser)
    add_preprocess_args(parser)
    return parser


def parse_data_args(argv: Sequence[str], *, base_dir: str | os.PathLike[str] | None = None) -> argparse.Namespace:
    """Parse loader flags; relative --model/--images/--npz paths are taken from ``base_dir``.

    Raises:
        InputError: an unknown flag or a bad value.
    """
    args = build_parser().parse_args(list(argv))
    if base_dir is not None:
        for dest in _PATH_DESTS:
            value = getattr(args, dest)
            if value is not None:
                setattr(args, dest, str(Path(base_dir, value)))
    return args


def args_from_env(environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The loader settings from ``QUANTKIT_DATA_ARGS`` (a shell-quoted flag string); the one place
    the environment is read.

    Raises:
        InputError: the variable is missing or empty, not shell-quoted properly, or has bad flags.
    """
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR, "").strip()
    example = f'{ENV_VAR}="--model model.onnx --images ./images --preprocess imagenet"'
    if not text:
        raise InputError(f"{ENV_VAR} is not set: the Polygraphy data loader needs quantkit's data flags",
                         hint=f"set it, for example {example}")
    try:
        argv = shlex.split(text)
    except ValueError as err:
        raise InputError(f"{ENV_VAR} is not a valid flag string ({err}): {text!r}",
                         hint=f"quote it like a shell command line, for example {example}") from err
    return parse_data_args(argv)


class Feeds:
    """The feed dicts Polygraphy runs, one per batch; re-iterable (each pass reads the images again).

    Args:
        batcher: quantkit's Batcher, as ``quantkit calibrate`` builds it.
    """

    def __init__(self, batcher: Any):
        self.batcher = batcher

    def __len__(self) -> int:
        return len(self.batcher)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batcher:
            yield dict(batch.feed)


def feeds_from_args(args: argparse.Namespace | Sequence[str]) -> Feeds:
    """The batches ``quantkit calibrate`` feeds for these flags, as Polygraphy feed dicts.

    Same sample choice (``--num-images``, default the first 512; ``--shuffle``/``--seed``), the
    same preprocessing and the same batching (a fixed-batch model uses its own batch size and
    drops a short tail). The model and the data are checked here; images are decoded lazily.

    Args:
        args: parsed flags (``parse_data_args``/``args_from_env``) or a flag list.

    Raises:
        InputError: bad flags, a missing or invalid model, an empty or missing image folder.
    """
    from quantkit.cli.calibrate import DEFAULT_CALIBRATION_IMAGES
    from quantkit.cli.common import select, source_for_model
    from quantkit.onnx.model import float_input_specs, load_model
    from quantkit.ptq import RunConfig, calibration_batches

    if not isinstance(args, argparse.Namespace):
        args = parse_data_args(args)
    specs = float_input_specs(load_model(args.model), source=args.model)
    source = source_for_model(args, specs)
    drawn = select(source, args, what="images", default=DEFAULT_CALIBRATION_IMAGES)  # calibrate's sample
    count = len(drawn.indices)
    batcher = calibration_batches(source, specs, drawn.indices,
                                  RunConfig(batch_size=args.batch_size, strict=args.strict))
    if args.drop_last:
        batcher.last_batch = "drop"
    log.info("Polygraphy feeds: %d samples in %d batches of %d from %s", count, len(batcher), batcher.batch_size,
             args.images or args.npz)
    return Feeds(batcher)


def load_data() -> Feeds:
    """Polygraphy's default loader function: the feeds for the flags in ``QUANTKIT_DATA_ARGS``."""
    return feeds_from_args(args_from_env())


def _one_line(err: QuantkitError) -> str:
    return f"quantkit: error: {err}" + (f"\n  hint: {err.hint}" if err.hint else "")


def loader_for_script(argv: Sequence[str], *, base_dir: str) -> Iterator[dict[str, np.ndarray]]:
    """What a written script's ``load_data()`` returns. Polygraphy prints a traceback for any
    error that is not its own, so quantkit's errors end the run here with their one-line message."""
    try:
        feeds = feeds_from_args(parse_data_args(argv, base_dir=base_dir))
    except QuantkitError as err:
        raise SystemExit(_one_line(err)) from err
    return _exit_on_error(feeds)


def _exit_on_error(feeds: Feeds) -> Iterator[dict[str, np.ndarray]]:
    try:
        yield from feeds
    except QuantkitError as err:
        raise SystemExit(_one_line(err)) from err


_SCRIPT = '''"""Polygraphy data loader written by quantkit {version} (python -m quantkit.interop.polygraphy).

Feeds the batches `quantkit calibrate` feeds for the flags in ARGS; quantkit must be installed in
the Python that runs Polygraphy (the commands are below).
"""
#   polygraphy run {model} --onnxrt --data-loader-script {script}
#   polygraphy convert {model} --int8 --data-loader-script {script} -o model.engine

from quantkit.interop.polygraphy import loader_for_script

#: quantkit's data flags (those of `quantkit calibrate`, plus --model); relative paths are from BASE_DIR
ARGS = {argv!r}
BASE_DIR = {base_dir!r}


def load_data():
    return loader_for_script(ARGS, base_dir=BASE_DIR)
'''


def check_script_path(path: str | os.PathLike[str]) -> Path:
    """A path Polygraphy can import the loader from, that does not exist yet.

    Raises:
        InputError: not a ``.py`` name, a name that is no Python identifier or that Python
            already imports as a module, or an existing file (OutputExistsError).
    """
    import importlib.util

    out = Path(path)
    stem = out.stem
    if out.suffix != ".py":
        raise InputError(f"--write-script {str(out)!r}: Polygraphy loads a data loader script only from a .py file",
                         hint="name it like calib_data.py")
    if not stem.isidentifier() or keyword.iskeyword(stem):
        raise InputError(f"--write-script {str(out)!r}: Polygraphy imports the script as module {stem!r}, "
                         "which is not a valid module name", hint="use letters, digits and _ (calib_data.py)")
    if out.exists():  # before the module check, which finds this very file when it sits in the working folder
        raise OutputExistsError(f"--write-script {str(out)!r} exists; quantkit does not overwrite it",
                                hint="remove it or choose another name")
    # Polygraphy imports the script by its bare name: an existing module of that name (json,
    # polygraphy, numpy, ...) would be imported instead, and dropped from sys.modules afterwards.
    if stem in sys.modules or importlib.util.find_spec(stem) is not None:
        raise InputError(f"--write-script {str(out)!r}: Polygraphy imports the script as module {stem!r}, "
                         f"but Python already has a module {stem!r}", hint="choose another name (calib_data.py)")
    return out


def write_script(path: str | os.PathLike[str], argv: Sequence[str], *, base_dir: str | os.PathLike[str]) -> Path:
    """Write a loader script for Polygraphy with the flags ``argv`` baked in (atomic; never overwrites).

    The flags are checked first (model, data, sample count), so a script that is written works.

    Returns:
        The script's path.
    """
    from quantkit import __version__
    from quantkit._io import check_output_file, write_text_atomic

    out = check_script_path(path)
    base = str(Path(base_dir).resolve())
    args = parse_data_args(argv, base_dir=base)
    feeds = feeds_from_args(args)
    check_output_file(out, force=False, inputs=[p for p in (args.model, args.images, args.npz) if p])
    # the paths go into comments only (a docstring would end at a path's '"""'; a backslash
    # would be an escape there), one line each: a path that is not printable is written escaped
    text = _SCRIPT.format(version=__version__, argv=list(argv), base_dir=base, model=_comment(shlex.quote(args.model)),
                          script=_comment(shlex.quote(str(out))))
    if out.exists():  # appeared while the data was checked
        raise OutputExistsError(f"--write-script {str(out)!r} exists; quantkit does not overwrite it")
    write_text_atomic(out, text)
    log.info("loader script %s: %d batches", out, len(feeds))
    return out


def _comment(text: str) -> str:
    """``text`` for a ``#`` comment of the script: as it is when printable, else escaped (a
    newline would end the comment; a lone surrogate of an undecodable file name cannot be
    written as UTF-8)."""
    return text if text.isprintable() else ascii(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m quantkit.interop.polygraphy FLAGS --write-script OUT.py``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(raising=False)
    parser.add_argument("--write-script", required=True, metavar="OUT.py",
                        help="the loader script to write (refuses an existing file)")
    args = parser.parse_args(argv)  # bad flags: usage and exit 2, as every quantkit command
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    data_argv = _without_write_script(argv)
    try:
        out = write_script(args.write_script, data_argv, base_dir=os.getcwd())
    except QuantkitError as err:
        print(_one_line(err), file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except OSError as err:  # a folder that cannot be written: one line, as every quantkit output
        print(f"quantkit: error: cannot write {args.write_script!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantkit: interrupted; no script was written", file=sys.stderr)
        return 130
    print(f"wrote {out}; use it with:")
    print(f"  polygraphy run {shlex.quote(args.model)} --onnxrt --data-loader-script {shlex.quote(str(out))}")
    print(f"  polygraphy convert {shlex.quote(args.model)} --int8 --data-loader-script {shlex.quote(str(out))} "
          "-o model.engine   (needs TensorRT)")
    return 0


def _without_write_script(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--write-script":
            skip = True
        elif not token.startswith("--write-script="):
            out.append(token)
    return out


if __name__ == "__main__":
    sys.exit(main())
