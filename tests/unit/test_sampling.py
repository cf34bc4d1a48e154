"""Sample order: spread over classes / sub-folders (stratified, seeded), sorted, shuffled;
symlinked class folders; the class-count check against the model's first output."""

import json
import logging
import os
from collections import Counter

import numpy as np
import pytest

from quantkit import sample
from quantkit.cli import main
from quantkit.datasets import ImageFolder, NumpySource, Preprocess
from quantkit.datasets.sampling import draw_sample, grouping_of, sample_order, spread_order

DIGITS = ["--preprocess", "none", "--color", "gray", "--scale", repr(1 / 255),
          "--mean", str(sample.preprocess().mean[0]), "--std", str(sample.preprocess().std[0]), "--no-progress"]


def _prefix_counts(order, groups, k):
    return Counter(groups[i] for i in order[:k])


@pytest.mark.parametrize("sizes", [[5, 5, 5, 5], [1, 40, 3, 12, 7], [100, 1, 1], [9], [2, 30]])
@pytest.mark.parametrize("seed", [0, 7])
def test_spread_order_is_a_stratified_permutation(sizes, seed):
    rng = np.random.default_rng(seed + 100)
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(groups)  # group members are not contiguous in the source
    order = spread_order(groups, seed=seed)
    assert sorted(order) == list(range(len(groups)))
    assert order == spread_order(groups, seed=seed)  # deterministic for a seed
    total, n_groups = len(groups), len(sizes)
    for k in range(1, total + 1):
        got = _prefix_counts(order, groups, k)
        if k >= n_groups:
            assert set(got) == set(range(n_groups)), (k, got)  # every group once k >= groups
        for g, n in enumerate(sizes):
            # never more than one above its proportional share (brute-force check of every prefix)
            assert got[g] <= k * n / total + 1 + 1e-9, (k, g, got)
            if len(set(sizes)) == 1:
                assert got[g] >= k * n / total - 1 - 1e-9, (k, g, got)


def test_spread_order_seed_changes_members_not_balance():
    groups = [0] * 10 + [1] * 10
    a, b = spread_order(groups, seed=0), spread_order(groups, seed=1)
    assert a != b  # another seed draws other members ...
    for order in (a, b):  # ... with the same balance: alternating groups
        assert all({groups[i] for i in order[k : k + 2]} == {0, 1} for k in range(0, 20, 2))


def test_sample_order_kinds():
    groups = [0, 0, 0, 1, 1, 1]
    assert sample_order(groups, "sorted") == list(range(6))
    shuffled = sample_order(groups, "shuffle", seed=3)
    assert sorted(shuffled) == list(range(6)) and shuffled == sample_order(groups, "shuffle", seed=3)
    assert {groups[i] for i in sample_order(groups, "spread")[:2]} == {0, 1}
    from quantkit.errors import InputError

    with pytest.raises(InputError, match="order"):
        sample_order(groups, "random")


def test_image_folder_grouping_and_draw(digits_dirs):
    src = ImageFolder(digits_dirs[1], Preprocess(color="gray"))
    grouping = grouping_of(src)
    assert grouping.kind == "classes" and grouping.names == tuple(str(d) for d in range(10))
    s = draw_sample(src, 30, order="spread", seed=0)
    assert {src.labels[i] for i in s.indices} == set(range(10))
    assert sorted(s.indices + s.rest) == list(range(len(src)))
    assert s.to_dict() == {"order": "spread", "seed": 0, "groups": 10, "group_kind": "classes", "count": 30,
                           "of": len(src), "groups_covered": 10}
    first = draw_sample(src, 30, order="sorted")
    assert {src.labels[i] for i in first.indices} == {0}  # the first class folder alone
    assert first.to_dict()["groups_covered"] == 1


def test_unlabeled_tree_groups_by_subfolder(tmp_path):
    import cv2

    img = np.zeros((4, 4), np.uint8)
    for folder, n in (("", 2), ("a", 5), ("b/c", 5)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / folder / f"{i}.png"), img)
    src = ImageFolder(tmp_path, Preprocess(color="gray"))
    assert src.labels is None
    g = grouping_of(src)
    assert g.kind == "subfolders" and len(g.names) == 3
    s = draw_sample(src, 3)
    assert {src.paths[i].parent for i in s.indices} == {tmp_path, tmp_path / "a", tmp_path / "b" / "c"}


def test_npz_grouping_by_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((12, 2), np.float32), labels=np.repeat(np.arange(3), 4))
    src = NumpySource(tmp_path / "d.npz")
    s = draw_sample(src, 3)
    assert {int(src.labels[i]) for i in s.indices} == {0, 1, 2}
    np.save(tmp_path / "e.npy", np.zeros((5, 2), np.float32))
    flat = draw_sample(NumpySource(tmp_path / "e.npy"), 2)
    assert flat.to_dict()["groups"] == 1 and flat.to_dict()["group_kind"] == "none"


def test_calibrate_spread_covers_every_class(digits_dirs, tmp_path, capsys):
    train, _ = digits_dirs
    out = tmp_path / "spread"
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out),
                 "--num-images", "40", "--eval-images", "60", *DIGITS]) == 0
    text = capsys.readouterr().out
    n = sum(1 for _ in train.rglob("*.png"))
    assert f"calibration sample: 40 of {n} images, spread over 10 classes (seed 0)" in text
    sampling = json.loads((out / "ranges.json").read_text())["sampling"]
    assert sampling == {"order": "spread", "seed": 0, "groups": 10, "group_kind": "classes", "count": 40, "of": n,
                        "groups_covered": 10}

    out2 = tmp_path / "sorted"
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out2),
                 "--num-images", "40", "--eval-images", "0", "--order", "sorted", *DIGITS]) == 0
    text = capsys.readouterr().out
    assert "the first 40 of" in text and "1 of the 10 classes" in text
    assert json.loads((out2 / "ranges.json").read_text())["sampling"]["groups_covered"] == 1

    out3 = tmp_path / "shuffle"  # --shuffle stays an alias of --order shuffle
    assert main(["calibrate", str(sample.model_path()), "--images", str(train), "-o", str(out3),
                 "--num-images", "40", "--eval-images", "0", "--shuffle", "--seed", "4", *DIGITS]) == 0
    s3 = json.loads((out3 / "ranges.json").read_text())["sampling"]
    assert s3["order"] == "shuffle" and s3["seed"] == 4


def test_compare_num_images_uses_the_spread_order(digits_dirs, tmp_path, capsys):
    _, test = digits_dirs
    js = tmp_path / "c.json"
    # the FP32 model against itself: accuracy depends only on which images are drawn
    assert main(["compare", str(sample.model_path()), str(sample.model_path()), "--images", str(test),
                 "--num-images", "20", "--json", str(js), *DIGITS]) == 0
    assert "spread over 10 classes" in capsys.readouterr().out
    spread_acc = json.loads(js.read_text())["accuracy_reference"]
    assert main(["compare", str(sample.model_path()), str(sample.model_path()), "--images", str(test),
                 "--num-images", "20", "--order", "sorted", "--json", str(js), "--force", *DIGITS]) == 0
    assert "the first 20 of" in capsys.readouterr().out
    assert json.loads(js.read_text())["num_samples"] == 20
    assert spread_acc >= 0.9


# ---- item 6: symlinked class folders -------------------------------------------------------

def _png(path, value=0):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((4, 4), value, np.uint8))


def test_symlinked_class_folders_are_followed(tmp_path):
    store, root = tmp_path / "store", tmp_path / "data"
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(store / cls / f"{i}.png")
    _png(root / "ant" / "0.png")
    os.symlink(store / "cat", root / "cat")  # a symlinked class folder
    (root / "dog").mkdir()
    for i in range(3):
        os.symlink(store / "dog" / f"{i}.png", root / "dog" / f"{i}.png")  # symlinked files
    src = ImageFolder(root, Preprocess(color="gray"))
    assert src.classes == ["ant", "cat", "dog"]
    assert [src.labels.count(c) for c in range(3)] == [1, 3, 3]
    assert all(str(p).startswith(str(root)) for p in src.paths)  # paths as the user sees them
    assert src.paths[1] == root / "cat" / "0.png"


def test_symlink_loops_are_not_followed(tmp_path, caplog):
    root = tmp_path / "data"
    _png(root / "a" / "0.png")
    _png(root / "b" / "0.png")
    os.symlink(root, root / "a" / "loop")  # a loop back to the root
    os.symlink(root / "b", root / "b2")  # a second name for a folder already read
    with caplog.at_level(logging.WARNING):
        src = ImageFolder(root, Preprocess(color="gray"))
    assert [p.relative_to(root).as_posix() for p in src.paths] == ["a/0.png", "b/0.png"]
    assert src.classes == ["a", "b"]
    assert "b2" in caplog.text


def test_class_count_warning(digits_dirs, tmp_path, caplog):
    import shutil

    from quantkit.datasets.classes import check_classes
    from quantkit.onnx.model import TensorSpec

    logits = [TensorSpec("logits", ("batch", 10), np.dtype(np.float32))]
    src = ImageFolder(digits_dirs[1], Preprocess(color="gray"))
    assert check_classes(src, logits) is None
    few = tmp_path / "few"
    for c in ("3", "7"):
        shutil.copytree(digits_dirs[1] / c, few / c)
    with caplog.at_level(logging.WARNING):
        msg = check_classes(ImageFolder(few, Preprocess(color="gray")), logits)
    assert "2 class folders" in msg and "'logits'" in msg and "10" in msg and msg in caplog.text
    np.savez(tmp_path / "l.npz", x=np.zeros((4, 2), np.float32), labels=np.array([0, 1, 1, 0]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # said, and scored on those classes (not refused as meaningless)
        assert check_classes(NumpySource(tmp_path / "l.npz"), logits) is None
    assert "cover 2 of the 10 classes" in caplog.text
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 2), np.float32))
    assert check_classes(NumpySource(tmp_path / "n.npz"), logits) is None  # no labels: nothing to check
    assert check_classes(src, [TensorSpec("y", ("batch", 3, 8), np.dtype(np.float32))]) is None


def test_calibrate_and_compare_warn_about_class_folders(digits_dirs, tmp_path, caplog):
    import shutil

    few = tmp_path / "few"
    for c in ("3", "7"):
        shutil.copytree(digits_dirs[1] / c, few / c)
    with caplog.at_level(logging.WARNING):
        assert main(["compare", str(sample.model_path()), str(sample.model_path()), "--images", str(few),
                     *DIGITS]) == 0
    assert "2 class folders" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(sample.model_path()), "--images", str(few), "-o", str(tmp_path / "o"),
                     "--eval-images", "0", *DIGITS]) == 0
    assert "2 class folders" in caplog.text
