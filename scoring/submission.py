"""Submissions: scores written as they come, resumable after a kill, one row per input image.

A submission is ``img_name,y_pred`` (plus one column per expert on request), in input order. While a run
scores, each batch is appended to ``OUT.csv.partial`` and flushed: memory stays flat and a killed run
loses at most one batch (:func:`done_names` tells a resumed run what to skip). At the end the rows are
written to ``OUT.csv`` atomically and the partial file is removed.

Under torchrun each process scores its own shard into its own ``OUT.csv.partial.RANK`` (one writer per file,
so processes never interleave rows); the final file is made from all of them. A run may be resumed with
any number of processes: every partial file of ``OUT.csv`` counts (:func:`partial_files`).

An image that could not be scored still gets a row, with ``fill`` (0.5 by default: "don't know") as its
score, because competitions and :mod:`evaluation.submission` reject a submission with missing rows;
``fill=None`` leaves it out.
"""
from __future__ import annotations

import csv
import glob
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.files import atomic_output

DEFAULT_FILL = 0.5


class SubmissionError(ValueError):
    """A partial file that cannot be continued, or inputs that cannot make a submission."""


def partial_path(out: str | Path, rank: int | None = None) -> Path:
    """Where a submission's rows go while it is being scored: ``OUT.csv.partial``, or for process ``rank`` of
    a torchrun job ``OUT.csv.partial.RANK``."""
    out = Path(out)
    return out.with_name(out.name + ".partial" + ("" if rank is None else f".{rank}"))


def partial_files(out: str | Path) -> list[Path]:
    """Every partial file of ``out`` on disk: the one-process one, then each process's by rank, whatever number
    of processes wrote them."""
    single = partial_path(out)
    ranks = [p for p in single.parent.glob(glob.escape(single.name) + ".*") if p.suffix[1:].isdigit()]
    return [single] * single.exists() + sorted(ranks, key=lambda p: int(p.suffix[1:]))


def check_unique(names: Sequence[str]) -> None:
    """A submission needs each ``img_name`` once: refuse inputs that list one twice."""
    index = pd.Index(names)
    if index.has_duplicates:
        raise SubmissionError(f"{index[index.duplicated()][0]}: listed twice in the input; a submission needs "
                              "each img_name once")


class PartialWriter:
    """Appends scored rows to ``OUT.csv.partial``, flushed and synced per batch.

    The first line stamps the settings (weights, crop, columns) the rows were scored with; a resumed run
    with other settings is refused rather than mixed in.
    """

    def __init__(self, path: Path, stamp: str, columns: Sequence[str]):
        self.path, self.stamp, self.columns = path, stamp, list(columns)
        self._file = open(path, "a", encoding="utf-8", errors="surrogateescape", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self._file.tell() == 0:
            self._file.write(stamp + "\n")
            self._writer.writerow(self.columns)

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        self._writer.writerows(rows)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PartialWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_partial(path: Path, stamp: str, columns: Sequence[str], key: Sequence[str] = ("img_name",)) -> pd.DataFrame:
    """The rows a partial file holds, as written (strings); ``key`` unique (the last row of each is kept).

    A kill can tear the last line: it is cut off the file, so that the next run appends after whole rows
    and scores that image again.
    """
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        stamp_and_header = data.count(b"\n", 0, end) >= 2
        f.truncate(end if stamp_and_header else 0)
    if not stamp_and_header:
        return pd.DataFrame(columns=list(columns))
    first, header, _ = data[:end].decode("utf-8", "surrogateescape").split("\n", 2)
    if first != stamp or header.split(",") != list(columns):
        raise SubmissionError(f"{path}: written by a run with other settings ({first.lstrip('# ')}; {header}); "
                              "rerun with the same --weights, --per-expert and --crop-faces, or delete it")
    try:  # surrogateescape: file names that are not valid UTF-8 (possible on Linux) go through unchanged
        df = pd.read_csv(io.BytesIO(data[data.index(b"\n") + 1:end]), dtype=str, keep_default_na=False,
                         encoding="utf-8", encoding_errors="surrogateescape")
    except pd.errors.ParserError as e:
        raise SubmissionError(f"{path}: corrupt ({e}); delete it to start over") from None
    df = df[pd.to_numeric(df["y_pred"], errors="coerce").notna()]
    return df.drop_duplicates(list(key), keep="last")


def read_partials(partials: Sequence[Path], stamp: str, columns: Sequence[str],
                  key: Sequence[str] = ("img_name",)) -> pd.DataFrame:
    """The rows of several partial files (:func:`read_partial` each), ``key`` unique (a later file's row wins)."""
    frames = [read_partial(p, stamp, columns, key) for p in partials]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat(frames, ignore_index=True).drop_duplicates(list(key), keep="last")


def done_names(partials: Sequence[Path], stamp: str, columns: Sequence[str]) -> set[str]:
    """The names the partial files already hold scores for (empty when there are none)."""
    return set(read_partials(partials, stamp, columns)["img_name"])


def write_submission(partials: Sequence[Path], out: Path, names: Sequence[str], stamp: str, columns: Sequence[str],
                     fill: float | None = DEFAULT_FILL) -> tuple[int, int]:
    """Write the partial files' rows of ``names`` to ``out`` in the order of ``names``, atomically.

    The values are copied as written, so a resumed run gives the same file as an uninterrupted one, and a
    run sharded over processes the same file as one process. A name without a score gets ``fill`` in every
    score column (or no row when ``fill`` is None). Returns ``(rows written, rows filled)``.
    """
    df = read_partials(partials, stamp, columns).set_index("img_name")
    missing = [n for n in names if n not in df.index]
    if fill is not None and missing:
        filled = pd.DataFrame({c: f"{fill:.6f}" for c in columns[1:]}, index=pd.Index(missing, name="img_name"))
        df = pd.concat([df, filled])
    position = pd.Index(names).get_indexer(df.index)
    keep = position >= 0
    df = df[keep].iloc[np.argsort(position[keep], kind="stable")].reset_index()
    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            df.to_csv(f, index=False, lineterminator="\n")
    return len(df), len(missing) if fill is not None else 0


FRAME_COLUMNS = ["img_name", "frame", "time_s", "y_pred"]
FRAME_KEY = ("img_name", "frame")


def write_frame_scores(partials: Sequence[Path], out: Path, names: Sequence[str], stamp: str,
                       columns: Sequence[str]) -> int:
    """Write the per-frame rows of partial files (``img_name,frame,time_s,y_pred[,expert ...]``, one row per
    sampled frame of each video) to ``out`` atomically: videos in the order of ``names``, frames in order.
    Returns the number of rows written."""
    df = read_partials(partials, stamp, columns, key=FRAME_KEY)
    first = {name: i for i, name in reversed(list(enumerate(names)))}
    df = df.assign(_pos=df["img_name"].map(first).fillna(-1), _frame=pd.to_numeric(df["frame"]))
    df = df[df["_pos"] >= 0].sort_values(["_pos", "_frame"], kind="stable").drop(columns=["_pos", "_frame"])
    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            df.to_csv(f, index=False, lineterminator="\n")
    return len(df)


def parse_fill(value: str) -> float | None:
    """``--fill``: a probability in [0, 1], or ``none`` to leave unreadable images out."""
    if value.strip().lower() == "none":
        return None
    try:
        fill = float(value)
    except ValueError:
        fill = float("nan")
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"--fill must be a probability in [0, 1] or 'none', got {value!r}")
    return fill
