"""Quantization-aware training on the bundled digits, end to end.

    pip install -e '.[torch]' && python examples/qat_digits.py [--epochs 40] [--qat-epochs 2] [-o out/qat]

1. train DigitsNet in FP32 (scikit-learn's handwritten digits, upsampled to 32x32);
2. PTQ: quantkit.qat.prepare + one quantkit.qat.calibrate pass, then every range method
   (entropy, minmax, percentile, mse) exported as Q/DQ ONNX;
3. QAT: fine-tune the fake-quantized model from the best PTQ ranges for a couple of epochs;
4. measure every exported model with ONNX Runtime on the test split and print the table.

The steps are in quantkit/qat/demo.py (public API only); `quantkit qat-demo` runs the same.
"""

import argparse
import tempfile

from quantkit.qat.demo import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.output or tmp, epochs=args.epochs, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr)
        print()
        print(result.table())
