"""What the augmenters (``augment_edits.py``, ``sd_augment.py``) share: jobs, their seeds, resuming, writing.

A run is a list of :class:`Job` records, one per output image, each named by the stem of its files and
carrying its source image, its source's group and its seed. The seed comes from :func:`job_seed`: a numpy
``SeedSequence`` of (the run's ``--seed``, the output name), so an output is the same whatever order the
jobs run in, however they are batched or shared out, and whatever other outputs the run makes.

An :class:`OutputFolder` holds a run's outputs, laid out the same way by both augmenters:

    images/<name>.png|jpg    the fake                    masks/<name>.png    what was changed (255)
    meta/<name>.json         its labels row, its seed, everything needed to make it again, and the size
                             of each file it wrote ("files")
    labels.csv               img_name,target,group,source,... in the competition's format

Each file is written atomically (``core.files``), the metadata last: an output is *done* when its metadata
exists and every file it lists is there with the size it was written with. Running a command again makes
only the outputs that are not done (never written, killed before the metadata, or a file since deleted or
cut short), and ``labels.csv`` is rebuilt, atomically, from the metadata of every done output.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TypeVar

from core.files import atomic_output, atomic_write

if TYPE_CHECKING:
    import numpy as np

LABELS = "labels.csv"
#: In a metadata record: ``{file relative to the folder: its size in bytes}``; never a labels column.
FILES_KEY = "files"


class AugmentError(ValueError):
    """Options or inputs an augmenter cannot use; the message is one line naming the option or file."""


@dataclass(frozen=True)
class Job:
    """One output image to make. Each augmenter subclasses it with how (the edit, the strength...)."""

    name: str     # the output's file stem: images/<name>.<fmt>, masks/<name>.png, meta/<name>.json
    origin: str   # the source image's img_name, as its list gives it
    path: str     # the source image's path
    group: str    # the source's group: a fake stays on its real's side of a group split
    seed: int     # job_seed(run seed, name)


J = TypeVar("J", bound=Job)


# ------------------------------------------------------------------------------------------------ planning
def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int (what ``SeedSequence`` takes); :class:`AugmentError` otherwise."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if value < 0:
        raise AugmentError(f"--seed must be a non-negative integer, got {seed!r}")
    return value


def job_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed (fits numpy, torch and an int64 column) that depends only on ``run_seed`` and ``key``.

    ``key`` is the job's identity, its output name: the job gets the child ``spawn_key=(hash of key,)`` of
    ``SeedSequence(run_seed)``, so seeds do not depend on job order, batching or workers.
    """
    import numpy as np

    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "little")
    state = np.random.SeedSequence(check_seed(run_seed), spawn_key=(digest,)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def job_rng(job: Job) -> np.random.Generator:
    """The job's numpy generator (from its seed, so the seed in its metadata redoes it)."""
    import numpy as np

    return np.random.default_rng(job.seed)


def check_unique(jobs: Iterable[J]) -> list[J]:
    """``jobs`` as a list; :class:`AugmentError` if two of them would write the same files."""
    seen: dict[str, J] = {}
    for job in jobs:
        other = seen.setdefault(job.name, job)
        if other is not job:
            raise AugmentError(f"{other.origin} and {job.origin} map to the same output name {job.name!r} "
                               f"(same name, other extension or folder?)")
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ writing
def image_name(name: str, fmt: str = "png") -> str:
    """An output image's name relative to the folder, as labels.csv lists it."""
    return f"images/{name}.{fmt}"


def mask_name(name: str) -> str:
    return f"masks/{name}.png"


def write_image(array: np.ndarray, path: str | Path, quality: int = 95) -> int:
    """Write an RGB or grey uint8 array atomically, JPEG (at ``quality``) or PNG by the suffix; its size."""
    from PIL import Image

    path = Path(path)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    with atomic_output(path) as tmp:
        if jpeg:
            Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
        else:
            Image.fromarray(array).save(tmp, format="PNG", compress_level=3)
    return path.stat().st_size


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values, for ``json.dumps``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class OutputFolder:
    """An augmenter's output folder: which outputs are done, writing one, and rebuilding labels.csv."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def meta_path(self, name: str) -> Path:
        return self.root / "meta" / f"{name}.json"

    # -------------------------------------------------------------------------------------- resume
    def record(self, name: str) -> dict[str, Any] | None:
        """The metadata of a done output, else None (none, unreadable, or a file it lists missing or cut)."""
        return self._complete(self.meta_path(name))

    def is_done(self, name: str, img_name: str | None = None) -> bool:
        """Whether output ``name`` is done (and, if given, is the image ``img_name``: another ``--format``
        makes other files)."""
        record = self.record(name)
        return record is not None and (img_name is None or record.get("img_name") == img_name)

    def split_done(self, jobs: Sequence[J], img_name: Any = None) -> tuple[list[J], list[J]]:
        """``(to do, done)``; ``img_name(job)``, when given, is the image each job must have written."""
        todo, done = [], []
        for job in jobs:
            (done if self.is_done(job.name, img_name(job) if img_name else None) else todo).append(job)
        return todo, done

    def records(self) -> list[dict[str, Any]]:
        """The metadata of every done output, by image name."""
        rows = []
        for path in sorted((self.root / "meta").glob("*.json")):
            if path.name.startswith("."):  # a temporary file left by a killed write
                continue
            record = self._complete(path, warn=True)
            if record is not None:
                rows.append(record)
        return sorted(rows, key=lambda r: str(r["img_name"]))

    def _complete(self, meta: Path, warn: bool = False) -> dict[str, Any] | None:
        try:
            record = json.loads(meta.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            if warn:
                warnings.warn(f"{meta}: unreadable metadata, left out of {LABELS} ({e})", stacklevel=3)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("img_name"), str):
            return None
        files = record.get(FILES_KEY)
        if isinstance(files, dict):
            return record if all(self._has(name, size) for name, size in files.items()) else None
        # metadata written before sizes were recorded: the image and the mask it names must exist
        names = [record["img_name"]] + ([record["mask"]] if record.get("mask") else [])
        return record if all(self._has(name) for name in names) else None

    def _has(self, name: str, size: int | None = None) -> bool:
        try:
            stat = (self.root / name).stat()
        except OSError:
            return False
        return stat.st_size > 0 and (size is None or stat.st_size == size)

    # -------------------------------------------------------------------------------------- writing
    def save(self, name: str, record: dict[str, Any], image: np.ndarray, mask: np.ndarray | None = None,
             quality: int = 95) -> dict[str, Any]:
        """Write the mask (at ``record["mask"]``), the image (at ``record["img_name"]``), then the metadata,
        each atomically; returns the record as written (with the files' sizes)."""
        files = {}
        if mask is not None:
            files[record["mask"]] = write_image(mask, self.root / record["mask"])
        files[record["img_name"]] = write_image(image, self.root / record["img_name"], quality)
        record = {**record, FILES_KEY: files}
        atomic_write(self.meta_path(name), json.dumps(record, indent=1, default=_plain))
        return record

    def write_labels(self, columns: Sequence[str], extra_rows: Iterable[dict[str, Any]] = (),
                     extra_columns: bool = False) -> Path:
        """Rebuild ``labels.csv`` from every done output (and ``extra_rows``, e.g. the reals)."""
        return write_labels(self.root / LABELS, [*self.records(), *extra_rows], columns, extra_columns)


def write_labels(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str],
                 extra_columns: bool = False) -> Path:
    """Write ``rows`` as a labels CSV, atomically, sorted by ``img_name``: ``columns`` in order, then (with
    ``extra_columns``) any other key of the rows in first-seen order. Missing values are empty cells."""
    rows = sorted(rows, key=lambda r: str(r["img_name"]))
    header = list(columns)
    if extra_columns:
        for row in rows:
            header += [k for k in row if k not in header and k != FILES_KEY]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_cell(row.get(k)) for k in header] for row in rows)
    return atomic_write(path, text.getvalue())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value
