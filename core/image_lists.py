"""The one reader of "some images": files, folders, CSV lists and glob patterns, in the order given.

Every command that takes images from a user (``infer.py``, the face cropper, the augmenters) reads them
here, so that a folder is searched the same way (recursively, sorted, image files only) and a CSV list
means the same thing (an ``img_name`` column, relative to the CSV's folder) everywhere.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .images import is_image_file
from .labels import LabelsError, read_labels
from .video import is_video_file


class ImageListError(LabelsError):
    """A source that names no usable images: missing path, empty folder, unusable CSV."""


def read_image_list(sources: str | Path | Sequence[str | Path], videos: bool = False) -> pd.DataFrame:
    """Rows ``img_name, path, group`` (plus a CSV's other columns) of every image the sources name.

    A source is
      * an image file: ``img_name`` is the path as given;
      * a folder, searched recursively (sorted, image files only): ``img_name`` relative to it;
      * a ``.csv`` list with an ``img_name`` column (paths relative to the CSV; :func:`core.labels.read_labels`
        checks it and keeps its columns, ``target`` included when present);
      * a glob pattern (``photos/**/*.jpg``): ``img_name`` as matched.

    ``img_name`` is what a submission shows. ``group`` defaults to ``img_name``. Names are not made
    unique here: a caller that needs them unique (a submission) checks.

    With ``videos``, folders and glob patterns also yield video files (:data:`core.video.VIDEO_EXTENSIONS`),
    in the same sorted order among the images; callers tell them apart with :func:`core.video.is_video_file`.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ImageListError("no images given")
    wanted = (lambda p: is_image_file(p) or is_video_file(p)) if videos else is_image_file
    what = "image files or videos" if videos else "image files"
    frames = [_read_source(str(source), wanted, what) for source in sources]
    rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if "group" not in rows.columns:
        rows["group"] = rows["img_name"]
    rows["group"] = rows["group"].fillna(rows["img_name"])
    return rows


def _read_source(source: str, wanted: Callable[[str | Path], bool], what: str) -> pd.DataFrame:
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if wanted(p) and not p.is_dir())
        if not found:
            raise ImageListError(f"{source}: folder holds no {what}")
        return pd.DataFrame({"img_name": [p.relative_to(path).as_posix() for p in found],
                             "path": [str(p) for p in found]})
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            return read_labels(path, require_target=False)
        except LabelsError as e:
            raise ImageListError(str(e)) from None
    if path.exists() or path.is_symlink():
        return pd.DataFrame({"img_name": [source], "path": [source]})
    if any(c in source for c in "*?["):
        matches = sorted(m for m in glob.glob(source, recursive=True) if wanted(m) and not os.path.isdir(m))
        if not matches:
            raise ImageListError(f"{source}: pattern matches no {what}")
        return pd.DataFrame({"img_name": matches, "path": matches})
    raise ImageListError(f"{source}: no such file or folder")
