"""``quantkit <command>``: a thin skin over the API, one module per subcommand.

Exit status: 0 success, 2 bad usage or bad input, 1 anything else, 130 interrupted (Ctrl-C).
Errors are one line (plus a hint); ``--debug`` (before or after the command) shows the traceback.
A reader that closes the output early (``quantkit inspect m.onnx | head -3``) is not an error.
"""

from __future__ import annotations

import argparse
import importlib
import inspect as _inspect  # (the name `inspect` is the inspect command's module here)
import logging
import os
import re
import sys
import traceback
import typing
from collections.abc import Sequence

# name -> (module, class); modules are imported only when their command runs or --help needs them
COMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("quantkit.cli.calibrate", "Calibrate"),
    "compare": ("quantkit.cli.compare", "Compare"),
    "debug": ("quantkit.cli.debug", "Debug"),
    "build": ("quantkit.cli.build", "Build"),
    "bench": ("quantkit.cli.bench", "Bench"),
    "demo": ("quantkit.cli.demo", "Demo"),
    "qat-demo": ("quantkit.cli.qat_demo", "QatDemo"),
    "inspect": ("quantkit.cli.inspect", "Inspect"),
    "report": ("quantkit.cli.report", "Report"),
    "view": ("quantkit.cli.view", "View"),
    "merge-stats": ("quantkit.cli.merge_stats", "MergeStats"),
}


class _Broken:
    """Stands in for a subcommand whose module failed to import; reports it when invoked."""

    def __init__(self, name: str, err: Exception):
        self.name, self.err = name, err
        self.__doc__ = f"(unavailable: {err})"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args: argparse.Namespace) -> int:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"the {self.name!r} command cannot run: {self.err}") from self.err


def _load(name: str) -> object:
    module, cls = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except Exception as err:  # one broken subcommand must not take the CLI down
        return _Broken(name, err)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in the CLI's error format: one line and a hint, exit 2 (its
    default prints the whole usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"quantkit: error: {message}\n  hint: see `{self.prog} --help`\n")


def summary(doc: str | None, default: str) -> str:
    """The --help summary: the docstring's first paragraph, joined into one line."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split()) or default


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a flag not given leaves no attribute, so a subcommand parser cannot reset what
    # the main parser read (`quantkit --debug calibrate ...` and `quantkit calibrate ... --debug`)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="more log output")


def _requested(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line, if any (the first word that is not a flag)."""
    for word in sys.argv[1:] if argv is None else argv:
        if word in ("-h", "--help", "--version"):
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``only``, that subcommand's module alone is imported
    (the others stay names without options, enough to run ``only``)."""
    from quantkit import __version__

    parser = _Parser(
        prog="quantkit",
        description="INT8 quantization workbench for TensorRT: calibrate on images, write Q/DQ ONNX "
        "and TensorRT calibration caches, check INT8 against FP32.",
    )
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    _add_common_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        cmd = _load(name)
        doc = _inspect.cleandoc(cmd.__doc__ or "")  # a docstring's own indent off every line
        p = sub.add_parser(name, help=summary(doc, name), description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common_flags(p)
        cmd.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_command=cmd)
    return parser


def _stdout_gone() -> int:
    """The reader closed stdout (``| head``): nothing more to say, and exit 0. Point stdout at
    devnull so that flushing it at interpreter exit cannot raise again (Python docs, "Note on
    SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (kill, a closed terminal, a job scheduler), raised as Ctrl-C is: the same
    clean-up runs (staging folders and temporary files removed, the output as it was)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _stop_signals() -> dict[int, typing.Any]:
    """Route SIGTERM and SIGHUP to ``Terminated`` while a command runs, where they have their default
    action (one that ``nohup`` or the caller ignores or handles stays so); the handlers before, to
    restore (none where signals cannot be set: a thread other than the main one)."""
    import signal

    before = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) != signal.SIG_DFL:  # ignored (nohup) or the caller's own: kept
            continue
        try:
            before[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            break
    return before


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    for stream in (sys.stdout, sys.stderr):  # a name the terminal's encoding lacks: escaped, never a crash at the end
        if hasattr(stream, "reconfigure") and (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8":
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot be reconfigured (closed, detached)
                pass
    before = _stop_signals()
    try:
        return _main(argv)
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt as err:  # while parsing or importing, before a command ran
        print("quantkit: interrupted", file=sys.stderr)
        return 128 + err.signum if isinstance(err, Terminated) else 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


#: how OpenCV and ONNX Runtime say that an allocation failed (their own exception types)
_ALLOCATION_FAILED = ("Insufficient memory", "Failed to allocate memory")


def _out_of_memory(args: argparse.Namespace) -> int:
    if args.debug:
        traceback.print_exc()
    print("quantkit: error: out of memory", file=sys.stderr)
    # the flags of this command that set how much is held at once (bench has --batch, not --batch-size)
    flags = [f for f, dest in (("--batch-size", "batch_size"), ("--batch", "batch"), ("--num-images", "num_images"))
             if hasattr(args, dest)]
    print(f"  hint: {'lower ' + ' or '.join(flags) + ', and ' if flags else ''}check the data's shapes and the "
          "model's declared input sizes", file=sys.stderr)
    return 2


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _one_line(text: object) -> str:
    """An error message on one line (messages from libraries may span several), its control
    characters escaped (``printable``)."""
    return "; ".join(printable(line.strip()) for line in str(text).splitlines() if line.strip())


#: control characters (C0 but tab and line feed, DEL, C1) -> an escape that shows them: a file name
#: may hold any of them, and printed raw they retitle or clear the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 9), *range(11, 32), *range(127, 160))}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\x1b``), line feeds kept."""
    return text.translate(_CONTROL)


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped, and each line after a message's first indented:
    a line break in a file name cannot start a line of its own ("quantkit: done")."""

    def format(self, record: logging.LogRecord) -> str:
        return re.sub(r"\n(?=\S)", "\n  ", printable(super().format(record)))


def _check_environment() -> None:
    """Environment variables quantkit reads, with values it cannot use: refused by name."""
    import quantkit
    from quantkit import ptq  # noqa: F401  (reads QUANTKIT_CHECK_WORKERS)
    from quantkit.calibrators import collectors  # noqa: F401  (reads QUANTKIT_HISTOGRAM_WORKERS)
    from quantkit.errors import InputError

    for name, value in quantkit.BAD_ENVIRONMENT.items():
        raise InputError(f"environment variable {name}={value!r} is not a usable whole number",
                         hint=f"unset it (`unset {name}`) or give a positive integer")


def _main(argv: Sequence[str] | None) -> int:
    from quantkit.errors import InputError, QuantkitError

    parser = build_parser(only=_requested(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        print("quantkit: error: no command given\n  hint: pick one of the commands above", file=sys.stderr)
        return 2
    args.debug = getattr(args, "debug", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
    try:
        _check_environment()
        code = int(args._command.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
        return code
    except BrokenPipeError:
        raise
    except KeyboardInterrupt as err:
        how = f" ({_signal_name(err.signum)})" if isinstance(err, Terminated) else ""
        print(f"quantkit: interrupted{how}; no partial output was written", file=sys.stderr)
        return 128 + err.signum if isinstance(err, Terminated) else 130
    except MemoryError:
        return _out_of_memory(args)
    except OSError as err:  # a file system's refusal met during the work: the file and the reason
        if args.debug:
            traceback.print_exc()
        where = f"{printable(str(err.filename))}: " if getattr(err, "filename", None) else ""
        if not where:  # a write() that failed (a full disk) names no file: name the outputs of the command
            outs = [str(v) for v in (getattr(args, k, None) for k in ("output", "json", "save_stats")) if v]
            where = f"writing {' / '.join(repr(o) for o in outs)}: " if outs else ""
        print(f"quantkit: error: {where}{_one_line(err.strerror or err)}", file=sys.stderr)
        print("  hint: check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except QuantkitError as err:
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {_one_line(err)}", file=sys.stderr)
        if err.hint:
            print(f"  hint: {_one_line(err.hint)}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except Exception as err:  # anything unexpected: still one line unless --debug
        if any(m in str(err) for m in _ALLOCATION_FAILED):  # OpenCV's, ONNX Runtime's MemoryError
            return _out_of_memory(args)
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        print("  hint: rerun with --debug for the traceback, and report it if it looks like a bug",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
