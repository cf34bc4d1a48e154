from __future__ import annotations

import argparse

from quantkit.cli.common import positive_int


class QatDemo:
    """Train the bundled digits CNN, quantize it with every PTQ method and with QAT, and print the
    accuracy table measured through ONNX Runtime on the exported Q/DQ models (needs PyTorch).

    examples:
      quantkit qat-demo                    # 40 FP32 epochs + 2 QAT epochs, about two minutes on 2 cores
      quantkit qat-demo --epochs 5 --qat-epochs 1 -o /tmp/qat
    """

    name = "qat-demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", default=None, metavar="DIR",
                            help="keep the exported models and results.json here (default: a temporary folder)")
        parser.add_argument("--epochs", type=positive_int, default=40, help="FP32 training epochs (default 40)")
        parser.add_argument("--qat-epochs", type=positive_int, default=2, help="QAT fine-tuning epochs (default 2)")
        parser.add_argument("--qat-lr", type=float, default=1e-3, help="QAT learning rate (SGD, cosine; default 0.001)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    def run(self, args: argparse.Namespace) -> int:
        import tempfile
        from pathlib import Path

        from quantkit._deps import require

        require("torch")
        from quantkit.qat.demo import run

        with tempfile.TemporaryDirectory(prefix="quantkit-qat-") as tmp:
            out = Path(args.output) if args.output else Path(tmp)
            result = run(out, epochs=args.epochs, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr, seed=args.seed)
            print()
            print(result.table())
            if args.output:
                from quantkit._io import write_json_atomic

                write_json_atomic(out / "results.json", result.to_dict())
                print(f"\n  wrote {out / 'results.json'} and the ONNX models in {out}")
        return 0
