"""Unpack the ``tensorrt-stubs`` wheel into a folder for mypy (``MYPYPATH``), mending it.

    pip download --no-deps tensorrt-stubs==10.13.0.35.1 -d /tmp/trt-stubs
    python scripts/trt_stubs.py /tmp/trt-stubs/tensorrt_stubs-*.whl .mypy-stubs
    MYPYPATH=.mypy-stubs mypy quantkit/backends/tensorrt quantkit/backends/tensorrt/calibrator.py quantkit/cuda.py

Unpacked rather than installed: installed, its ``tensorrt`` folder of ``.pyi`` files imports as
an empty namespace package and looks like TensorRT to ``import tensorrt``. A few plugin
methods in the generated stubs name a parameter ``in`` (a Python keyword, so the file does not
parse); those parameters are renamed ``in_``. One method gives a parameter without a default
after parameters with defaults; such parameters get ``= ...``.
"""

from __future__ import annotations

import re
import shutil
import sys
import zipfile
from pathlib import Path


def _split_params(params: str) -> list[str]:
    """Split at top-level commas (types like ``tuple[int, int]`` hold commas too)."""
    parts, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur] if cur.strip() else parts


def _mend_defaults(m: re.Match[str]) -> str:
    params = _split_params(m.group(2))
    seen_default = False
    for i, p in enumerate(params):
        if "=" in p:
            seen_default = True
        elif seen_default and not p.strip().startswith("*"):
            params[i] = p + " = ..."
    return m.group(1) + ",".join(params) + m.group(3)


def main(wheel: str, dest: str) -> None:
    out = Path(dest)
    shutil.rmtree(out, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".pyi") and name.split("/")[0] in ("tensorrt", "tensorrt_bindings"):
                text = zf.read(name).decode("utf-8")
                text = re.sub(r"([(,]\s*)in:", r"\1in_:", text)
                text = re.sub(r"(?m)^(\s*def \w+\()(.*)(\)\s*->.*)$", _mend_defaults, text)
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    print(f"tensorrt stubs in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
