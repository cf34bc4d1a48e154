"""Data sources: image folders (OpenCV), NumPy files, synthetic data.

A source is indexable: ``len(source)``, ``source.load(i)`` returns one preprocessed sample
(an array, or a dict of arrays keyed by model input name), ``source.label(i)`` an int or None,
and ``source.describe(i)`` names the sample in messages. ``load`` raises SampleError for one
unreadable sample; the batcher skips it (or stops, when strict).
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from quantkit import MAX_IMAGE_PIXELS, env_int
from quantkit._deps import require
from quantkit.datasets.dtypes import cast_for_input
from quantkit.datasets.preprocess import Preprocess
from quantkit.datasets.sampling import Grouping
from quantkit.errors import DatasetError, InputError

#: what reading a damaged .npy/.npz raises (a truncated file, a bad zip member)
_NUMPY_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def _starts_with(path: Path, head: bytes) -> bool:
    """Whether the file ``path`` begins with ``head`` (False where it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(head)) == head
    except OSError:
        return False


class SampleError(DatasetError):
    """One sample could not be read or converted; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@runtime_checkable
class Source(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> np.ndarray | dict[str, np.ndarray]: ...
    def label(self, index: int) -> int | None: ...
    def describe(self, index: int) -> str: ...


def _walk_images(base: Path) -> list[Path]:
    """Image files under ``base``, following symlinked folders and files.

    Paths keep the names the user sees (a symlinked folder's own name, not its target). A
    folder reached twice (a symlink loop, or two links to one folder) is read once: the first
    time in sorted order; the other names are skipped with a warning.
    """
    seen: dict[tuple[int, int], Path] = {}
    found: list[Path] = []
    others: list[Path] = []  # files that are not images (or not readable files): said once

    def visit(folder: Path) -> None:
        try:
            st = folder.stat()
        except OSError as err:
            log.warning("skipping folder %s: %s", folder, err.strerror or err)
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.warning("skipping %s: it is the folder %s again (symlink), read once", folder, seen[key])
            return
        seen[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            log.warning("skipping folder %s: %s", folder, err.strerror or err)
            return
        subdirs = []
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):  # hidden (.ipynb_checkpoints, .git, .DS_Store): not data, no class
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                subdirs.append(path)
            elif is_file and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                others.append(path)
        for sub in subdirs:
            visit(sub)

    visit(base)
    if others:
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in others})
        log.warning("skipped %d file(s) under %s that are not images or not readable files (%s; first: %s)",
                    len(others), base, ", ".join(kinds[:6]) + (", ..." if len(kinds) > 6 else ""), sorted(others)[0])
    return sorted(found)


def scan_images(root: str | os.PathLike[str]) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files under ``root`` (recursive, sorted) and labels from class subfolders.

    Labels exist when every image lies inside an immediate subfolder of ``root``; classes are
    the sorted subfolder names that hold images. Hidden files and folders (``.name``) are left
    out; other files that are not images are counted in one warning. Symlinked folders and files are followed
    (each folder read once, so loops end); a class is named after the link, as the user sees it.

    Returns:
        (paths, labels or None, class names)
    """
    base = Path(root)
    if not str(root):  # Path("") is the working folder: never read it unasked
        raise DatasetError("an empty path was given for the image folder", hint="give the folder of images")
    if not base.exists():
        raise DatasetError(f"image folder {str(base)!r} does not exist")
    if not base.is_dir():
        raise DatasetError(f"{str(base)!r} is not a folder", hint="--images takes a folder of images")
    paths = _walk_images(base)
    if not paths:
        raise DatasetError(
            f"image folder {str(base)!r} has no images",
            hint=f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    tops = [p.relative_to(base).parts for p in paths]
    if all(len(t) >= 2 for t in tops):
        classes = sorted({t[0] for t in tops})
        index = {c: i for i, c in enumerate(classes)}
        _say_class_order(base, classes)
        return paths, [index[t[0]] for t in tops], classes
    loose = [p for p, t in zip(paths, tops) if len(t) < 2]
    if len(loose) < len(paths):  # class folders, and images beside them: no labels, and the user is told why
        log.warning("%s: %d image(s) lie directly in it (first: %s) beside %d class folder(s): no labels are read "
                    "(accuracy needs every image inside a class folder); move them into one, or out",
                    base, len(loose), loose[0].name, len({t[0] for t in tops if len(t) >= 2}))
    return paths, None, []


def _say_class_order(base: Path, classes: list[str]) -> None:
    """Warn where the class folders' order may not be the model's: folders that hold no image
    (they are no class, so the labels after them shift by one), and numbered folders past 9,
    which are taken in text order ('10' before '2'), as torchvision's ImageFolder takes them."""
    known = set(classes)
    try:
        empty = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
                       and d.name not in known)
    except OSError:
        empty = []
    if empty:
        log.warning("%s: class folder(s) %s hold no image: they are no class, so every label after them is one "
                    "lower (labels are the folders' indices in sorted order, of those that hold images)", base,
                    ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else ""))
    numeric = sorted(classes, key=int) if all(c.isascii() and c.isdigit() for c in classes) else classes
    if numeric != classes:
        c = next(a for a, b in zip(numeric, classes) if a != b)  # where the two orders part
        width = len(numeric[-1])
        log.warning("%s: the class folders are numbers, taken in text order as torchvision's ImageFolder takes them: "
                    "folder %r is class %d, not %d; where the model's classes follow the numbers, name the folders "
                    "with leading zeros (%s, %s, ...)", base, c, classes.index(c), numeric.index(c),
                    numeric[0].zfill(width), numeric[1].zfill(width))


@functools.cache
def _opencv() -> Any:
    """OpenCV, its own log at errors only: a damaged file is said once, in quantkit's warning that
    names it and what is skipped (OpenCV's "[ WARN:0@...] grfmt_png.cpp" lines came too)."""
    cv2 = require("cv2")
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # an OpenCV without its logging module
        pass
    return cv2


def _jpeg_complete(data: bytes) -> bool:
    """The JPEG's end-of-image marker follows its scan. The segments before the first scan are
    stepped over by their lengths (an EXIF thumbnail there ends with a marker of its own), then
    the marker is looked for after it: bytes after the image (a Motion Photo's video, a vendor
    trailer) do not make a whole file look truncated, as a look at its last bytes did."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break  # not a segment: judge by the end of the file, as before
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan: the image data, then (in a whole file) the end marker
            return data.find(b"\xff\xd9", pos) != -1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return b"\xff\xd9" in data[-64:]


def pixel_limit() -> int:
    """The most pixels an image may have, decoded or resized (``OPENCV_IO_MAX_IMAGE_PIXELS``,
    default ``quantkit.MAX_IMAGE_PIXELS``)."""
    return env_int("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS, minimum=1)


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file with OpenCV into uint8-range values.

    Rules: 8-bit as is; 16-bit divided by 257 (to the 8-bit range, as float32); float images
    assumed 0-1 and multiplied by 255; an alpha channel is dropped; gray+alpha keeps gray; a
    JPEG turned by its EXIF orientation; an image over ``quantkit.MAX_IMAGE_PIXELS`` refused.
    Returns HxW (gray) or HxWx3 (BGR). Raises SampleError for empty, truncated or corrupt files.
    """
    cv2 = _opencv()
    try:
        # no image of the pixel limit takes more bytes than float32 RGBA does, uncompressed: a larger
        # file (a video or an archive named .png) is not read whole just to be refused (3 GiB, 25 s)
        size, most = path.stat().st_size, pixel_limit() * 16 + (1 << 20)
        if size > most:
            raise SampleError(str(path), f"{size / 2**30:.1f} GiB, more than an image of at most {pixel_limit():,} "
                              "pixels takes (OPENCV_IO_MAX_IMAGE_PIXELS); not read")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise SampleError(str(path), f"cannot be read ({err.strerror or err})") from err
    if data.size == 0:
        raise SampleError(str(path), "empty file (0 bytes)")
    jpeg = data[:2].tobytes() == b"\xff\xd8"
    # libjpeg decodes a truncated JPEG into a partly grey image with only a warning: check
    # that the end-of-image marker is there.
    if jpeg and not _jpeg_complete(data.tobytes()):
        raise SampleError(str(path), "truncated JPEG (no end-of-image marker)")
    # a JPEG turned upright by its EXIF orientation (a phone photo), as viewers show it; it has
    # no alpha channel to keep, which is what IMREAD_UNCHANGED (orientation ignored) is for
    flags = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if jpeg else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(data, flags)
    except cv2.error as err:  # over OpenCV's pixel limit (quantkit.MAX_IMAGE_PIXELS), or corrupt
        too_large = "too large" in str(err).lower() or "pixels" in str(err).lower()
        limit = pixel_limit()
        raise SampleError(str(path), f"over {limit:,} pixels, "
                          "not decoded (OPENCV_IO_MAX_IMAGE_PIXELS)" if too_large else
                          "not a decodable image (corrupt or unsupported format)") from err
    if img is None or img.size == 0:
        raise SampleError(str(path), "not a decodable image (corrupt or unsupported format)")
    if img.dtype == np.uint16:
        img = img.astype(np.float32) * np.float32(1 / 257)
    elif img.dtype in (np.float32, np.float64):
        img = img.astype(np.float32) * np.float32(255)
    elif img.dtype != np.uint8:
        img = img.astype(np.float32)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        elif img.shape[2] == 2:
            img = img[:, :, 0]
        elif img.shape[2] == 1:
            img = img[:, :, 0]
    return np.ascontiguousarray(img)


@dataclass
class ImageFolder:
    """Images under a folder, decoded with OpenCV and preprocessed by ``preprocess``.

    Args:
        root: the folder (searched recursively).
        preprocess: the preprocessing spec (already resolved for the model).
        expected_hw: when set, every sample must come out with this height and width.
    """

    root: str | os.PathLike[str]
    preprocess: Preprocess
    expected_hw: tuple[int, int] | None = None
    paths: list[Path] = field(init=False)
    labels: list[int] | None = field(init=False)
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.paths, self.labels, self.classes = scan_images(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def label(self, index: int) -> int | None:
        return None if self.labels is None else self.labels[index]

    def grouping(self) -> Grouping:
        """Class folders when labelled, else the sub-folder of each image (one group when flat)."""
        if self.labels is not None:
            return Grouping(tuple(self.labels), tuple(self.classes), "classes")
        base = Path(self.root)
        parents = [p.parent.relative_to(base).as_posix() for p in self.paths]
        names = sorted(set(parents))
        index = {n: i for i, n in enumerate(names)}
        return Grouping(tuple(index[p] for p in parents), tuple(names), "subfolders" if len(names) > 1 else "none")

    def load(self, index: int) -> np.ndarray:
        path = self.paths[index]
        img = decode_image(path)
        pre = self.preprocess
        if pre.resize is not None or pre.cover is not None:  # a thin strip's resize would be huge
            oh, ow = pre._resized_hw(img.shape[:2])
            limit = pixel_limit()
            if oh * ow > limit:
                raise SampleError(str(path), f"{img.shape[0]}x{img.shape[1]} pixels would be resized to {oh}x{ow}, "
                                  f"over {limit:,} pixels (an extreme aspect ratio; OPENCV_IO_MAX_IMAGE_PIXELS)")
        sample = pre.apply(img, source=str(path))
        if self.expected_hw is not None:
            hw = sample.shape[1:3] if self.preprocess.layout == "nchw" else sample.shape[0:2]
            if tuple(hw) != tuple(self.expected_hw):
                raise InputError(
                    f"{path}: preprocessed image is {hw[0]}x{hw[1]}, the model expects "
                    f"{self.expected_hw[0]}x{self.expected_hw[1]}",
                    hint="set --resize/--crop (or --preprocess imagenet) so images match the model input",
                )
        return sample


@dataclass
class NumpySource:
    """Samples from a .npy file (one input: array [N, ...]) or .npz file (arrays by input name).

    An .npz may also hold ``labels`` (int array [N]); every other array must have the same N
    along its batch axis. The batch axis is 0 unless ``batch_axes`` declares another (or None:
    the array is fed as is, the same value in every batch) or ``shapes`` (the model's input
    shapes) tells it: see ``batch_axes_from_shapes`` (an RNN state [layers, N, C] is batched on
    axis 1; a 0-d sample rate or a fixed-shape tensor has no batch axis). ``batch_axes_`` holds
    the result, by array name.
    Arrays keep their dtype (int64 token ids, bool masks, float images) unless ``dtypes`` gives
    the model's input dtypes: then each array is cast to its input's dtype when no value changes
    (float64 -> float32 with a note; int32 -> int64 when the values fit; ...) and refused with
    a DtypeMismatchError otherwise (see ``quantkit.datasets.dtypes``).
    """

    path: str | os.PathLike[str]
    dtypes: dict[str, Any] | None = None
    shapes: dict[str, tuple[int | str | None, ...]] | None = None
    batch_axes: dict[str, int | None] | None = None
    arrays: dict[str, np.ndarray] = field(init=False)
    labels: np.ndarray | None = field(init=False)
    batch_axes_: dict[str, int | None] = field(init=False)

    def __post_init__(self) -> None:
        from quantkit._io import input_file

        p = input_file(self.path, "NumPy file", DatasetError)
        inputs = sorted(set(self.shapes or self.dtypes or ()))  # the model's inputs, when known
        try:
            loaded = np.load(p, allow_pickle=False)
        except (ValueError, *_NUMPY_READ_ERRORS) as err:
            # NumPy takes any file that is neither .npy nor a zip for a pickle: only one that starts
            # as a pickle does (protocol 2+: 0x80) is called one; NumPy's own text would advise loading it unsafely
            pickled = _starts_with(p, b"\x80") or _starts_with(p, b"\x93NUMPY")  # a pickle, an object array
            why = (str(err) if "pickle" not in str(err) else "it holds pickled Python objects, which quantkit never "
                   "loads" if pickled else "it is neither a .npy array nor an .npz (zip) archive")
            raise DatasetError(f"{str(p)!r} is not a readable .npy/.npz file: {why}",
                               hint="save plain arrays with numpy.save / numpy.savez") from err
        if isinstance(loaded, np.ndarray):
            self.arrays, self.labels = {"": loaded}, None
        else:
            arrays = {}
            twice = sorted({k for k in loaded.files if loaded.files.count(k) > 1})
            if twice:  # a hand-made or concatenated archive: NumPy would read the last member of each name
                loaded.close()
                raise DatasetError(f"{str(p)!r} holds more than one array named {twice[0]!r}",
                                   hint="write the file again with np.savez (one array a name)")
            unread = [k for k in loaded.files if inputs and k not in inputs and k != "labels"]
            if unread:  # never read (a 1 GB array of something else cost its size; one of another length stopped it)
                log.warning("%s: array(s) %s are not inputs the model reads; left out, not read", p,
                            ", ".join(repr(k) for k in unread[:5]) + (", ..." if len(unread) > 5 else ""))
            with loaded:
                for k in loaded.files:
                    if k in unread:
                        continue
                    try:
                        arrays[k] = loaded[k]
                    except ValueError as err:  # an object array: np.load refuses to unpickle it
                        if "pickle" not in str(err):  # a truncated member: "EOF: reading array data"
                            raise DatasetError(f"{str(p)!r}: array {k!r} is not readable: {err}") from err
                        raise DatasetError(f"{str(p)!r}: array {k!r} cannot be read without unpickling Python "
                                           f"objects ({err}); quantkit never runs code from a data file",
                                           hint="save numeric arrays (np.savez with float/int arrays), and text as "
                                                "NumPy str arrays; samples of different lengths (clips, sequences: a "
                                                "list of arrays becomes an object array) need one length: cut or pad "
                                                "them to it, or save a file for each length") from err
                    except _NUMPY_READ_ERRORS as err:
                        raise DatasetError(f"{str(p)!r}: array {k!r} is not readable: {err}") from err
                    if not isinstance(arrays[k], np.ndarray):  # a member that is not in NumPy's format: its bytes
                        raise DatasetError(f"{str(p)!r}: member {k!r} is not a NumPy array",
                                           hint="write the file with np.savez")
            self.labels = arrays.pop("labels", None)
            self.arrays = arrays
        if not self.arrays:
            unread = [k for k in getattr(loaded, "files", ()) if k != "labels"]
            raise DatasetError(f"{str(p)!r} holds no input arrays"
                               + (f": its arrays {unread} are not the model's inputs {inputs}"
                                  if unread else ""), hint="name the arrays in the .npz after the model inputs")
        def model_name(key: str) -> str:  # a .npy array feeds the model's only input
            names = list(self.shapes or self.dtypes or {})
            return names[0] if not key and len(names) == 1 else key

        self.batch_axes_ = batch_axes_from_shapes(
            {model_name(k): a.shape for k, a in self.arrays.items()}, self.shapes or {}, self.batch_axes or {},
            where=str(p))
        self.batch_axes_ = {k: self.batch_axes_[model_name(k)] for k in self.arrays}
        sizes = {k: a.shape[ax] for k, a in self.arrays.items() if (ax := self.batch_axes_[k]) is not None}
        if not sizes:  # every array fed whole: one sample, and nothing says how to count more
            raise DatasetError(f"{str(p)!r}: no array has a batch axis ({_axes_text(self.batch_axes_)}), so the file "
                               "holds one sample", hint="stack samples on a new first axis of each array (one axis "
                               "more than the input: samples of a model without a batch axis), or declare a batch "
                               "axis with --batch-axis NAME=AXIS")
        if set(sizes.values()) == {0}:
            raise DatasetError(f"{str(p)!r} holds 0 samples: its arrays are empty along their batch axes "
                               f"({_axes_text(self.batch_axes_)}: {sizes})", hint="give it samples")
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise DatasetError(f"{str(p)!r}: arrays must share a non-zero size along their batch axes "
                               f"({_axes_text(self.batch_axes_)}), got {sizes}",
                               hint="declare an input's batch axis with --batch-axis NAME=AXIS (NAME=none: "
                               "no batch axis, fed as is)")
        self.count_ = next(iter(sizes.values()))
        if self.labels is not None:
            self.labels = _class_labels(self.labels, self.count_, str(p))
        if self.dtypes:
            noted: set[str] = set()
            for key, arr in self.arrays.items():
                name = key or (next(iter(self.dtypes)) if len(self.dtypes) == 1 else "")
                if name in self.dtypes:
                    where = str(p) if not key else f"{p}[{key!r}]"
                    self.arrays[key] = cast_for_input(arr, self.dtypes[name], name=name, where=where, noted=noted)

    def __len__(self) -> int:
        return self.count_

    def describe(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def label(self, index: int) -> int | None:
        return None if self.labels is None else int(self.labels[index])

    def grouping(self) -> Grouping:
        """Labels when the file has them, else one group."""
        if self.labels is None:
            return Grouping((0,) * len(self), ("",), "none")
        names, ids = np.unique(np.asarray(self.labels), return_inverse=True)
        return Grouping(tuple(int(i) for i in ids.ravel()), tuple(str(n) for n in names), "classes")

    def load(self, index: int) -> np.ndarray | dict[str, np.ndarray]:
        """Sample ``index``: each array's slice at ``index`` along its batch axis (that axis
        removed); an array without a batch axis whole."""
        out = {k: a if (ax := self.batch_axes_[k]) is None else np.take(a, index, axis=ax)
               for k, a in self.arrays.items()}
        return out[""] if "" in out else out


def _class_labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    """An .npz's ``labels`` as int64 class indices [count], or one line saying what is wrong with
    them (they were read as they came: a [N, 2] array, strings or NaN stopped a run with exit 1,
    fractions were cut to integers without a word)."""
    hint = "save 'labels' as one integer class index per sample (np.savez(..., labels=np.array([...], np.int64)))"
    if labels.ndim != 1 or len(labels) != count:
        raise DatasetError(f"{where!r}: 'labels' has shape {labels.shape}, expected ({count},): one class index per "
                           "sample", hint=hint)
    if labels.dtype.kind == "u" and labels.size and int(labels.max()) > np.iinfo(np.int64).max:
        raise DatasetError(f"{where!r}: 'labels' has a class index too large to be one ({int(labels.max())})", hint=hint)
    if labels.dtype == bool or np.issubdtype(labels.dtype, np.integer):
        values = labels.astype(np.int64)
    elif np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and \
            (labels == np.round(labels)).all():
        values = labels.astype(np.int64)
    else:
        raise DatasetError(f"{where!r}: 'labels' are {labels.dtype} values that are not whole class indices "
                           f"(first: {labels.reshape(-1)[0]!r})", hint=hint)
    if (values < 0).any():
        raise DatasetError(f"{where!r}: 'labels' has a negative class index ({int(values.min())})", hint=hint)
    return values


def _axes_text(axes: dict[str, int | None]) -> str:
    return ", ".join(f"{k or 'the array'}: {'none' if ax is None else ax}" for k, ax in axes.items())


def batch_axes_from_shapes(arrays: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int | str | None, ...]],
                           declared: dict[str, int | None], *, where: str) -> dict[str, int | None]:
    """The batch axis of each array (by input name; shapes of the whole data), or None for an
    array fed as is in every batch.

    Rules, in order: a ``declared`` axis (None: no batch axis); a 0-d array has none; an array
    whose input shape is unknown (or of another rank) is batched on axis 0. Otherwise the
    candidate axes of an array are its input's dynamic dims (symbolic, -1 or unnamed) and the
    static dims that the array does not match (N samples for a fixed-batch model: on axis 0, or
    on axis 1 of an RNN state [2, 1, 128] stacked as [2, N, 128]), and axis 0 of size 1 where
    the input's is a static 1 and a later axis is a candidate (one sample [1, T, F] of a batch-1
    model, read as N samples [N, T, F] are: not as T samples of one time step); an array
    with no candidate is a fixed-shape tensor, fed as is. Axis 0 wins when it is a candidate of
    every batched array and their sizes there agree (the usual layout); where they differ there
    and the inputs declare their first dims by one symbol, the arrays hold different numbers of
    samples (an error: not a batch on the sequence axis they share); else the batch size is the
    one size that every batched array has on a candidate axis, and each array's axis is its
    candidate of that size (an RNN state [1, N, H] beside x [N, T, F]; time-major [S, N] and
    [T, N] inputs). When no array has a candidate, every array with dims is batched on
    axis 0 (one fixed-shape input given as one sample).

    Raises:
        DatasetError: a declared axis out of range, different sample counts on a shared first
            dim, no common size, or more than one way to read an array; the message names the
            array and its candidates.
    """
    hint = "declare it with --batch-axis NAME=AXIS (NAME=none: no batch axis, fed as is in every batch)"
    axes: dict[str, int | None] = {}
    candidates: dict[str, list[int]] = {}
    for name, shape in arrays.items():
        if name in declared:
            ax = declared[name]
            if ax is not None and not 0 <= ax < len(shape):
                raise DatasetError(f"{where}: array {name!r} cannot be batched on axis {ax}: it has "
                                   f"{len(shape)} dimensions {tuple(shape)}", hint="an axis from 0 to ndim-1, or none")
            axes[name] = ax
        elif not shape:
            axes[name] = None
        elif name not in shapes or len(shapes[name]) != len(shape):
            candidates[name] = [0]
        else:
            dims = shapes[name]
            candidates[name] = [i for i, d in enumerate(dims) if not isinstance(d, int) or d != shape[i]]
            if candidates[name] and candidates[name][0] != 0 and dims[0] == 1 == shape[0]:
                # one sample of a batch-1 model with a dynamic axis after (a streaming VAD's [1, T, F]):
                # axis 0, as N such samples are read, not T samples of one time step
                candidates[name].insert(0, 0)
    batched = {n: c for n, c in candidates.items() if c}
    if not batched and all(ax is None for ax in axes.values()):
        return {**axes, **{n: 0 for n in candidates}}
    known = {arrays[n][ax] for n, ax in axes.items() if ax is not None}
    if all(0 in c for c in batched.values()) and len(known | {arrays[n][0] for n in batched}) == 1:
        return {**axes, **{n: (0 if c else None) for n, c in candidates.items()}}
    firsts = {shapes[n][0] if n in shapes and len(shapes[n]) == len(arrays[n]) else None for n in batched}
    shared = next(iter(firsts)) if len(firsts) == 1 else None
    if isinstance(shared, str) and shared and all(0 in c for c in batched.values()):
        # the inputs' first dims are one symbol: the model says they are one size, the samples; a
        # size the arrays share on a later axis (a sequence's length) is not theirs to take
        counts = ", ".join(f"{n!r} {arrays[n][0]}" for n in batched)
        raise DatasetError(f"{where}: the arrays hold different numbers of samples on axis 0 ({counts}), where the "
                           f"model's inputs share their first dimension {shared!r}",
                           hint="give every input the same number of samples on axis 0, or declare an array fed "
                                "whole in every batch with --batch-axis NAME=none")
    common = None if not known else set(known)
    for n, c in batched.items():
        sizes = {arrays[n][i] for i in c}
        common = sizes if common is None else common & sizes
    if not common:
        listed = "; ".join(f"{n!r} {tuple(arrays[n])}: axes {c}" for n, c in batched.items())
        raise DatasetError(f"{where}: the arrays share no batch size on the axes that can hold samples (the input's "
                           f"dynamic axes, and its fixed ones the array's size differs on: {listed})", hint=hint)
    if len(common) > 1:
        n, c = next((n, c) for n, c in batched.items() if len({arrays[n][i] for i in c} & common) > 1)
        raise DatasetError(f"{where}: the batch axis of {n!r} {tuple(arrays[n])} is ambiguous: axes {c} "
                           f"could each be it (sizes {sorted(common)} are common to every array)", hint=hint)
    size = common.pop()
    for n, c in candidates.items():
        fits = [i for i in c if arrays[n][i] == size]
        if len(fits) > 1 and 0 not in fits:
            raise DatasetError(f"{where}: the batch axis of {n!r} {tuple(arrays[n])} is ambiguous: axes {fits} "
                               f"all have the batch size {size}", hint=hint)
        axes[n] = (0 if 0 in fits else fits[0]) if fits else None
    return axes


@dataclass
class SyntheticSource:
    """Random samples of a fixed shape (for smoke tests and speed runs; not for real scales).

    Args:
        shape: one sample's shape, e.g. (3, 224, 224).
        count: number of samples.
        seed: random seed; sample i is the same on every run.
        distribution: float data: "normal" (mean 0, std 1) or "uniform" (0 to 1).
        dtype: the sample dtype: a float type, an integer type (token ids) or "bool" (a mask,
            True or False with equal odds).
        value_range: integers: uniform in [low, high), e.g. (0, vocabulary size); required for
            integer dtypes (``synthetic_for_model`` takes it from an embedding table).
    """

    shape: tuple[int, ...]
    count: int = 64
    seed: int = 0
    distribution: str = "normal"
    dtype: str = "float32"
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise DatasetError(f"synthetic source needs a positive count, got {self.count}")
        if self.distribution not in ("normal", "uniform"):
            raise InputError(f"distribution must be normal or uniform, got {self.distribution!r}")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as err:
            raise InputError(f"synthetic source: unknown dtype {self.dtype!r}") from err
        if np.issubdtype(dt, np.integer):
            if self.value_range is None:
                raise InputError(f"synthetic {dt} data needs a value_range (low, high), e.g. (0, vocabulary size)")
            low, high = self.value_range
            info = np.iinfo(dt)
            if not (info.min <= low < high <= info.max + 1):
                raise InputError(f"synthetic {dt} data: value_range {self.value_range} is empty or outside {dt}")
        elif dt != np.bool_ and not np.issubdtype(dt, np.floating):
            raise InputError(f"synthetic source: dtype must be float, integer or bool, got {dt}")

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"synthetic[{index}]"

    def label(self, index: int) -> int | None:
        return None

    def load(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        dt = np.dtype(self.dtype)
        if dt == np.bool_:
            return rng.random(self.shape) < 0.5
        if np.issubdtype(dt, np.integer):
            low, high = self.value_range  # type: ignore[misc]
            return rng.integers(low, high, self.shape, dtype=np.int64).astype(dt)
        if self.distribution == "normal":
            return rng.standard_normal(self.shape, dtype=np.float32).astype(dt, copy=False)
        return rng.random(self.shape, dtype=np.float32).astype(dt, copy=False)


@dataclass
class InputsSource:
    """One source per model input, zipped: sample i is ``{name: sources[name].load(i)}``.

    Labels come from the first source that has them.
    """

    sources: dict[str, Source]

    def __post_init__(self) -> None:
        sizes = {k: len(s) for k, s in self.sources.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise DatasetError(f"the sources of the inputs must have one common length, got {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.sources.values())))

    def describe(self, index: int) -> str:
        return next(iter(self.sources.values())).describe(index)

    def label(self, index: int) -> int | None:
        for s in self.sources.values():
            lab = s.label(index)
            if lab is not None:
                return lab
        return None

    def load(self, index: int) -> dict[str, np.ndarray]:
        out = {}
        for name, s in self.sources.items():
            sample = s.load(index)
            out[name] = sample[name] if isinstance(sample, dict) else sample
        return out


@dataclass
class WithInputValues:
    """A source for one model input (an image folder) and the same value of every other input
    for each sample (a detector's ``scale_factor`` or ``im_shape``): sample i is
    ``{name: source.load(i), **values}``. Anything else (labels, grouping, the preprocessing) is
    the wrapped source's."""

    source: Source
    name: str
    values: dict[str, np.ndarray]
    #: inputs without a batch axis (a 0-d loop count or threshold): fed as they are, not stacked
    whole: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def batch_axes_(self) -> dict[str, int | None]:
        """``Batcher``'s batch axes: None for the inputs fed whole."""
        return {self.name: 0, **{n: (None if n in self.whole else 0) for n in self.values}}

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def label(self, index: int) -> int | None:
        return self.source.label(index)

    def load(self, index: int) -> dict[str, np.ndarray]:
        sample = self.source.load(index)
        return {self.name: sample[self.name] if isinstance(sample, dict) else sample, **self.values}

    def __getattr__(self, attr: str) -> Any:  # grouping, preprocess, paths: the wrapped source's
        if attr == "source":
            raise AttributeError(attr)
        return getattr(self.source, attr)


def synthetic_for_model(model: Any, *, count: int = 64, seed: int = 0, distribution: str = "normal",
                        ranges: dict[str, tuple[int, int]] | None = None,
                        dims: dict[str, int] | None = None) -> InputsSource:
    """Synthetic data for every input of an ONNX model, in each input's dtype.

    Float inputs get ``distribution``; bool inputs random masks; integer inputs uniform values
    in ``ranges[name]``, or, when the input only indexes Gathers over constant tables (token
    ids into an embedding), in [0, table rows).

    Args:
        model: the ONNX model (ModelProto).
        count: samples.
        seed: random seed (each input draws from its own stream).
        distribution: for float inputs, "normal" or "uniform".
        ranges: [low, high) per integer input name; overrides the value taken from a Gather.
        dims: sizes of dynamic dimensions by name (the first, batch, dimension is not part of
            a sample).

    Raises:
        InputError: an integer input without an obvious range and none in ``ranges``, or a
            dynamic dimension missing from ``dims``.
    """
    from quantkit.onnx.model import index_ranges, input_specs

    known = {**index_ranges(model), **(ranges or {})}
    sources: dict[str, Source] = {}
    for k, spec in enumerate(input_specs(model)):
        shape = []
        for d in spec.shape[1:]:
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and dims and d in dims:
                shape.append(int(dims[d]))
            else:
                raise InputError(f"input {spec.name!r} has the dynamic dimension {d!r} (shape {list(spec.shape)})",
                                 hint=f"pass dims={{{str(d)!r}: size}}")
        rng_range = None
        if np.issubdtype(spec.dtype, np.integer):
            if spec.name not in known:
                raise InputError(
                    f"input {spec.name!r} is {spec.dtype} and does not only index an embedding table, so its "
                    "value range is unknown",
                    hint=f"pass ranges={{{spec.name!r}: (low, high)}}",
                )
            rng_range = tuple(int(v) for v in known[spec.name])
        sources[spec.name] = SyntheticSource(tuple(shape), count, seed + 7919 * k, distribution,
                                             str(spec.dtype), rng_range)  # type: ignore[arg-type]
    return InputsSource(sources)


@dataclass
class TorchDatasetSource:
    """A PyTorch (map-style) dataset: ``dataset[i]`` is a tensor/array or (input, label, ...).

    torch is not imported here; tensors are converted with ``.detach().cpu().numpy()``.
    """

    dataset: object

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def describe(self, index: int) -> str:
        return f"{type(self.dataset).__name__}[{index}]"

    def _item(self, index: int) -> tuple[object, object | None]:
        item = self.dataset[index]  # type: ignore[index]
        if isinstance(item, (tuple, list)):
            return item[0], (item[1] if len(item) > 1 else None)
        return item, None

    @staticmethod
    def _array(x: object) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()  # type: ignore[attr-defined]
        return np.asarray(x, dtype=np.float32)

    def label(self, index: int) -> int | None:
        lab = self._item(index)[1]
        return None if lab is None else int(lab)  # type: ignore[call-overload]

    def load(self, index: int) -> np.ndarray:
        return self._array(self._item(index)[0])
