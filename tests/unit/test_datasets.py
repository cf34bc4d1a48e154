import cv2
import numpy as np
import pytest

from quantkit.datasets import Batcher, ImageFolder, NumpySource, Preprocess, SyntheticSource, for_model, preset
from quantkit.datasets.sources import SampleError, decode_image, scan_images
from quantkit.errors import DatasetError, InputError, ShapeMismatchError


def test_scan_labels_from_subfolders(photo_dir):
    paths, labels, classes = scan_images(photo_dir)
    assert len(paths) == 5 and classes == ["a", "b"]
    assert labels == [0 if p.parent.name == "a" else 1 for p in paths]


def test_flat_folder_has_no_labels(tmp_path):
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((4, 4), np.uint8))
    assert scan_images(tmp_path)[1] is None


@pytest.mark.parametrize("setup,msg", [("missing", "does not exist"), ("empty", "has no images"), ("file", "not a folder")])
def test_bad_folders(tmp_path, setup, msg):
    target = tmp_path / "d"
    if setup == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    elif setup == "file":
        target.write_text("x")
    with pytest.raises(DatasetError, match=msg):
        scan_images(target)


def test_decode_conversion_rules(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgba = np.dstack([np.full((8, 8), c, np.uint8) for c in (10, 20, 30, 99)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert np.array_equal(decode_image(tmp_path / "g.png"), gray)
    a = decode_image(tmp_path / "a.png")
    assert a.shape == (8, 8, 3) and a[0, 0].tolist() == [10, 20, 30]  # alpha dropped
    d = decode_image(tmp_path / "d.png")
    assert d.dtype == np.float32 and d.max() == pytest.approx(63000 / 257)


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    for name, msg in (("zero.png", "0 bytes"), ("junk.jpg", "not a decodable"), ("trunc.jpg", "truncated")):
        with pytest.raises(SampleError, match=msg) as err:
            decode_image(tmp_path / name)
        assert name in str(err.value)


def test_imagenet_preprocess_matches_manual(photo_dir):
    spec = for_model(preset("imagenet"), ("N", 3, 224, 224), input_name="x", preset_name="imagenet")
    assert spec.crop == (224, 224) and spec.resize == 256
    path = next(photo_dir.rglob("astronaut.png"))
    out = spec.apply(decode_image(path))
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_LINEAR)[16:240, 16:240].astype(np.float32) / 255
    manual = ((img - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, manual, atol=1e-5)


def test_imagenet_preset_keeps_its_ratio_around_a_given_crop():
    """--preprocess imagenet --crop 320x320 on a dynamic-size input kept the preset's resize of 256
    and refused every image as smaller than the crop."""
    spec = for_model(preset("imagenet").replace(crop=(320, 320)), ("N", 3, "h", "w"), input_name="x",
                     preset_name="imagenet")
    assert spec.crop == (320, 320) and spec.resize == round(320 * 256 / 224)
    given = for_model(preset("imagenet").replace(crop=(320, 320), resize=400), ("N", 3, "h", "w"), input_name="x",
                      preset_name="imagenet")
    assert given.resize == 400  # a resize given with it stays


def test_preprocess_nhwc_gray_and_validation():
    img = np.full((10, 12, 3), 255, np.uint8)
    out = Preprocess(color="gray", layout="nhwc", scale=1 / 255).apply(img)
    assert out.shape == (10, 12, 1) and out.max() == pytest.approx(1.0)
    with pytest.raises(InputError):
        Preprocess(color="gray", mean=(0.1, 0.2, 0.3))
    with pytest.raises(ShapeMismatchError, match="smaller than the crop"):
        Preprocess(crop=(20, 20)).apply(img)


def test_for_model_mismatches():
    with pytest.raises(ShapeMismatchError, match="'x'.*1 channels"):
        for_model(Preprocess(color="rgb"), ("N", 1, 32, 32), input_name="x")
    with pytest.raises(ShapeMismatchError, match="expects 32x32"):
        for_model(Preprocess(crop=(28, 28), color="gray"), ("N", 1, 32, 32), input_name="x")


def test_batcher_order_shuffle_lastbatch():
    src = SyntheticSource((2,), count=10)
    b = list(Batcher(src, ["x"], 4))
    assert [x.size for x in b] == [4, 4, 2] and b[0].indices == (0, 1, 2, 3)
    np.testing.assert_array_equal(b[0].feed["x"][1], src.load(1))
    padded = list(Batcher(src, ["x"], 4, last_batch="pad"))
    assert padded[-1].feed["x"].shape[0] == 4 and padded[-1].size == 2
    assert [x.size for x in Batcher(src, ["x"], 4, last_batch="drop")] == [4, 4]
    from quantkit.datasets import ordered_indices

    order = ordered_indices(10, shuffle=True, seed=3)
    assert order == ordered_indices(10, shuffle=True, seed=3) and sorted(order) == list(range(10))
    assert [i for x in Batcher(src, ["x"], 3, indices=order) for i in x.indices] == order


def test_batcher_skips_and_strict(digits_dirs, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(digits_dirs[1] / "3", folder / "3")
    (folder / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    n_good = len(list((folder / "3").glob("*.png"))) - 1
    src = ImageFolder(folder, Preprocess(color="gray"))
    b = Batcher(src, ["image"], 16)
    assert sum(x.size for x in b) == n_good
    assert len(b.skipped_) == 1 and "broken.png" in b.skipped_[0][0]
    with pytest.raises(SampleError, match="broken.png"):
        list(Batcher(src, ["image"], 16, strict=True))


def test_all_corrupt_folder(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the 3 samples"):
        list(Batcher(ImageFolder(tmp_path, Preprocess()), ["x"], 2))


def test_numpy_sources(tmp_path, rng):
    np.save(tmp_path / "a.npy", rng.standard_normal((5, 3), dtype=np.float32))
    assert len(NumpySource(tmp_path / "a.npy")) == 5
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2), np.float32), labels=np.arange(4))
    src = NumpySource(tmp_path / "b.npz")
    batch = next(iter(Batcher(src, ["x"], 4)))
    assert batch.labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError, match="missing"):
        next(iter(Batcher(src, ["input_ids"], 4)))
    (tmp_path / "c.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable"):
        NumpySource(tmp_path / "c.npz")


def _png_of_zeros(path, width, height):
    """A valid gray PNG of ``width`` x ``height`` zeros, a few hundred KB on disk."""
    import struct
    import zlib

    c = zlib.compressobj(9)
    body = b"".join(c.compress(b"\x00" * (width + 1)) for _ in range(height)) + c.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path):
    """A small PNG that declares more pixels than quantkit.MAX_IMAGE_PIXELS (a 400 KB file of
    20000x20000 took 2.8 GB and 28 s) is refused before OpenCV allocates it."""
    import quantkit

    side = int(quantkit.MAX_IMAGE_PIXELS ** 0.5) + 64
    _png_of_zeros(tmp_path / "bomb.png", side, side)
    assert (tmp_path / "bomb.png").stat().st_size < 2 << 20
    with pytest.raises(SampleError, match="pixels"):
        decode_image(tmp_path / "bomb.png")


def test_a_thin_strip_whose_resize_would_be_huge_is_skipped(tmp_path, caplog):
    """A 3 KB PNG of 1x1,000,000 pixels decodes (a million pixels), but resizing its shorter side
    to 256 makes 256x256,000,000 (6.6 GB and 100 s, then `out of memory` naming no file): it is
    skipped with a warning naming it, before the resize; --strict refuses it."""
    import quantkit

    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "ok.png"), np.full((40, 30, 3), 99, np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "strip.png"), np.zeros((1, 1_000_000, 3), np.uint8))
    src = ImageFolder(tmp_path, Preprocess(resize=256, crop=(224, 224)))
    with pytest.raises(SampleError, match=r"strip\.png: 1x1000000 pixels would be resized to 256x256000000"):
        src.load([str(p) for p in src.paths].index(str(tmp_path / "a" / "strip.png")))
    with caplog.at_level("WARNING"):
        got = [b.size for b in Batcher(src, ["x"], 2)]
    assert got == [1] and "strip.png" in caplog.text and f"{quantkit.MAX_IMAGE_PIXELS:,}" in caplog.text
    with pytest.raises(SampleError):
        list(Batcher(src, ["x"], 2, strict=True))


def test_jpeg_orientation_trailer_and_cmyk(tmp_path):
    """A phone photo is turned upright by its EXIF orientation; a JPEG with bytes after its end
    marker (a Motion Photo's video) is whole, where a cut one is still refused; CMYK and gray
    JPEGs decode as before."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rgb.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")).convert("RGB"))
    got = decode_image(tmp_path / "rot.jpg")
    assert got.shape == (60, 40, 3) == upright.shape
    assert np.abs(got[:, :, ::-1].astype(int) - upright.astype(int)).mean() < 3
    rgb.save(tmp_path / "motion.jpg", quality=95)
    whole = (tmp_path / "motion.jpg").read_bytes()
    (tmp_path / "motion.jpg").write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 255, 4000,
                                                                                                   dtype=np.uint8)))
    assert decode_image(tmp_path / "motion.jpg").shape == (40, 60, 3)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(SampleError, match="truncated"):
        decode_image(tmp_path / "cut.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    rgb.convert("L").save(tmp_path / "gray.jpg", quality=95)
    assert np.abs(decode_image(tmp_path / "cmyk.jpg")[:, :, ::-1].astype(int) - np.asarray(rgb).astype(int)).mean() < 8
    assert decode_image(tmp_path / "gray.jpg").shape == (40, 60)


def test_hidden_folders_are_not_classes_and_other_files_are_named(tmp_path, caplog):
    """A notebook's .ipynb_checkpoints beside cat/dog/fox shifted every label by one (4 folders
    for a 4-class model: no warning); non-image files were skipped without a word."""
    for cls in ("cat", "dog", "fox", ".ipynb_checkpoints"):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "dog" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level("WARNING"):
        paths, labels, classes = scan_images(tmp_path)
    assert classes == ["cat", "dog", "fox"] and labels == [0, 1, 2] and len(paths) == 3
    assert "skipped 2 file(s)" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("what", ["empty", "device", "fifo"])
def test_paths_that_are_not_files_are_refused_before_reading(tmp_path, what):
    """--images '' read the working folder; /dev/zero as a model or .npz read without end, a FIFO
    without a writer blocked for ever: refused in one line before they are opened."""
    import os

    from quantkit.onnx.model import load_model

    path = {"empty": "", "device": "/dev/zero", "fifo": str(tmp_path / "f.onnx")}[what]
    if what == "fifo":
        os.mkfifo(path)
    if what == "empty":
        with pytest.raises(DatasetError, match="empty path"):
            scan_images(path)
    with pytest.raises(InputError, match="empty path" if what == "empty" else "not a regular file"):
        load_model(path)
    with pytest.raises(DatasetError, match="empty path" if what == "empty" else "not a regular file"):
        NumpySource(path)


@pytest.mark.parametrize("labels, msg", [(np.zeros((8, 2), np.int64), "shape (8, 2)"), (np.array(list("abcdefgh")), "<U1"),
                                         (np.full(8, np.nan), "not whole class indices"),
                                         (np.int64(3), "shape ()"), (np.linspace(0, 1, 8), "not whole"),
                                         (-np.ones(8, np.int64), "negative")])
def test_npz_labels_that_are_not_class_indices_are_one_line(tmp_path, labels, msg):
    """They stopped runs with IndexError, UFuncTypeError, ValueError, TypeError (exit 1), and
    fractions were cut to integers without a word."""
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), labels=labels)
    with pytest.raises(DatasetError) as err:
        NumpySource(tmp_path / "d.npz")
    assert msg in str(err.value)
    np.savez(tmp_path / "ok.npz", x=np.zeros((8, 3), np.float32), labels=np.arange(8.0))
    assert NumpySource(tmp_path / "ok.npz").labels.dtype == np.int64


def test_npz_arrays_the_model_does_not_read_are_never_loaded(tmp_path, caplog, monkeypatch):
    """A 1 GB array of something else cost its size in memory; one of another length stopped the
    run. Arrays that are no input of the model are left out unread, with one warning; a member
    that is not in NumPy's format is one line (it was AttributeError, exit 1)."""
    import zipfile

    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), notes=np.zeros(5), other=np.zeros((2, 2)))
    read = []
    original = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: read.append(k) or original(self, k))
    with caplog.at_level("WARNING"):
        src = NumpySource(tmp_path / "d.npz", shapes={"x": ("N", 3)})
    assert len(src) == 8 and read == ["x"] and "'notes', 'other' are not inputs" in caplog.text
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        z.writestr("x.npy", b"\x80\x04not numpy")
    with pytest.raises(DatasetError, match="not a NumPy array"):
        NumpySource(tmp_path / "raw.npz")


def test_a_file_larger_than_any_image_is_skipped_unread(tmp_path, monkeypatch):
    """A 3 GiB file named .png was read whole (3.2 GB, 25 s) before it was refused."""
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)  # sparse: nothing is written
    read = []
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: read.append(a) or np.zeros(1, np.uint8))
    with pytest.raises(SampleError, match="more than an image of at most"):
        decode_image(big)
    assert not read


def test_an_npz_with_two_arrays_of_one_name_is_refused(tmp_path):
    """A zip holding input.npy twice (a hand-made or concatenated archive) used the last member
    without a word."""
    import io
    import warnings
    import zipfile

    from quantkit.datasets.sources import NumpySource
    from quantkit.errors import DatasetError

    with zipfile.ZipFile(tmp_path / "dup.npz", "w") as z:
        for scale in (1.0, 1000.0):
            buf = io.BytesIO()
            np.save(buf, np.full((4, 3), scale, np.float32))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile's "Duplicate name" (on some Pythons)
                z.writestr("input.npy", buf.getvalue())
    with pytest.raises(DatasetError, match="more than one array named 'input'"):
        NumpySource(tmp_path / "dup.npz")


def test_integer_data_for_a_float_input_is_noted_once(tmp_path, caplog):
    """uint8 0-255 pixels for a model that expects 0-1 floats (a forgotten /255) were cast without
    a word and calibrated."""
    import logging

    from quantkit.datasets.dtypes import _SAID, cast_for_input

    _SAID.discard(("x", "uint8", "float32"))
    noted: set[str] = set()
    arr = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out = cast_for_input(arr, "float32", name="x", where="d.npz", noted=noted)
    assert out.dtype == np.float32 and out.max() == 255
    notes = [r.getMessage() for r in caplog.records if "uint8 data (values 0..255)" in r.getMessage()]
    assert len(notes) == 1 and "pixels / 255" in notes[0]


def test_a_fixed_height_that_the_crop_misses_is_named_before_the_work():
    """A recogniser's [N, 3, 48, W]: the imagenet preset's 224x224 crop met the model at its first
    batch with a hint about resize/crop settings; now at once, naming the height and the flags."""
    with pytest.raises(ShapeMismatchError, match="fixed height of 48") as err:
        for_model(preset("imagenet"), ("N", 3, 48, "w"), input_name="x", preset_name="imagenet")
    assert "--crop 48x320" in err.value.hint
    spec = for_model(preset("imagenet").replace(crop=(48, 320), resize=None), ("N", 3, 48, "w"), input_name="x")
    assert tuple(spec.crop) == (48, 320)
    with pytest.raises(ShapeMismatchError, match="fixed width of 100"):
        for_model(preset("imagenet"), ("N", 3, "h", 100), input_name="x", preset_name="imagenet")


def test_letterbox_fits_the_whole_image_and_pads_the_rest():
    """YOLO exports expect the whole image fitted into the model's size (aspect kept, 114 around
    it): the imagenet preset's centre crop cut a wide image's sides off."""
    spec = for_model(preset("yolo"), ("N", 3, 64, 64), input_name="images", preset_name="yolo")
    assert spec.letterbox == (64, 64) and spec.resize is None and spec.crop is None and "letterbox 64x64" in spec.summary()
    img = np.full((30, 120, 3), 200, np.uint8)  # 4:1, BGR
    img[:, :60] = (0, 0, 255)  # left half red
    out = spec.apply(img)
    assert out.shape == (3, 64, 64)
    band = (64 - 16) // 2  # 120 -> 64 wide, 30 -> 16 high, centred
    np.testing.assert_allclose(out[:, :band], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(out[:, band + 16:], 114 / 255, rtol=1e-6)
    assert out[0, band + 8, 5] == pytest.approx(1.0) and out[2, band + 8, 5] == pytest.approx(0.0)  # RGB: red, left
    assert for_model(preset("yolo"), ("N", 3, "h", "w"), input_name="x", preset_name="yolo").letterbox == (640, 640)
    with pytest.raises(ShapeMismatchError, match="expects height 64, the letterbox is 32x32"):
        for_model(preset("yolo").replace(letterbox=(32, 32)), ("N", 3, 64, 64), input_name="x", preset_name="yolo")
    with pytest.raises(InputError, match="takes no --resize or --crop"):
        Preprocess(resize=64, letterbox=(64, 64))
    assert Preprocess.from_dict(spec.to_dict()) == spec and "letterbox" not in preset("imagenet").to_dict()


def test_a_letterbox_under_the_default_preset_and_with_one_fixed_side():
    """--letterbox without --preprocess (the imagenet preset) was refused as taking a --crop nobody
    gave; the yolo preset letterboxed a [N, 3, 320, W] input to 640x640."""
    spec = for_model(preset("imagenet").replace(letterbox=(64, 64), resize=None), ("N", 3, "h", "w"), input_name="x",
                     preset_name="imagenet")
    assert spec.letterbox == (64, 64) and spec.crop is None
    assert for_model(preset("yolo"), ("N", 3, 320, "w"), input_name="x", preset_name="yolo").letterbox == (320, 640)
    with pytest.raises(ShapeMismatchError, match="expects height 320") as err:
        for_model(preset("yolo").replace(letterbox=(640, 320)), ("N", 3, 320, "w"), input_name="x", preset_name="yolo")
    assert err.value.hint == "pass --letterbox 320x320"
