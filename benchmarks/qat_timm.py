"""timm's models through the QAT route: ``prepare`` -> ``calibrate`` -> ``export_onnx`` (the Q/DQ
model and its float twin) -> ONNX Runtime (graph optimizations off: the Q/DQ arithmetic as written)
against the fake-quant model, and ``quantkit debug`` of the pair.

    pip install timm && python benchmarks/qat_timm.py [--models NAME ...] [--out FILE]

Random weights (``pretrained=False``: nothing is downloaded), 10 classes, 224x224 inputs, two
calibration batches of 2 random images; the point is the route, not accuracy. One process, one
markdown table (printed, and written to ``--out``). timm needs torchvision; the lent GPU machine
has both (the CPU-only machine has no torchvision build).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100",
          "resnet18", "regnetx_002", "levit_128s", "mobilevit_xxs", "swin_tiny_patch4_window7_224",
          # subclasses with their own forward (StdConv2d, ScaledStdConv2d, Conv2dSame), BEiT's functional qkv, ...
          "resnetv2_50x1_bit", "nf_resnet26", "tf_efficientnet_b0", "beit_base_patch16_224", "eva02_tiny_patch14_224",
          "repvgg_a0", "ghostnet_100", "rexnet_100", "hrnet_w18_small", "cspdarknet53", "dla34", "poolformer_s12",
          "efficientformer_l1", "coat_lite_tiny", "pvt_v2_b0", "fastvit_t8", "edgenext_xx_small", "hgnetv2_b0",
          "densenet121", "inception_v3"]


def run(name: str, work: Path) -> str:
    import onnx
    import onnxruntime as ort
    import timm
    import torch

    import quantkit.qat as qq

    t = time.perf_counter()
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    q = qq.prepare(m)
    qq.calibrate(q, [torch.randn(2, 3, 224, 224) for _ in range(2)])
    int8 = qq.export_onnx(q, work / f"{name}.qat.onnx", x)
    fp32 = qq.export_onnx(q, work / f"{name}.fp32.onnx", x, quantized=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    np.save(work / f"{name}.npy", torch.randn(4, 3, 224, 224).numpy())
    dbg = subprocess.run([sys.executable, "-m", "quantkit", "debug", str(fp32), str(int8), "--npz",
                          str(work / f"{name}.npy"), "--no-progress", "-o", str(work / f"{name}-debug")],
                         capture_output=True, text=True)
    sqnr = next((line.split("SQNR")[1].split(",")[0].strip() for line in dbg.stdout.splitlines()
                 if line.strip().startswith("output ") and "SQNR" in line), "")
    debug = f"exit 0, output {sqnr}" if dbg.returncode == 0 else \
        f"exit {dbg.returncode}: {(dbg.stderr.strip().splitlines() or [''])[0][:120]}"
    return (f"| {name} | {ops.count('QuantizeLinear')} | {ops.count('BatchNormalization')} | "
            f"{float(np.abs(got - want).max()):.3g} / {float(np.abs(want).max()):.3g} | {debug} | "
            f"{time.perf_counter() - t:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--machine", default="this machine", help="how to describe the machine in the head")
    ap.add_argument("--out", type=Path, help="write the table here too (markdown)")
    args = ap.parse_args()
    try:
        import timm
        import torch
    except ImportError as err:
        print(f"qat_timm: needs torch and timm ({err}); pip install timm", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                rows.append(run(name, Path(tmp)))
            except Exception as err:  # noqa: BLE001 - a row says what failed; the table goes on
                rows.append(f"| {name} | | | | failed: {type(err).__name__}: {' '.join(str(err).split())[:160]} | |")
            print(rows[-1], flush=True)
    import onnxruntime

    head = [f"{time.strftime('%Y-%m-%d')}, {args.machine}, {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}, ONNX Runtime {onnxruntime.__version__}. "
            "`python benchmarks/qat_timm.py`", "",
            "| model | QuantizeLinear | BatchNormalization left | ONNX Runtime vs fake-quant max abs / max abs output | "
            "`quantkit debug` FP32 twin vs Q/DQ export | s |", "|---|---|---|---|---|---|"]
    table = "\n".join(head + rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
