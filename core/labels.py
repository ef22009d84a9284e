"""Reading labelled image lists (the competition's CSV format) and splitting them by group.

A labels CSV has ``img_name,target`` and optionally ``group`` and ``source``; ``img_name`` is relative to
the CSV's folder. ``group`` ties images that must stay on one side of a split (a DFDC fake and the real
video it was made from); without it each image is its own group.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import pandas as pd


class LabelsError(ValueError):
    """A labels file that cannot be used; the message names the file, and the row where there is one."""


def read_labels(csv_path: str | Path, require_target: bool = True) -> pd.DataFrame:
    """Read a labels CSV into a frame with ``img_name, path, target, group, source``.

    ``path`` is the absolute image path; ``group`` defaults to ``img_name`` and ``source`` to the CSV's
    folder name. Targets must be 0 (real) or 1 (fake); names must be unique.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LabelsError(f"{csv_path}: labels file not found")
    try:
        # utf-8-sig: spreadsheet programs start CSVs with a byte-order mark, which would hide "img_name".
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise LabelsError(f"{csv_path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LabelsError(f"{csv_path}: not a readable CSV ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise LabelsError(f"{csv_path}: cannot read ({e.strerror or e})") from None
    df.columns = [c.strip() for c in df.columns]
    required = ["img_name", "target"] if require_target else ["img_name"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LabelsError(f"{csv_path}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise LabelsError(f"{csv_path}: has a header but no rows")
    blank = df["img_name"].isna() | (df["img_name"].str.strip() == "")
    if blank.any():
        raise LabelsError(f"{csv_path}: row {_row(blank.idxmax())}: empty img_name")
    duplicated = df["img_name"].duplicated()
    if duplicated.any():
        i = duplicated.idxmax()
        raise LabelsError(f"{csv_path}: row {_row(i)}: img_name {df.at[i, 'img_name']!r} is listed twice")
    if require_target:
        target = pd.to_numeric(df["target"], errors="coerce")
        bad = ~target.isin([0, 1])
        if bad.any():
            i = bad.idxmax()
            raise LabelsError(f"{csv_path}: row {_row(i)}: target {str(df.at[i, 'target'])!r} is not 0 (real) or 1 (fake)")
        df["target"] = target.astype(int)
    root = csv_path.resolve().parent
    df["path"] = [str(root / name) for name in df["img_name"]]
    df["group"] = df["group"].fillna(df["img_name"]) if "group" in df else df["img_name"]
    df["source"] = df["source"].fillna(root.name) if "source" in df else root.name
    return df


def _row(index: int) -> int:
    """The 1-based line number in the file of a 0-based data row (the header is line 1)."""
    return int(index) + 2


def group_fold(group: str, n: int = 100) -> int:
    """A stable bucket in ``[0, n)`` for a group name: the same in every run, on every machine."""
    return int(hashlib.md5(group.encode()).hexdigest(), 16) % n


def split_by_group(df: pd.DataFrame, val_fraction: float, salt: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into (train, validation) so that no group has rows on both sides.

    The side of each group follows from a hash of its name, so the split does not depend on row order or
    on the other rows: adding images never moves an existing group across the split.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    is_val = df["group"].map(lambda g: group_fold(salt + str(g)) < round(val_fraction * 100))
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)


def read_splits(path: str | Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Rows of a ``splits.csv`` written by ``data_prep/cluster.py``: ``path, target`` and ``required`` columns.

    Training (fold columns) and evaluation (the ``cluster`` column) both read it through here, so the file
    is parsed one way everywhere (names, groups and sources stay strings).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"splits file not found: {path} (write it with `python data_prep/cluster.py`)")
    rows = pd.read_csv(path, dtype={"img_name": str, "group": str, "source": str}, keep_default_na=False)
    missing = [c for c in ("path", "target", *required) if c not in rows.columns]
    if missing:
        raise LabelsError(f"{path}: not a splits file of data_prep/cluster.py (missing {missing})")
    return rows
