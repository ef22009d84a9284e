"""Shared fixtures: tiny labelled image sets made on the fly, and the repo root on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_labelled_set(folder: Path, n: int = 16, size: int = 72, seed: int = 0) -> Path:
    """``n`` small JPEGs, half "fake" (smooth blobs) and half "real" (noisy), and their labels.csv."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["img_name,target,group"]
    for i in range(n):
        target = i % 2
        base = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        if target:
            base = np.asarray(Image.fromarray(base).resize((8, 8)).resize((size, size), Image.BICUBIC))
        name = f"images/{i:03d}.jpg"
        Image.fromarray(base).save(folder / name, quality=90)
        rows.append(f"{name},{target},g{i // 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    return write_labelled_set(tmp_path / "set")
