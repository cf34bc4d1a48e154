"""``quantkit <command>``: a thin skin over the API, one module per subcommand.

Exit status: 0 success, 2 bad usage or bad input, 1 anything else. Errors are one line (plus
a hint); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
import typing
from collections.abc import Sequence

# name -> (module, class); modules are imported only when their command runs or --help needs them
COMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("quantkit.cli.calibrate", "Calibrate"),
    "compare": ("quantkit.cli.compare", "Compare"),
    "build": ("quantkit.cli.build", "Build"),
    "bench": ("quantkit.cli.bench", "Bench"),
    "demo": ("quantkit.cli.demo", "Demo"),
    "qat-demo": ("quantkit.cli.qat_demo", "QatDemo"),
    "inspect": ("quantkit.cli.inspect", "Inspect"),
    "report": ("quantkit.cli.report", "Report"),
    "view": ("quantkit.cli.view", "View"),
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


def build_parser() -> argparse.ArgumentParser:
    from quantkit import __version__

    parser = _Parser(
        prog="quantkit",
        description="INT8 quantization workbench for TensorRT: calibrate on images, write Q/DQ ONNX "
        "and TensorRT calibration caches, check INT8 against FP32.",
    )
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        cmd = _load(name)
        doc = (cmd.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        p.add_argument("-v", "--verbose", action="store_true", help="more log output")
        cmd.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from quantkit.errors import InputError, QuantkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("quantkit: interrupted; no partial output was written", file=sys.stderr)
        return 1
    except QuantkitError as err:
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"  hint: {err.hint}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except Exception as err:  # anything unexpected: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {type(err).__name__}: {err}", file=sys.stderr)
        print("  hint: rerun with --debug for the traceback, and report it if it looks like a bug",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
