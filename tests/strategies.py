"""Hypothesis strategies and oracles for the fuzz suite (tests/unit/test_fuzz.py).

Strategies build real inputs on disk: small random ONNX graphs (onnx.helper), image folders of
valid, truncated and random files with odd names, and CLI argument lists mixing valid and invalid
flag values. Oracles check what must hold for any run of the CLI: exit status 0/1/2, no traceback
without --debug, one error line (+ hint), inputs unchanged, no partial artifact, a loadable Q/DQ
model with the FP32 model's inputs and outputs.

``QUANTKIT_FUZZ_SCALE`` (default 1) multiplies every property's example budget; it is read once,
in ``fuzz_scale``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

# ------------------------------------------------------------------ budget

def fuzz_scale(environ: dict[str, str] | None = None) -> float:
    """The example-budget multiplier from ``QUANTKIT_FUZZ_SCALE`` (positive number, default 1)."""
    raw = (os.environ if environ is None else environ).get("QUANTKIT_FUZZ_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"QUANTKIT_FUZZ_SCALE must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"QUANTKIT_FUZZ_SCALE must be positive, got {raw!r}")
    return value


def budget(base: int) -> int:
    """``base`` examples times the fuzz scale (at least 1)."""
    return max(1, round(base * fuzz_scale()))


# ------------------------------------------------------------------ ONNX graphs

#: IR version per opset (the oldest IR that carries the opset), so ONNX Runtime loads every model
_IR_FOR_OPSET = {11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}

# Conv, Gemm and MatMul appear more often: a model without them is refused (nothing to quantize)
OPS_4D = ("Conv", "Conv", "Conv", "Relu", "Sigmoid", "SiLU", "HardSwish", "MaxPool", "AveragePool", "Residual", "Concat", "MulConst")
OPS_2D = ("Gemm", "Gemm", "MatMul", "MatMul", "AddBias", "Relu")


@dataclass
class GeneratedModel:
    model: onnx.ModelProto
    opset: int
    batch: int | str | None
    channels: int
    size: int
    weights: str  # "initializer" or "constant"
    ops: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"opset {self.opset}, batch {self.batch!r}, {self.channels}x{self.size}x{self.size}, "
                f"weights as {self.weights}: {' -> '.join(self.ops)}")


class _GraphBuilder:
    def __init__(self, weights: str, seed: int):
        self.weights, self.rng = weights, np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, arr: np.ndarray, base: str = "w") -> str:
        name = self._name(base)
        tensor = numpy_helper.from_array(np.asarray(arr), name)
        if self.weights == "initializer":
            self.inits.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) * 0.3).astype(np.float32))

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out


@st.composite
def onnx_models(draw: st.DrawFn) -> GeneratedModel:
    """A small valid FP32 model: x[B,C,S,S] -> random 4-D chain -> optional head -> 2-D chain -> y."""
    opset = draw(st.integers(11, 21))
    batch = draw(st.sampled_from([1, 2, "N", None]))
    channels = draw(st.sampled_from([1, 3]))
    size = draw(st.sampled_from([8, 12, 16]))
    weights = draw(st.sampled_from(["initializer", "constant"]))
    b = _GraphBuilder(weights, draw(st.integers(0, 2**16)))
    gen = GeneratedModel(onnx.ModelProto(), opset, batch, channels, size, weights)
    cur, c, h = "x", channels, size

    def conv(inp: str, cin: int, cout: int, k: int, stride: int) -> tuple[str, int]:
        pad = k // 2
        ins = [inp, b.weight(cout, cin, k, k)] + ([b.weight(cout)] if draw(st.booleans()) else [])
        out = b.node("Conv", ins, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])
        return out, (h + 2 * pad - k) // stride + 1

    for op in draw(st.lists(st.sampled_from(OPS_4D), min_size=0, max_size=5)):
        if op == "Conv":
            k, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]) if h >= 4 else st.just(1))
            cout = draw(st.sampled_from([2, 4]))
            cur, h = conv(cur, c, cout, k, stride)
            c = cout
        elif op in ("Relu", "Sigmoid"):
            cur = b.node(op, [cur])
        elif op == "SiLU":
            cur = b.node("Mul", [cur, b.node("Sigmoid", [cur])])
        elif op == "HardSwish":
            cur = b.node("HardSwish", [cur]) if opset >= 14 else b.node("Relu", [cur])
        elif op in ("MaxPool", "AveragePool"):
            if h < 4:
                continue
            cur = b.node(op, [cur], kernel_shape=[2, 2], strides=[2, 2])
            h //= 2
        elif op == "Residual":
            branch, _ = conv(cur, c, c, 3, 1)
            cur = b.node("Add", [branch, cur] if draw(st.booleans()) else [cur, branch])
        elif op == "Concat":
            left, _ = conv(cur, c, 2, 1, 1)
            right, _ = conv(cur, c, 2, 3, 1)
            cur, c = b.node("Concat", [left, right], axis=1), 4
        elif op == "MulConst":
            cur = b.node("Mul", [cur, b.const(np.array(0.5, dtype=np.float32), "k")])
        gen.ops.append(op)

    head = draw(st.sampled_from(["GlobalAveragePool+Flatten", "Flatten", "Reshape", "none"]))
    if head == "none":
        shape: list[int | str | None] = [batch, c, h, h]
        gen.ops.append("(4-D output)")
    else:
        if head == "GlobalAveragePool+Flatten":
            cur, feat = b.node("Flatten", [b.node("GlobalAveragePool", [cur])], axis=1), c
        elif head == "Flatten":
            cur, feat = b.node("Flatten", [cur], axis=1), c * h * h
        else:
            cur, feat = b.node("Reshape", [cur, b.const(np.array([0, -1], dtype=np.int64), "shape")]), c * h * h
        gen.ops.append(head)
        for op in draw(st.lists(st.sampled_from(OPS_2D), min_size=0, max_size=3)):
            if op == "Gemm":
                n, trans_b = draw(st.sampled_from([3, 5])), draw(st.booleans())
                w = b.weight(n, feat) if trans_b else b.weight(feat, n)
                ins = [cur, w] + ([b.weight(n)] if draw(st.booleans()) else [])
                cur, feat = b.node("Gemm", ins, transB=int(trans_b)), n
            elif op == "MatMul":
                n = draw(st.sampled_from([3, 5]))
                cur, feat = b.node("MatMul", [cur, b.weight(feat, n)]), n
            elif op == "AddBias":
                cur = b.node("Add", [cur, b.weight(feat)])
            else:
                cur = b.node("Relu", [cur])
            gen.ops.append(op)
        shape = [batch, feat]
    b.nodes.append(helper.make_node("Identity", [cur], ["y"], name="output_identity"))
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR_FOR_OPSET[opset]
    gen.model = model
    return gen


def model_is_valid(model: onnx.ModelProto) -> bool:
    """onnx.checker (full check) and ONNX Runtime both accept the model and it runs."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        sess.run(None, {i.name: np.zeros(shape, np.float32)})
    except Exception:
        return False
    return True


# ------------------------------------------------------------------ image folders

_NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\x00\n\r", exclude_categories=("Cs", "Cc"))
FILE_KINDS = ("png-gray", "png-rgb", "png-rgba", "png-16bit", "jpeg", "truncated-png", "truncated-jpeg",
              "random-bytes", "empty", "not-an-image")


@st.composite
def file_names(draw: st.DrawFn) -> str:
    """Names with spaces, unicode, leading dots, several dots, or no extension."""
    stem = draw(st.text(_NAME_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", "..")))
    ext = draw(st.sampled_from([".png", ".PNG", ".jpg", ".jpeg", ".tif", ".bmp", ".webp", "", ".txt", ".png.bak",
                                ".tar.png"]))
    prefix = draw(st.sampled_from(["", "", "", ".", " ", "a b "]))
    name = f"{prefix}{stem}{ext}"
    return name[:120] if len(name.encode()) <= 200 else "long" + ext


def _image_bytes(kind: str, rng: np.random.Generator, hw: tuple[int, int]) -> bytes:
    import cv2

    h, w = hw
    if kind == "png-gray":
        return cv2.imencode(".png", rng.integers(0, 256, (h, w), dtype=np.uint8))[1].tobytes()
    if kind in ("png-rgb", "truncated-png"):
        data = cv2.imencode(".png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes()
        return data if kind == "png-rgb" else data[: max(8, len(data) // 2)]
    if kind == "png-rgba":
        return cv2.imencode(".png", rng.integers(0, 256, (h, w, 4), dtype=np.uint8))[1].tobytes()
    if kind == "png-16bit":
        return cv2.imencode(".png", rng.integers(0, 65536, (h, w, 3), dtype=np.uint16))[1].tobytes()
    if kind in ("jpeg", "truncated-jpeg"):
        data = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes()
        return data if kind == "jpeg" else data[: len(data) // 2]
    if kind == "random-bytes":
        return rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
    if kind == "empty":
        return b""
    return b"hello, not an image\n"


@dataclass(frozen=True)
class FolderSpec:
    files: tuple[tuple[str, str, tuple[int, int]], ...]  # (relative path, kind, (h, w))
    seed: int

    def write(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(self.seed)
        for rel, kind, hw in self.files:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_image_bytes(kind, rng, hw))
        return root


@st.composite
def image_folders(draw: st.DrawFn, *, min_valid: int = 0) -> FolderSpec:
    """A folder spec: valid PNG/JPEG (gray, RGB, RGBA, 16-bit), truncated, random, empty and
    non-image files, odd names, flat or in class subfolders (sometimes nested deeper)."""
    classes = draw(st.sampled_from([[], ["a"], ["cat", "dog"], ["ünï cödé", ".hidden", "x y"]]))
    n = draw(st.integers(0, 7))
    files: dict[str, tuple[str, tuple[int, int]]] = {}
    hw = st.tuples(st.integers(4, 40), st.integers(4, 40))
    for i in range(n + min_valid):
        kind = draw(st.sampled_from(FILE_KINDS[:5])) if i < min_valid else draw(st.sampled_from(FILE_KINDS))
        name = f"valid{i}.png" if i < min_valid else draw(file_names())
        parts = [draw(st.sampled_from(classes))] if classes else []
        if parts and draw(st.integers(0, 5)) == 0:
            parts.append("nested")
        rel = "/".join([*parts, name])
        if rel.lower() in {k.lower() for k in files}:
            continue
        files[rel] = (kind, draw(hw))
    # a file and a folder must not share a path
    dirs = {"/".join(r.split("/")[:k]) for r in files for k in range(1, r.count("/") + 1)}
    kept = tuple((r, k, s) for r, (k, s) in files.items() if r not in dirs)
    return FolderSpec(kept, draw(st.integers(0, 2**16)))


# ------------------------------------------------------------------ oracles

def tree_hashes(*roots: Path | str | None) -> dict[str, str]:
    """SHA-256 of every file (and a marker for every folder and link) below ``roots``."""
    out: dict[str, str] = {}
    for root in roots:
        if root is None:
            continue
        root = Path(root)
        if root.is_symlink() or root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest() if root.is_file() else "link"
            continue
        if not root.exists():
            out[str(root)] = "missing"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = "dir"
            for name in filenames:
                p = Path(dirpath) / name
                out[str(p)] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_cli_result(rc: int, err: str, *, debug: bool, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
    """Exit status in ``allowed``; no traceback unless --debug; exit 2 (without --debug) is one
    ``quantkit: error:`` line and at most one ``  hint:`` line on stderr."""
    assert rc in allowed, f"exit status {rc} (allowed {allowed}); stderr:\n{err}"
    if not debug:
        assert "Traceback" not in err, f"traceback without --debug:\n{err}"
    if rc == 2 and not debug:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert 1 <= len(lines) <= 2, f"exit 2 with {len(lines)} stderr lines:\n{err}"
        assert lines[0].startswith("quantkit: error: "), lines
        assert len(lines) == 1 or lines[1].startswith("  hint: "), lines


def check_output_folder(out: Path, before: dict[str, str] | None, rc: int) -> None:
    """Failure: ``out`` exactly as before (absent stays absent). Success: complete, every file in
    the manifest with its recorded hash, nothing else but the manifest."""
    if rc != 0:
        assert tree_hashes(out) == (before if before is not None else {str(out): "missing"}), \
            f"failed run changed the output folder {out}"
        return
    from quantkit._io import MANIFEST

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == set(manifest["files"]) | {MANIFEST}, written


def no_staging_left(folder: Path) -> list[str]:
    """Names of staging or temporary files quantkit left in ``folder`` (should be none)."""
    return [p.name for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")) or
            p.name.startswith((".quantkit-staging-", ".quantkit-probe-"))]


def check_qdq_model(int8_path: Path, fp32: onnx.ModelProto) -> None:
    """The written Q/DQ model loads and runs in ONNX Runtime with the FP32 model's inputs and
    outputs (names, element types, shapes)."""
    import onnxruntime as ort

    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    io = lambda s: ([(i.name, i.type, i.shape) for i in s.get_inputs()],  # noqa: E731
                    [(o.name, o.type, o.shape) for o in s.get_outputs()])
    assert io(q) == io(ref), f"inputs/outputs changed: {io(ref)} -> {io(q)}"
    i = q.get_inputs()[0]
    q.run(None, {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
