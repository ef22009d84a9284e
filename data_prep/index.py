"""One reader for labelled image sets, with a report of what is wrong in them, and a leak finder.

    python data_prep/index.py ../shared/data/dfdc_faces              # problems, then duplicate pairs
    python data_prep/index.py set/labels.csv other/ --max-distance 16 --pairs pairs.csv

A source is a labels CSV in the competition's format (``img_name,target[,group,source]``, names relative
to the CSV; read with :func:`core.labels.read_labels`), a folder holding such a ``labels.csv``, or a
folder laid out ``real/`` and ``fake/`` (any depth below them; the nearest such folder gives the label).

:func:`load_index` checks every row (missing or unreadable files, repeated names, targets other than 0
and 1) and returns the usable rows plus one line per problem, naming the file and the row.
:func:`find_duplicates` finds exact and near-duplicate images by a perceptual hash (dHash): the same
picture on both sides of a train/validation split, or under both labels, makes validation scores lie.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from core.files import atomic_output
from core.images import ImageLoadError, load_image
from core.labels import LabelsError, read_labels, split_by_group
from core.protocol import VAL_FRACTION

log = logging.getLogger(__name__)

COLUMNS = ["img_name", "path", "target", "group", "source"]
CLASS_FOLDERS = {"real": 0, "0_real": 0, "fake": 1, "1_fake": 1}


class IndexProblemError(LabelsError):
    """A row that cannot be used, raised by ``load_index(..., on_error="raise")``; one line."""


@dataclass(frozen=True)
class Problem:
    """One unusable row: where it is (``file``, 1-based ``row`` of a CSV or None) and why."""

    file: str
    row: int | None
    reason: str
    img_name: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: row {self.row}" if self.row is not None else self.file
        what = f"{self.img_name}: " if self.img_name and self.row is not None else ""
        return f"{where}: {what}{self.reason}"


# ---------------------------------------------------------------------------------------------- index
def load_index(source: str | Path, on_error: Literal["skip", "raise"] = "skip",
               check_images: bool = True) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a labelled set into ``img_name, path, target, group, source`` and list its problems.

    Args:
        source: A labels CSV, a folder with ``labels.csv``, or a folder with ``real/`` and ``fake/``.
        on_error: ``"skip"`` drops bad rows (logging how many) and returns them as problems;
            ``"raise"`` raises :class:`IndexProblemError` (a :class:`LabelsError`) at the first.
        check_images: Decode every image (catches truncated and non-image files); when False, only check
            that the files exist.

    Raises:
        LabelsError: the source itself is unusable (no such file, not a CSV, missing columns, no images).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    source = Path(source)
    if source.is_dir() and (source / "labels.csv").is_file():
        source = source / "labels.csv"
    if source.is_dir():
        df, problems = _index_folder(source, on_error)
    else:
        df, problems = index_csv(source, on_error)
    csv_file = None if source.is_dir() else str(source)
    bad_rows, file_problems = _check_files(df, check_images, on_error, csv_file)
    problems += file_problems
    df = df.drop(index=bad_rows).reset_index(drop=True)[COLUMNS]
    if problems:
        log.warning("%s: skipped %d row(s) with problems; %d usable", source, len(problems), len(df))
    return df, problems


def index_csv(csv_path: Path, on_error: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Rows of a labels CSV; read_labels checks it whole, and on a bad row we find every bad row."""
    try:
        df = read_labels(csv_path)
    except LabelsError as e:
        if on_error == "raise" or ": row " not in str(e):
            raise  # the first bad row (read_labels names it), or a problem with the file itself
        return _index_csv_rowwise(csv_path)
    df["csv_row"] = np.arange(len(df)) + 2
    # the same file listed under two spellings ("a.jpg", "./a.jpg") is a duplicate too
    return _drop_duplicates(df, "path", str(csv_path), on_error)


def _index_csv_rowwise(csv_path: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Every bad row of a CSV that read_labels refused, and the frame of the others, read as read_labels does."""
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    raw.columns = [c.strip() for c in raw.columns]
    raw["csv_row"] = np.arange(len(raw)) + 2
    problems = []
    name = raw["img_name"].fillna("").str.strip()
    target = pd.to_numeric(raw["target"], errors="coerce")
    first_row = raw.groupby(name)["csv_row"].transform("min")
    for i in range(len(raw)):
        row, img = int(raw.at[i, "csv_row"]), str(raw.at[i, "img_name"]) if name[i] else ""
        if not name[i]:
            problems.append(Problem(str(csv_path), row, "empty img_name"))
        elif first_row[i] != row:
            problems.append(Problem(str(csv_path), row, f"img_name {img!r} is listed twice (first at row "
                                    f"{first_row[i]})", img))
        elif target[i] not in (0, 1):
            problems.append(Problem(str(csv_path), row, f"target {str(raw.at[i, 'target'])!r} is not 0 (real) or "
                                    "1 (fake)", img))
    bad = {p.row for p in problems}
    df = raw[~raw["csv_row"].isin(bad)].reset_index(drop=True)
    df["target"] = pd.to_numeric(df["target"]).astype(int)
    root = csv_path.resolve().parent
    df["path"] = [str(root / n) for n in df["img_name"]]
    df["group"] = df["group"].fillna(df["img_name"]) if "group" in df else df["img_name"]
    df["source"] = df["source"].fillna(root.name) if "source" in df else root.name
    df, more = _drop_duplicates(df, "path", str(csv_path), "skip")
    return df, problems + more


def _drop_duplicates(df: pd.DataFrame, column: str, file: str, on_error: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Keep the first row of each normalised ``column`` value; the others are problems."""
    key = df[column].map(os.path.normpath)
    dup = key.duplicated()
    problems = []
    for i in np.flatnonzero(dup.to_numpy()):
        first = int(df.loc[key == key.iloc[i], "csv_row"].iloc[0])
        problem = Problem(file, int(df["csv_row"].iloc[i]), f"same file as row {first}", str(df["img_name"].iloc[i]))
        if on_error == "raise":
            raise IndexProblemError(str(problem))
        problems.append(problem)
    return df[~dup.to_numpy()].reset_index(drop=True), problems


def _index_folder(root: Path, on_error: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Images under ``real/`` and ``fake/`` folders (also ``0_real``/``1_fake``) anywhere below ``root``.

    The nearest class folder above a file gives its target; ``source`` is the folder holding the class
    folders (``root``'s name when they sit directly in it), ``group`` the file's own name.
    """
    from core.image_lists import ImageListError, read_image_list

    try:
        names = read_image_list(root)["img_name"]  # every image file below root, sorted
    except ImageListError:
        names = []
    rows = []
    for name in names:
        rel_dir = Path(name).parent
        classes = [(i, CLASS_FOLDERS[p.lower()]) for i, p in enumerate(rel_dir.parts) if p.lower() in CLASS_FOLDERS]
        if not classes:
            continue
        depth, target = classes[-1]
        src = "/".join(rel_dir.parts[:depth]) or root.resolve().name
        rows.append({"img_name": name, "path": str(root.resolve() / name), "target": target, "group": name,
                     "source": src})
    if not rows:
        raise LabelsError(f"{root}: no labels.csv and no images under real/ or fake/ folders")
    df = pd.DataFrame(rows)
    df["csv_row"] = None
    return df, []


def _check_files(df: pd.DataFrame, check_images: bool, on_error: str,
                 csv_file: str | None) -> tuple[list[int], list[Problem]]:
    """Row indices whose file is missing or unreadable, and a problem line for each (naming the CSV row)."""
    bad, problems = [], []
    for i, path, name, row in zip(df.index, df["path"], df["img_name"], df["csv_row"]):
        reason = None
        if not os.path.isfile(path):
            reason = "file not found" if not os.path.exists(path) else "not a regular file"
        elif check_images:
            try:
                load_image(path)
            except ImageLoadError as e:
                reason = e.reason
        if reason is None:
            continue
        problem = Problem(csv_file or path, None if csv_file is None else int(row), reason, name)
        if on_error == "raise":
            raise IndexProblemError(str(problem))
        bad.append(i)
        problems.append(problem)
    return bad, problems


# ---------------------------------------------------------------------------------------------- duplicates
def dhash(image: np.ndarray, hash_size: int = 16) -> np.ndarray:
    """Difference hash: signs of horizontal brightness steps on a ``hash_size`` grid, as packed bits.

    Robust to resizing, re-compression and small colour changes, which is what a copy of one photo
    in two datasets (or two frames of one video) goes through.
    """
    gray = Image.fromarray(image).convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(gray, dtype=np.int16)
    return np.packbits(pixels[:, 1:] > pixels[:, :-1])


def hash_images(paths: Iterable[str], hash_size: int = 16) -> tuple[np.ndarray, list[str], list[str]]:
    """dHashes ``[N, hash_size**2 / 8]`` (uint8), pixel digests, and an error ('' when fine) per path."""
    hashes, digests, errors = [], [], []
    for path in paths:
        try:
            image = load_image(path)
        except ImageLoadError as e:
            hashes.append(np.zeros(hash_size * hash_size // 8, np.uint8))
            digests.append("")
            errors.append(str(e))
            continue
        hashes.append(dhash(image, hash_size))
        digests.append(hashlib.md5(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest())
        errors.append("")
    return np.array(hashes, np.uint8).reshape(len(hashes), -1), digests, errors


def close_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs ``i < j`` with Hamming distance <= ``max_distance``, and the distances.

    Brute force in blocks (``N^2`` popcounts on 64-bit words): 10k images take seconds and little memory.
    """
    n = len(hashes)
    words = np.ascontiguousarray(hashes)
    if words.shape[1] % 8 == 0 and hasattr(np, "bitwise_count"):
        words = words.view(np.uint64)
    block = max(1, 2**22 // max(1, n * words.shape[1]))
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, block):
        xor = np.bitwise_xor(words[start:start + block, None, :], words[None, :, :])
        dist = _popcount(xor).sum(axis=2, dtype=np.int32)
        i, j = np.nonzero(dist <= max_distance)
        keep = i + start < j
        found_i.append(i[keep] + start), found_j.append(j[keep]), found_d.append(dist[i[keep], j[keep]])
    if not found_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per element: ``np.bitwise_count`` (numpy 2) or a byte table (numpy 1, uint8 input)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BIT_TABLE[x]


_BIT_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


def find_duplicates(df: pd.DataFrame, max_distance: int = 24, val_fraction: float = VAL_FRACTION, salt: str = "",
                    hash_size: int = 16, all_pairs: bool = False) -> pd.DataFrame:
    """Pairs of exact or near-duplicate images that leak across labels or across the train/validation split.

    The split is the training one (:func:`core.labels.split_by_group` with ``val_fraction`` and
    ``salt``), so a pair with ``cross_split`` is an image whose copy the model trains on and is then
    validated on. ``cross_class`` pairs are the same picture labelled real and fake: expected for a DFDC
    fake and its source video (``same_group``, kept on one side by the split), label noise otherwise.

    Args:
        df: Rows from :func:`load_index` (``img_name, path, target, group``; ``source`` if there).
        max_distance: Largest Hamming distance between dHashes (of ``hash_size**2`` bits) to report. On the
            aligned face crops of ``dfdc_faces``, 256-bit pairs up to about 32 apart are still mostly the same
            person in the same scene; 24 keeps the report to clear near-duplicates. A 64-bit hash
            (``hash_size=8``) is too coarse for face crops: different people collide at distance 3-4.
        all_pairs: Also report pairs within one class and one side of the split.

    Returns:
        One row per pair: ``img_a, img_b, distance, exact`` (identical pixels), ``target_a, target_b,
        group_a, group_b, split_a, split_b, cross_class, cross_split, same_group, path_a, path_b``; sorted
        by distance. Unreadable images are left out (``load_index`` reports them).
    """
    df = df.reset_index(drop=True)
    hashes, digests, errors = hash_images(df["path"], hash_size)
    ok = np.array([not e for e in errors])
    for e in (e for e in errors if e):
        log.warning("find_duplicates: %s", e)
    _, val = split_by_group(df.assign(_row=np.arange(len(df))), val_fraction, salt)
    split = np.full(len(df), "train", dtype=object)
    split[val["_row"].to_numpy()] = "val"
    idx = np.flatnonzero(ok)
    i, j, dist = close_pairs(hashes[idx], max_distance)
    i, j = idx[i], idx[j]
    a, b = df.iloc[i].reset_index(drop=True), df.iloc[j].reset_index(drop=True)
    pairs = pd.DataFrame({
        "img_a": a["img_name"], "img_b": b["img_name"], "distance": dist,
        "exact": [digests[x] == digests[y] for x, y in zip(i, j)],
        "target_a": a["target"], "target_b": b["target"], "group_a": a["group"], "group_b": b["group"],
        "split_a": split[i], "split_b": split[j],
    })
    pairs["cross_class"] = pairs["target_a"] != pairs["target_b"]
    pairs["cross_split"] = pairs["split_a"] != pairs["split_b"]
    pairs["same_group"] = pairs["group_a"] == pairs["group_b"]
    pairs["path_a"], pairs["path_b"] = a["path"], b["path"]
    if not all_pairs:
        pairs = pairs[pairs["cross_class"] | pairs["cross_split"]]
    return pairs.sort_values(["distance", "img_a", "img_b"], kind="stable").reset_index(drop=True)


def summarise_duplicates(pairs: pd.DataFrame) -> str:
    """One line of counts: what a reader needs to judge whether the split leaks."""
    cross_class_other = pairs["cross_class"] & ~pairs["same_group"]
    return (f"{len(pairs)} pair(s) ({int(pairs['exact'].sum())} exact): {int(pairs['cross_split'].sum())} across the "
            f"train/val split, {int(pairs['cross_class'].sum())} across labels ({int(cross_class_other.sum())} of "
            f"them from different groups)")


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status: 0 when every row is usable, 1 when some are not (each "
                                            "named on stderr), 2 when a source cannot be read at all.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="labels CSV, folder with labels.csv, or folder with real/ fake/")
    parser.add_argument("--max-distance", type=int, default=24,
                        help="largest Hamming distance between the 256-bit dHashes reported as a pair (default: "
                             "%(default)s, about 10%% of the bits)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help="the training split's validation share, to tell pairs across it (default: %(default)s)")
    parser.add_argument("--pairs", metavar="CSV", help="also write every duplicate pair to this CSV")
    parser.add_argument("--no-duplicates", action="store_true", help="only check the rows; look for no duplicates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    frames, n_problems = [], 0
    for source in args.sources:
        try:
            df, problems = load_index(source, on_error="skip")
        except LabelsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        n_problems += len(problems)
        counts = df["target"].value_counts()
        print(f"{source}: {len(df)} usable images ({counts.get(0, 0)} real, {counts.get(1, 0)} fake), "
              f"{len(problems)} problem(s)")
        frames.append(df)
    if not args.no_duplicates:
        pairs = find_duplicates(pd.concat(frames, ignore_index=True), args.max_distance, args.val_fraction)
        print(summarise_duplicates(pairs))
        for row in pairs.head(20).itertuples():
            print(f"  {row.distance:2d} {row.img_a} ({row.target_a}, {row.split_a}) ~ {row.img_b} "
                  f"({row.target_b}, {row.split_b})")
        if args.pairs:
            with atomic_output(args.pairs) as tmp:
                pairs.to_csv(tmp, index=False)
            print(f"pairs written to {args.pairs}")
    return 1 if n_problems else 0


if __name__ == "__main__":
    sys.exit(main())
