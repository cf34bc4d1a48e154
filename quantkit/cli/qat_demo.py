from __future__ import annotations

import argparse

from quantkit.cli.common import non_negative_int, positive_int, progress


class QatDemo:
    """Train the bundled digits CNN, quantize it with every PTQ method and with QAT, and print the
    accuracy table measured through ONNX Runtime on the exported Q/DQ models (needs PyTorch).

    The default run (40 FP32 epochs + 2 QAT epochs) took 80 s on a 2-core machine of the CI kind
    (torch 2.13 CPU; 2026-11-28).

    examples:
      quantkit qat-demo
      quantkit qat-demo --epochs 5 --qat-epochs 1 -o /tmp/qat
    """

    name = "qat-demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", default=None, metavar="DIR",
                            help="keep the exported models and results.json here (default: a temporary folder, "
                                 "removed at the end)")
        parser.add_argument("--force", action="store_true",
                            help="replace the artifacts of an earlier qat-demo in DIR (never other files)")
        parser.add_argument("--epochs", type=positive_int, default=40, help="FP32 training epochs (default 40)")
        parser.add_argument("--qat-epochs", type=positive_int, default=2, help="QAT fine-tuning epochs (default 2)")
        parser.add_argument("--qat-lr", type=float, default=1e-3, help="QAT learning rate (SGD, cosine; default 0.001)")
        parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        import contextlib
        import sys
        import tempfile
        from pathlib import Path

        from quantkit._deps import require
        from quantkit._io import check_output_dir, output_dir, write_json_atomic

        require("torch")
        if args.output:
            check_output_dir(args.output, force=args.force, command="quantkit qat-demo")
        from quantkit.qat.demo import run

        def echo(line: str) -> None:  # steps go to stderr; the results follow the written files
            print(line, file=sys.stderr)

        with contextlib.ExitStack() as stack:
            if args.output:
                out = Path(args.output)
                staging = stack.enter_context(output_dir(out, force=args.force, command="quantkit qat-demo"))
            else:
                out = staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-qat-")))
            lines = args.no_progress or not sys.stderr.isatty()  # no bar: a line every 10 epochs (a log looked hung)
            with progress(args.epochs, "FP32 training", disable=lines, unit="epoch") as bar:  # (its own lines)
                def on_epoch(e: int, acc: float) -> None:
                    bar.update(1)
                    if lines and (e % 10 == 0 or e == 1) and e < args.epochs:
                        echo(f"FP32 training: epoch {e} of {args.epochs}, test accuracy {acc:.4f}")

                result = run(staging, epochs=args.epochs, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr,
                             seed=args.seed, echo=echo, on_epoch=on_epoch)
            for row in result.rows:  # where the models will be once the folder is in place
                row.path = str(out / Path(row.path).name) if args.output else ""
            if args.output:
                write_json_atomic(staging / "results.json", result.to_dict())
        print()
        print(result.table())
        if args.output:
            print(f"\n  wrote {out / 'results.json'} and the ONNX models in {out}")
        return 0
