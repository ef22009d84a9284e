"""Make labelled fakes from the real images of a set with forgery edits (data_prep/edits.py), and their masks.

    python data_prep/augment_edits.py ../shared/data/dfdc_faces/labels.csv --out runs/edits --limit 50
    python data_prep/augment_edits.py photos/ --out runs/edits --edits self_blend,splice --per-image 2
    python data_prep/augment_edits.py SET --out DIR --include-reals     # DIR/labels.csv lists the reals too

The input is anything :func:`data_prep.index.load_index` reads (a labels CSV, a folder with one, or a folder
with ``real/`` and ``fake/``); only its real images (target 0) are edited. Each output gets the next edit of
``--edits`` in turn, with a generator seeded from (``--seed``, image, edit, copy), so a run is reproducible
and does not depend on order. Written:

    DIR/images/<name>.png|jpg    the edited image (PNG by default: JPEG would blur the traces)
    DIR/masks/<name>.png         its mask, 255 where manipulated
    DIR/labels.csv               img_name,target=1,group,source=edit,edit,params (JSON),origin,mask

``group`` is the real image's group, so a fake and its real fall on the same side of the group split;
``origin`` is the real image's path relative to DIR. Splice donors are other reals on the same side of that
split (``--val-fraction``), so no validation content enters training through a pasted region.

Running again skips outputs already written (``DIR/edits.jsonl`` records each finished one);
``labels.csv`` is rebuilt at the end, atomically, from every recorded output whose files exist. An input
image that cannot be read is reported (``error: path: reason``) and skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from data_prep.edits import EDITS, NEEDS_DONOR, apply_edit, parse_edit_names
from core.files import atomic_output
from core.images import ImageLoadError, load_image
from data_prep.index import load_index
from core.labels import LabelsError, split_by_group

JOURNAL = "edits.jsonl"
LABEL_COLUMNS = ["img_name", "target", "group", "source", "edit", "params", "origin", "mask"]


@dataclass(frozen=True)
class Job:
    """One fake to make: the ``copy``-th edit ``edit`` of the real image in ``row``."""

    name: str
    edit: str
    copy: int
    row: int


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    errors: int = 0
    rows: int = 0


# ---------------------------------------------------------------------------------------------- planning
def shuffled_reals(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The real rows in a seeded random order.

    Taking the first ``--limit`` readable ones of this order gives a fair sample, and the same one for any
    limit, so raising the limit extends an earlier run.
    """
    reals = df[df["target"] == 0].reset_index(drop=True)
    return reals.iloc[np.random.default_rng(seed).permutation(len(reals))].reset_index(drop=True)


def host_jobs(position: int, img_name: str, edits: list[str], per_image: int) -> list[Job]:
    """The ``per_image`` jobs of the real image at ``position`` of the shuffled order, cycling through
    ``edits`` across images so that each edit is used about equally."""
    jobs = []
    for k in range(per_image):
        edit = edits[(position * per_image + k) % len(edits)]
        jobs.append(Job(output_stem(img_name, edit, k), edit, k, position))
    return jobs


def output_stem(img_name: str, edit: str, copy: int) -> str:
    """A flat file name for an output: ``images/x.jpg`` + splice + 0 -> ``images_x_splice_0``."""
    stem = Path(img_name).with_suffix("").as_posix().strip("./").replace("/", "_").replace(" ", "_")
    return f"{stem}_{edit}_{copy}"


def job_rng(seed: int, img_name: str, edit: str, copy: int) -> np.random.Generator:
    """A generator that depends only on the seed and the job, not on the order or the other jobs."""
    digest = int(hashlib.md5(f"{img_name}|{edit}|{copy}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng([seed, digest])


def split_sides(df: pd.DataFrame, val_fraction: float) -> np.ndarray:
    """True for rows on the validation side of the training split (``split_by_group``)."""
    _, val = split_by_group(df.assign(_row=np.arange(len(df))), val_fraction)
    side = np.zeros(len(df), bool)
    side[val["_row"].to_numpy()] = True
    return side


# ---------------------------------------------------------------------------------------------- one job
def run_job(job: Job, host: pd.Series, image: np.ndarray, donors: pd.DataFrame, out_dir: Path, seed: int,
            fmt: str, quality: int) -> dict[str, Any]:
    """Edit one image, write the image and its mask, and return its labels row."""
    rng = job_rng(seed, host["img_name"], job.edit, job.copy)
    donor, donor_name = None, None
    if job.edit in NEEDS_DONOR:
        donor, donor_name = pick_donor(donors, host, rng)
    edited = apply_edit(job.edit, image, rng, donor=donor)
    params = dict(edited.params)
    if donor_name is not None:
        params["donor"] = os.path.relpath(donor_name, out_dir)
    img_name = f"images/{job.name}.{fmt}"
    mask_name = f"masks/{job.name}.png"
    save_image(edited.image, out_dir / img_name, quality)
    save_image(edited.mask, out_dir / mask_name, quality)
    return {"img_name": img_name, "target": 1, "group": str(host["group"]), "source": job.edit, "edit": job.edit,
            "params": json.dumps(params, sort_keys=True), "origin": os.path.relpath(host["path"], out_dir),
            "mask": mask_name}


def pick_donor(donors: pd.DataFrame, host: pd.Series, rng: np.random.Generator,
               tries: int = 5) -> tuple[np.ndarray, str]:
    """A readable real image from another group (same split side: ``donors`` is already that side)."""
    pool = donors[donors["group"] != host["group"]]
    if pool.empty:
        raise ImageLoadError(host["path"], "no donor image from another group on the same side of the split")
    last = None
    for index in rng.permutation(len(pool))[:tries]:  # distinct candidates: one broken file is not retried
        path = pool["path"].iloc[int(index)]
        try:
            return load_image(path), path
        except ImageLoadError as e:
            last = e
    raise ImageLoadError(host["path"], f"no readable donor among {min(tries, len(pool))} tried (last: {last})")


def save_image(array: np.ndarray, path: Path, quality: int = 95) -> None:
    """Write an image atomically (a temporary file beside it, then a rename), so a crash leaves no half file."""
    kwargs = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {"compress_level": 3}
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="JPEG" if "quality" in kwargs else "PNG", **kwargs)


# ---------------------------------------------------------------------------------------------- records
def read_journal(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Recorded outputs whose image and mask still exist, by image name (the last record wins)."""
    rows: dict[str, dict[str, Any]] = {}
    journal = out_dir / JOURNAL
    if not journal.is_file():
        return rows
    for line in journal.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and "img_name" in row:
            rows[row["img_name"]] = row
    return {k: r for k, r in rows.items()
            if (out_dir / k).is_file() and (not r.get("mask") or (out_dir / r["mask"]).is_file())}


def append_journal(out_dir: Path, row: dict[str, Any]) -> None:
    with open(out_dir / JOURNAL, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_labels(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """``DIR/labels.csv``, sorted by name, written atomically."""
    path = out_dir / "labels.csv"
    frame = pd.DataFrame(rows, columns=LABEL_COLUMNS).sort_values("img_name", kind="stable")
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def real_rows(reals: pd.DataFrame, out_dir: Path) -> list[dict[str, Any]]:
    """Labels rows for the real images themselves, named relative to DIR (for ``--include-reals``)."""
    return [{"img_name": os.path.relpath(r.path, out_dir), "target": 0, "group": str(r.group), "source": r.source,
             "edit": "", "params": "", "origin": "", "mask": ""} for r in reals.itertuples()]


# ---------------------------------------------------------------------------------------------- driver
def augment(source: str | Path, out_dir: str | Path, edits: list[str] | str | None = None, per_image: int = 1,
            seed: int = 0, limit: int | None = None, fmt: str = "png", quality: int = 95,
            val_fraction: float = 0.2, include_reals: bool = False, progress: bool = True) -> Summary:
    """Write ``per_image`` edited fakes of each selected real image of ``source`` under ``out_dir``."""
    edits = parse_edit_names(edits if edits is not None else list(EDITS))
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be png or jpg, got {fmt!r}")
    out_dir = Path(out_dir).resolve()
    df, problems = load_index(source, on_error="skip", check_images=False)
    for problem in problems:
        tqdm.write(f"error: {problem}", file=sys.stderr)
    summary = Summary(errors=len(problems))
    all_reals = df[df["target"] == 0].reset_index(drop=True)
    if all_reals.empty:
        raise LabelsError(f"{source}: no real images (target 0) to edit")
    reals = shuffled_reals(df, seed)
    side = dict(zip(all_reals["img_name"], split_sides(all_reals, val_fraction)))
    donors = {s: all_reals[[side[n] == s for n in all_reals["img_name"]]] for s in (False, True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_journal(out_dir)
    wanted = len(reals) if limit is None else min(limit, len(reals))
    hosts = 0
    bar = tqdm(total=wanted * per_image, desc="edits", unit="img", disable=not progress)
    for position, host in reals.iterrows():
        if hosts >= wanted:
            break
        jobs = host_jobs(position, host["img_name"], edits, per_image)
        todo = [job for job in jobs if f"images/{job.name}.{fmt}" not in done]
        image = None
        if todo:
            try:
                image = load_image(host["path"])
            except ImageLoadError as e:  # does not count towards --limit: the next real takes its place
                tqdm.write(f"error: {e}", file=sys.stderr)
                summary.errors += 1
                continue
        hosts += 1
        summary.skipped += len(jobs) - len(todo)
        bar.update(len(jobs) - len(todo))
        for job in todo:
            try:
                row = run_job(job, host, image, donors[side[host["img_name"]]], out_dir, seed, fmt, quality)
            except ImageLoadError as e:  # no usable donor
                tqdm.write(f"error: {e}", file=sys.stderr)
                summary.errors += 1
                continue
            except ValueError as e:  # an image the edit cannot use (too small)
                tqdm.write(f"error: {host['path']}: {job.edit}: {e}", file=sys.stderr)
                summary.errors += 1
                continue
            finally:
                bar.update(1)
            append_journal(out_dir, row)
            done[row["img_name"]] = row
            summary.written += 1
    bar.close()
    rows = list(read_journal(out_dir).values())
    if include_reals:
        origins = {r["origin"] for r in rows}
        used = all_reals[[os.path.relpath(p, out_dir) in origins for p in all_reals["path"]]]
        rows += real_rows(used, out_dir)
    labels = write_labels(out_dir, rows)
    summary.rows = len(rows)
    if progress:
        print(f"wrote {summary.written}, skipped {summary.skipped} already there, {summary.errors} error(s); "
              f"{labels}: {summary.rows} rows")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make labelled fakes from real images with forgery edits.")
    parser.add_argument("source", help="labels CSV, folder with labels.csv, or folder with real/ and fake/")
    parser.add_argument("--out", required=True, help="output folder (images/, masks/, labels.csv)")
    parser.add_argument("--per-image", type=int, default=1, help="edited copies per real image")
    parser.add_argument("--edits", default=",".join(EDITS), help=f"comma-separated, used in turn: {','.join(EDITS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="edit only this many real images (a seeded random sample)")
    parser.add_argument("--format", choices=["png", "jpg"], default="png", help="image format of the fakes")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality with --format jpg")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="the training split's validation share "
                        "(splice donors come from the same side)")
    parser.add_argument("--include-reals", action="store_true", help="also list the edited reals in labels.csv")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    try:
        summary = augment(args.source, args.out, args.edits, args.per_image, args.seed, args.limit, args.format,
                          args.quality, args.val_fraction, args.include_reals, progress=not args.quiet)
    except (LabelsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
