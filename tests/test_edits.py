"""Forgery edits (data_prep/edits.py) and the augmentation CLI (data_prep/augment_edits.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.augment_edits import augment
from data_prep.edits import EDITS, apply_edit, double_jpeg, parse_edit_names, resample_trace, self_blend
from core.labels import read_labels

ROOT = Path(__file__).resolve().parents[1]


def textured(seed: int, size: int = 64) -> np.ndarray:
    """Noise over a colour gradient: every edit changes such pixels, and they differ between seeds."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, size, dtype=np.float32)
    base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 80)], -1)
    return np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(EDITS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edit_changes_pixels_inside_its_mask_only(name, seed):
    image, donor = textured(seed), textured(seed + 100)
    out, mask = apply_edit(name, image, np.random.default_rng(seed), donor=donor)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    assert (mask == 255).any(), "the manipulated region must be marked"
    changed = np.any(out != image, axis=2)
    inside = mask == 255
    assert changed[inside].mean() > 0.3, f"{name}: too few pixels changed inside the mask"
    assert not changed[mask == 0].any(), f"{name}: pixels changed outside the mask"


@pytest.mark.parametrize("name", list(EDITS))
def test_edit_is_deterministic_for_a_seed_and_records_json_params(name):
    image, donor = textured(3), textured(4)
    a = apply_edit(name, image, np.random.default_rng(7), donor=donor)
    b = apply_edit(name, image, np.random.default_rng(7), donor=donor)
    c = apply_edit(name, image, np.random.default_rng(8), donor=donor)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.params == b.params
    assert not (np.array_equal(a.image, c.image) and np.array_equal(a.mask, c.mask))
    json.dumps(a.params)


def test_edits_accept_non_square_images_and_explicit_parameters():
    image = textured(5, 96)[:, :80].copy()
    out, mask = self_blend(image, np.random.default_rng(0), landmarks=[(20, 30), (60, 30), (40, 80)], blend_ratio=1.0)
    assert out.shape == image.shape and mask[55, 40] == 255 and mask[5, 5] == 0
    out, mask = double_jpeg(image, np.random.default_rng(0), q1=60, q2=90, shift=(3, 5), region=False)
    assert (mask == 255).all() and out.shape == image.shape
    assert resample_trace(image, np.random.default_rng(0), method="transposed_conv", whole=True).params["factor"] == 0.5


def test_edits_refuse_bad_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        self_blend(np.zeros((32, 32), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a donor"):
        apply_edit("splice", textured(0), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown edit"):
        parse_edit_names("self_blend,deepfake")


def write_reals(folder: Path, n: int = 6) -> Path:
    """``n`` small real JPEGs, one unreadable real, and one fake, in a labels CSV."""
    (folder / "images").mkdir(parents=True)
    rows = ["img_name,target,group"]
    for i in range(n):
        Image.fromarray(textured(i, 48)).save(folder / f"images/r{i}.jpg", quality=90)
        rows.append(f"images/r{i}.jpg,0,g{i}")
    (folder / "images/broken.jpg").write_bytes(b"not a jpeg")
    rows.append("images/broken.jpg,0,gb")
    Image.fromarray(textured(99, 48)).save(folder / "images/f0.jpg")
    rows.append("images/f0.jpg,1,g0")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_augment_writes_images_masks_and_labels_and_resumes(tmp_path, capsys):
    csv = write_reals(tmp_path / "set")
    out = tmp_path / "edits"
    summary = augment(csv, out, per_image=2, seed=0, include_reals=False)
    assert summary.written == 12 and summary.errors == 1  # 6 reals x 2; the broken one is reported once
    assert "broken.jpg" in capsys.readouterr().err
    labels = pd.read_csv(out / "labels.csv")
    assert list(labels.columns) == ["img_name", "target", "group", "source", "edit", "params", "origin", "mask"]
    assert len(labels) == 12 and (labels["target"] == 1).all()
    assert set(labels["edit"]) == set(EDITS) and (labels["source"] == labels["edit"]).all()
    assert set(labels["group"]) == {f"g{i}" for i in range(6)}
    for row in labels.itertuples():
        image, mask = Image.open(out / row.img_name), Image.open(out / row.mask)
        assert image.size == mask.size == (48, 48) and mask.mode == "L"
        assert row.mask == f"masks/{Path(row.img_name).stem}.png"
        assert (csv.parent / "images" / Path(row.origin).name).is_file()
        json.loads(row.params)
    assert read_labels(out / "labels.csv")["path"].map(lambda p: Path(p).is_file()).all()

    first = (out / labels["img_name"][0]).stat().st_mtime_ns
    (out / labels["img_name"][1]).unlink()
    again = augment(csv, out, per_image=2, seed=0, progress=False)
    assert again.written == 1 and again.skipped == 11
    assert (out / labels["img_name"][0]).stat().st_mtime_ns == first
    assert pd.read_csv(out / "labels.csv").equals(labels)


def test_augment_cli_from_the_repo_root(tmp_path):
    csv = write_reals(tmp_path / "set", n=3)
    out = tmp_path / "cli"
    cmd = [sys.executable, "data_prep/augment_edits.py", str(csv), "--out", str(out), "--edits", "splice,copy_move",
           "--limit", "2", "--seed", "1", "--format", "jpg", "--include-reals", "--quiet",
           "--val-fraction", "0.01"]  # every image on the train side: donors for splice
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    labels = read_labels(out / "labels.csv")
    fakes = labels[labels["target"] == 1]
    assert result.returncode in (0, 1), result.stderr
    assert len(fakes) == 2 and fakes["img_name"].str.endswith(".jpg").all()
    assert set(fakes["edit"]) == {"splice", "copy_move"}
    reals = labels[labels["target"] == 0]
    assert sorted(reals["group"]) == sorted(fakes["group"])


def test_the_cli_knows_every_edit_without_importing_them():
    from data_prep.augment_edits import EDIT_NAMES

    assert EDIT_NAMES == tuple(EDITS)


def test_cli_refuses_bad_options_with_exit_status_2(tmp_path, capsys):
    from data_prep.augment_edits import main

    csv = write_reals(tmp_path / "set", n=2)
    assert main([str(csv), "--out", str(tmp_path / "o"), "--edits", "deepfake", "--quiet"]) == 2
    assert "error: --edits: unknown edit" in capsys.readouterr().err
    assert main([str(csv), "--out", str(tmp_path / "o"), "--val-fraction", "1.5", "--quiet"]) == 2
    assert main([str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()
