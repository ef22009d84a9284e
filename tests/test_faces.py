"""Face cropping: a real face is found and cropped square, a face-less image falls back, borders clamp."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import faces
from core.images import load_image
from tests.conftest import ROOT

DFDC = ROOT.parent / "shared" / "data" / "dfdc_faces"
# yuface has wheels only for CPython 3.10/3.11 on Linux x86-64 and Windows (requirements.txt has that marker)
needs_yuface = pytest.mark.skipif(not faces.has_detector(), reason="yuface not installed")


@pytest.fixture(scope="module")
def dfdc_face() -> np.ndarray:
    """A real DFDC face crop (224 px, the face fills most of it); the tests using it skip without the set."""
    if not faces.has_detector():
        pytest.skip("yuface not installed")
    if not (DFDC / "images").is_dir():
        pytest.skip(f"{DFDC}/images not found")
    name = pd.read_csv(DFDC / "labels.csv").query("target == 0")["img_name"].iloc[0]
    return load_image(DFDC / name)


def test_a_real_face_is_found_and_cropped_square(dfdc_face):
    with warnings.catch_warnings():
        warnings.simplefilter("error", faces.NoFaceWarning)
        crop, found, box = faces.crop_face(dfdc_face, size=96)
    assert found and crop.shape == (96, 96, 3) and crop.dtype == np.uint8
    x0, y0, x1, y1 = box
    h, w = dfdc_face.shape[:2]
    assert x1 - x0 == y1 - y0 and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_a_small_face_in_a_large_image_is_centred(dfdc_face):
    """The face pasted off-centre into a big grey canvas: the crop follows it, with margin, not the canvas."""
    canvas = np.full((700, 900, 3), 120, np.uint8)
    canvas[250:474, 400:624] = dfdc_face
    face = faces.largest_face(canvas)
    assert face is not None
    fx, fy, fw, fh = face.box
    crop, found, (x0, y0, x1, y1) = faces.crop_face(canvas, size=64, margin=0.3)
    assert found and crop.shape == (64, 64, 3)
    assert abs((x0 + x1) / 2 - (fx + fw / 2)) <= 1 and abs((y0 + y1) / 2 - (fy + fh / 2)) <= 1
    assert x1 - x0 == round(max(fw, fh) * 1.6)
    assert 400 - 120 < x0 and x1 < 624 + 120 and 250 - 120 < y0 and y1 < 474 + 120  # not the whole canvas


@needs_yuface
def test_a_flat_image_falls_back_to_the_centre_square_with_a_warning():
    grey = np.full((300, 200, 3), 128, np.uint8)
    with pytest.warns(faces.NoFaceWarning, match="no face found"):
        crop, found, box = faces.crop_face(grey, size=64)
    assert not found and crop.shape == (64, 64, 3) and box == (0, 50, 200, 250)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert faces.crop_face(grey, size=64, warn=False)[1] is False


@pytest.mark.parametrize("box, expected", [
    ((40, 40, 20, 20), (38, 38, 62, 62)),        # inside: 20 px + 0.1 x 20 on each side = 24 px, centred
    ((-5, -5, 20, 20), (0, 0, 24, 24)),          # past the top-left corner: shifted in
    ((90, 50, 20, 20), (76, 48, 100, 72)),       # past the right border: shifted in
    ((10, 10, 80, 60), (10, 0, 90, 80)),         # 96 px wanted, image is 100x80: shrunk to 80, kept inside
])
def test_square_is_clamped_to_the_image(box, expected):
    x0, y0, x1, y1 = faces.square_around(box, width=100, height=80, margin=0.1)
    assert (x0, y0, x1, y1) == expected and x1 - x0 == y1 - y0


def test_bad_input_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"\(10, 10\)"):
        faces.crop_face(np.zeros((10, 10), np.uint8))


@needs_yuface
def test_cli_writes_crops_and_labels(tmp_path):
    src = tmp_path / "set"
    (src / "images").mkdir(parents=True)
    Image.fromarray(np.full((80, 120, 3), 90, np.uint8)).save(src / "images" / "a.jpg")
    (src / "images" / "b.jpg").write_text("not an image")
    (src / "labels.csv").write_text("img_name,target,group\nimages/a.jpg,0,g1\nimages/b.jpg,1,g1\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "data_prep/faces.py", str(src / "labels.csv"), "--out", str(out), "--size",
                        "32", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "b.jpg: not an image file" in r.stderr and "1 without a face" in r.stderr
    df = pd.read_csv(out / "labels.csv")
    assert df.to_dict("records") == [{"img_name": "images/a.png", "target": 0, "group": "g1", "source": "set",
                                      "origin": "images/a.jpg", "face_found": 0, "crop_box": "20 0 100 80"}]
    with Image.open(out / "images" / "a.png") as im:
        assert im.size == (32, 32)
    assert not [p for p in Path(out).rglob("*") if p.name.startswith(".")]  # no temporary files left
