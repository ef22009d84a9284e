"""Make labelled fakes from the real images of a set with forgery edits (data_prep/edits.py), and their masks.

    python data_prep/augment_edits.py ../shared/data/dfdc_faces/labels.csv --out runs/edits --limit 50
    python data_prep/augment_edits.py photos/ --out runs/edits --edits self_blend,splice --per-image 2
    python data_prep/augment_edits.py SET --out DIR --include-reals     # DIR/labels.csv lists the reals too

The input is anything :func:`data_prep.index.load_index` reads (a labels CSV, a folder with one, or a folder
with ``real/`` and ``fake/``); only its real images (target 0) are edited. Each output gets the next edit of
``--edits`` in turn, with its own seeded generator, so a run is reproducible and does not depend on order.
Written:

    DIR/images/<name>.png|jpg    the edited image (PNG by default: JPEG would blur the traces)
    DIR/masks/<name>.png         its mask, 255 where manipulated
    DIR/meta/<name>.json         its labels row, its seed and the sizes of its files (marks it done)
    DIR/labels.csv               img_name,target=1,group,source=edit,edit,params (JSON),origin,mask

``group`` is the real image's group, so a fake and its real fall on the same side of the group split;
``origin`` is the real image's path relative to DIR. Splice donors are other reals on the same side of that
split (``--val-fraction``), so no validation content enters training through a pasted region.

Each output's seed comes from (``--seed``, its output name) through ``data_prep/augment_jobs.py``, and
its metadata (``DIR/meta/<name>.json``: the labels row and the seed) is written after its image and mask.
Running again makes only what is missing (an output with no metadata, or a file since deleted or cut
short); ``labels.csv`` is rebuilt from the metadata at the end, atomically, even after Ctrl-C. An input
image that cannot be read is reported (``error: path: reason``) and skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from core.progress import progress_bar, write_line
from core.protocol import VAL_FRACTION
from data_prep.augment_jobs import (LABELS, AugmentError, Job, OutputFolder, check_seed, check_unique,
                                    image_name, job_rng, job_seed, mask_name, write_labels)

if TYPE_CHECKING:  # imported where used, so that --help is instant
    import numpy as np
    import pandas as pd

#: The names of data_prep.edits.EDITS, in its order (a test checks), kept here so that --help loads no cv2.
EDIT_NAMES = ("self_blend", "splice", "copy_move", "inpaint_region", "resample_trace", "double_jpeg")
FORMATS = ("png", "jpg")
LABEL_COLUMNS = ["img_name", "target", "group", "source", "edit", "params", "origin", "mask"]


@dataclass(frozen=True)
class EditJob(Job):
    """One fake to make: the ``copy``-th edit ``edit`` of the real image ``origin``."""

    edit: str
    copy: int


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    errors: int = 0
    rows: int = 0
    labels: Path | None = None


# ---------------------------------------------------------------------------------------------- planning
def shuffled_reals(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The real rows in a seeded random order.

    Taking the first ``--limit`` readable ones of this order gives a fair sample, and the same one for any
    limit, so raising the limit extends an earlier run.
    """
    import numpy as np

    reals = df[df["target"] == 0].reset_index(drop=True)
    return reals.iloc[np.random.default_rng(seed).permutation(len(reals))].reset_index(drop=True)


def host_jobs(position: int, host: pd.Series, edits: Sequence[str], per_image: int, seed: int) -> list[EditJob]:
    """The ``per_image`` jobs of the real image at ``position`` of the shuffled order, cycling through
    ``edits`` across images so that each edit is used about equally."""
    jobs = []
    for k in range(per_image):
        edit = edits[(position * per_image + k) % len(edits)]
        name = output_stem(host["img_name"], edit, k)
        jobs.append(EditJob(name=name, origin=host["img_name"], path=host["path"], group=str(host["group"]),
                            seed=job_seed(seed, name), edit=edit, copy=k))
    return jobs


def output_stem(img_name: str, edit: str, copy: int) -> str:
    """A flat file name for an output: ``images/x.jpg`` + splice + 0 -> ``images_x_splice_0``."""
    stem = Path(img_name).with_suffix("").as_posix().strip("./").replace("/", "_").replace(" ", "_")
    return f"{stem}_{edit}_{copy}"


def split_sides(df: pd.DataFrame, val_fraction: float) -> np.ndarray:
    """True for rows on the validation side of the training split (``split_by_group``)."""
    import numpy as np

    from core.labels import split_by_group

    _, val = split_by_group(df.assign(_row=np.arange(len(df))), val_fraction)
    side = np.zeros(len(df), bool)
    side[val["_row"].to_numpy()] = True
    return side


# ---------------------------------------------------------------------------------------------- one job
def run_job(job: EditJob, image: np.ndarray, donors: pd.DataFrame, out: OutputFolder, fmt: str,
            quality: int) -> dict[str, Any]:
    """Edit one image, write the image, its mask and its metadata, and return its labels row."""
    from data_prep.edits import NEEDS_DONOR, apply_edit

    rng = job_rng(job)
    donor, donor_name = None, None
    if job.edit in NEEDS_DONOR:
        donor, donor_name = pick_donor(donors, job, rng)
    edited = apply_edit(job.edit, image, rng, donor=donor)
    params = dict(edited.params)
    root = out.root
    if donor_name is not None:
        params["donor"] = os.path.relpath(donor_name, root)
    record = {"img_name": image_name(job.name, fmt), "target": 1, "group": job.group, "source": job.edit,
              "edit": job.edit, "params": json.dumps(params, sort_keys=True), "origin": os.path.relpath(job.path, root),
              "mask": mask_name(job.name), "seed": job.seed}
    return out.save(job.name, record, edited.image, edited.mask, quality)


def pick_donor(donors: pd.DataFrame, job: Job, rng: np.random.Generator, tries: int = 5) -> tuple[np.ndarray, str]:
    """A readable real image from another group (same split side: ``donors`` is already that side)."""
    from core.images import ImageLoadError, load_image

    pool = donors[donors["group"] != job.group]
    if pool.empty:
        raise ImageLoadError(job.path, "no donor image from another group on the same side of the split")
    last = None
    for index in rng.permutation(len(pool))[:tries]:  # distinct candidates: one broken file is not retried
        path = pool["path"].iloc[int(index)]
        try:
            return load_image(path), path
        except ImageLoadError as e:
            last = e
    raise ImageLoadError(job.path, f"no readable donor among {min(tries, len(pool))} tried (last: {last})")


def real_rows(reals: pd.DataFrame, out_dir: Path) -> list[dict[str, Any]]:
    """Labels rows for the real images themselves, named relative to DIR (for ``--include-reals``)."""
    return [{"img_name": os.path.relpath(r.path, out_dir), "target": 0, "group": str(r.group), "source": r.source,
             "edit": "", "params": "", "origin": "", "mask": ""} for r in reals.itertuples()]


# ---------------------------------------------------------------------------------------------- driver
def check_options(edits: Sequence[str] | str | None, per_image: int, seed: int, limit: int | None, fmt: str,
                  quality: int, val_fraction: float) -> list[str]:
    """The edit names to use, checked; :class:`AugmentError` naming the option otherwise."""
    from data_prep.edits import parse_edit_names

    try:
        names = parse_edit_names(edits if edits is not None else EDIT_NAMES)
    except ValueError as e:
        raise AugmentError(f"--edits: {e}") from None
    if per_image < 1:
        raise AugmentError(f"--per-image must be at least 1, got {per_image}")
    if limit is not None and limit < 0:
        raise AugmentError(f"--limit must not be negative, got {limit}")
    if fmt not in FORMATS:
        raise AugmentError(f"--format must be png or jpg, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise AugmentError(f"--quality must be in 1..100, got {quality}")
    if not 0 < val_fraction < 1:
        raise AugmentError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    check_seed(seed)
    return names


def augment(source: str | Path, out_dir: str | Path, edits: Sequence[str] | str | None = None, per_image: int = 1,
            seed: int = 0, limit: int | None = None, fmt: str = "png", quality: int = 95,
            val_fraction: float = VAL_FRACTION, include_reals: bool = False, progress: bool = True) -> Summary:
    """Write ``per_image`` edited fakes of each selected real image of ``source`` under ``out_dir``.

    Raises :class:`AugmentError` for unusable options and :class:`core.labels.LabelsError` for an unusable
    source; an unreadable image is reported on stderr and counted in ``Summary.errors``.
    """
    from core.images import ImageLoadError, load_image
    from core.labels import LabelsError
    from data_prep.index import load_index

    edits = check_options(edits, per_image, seed, limit, fmt, quality, val_fraction)
    out = OutputFolder(Path(out_dir).resolve())
    df, problems = load_index(source, on_error="skip", check_images=False)
    for problem in problems:
        write_line(f"error: {problem}")
    summary = Summary(errors=len(problems))
    all_reals = df[df["target"] == 0].reset_index(drop=True)
    if all_reals.empty:
        raise LabelsError(f"{source}: no real images (target 0) to edit")
    reals = shuffled_reals(df, seed)
    plan = [host_jobs(position, host, edits, per_image, seed) for position, host in reals.iterrows()]
    check_unique(job for jobs in plan for job in jobs)
    side = dict(zip(all_reals["img_name"], split_sides(all_reals, val_fraction)))
    donors = {s: all_reals[[side[n] == s for n in all_reals["img_name"]]] for s in (False, True)}
    out.root.mkdir(parents=True, exist_ok=True)
    wanted = len(reals) if limit is None else min(limit, len(reals))
    hosts = 0
    bar = progress_bar(total=wanted * per_image, desc="edits", enabled=progress)
    try:
        for jobs in plan:
            if hosts >= wanted:
                break
            todo, done = out.split_done(jobs, lambda job: image_name(job.name, fmt))
            image = None
            if todo:
                try:
                    image = load_image(jobs[0].path)
                except ImageLoadError as e:  # does not count towards --limit: the next real takes its place
                    write_line(f"error: {e}")
                    summary.errors += 1
                    continue
            hosts += 1
            summary.skipped += len(done)
            bar.update(len(done))
            for job in todo:
                try:
                    run_job(job, image, donors[side[job.origin]], out, fmt, quality)
                    summary.written += 1
                except ImageLoadError as e:  # no usable donor
                    write_line(f"error: {e}")
                    summary.errors += 1
                except ValueError as e:  # an image the edit cannot use (too small)
                    write_line(f"error: {job.path}: {job.edit}: {e}")
                    summary.errors += 1
                finally:
                    bar.update(1)
    finally:  # an interrupted run still leaves labels.csv listing everything written so far
        bar.close()
        rows = out.records()
        if include_reals:
            origins = {r["origin"] for r in rows}
            rows += real_rows(all_reals[[os.path.relpath(p, out.root) in origins for p in all_reals["path"]]],
                              out.root)
        summary.labels = write_labels(out.root / LABELS, rows, LABEL_COLUMNS)
        summary.rows = len(rows)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Make labelled fakes from real images with forgery edits.")
    p.add_argument("source", help="labels CSV, folder with labels.csv, or folder with real/ and fake/")
    p.add_argument("--out", required=True, help="output folder (images/, masks/, meta/, labels.csv); running "
                   "again with it makes only what is missing")
    p.add_argument("--per-image", type=int, default=1, help="edited copies per real image (default: %(default)s)")
    p.add_argument("--edits", default=",".join(EDIT_NAMES), help="comma-separated, used in turn (default: all: "
                   f"{', '.join(EDIT_NAMES)})")
    p.add_argument("--seed", type=int, default=0, help="run seed; each output's seed is derived from it and its "
                   "name (default: %(default)s)")
    p.add_argument("--limit", type=int, help="edit only this many real images, a seeded random sample "
                   "(default: all)")
    p.add_argument("--format", choices=FORMATS, default="png", help="image format of the fakes (default: %(default)s)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --format jpg (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="the training split's validation "
                   "share; splice donors come from the same side (default: %(default)s, as training)")
    p.add_argument("--include-reals", action="store_true", help="also list the edited reals in labels.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.labels import LabelsError

    try:
        summary = augment(args.source, args.out, args.edits, args.per_image, args.seed, args.limit, args.format,
                          args.quality, args.val_fraction, args.include_reals, progress=not args.quiet)
    except (AugmentError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; what was written is kept and listed in {Path(args.out) / 'labels.csv'}; "
              "run the same command to go on", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {summary.written}, skipped {summary.skipped} already there, {summary.errors} error(s); "
              f"{summary.labels}: {summary.rows} rows")
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
