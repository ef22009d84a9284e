"""Labels, group splits, image loading and transforms."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.images import ImageLoadError, load_image
from core.labels import LabelsError, read_labels, split_by_group
from core.transforms import eval_transform, shortcut_free_eval_transform, train_transform


def test_read_labels_resolves_paths_and_defaults(labelled_csv):
    df = read_labels(labelled_csv)
    assert list(df["target"][:4]) == [0, 1, 0, 1]
    assert df["path"].map(lambda p: p.startswith(str(labelled_csv.parent))).all()
    assert df["source"].eq("set").all()


@pytest.mark.parametrize("content, message", [
    ("name,target\na.jpg,0\n", r"missing column\(s\) \['img_name'\]"),
    ("img_name,target\n", "no rows"),
    ("", "empty"),
    ("img_name,target\na.jpg,0\nb.jpg,2\n", "row 3: target '?2'? is not 0"),
    ("img_name,target\na.jpg,0\na.jpg,1\n", "row 3: img_name 'a.jpg' is listed twice"),
    ("img_name,target\r\na.jpg,0\r\nb.jpg,1\r\n", None),
])
def test_read_labels_validates_rows(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content, newline="")
    if message is None:
        assert list(read_labels(path)["img_name"]) == ["a.jpg", "b.jpg"]
    else:
        with pytest.raises(LabelsError, match=message):
            read_labels(path)


def test_split_keeps_each_group_on_one_side_and_is_stable(labelled_csv):
    df = read_labels(labelled_csv)
    train, val = split_by_group(df, 0.5)
    assert not set(train["group"]) & set(val["group"])
    assert len(train) + len(val) == len(df)
    train2, val2 = split_by_group(df.iloc[::-1], 0.5)
    assert set(val2["img_name"]) == set(val["img_name"])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (10, 6)).save(path)
    image = load_image(path)
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8


def test_load_image_applies_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (20, 10)).save(path, exif=exif)
    assert load_image(path).shape == (20, 10, 3)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "not an image"),
    (lambda p: p.write_text("hello"), "not an image"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: None, "file not found"),
])
def test_load_image_errors_name_the_file(tmp_path, make, reason):
    path = tmp_path / "broken image.jpg"
    make(path)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_transforms_produce_the_input_size():
    image = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    assert eval_transform(64)(image=image)["image"].shape == (64, 64, 3)
    assert train_transform(64)(image=image)["image"].shape == (64, 64, 3)
    assert shortcut_free_eval_transform(64)(image=image)["image"].shape == (64, 64, 3)


# Upscales, downscales, non-square in both orientations, already the size, odd crop offsets, 1-pixel sides
# and a non-contiguous view (what core.dataset.limit_aspect returns for a long strip).
EVAL_SHAPES = [(300, 200), (200, 300), (40, 30), (30, 41), (160, 160), (161, 160), (159, 640), (1, 7), (7, 1),
               (1000, 999), (97, 1555)]


@pytest.mark.parametrize("shape", EVAL_SHAPES)
@pytest.mark.parametrize("size", [64, 160])
def test_eval_transform_pixels_equal_the_albumentations_pipeline(shape, size):
    """Scoring resizes with OpenCV directly, not albumentations (start-up time): the pixels must be the same."""
    rng = np.random.default_rng(hash(shape) % 1000)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(shape[::-1],
                                                                                                Image.BICUBIC))
    for image in (rng.integers(0, 256, (*shape, 3), dtype=np.uint8), smooth):
        ours = eval_transform(size)(image=image)["image"]
        theirs = eval_transform(size).to_albumentations()(image=image)["image"]
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs)


def test_eval_transform_of_a_view_and_with_jpeg_equal_albumentations():
    image = np.random.default_rng(1).integers(0, 256, (90, 700, 3), dtype=np.uint8)[:, 50:650:2]  # strided view
    assert not image.flags["C_CONTIGUOUS"]
    for t in (eval_transform(64), shortcut_free_eval_transform(64, 60), shortcut_free_eval_transform(160)):
        np.testing.assert_array_equal(t(image=image)["image"], t.to_albumentations()(image=image)["image"])
    t = shortcut_free_eval_transform(64, 60)
    t.set_random_seed(3)  # deterministic: core.dataset reseeds every transform, this one ignores it
    assert len(t.transforms) == 3 and "jpeg_quality=60" in repr(t)


def test_importing_the_transforms_does_not_import_albumentations():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from core.transforms import eval_transform; import core.dataset; "
            "eval_transform(64)(image=np.zeros((80, 90, 3), np.uint8)); print('albumentations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
