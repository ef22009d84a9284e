"""The data index (data_prep/index.py): reading CSVs and real/fake folders, row problems, duplicates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.index import IndexProblemError, close_pairs, dhash, find_duplicates, load_index, main
from core.labels import LabelsError


def picture(seed: int, size: int = 40) -> np.ndarray:
    """A smooth random picture: its dHash survives re-compression and small changes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (5, 5, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def save(path: Path, image: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **kwargs)


def test_csv_index_reports_every_bad_row_and_skips_it(tmp_path):
    for i in range(3):
        save(tmp_path / f"img/{i}.png", picture(i))
    (tmp_path / "img/broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "labels.csv").write_text(
        "img_name,target,group\n"
        "img/0.png,0,a\n"          # row 2: fine
        "img/1.png,1,a\n"          # row 3: fine
        "img/missing.png,0,b\n"    # row 4: missing
        "img/broken.jpg,1,c\n"     # row 5: unreadable
        "img/0.png,1,d\n"          # row 6: listed twice
        "img/2.png,2,e\n"          # row 7: bad target
        "./img/1.png,0,f\n"        # row 8: the same file as row 3
    )
    df, problems = load_index(tmp_path / "labels.csv")
    assert list(df["img_name"]) == ["img/0.png", "img/1.png"]
    assert list(df.columns) == ["img_name", "path", "target", "group", "source"]
    lines = sorted(str(p) for p in problems)
    assert [p.row for p in sorted(problems, key=lambda p: p.row)] == [4, 5, 6, 7, 8]
    assert all(line.startswith(str(tmp_path / "labels.csv") + ": row ") for line in lines)
    text = "\n".join(lines)
    assert "row 4: img/missing.png: file not found" in text
    assert "row 5: img/broken.jpg: " in text
    assert "row 6: img/0.png: img_name 'img/0.png' is listed twice (first at row 2)" in text
    assert "row 7: img/2.png: target '2' is not 0" in text
    assert "row 8: ./img/1.png: same file as row 3" in text


def test_csv_index_raise_stops_at_the_first_problem(tmp_path):
    save(tmp_path / "a.png", picture(0))
    (tmp_path / "labels.csv").write_text("img_name,target\na.png,0\nb.png,1\nc.png,7\n")
    with pytest.raises(LabelsError, match="row 4: target '7'"):  # read_labels' own check comes first
        load_index(tmp_path / "labels.csv", on_error="raise")
    (tmp_path / "labels.csv").write_text("img_name,target\na.png,0\nb.png,1\n")
    with pytest.raises(IndexProblemError, match=r"labels.csv: row 3: b.png: file not found"):
        load_index(tmp_path, on_error="raise")  # a folder holding labels.csv reads it
    with pytest.raises(LabelsError, match="missing column"):
        (tmp_path / "bad.csv").write_text("name,target\na.png,0\n")
        load_index(tmp_path / "bad.csv")


def test_folder_index_reads_real_and_fake_recursively(tmp_path):
    save(tmp_path / "set/real/a.png", picture(0))
    save(tmp_path / "set/real/sub/b.jpg", picture(1))
    save(tmp_path / "set/fake/c.png", picture(2))
    save(tmp_path / "set/other/d.png", picture(3))     # outside the class folders: ignored
    (tmp_path / "set/fake/notes.txt").write_text("not an image")
    (tmp_path / "set/fake/e.png").write_bytes(b"garbage")
    df, problems = load_index(tmp_path / "set")
    assert dict(zip(df["img_name"], df["target"])) == {"fake/c.png": 1, "real/a.png": 0, "real/sub/b.jpg": 0}
    assert set(df["source"]) == {"set"} and (df["group"] == df["img_name"]).all()
    assert len(problems) == 1 and str(problems[0]).startswith(str(tmp_path / "set/fake/e.png") + ": ")
    with pytest.raises(LabelsError, match="no labels.csv and no images"):
        load_index(tmp_path / "set/other")


def test_dhash_is_stable_under_recompression_and_differs_between_pictures(tmp_path):
    save(tmp_path / "a.jpg", picture(0, 64), quality=60)
    from core.images import load_image
    same = np.unpackbits(dhash(picture(0, 64)) ^ dhash(load_image(tmp_path / "a.jpg"))).sum()
    other = np.unpackbits(dhash(picture(0, 64)) ^ dhash(picture(1, 64))).sum()
    assert dhash(picture(0)).shape == (32,)  # 256 bits
    assert same <= 24 < other
    i, j, d = close_pairs(np.array([dhash(picture(k)) for k in (0, 1, 0)]), 0)
    assert list(zip(i, j, d)) == [(0, 2, 0)]


def test_find_duplicates_reports_pairs_across_classes_and_splits(tmp_path):
    save(tmp_path / "real/a.png", picture(0))
    save(tmp_path / "fake/a_copy.jpg", picture(0), quality=70)   # near duplicate across classes
    save(tmp_path / "real/b.png", picture(1))
    save(tmp_path / "real/b_same.png", picture(1))               # exact duplicate, same class
    save(tmp_path / "real/c.png", picture(2))
    df, _ = load_index(tmp_path)
    pairs = find_duplicates(df, val_fraction=0.5)
    names = {frozenset((a, b)) for a, b in zip(pairs["img_a"], pairs["img_b"])}
    assert frozenset(("real/a.png", "fake/a_copy.jpg")) in names
    cross = pairs[pairs["cross_class"]]
    assert len(cross) == 1 and not cross["exact"].iloc[0] and not cross["same_group"].iloc[0]
    b = pairs[pairs["img_a"].str.startswith("real/b")]
    # the exact pair is reported only if the split separates it; with all_pairs it always is
    assert b["cross_split"].all()
    every = find_duplicates(df, val_fraction=0.5, all_pairs=True)
    exact = every[every["exact"]]
    assert {frozenset(p) for p in zip(exact["img_a"], exact["img_b"])} == {frozenset(("real/b.png", "real/b_same.png"))}
    assert not any("c.png" in n for n in set(every["img_a"]) | set(every["img_b"]))


def test_index_cli_prints_counts_and_writes_pairs(tmp_path, capsys):
    save(tmp_path / "real/a.png", picture(0))
    save(tmp_path / "fake/a.png", picture(0))
    assert main([str(tmp_path), "--pairs", str(tmp_path / "pairs.csv")]) == 0
    out = capsys.readouterr().out
    assert "2 usable images (1 real, 1 fake), 0 problem(s)" in out and "1 pair(s) (1 exact)" in out
    assert (tmp_path / "pairs.csv").read_text().count("\n") == 2
