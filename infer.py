"""Score images with the deepfake detector: the probability that each image is fake, and a verdict.

    python infer.py demo/fake_1.jpg                         # one line per image: probability, verdict, name
    python infer.py photos/ --submission submission.csv     # a folder (recursive), written as img_name,y_pred
    python infer.py test/labels.csv --submission sub.csv    # a CSV list (img_name column, relative to the CSV)
    python infer.py imgs/ --submission sub.csv --per-expert --batch-size 64 --device cuda
    python infer.py big_list.csv --submission sub.csv --resume   # continue a run that was killed

The score is the (weighted) average of the experts' softmax fake probabilities, as in the original
ensemble. Printed, each image is one line ``PROBABILITY<TAB>VERDICT<TAB>NAME`` (no header; with
--per-expert, one more tab-separated probability per expert after the name), e.g.
``0.912345<TAB>fake<TAB>demo/fake_1.jpg``. The verdict is ``fake`` when the (unrounded) probability is at
least the decision threshold, else ``real``. The threshold comes from the weights folder's manifest.json
(chosen on validation data by ``evaluation/threshold.py``), 0.5 when the weights folder records none. A
submission (--submission) holds the probability only, as the competition expects.

An image that cannot be read is reported on stderr as ``error: FILE: REASON``, the others are
still scored and written, and the exit status is 1 (2 when an input, the weights or an option is unusable).

A submission is written as it goes: each batch is appended to ``OUT.csv.partial`` and flushed, so memory
stays flat and a killed run loses at most one batch (``--resume`` skips what the partial file holds). At
the end the rows are written to ``OUT.csv`` in input order, atomically, and the partial file is removed.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data_prep.images import ImageLoadError, is_image_file, load_image
from data_prep.labels import LabelsError, read_labels
from evaluation.scoring import Score, score_batches
from experts import Ensemble, WeightsError, load_ensemble, read_manifest, scores_fingerprint
from experts.device import DeviceError, resolve_device

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"
Items = Sequence[tuple[str, str]]  # (img_name, path), as collect_images returns them


class SourceError(ValueError):
    """An input that names no images: missing path, empty folder, unusable CSV."""


def collect_images(sources: Sequence[str]) -> list[tuple[str, str]]:
    """``(img_name, path)`` of every image named by the sources, in order.

    A source is an image file, a folder (searched recursively for image files, sorted), a CSV with an
    ``img_name`` column (paths relative to the CSV) or a glob pattern. ``img_name`` is what the submission
    will show: the name as given, relative to the folder, or as written in the CSV.
    """
    items: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p) and not p.is_dir())
            if not found:
                raise SourceError(f"{source}: folder holds no image files")
            items += [(p.relative_to(path).as_posix(), str(p)) for p in found]
        elif path.suffix.lower() == ".csv" and path.is_file():
            try:
                df = read_labels(path, require_target=False)
            except LabelsError as e:
                raise SourceError(str(e)) from None
            items += list(zip(df["img_name"], df["path"]))
        elif path.exists() or path.is_symlink():
            items.append((source, source))
        elif any(c in source for c in "*?["):
            matches = sorted(m for m in glob.glob(source, recursive=True) if is_image_file(m) and not os.path.isdir(m))
            if not matches:
                raise SourceError(f"{source}: pattern matches no image files")
            items += [(m, m) for m in matches]
        else:
            raise SourceError(f"{source}: no such file or folder")
    return items


def partial_path(out: str | Path) -> Path:
    """Where a submission's rows go while it is being scored."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def read_partial(path: Path, stamp: str, columns: Sequence[str]) -> pd.DataFrame:
    """The rows a partial file holds, as written (strings); ``img_name`` unique.

    A kill can tear the last line: it is cut off the file, so that the next run appends after whole rows
    and scores that image again. The first line stamps the settings (weights, crop, columns) the rows were
    scored with; rows from other settings are refused, never mixed in.
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
        raise SourceError(f"{path}: written by a run with other settings ({first.lstrip('# ')}; {header}); "
                          "rerun with the same --weights, --per-expert and --crop-faces, or delete it")
    try:  # surrogateescape: file names that are not valid UTF-8 (possible on Linux) go through unchanged
        df = pd.read_csv(io.BytesIO(data[data.index(b"\n") + 1:end]), dtype=str, keep_default_na=False,
                         encoding="utf-8", encoding_errors="surrogateescape")
    except pd.errors.ParserError as e:
        raise SourceError(f"{path}: corrupt ({e}); delete it to start over") from None
    df = df[pd.to_numeric(df["y_pred"], errors="coerce").notna()]
    return df.drop_duplicates("img_name", keep="last")


def write_submission(partial: Path, out: Path, names: Sequence[str], stamp: str, columns: Sequence[str]) -> int:
    """Write the partial file's rows of ``names`` to ``out`` in the order of ``names``, atomically.

    The values are copied as written, so a resumed run gives the same file as an uninterrupted one.
    Returns the number of rows.
    """
    df = read_partial(partial, stamp, columns)
    position = pd.Index(names).get_indexer(df["img_name"])
    keep = position >= 0
    df = df[keep].iloc[np.argsort(position[keep], kind="stable")]
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            df.to_csv(f, index=False, lineterminator="\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(df)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="image files, folders, CSV lists (img_name column) or glob patterns")
    p.add_argument("--submission", metavar="OUT.csv",
                   help="write img_name,y_pred (probabilities, no verdict) to this CSV instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --submission file")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --submission run from OUT.csv.partial (its rows are not rescored)")
    p.add_argument("--per-expert", action="store_true", help="add one column (or printed value) per expert")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="weights folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--crop-faces", action="store_true",
                   help="score a square crop around the largest face (YuNet) instead of the whole image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks, also for images that cannot be read")
    return p


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise SourceError("--batch-size must be at least 1 and --workers at least 0")
    if args.resume and not args.submission:
        raise SourceError("--resume continues a --submission run; pass --submission OUT.csv")
    if args.submission and Path(args.submission).exists() and not args.overwrite:
        raise SourceError(f"{args.submission} exists; pass --overwrite to replace it")
    items = collect_images(args.sources)
    device = resolve_device(args.device)
    ensemble = load_ensemble(args.weights, device)
    score = score_to_submission if args.submission else score_to_stdout
    failed = score(args, items, ensemble, device)
    if failed:
        print(f"{failed} of {len(items)} images could not be scored (see the errors above)", file=sys.stderr)
        return 1
    return 0


def _batches(args: argparse.Namespace, items: Items, ensemble: Ensemble, device: torch.device,
             progress: bool) -> Iterator[list[Score]]:
    return score_batches(ensemble, [p for _, p in items], [n for n, _ in items], args.batch_size, args.workers,
                         device, progress=progress and not args.quiet, crop_faces=args.crop_faces)


def _report(score: Score, debug: bool) -> None:
    """One line per unreadable image; with --debug, the traceback of loading it again here."""
    tqdm.write(f"error: {score.error}", file=sys.stderr)
    if debug and score.path:
        try:
            load_image(score.path)
        except ImageLoadError:
            traceback.print_exc()


def score_to_stdout(args: argparse.Namespace, items: Items, ensemble: Ensemble, device: torch.device) -> int:
    """Print ``probability<TAB>verdict<TAB>name[<TAB>expert probability ...]`` per image as it is scored.

    No header and a fixed column order, so that scripts can cut fields (``cut -f2`` is the verdict);
    returns the number of failures.
    """
    failed = 0
    for batch in _batches(args, items, ensemble, device, progress=len(items) > 1):
        for score in batch:
            if score.error:
                failed += 1
                _report(score, args.debug)
                continue
            extra = "".join(f"\t{p:.6f}" for p in score.expert_probs) if args.per_expert else ""
            tqdm.write(f"{score.prob:.6f}\t{ensemble.verdict(score.prob)}\t{score.name}{extra}")
    return failed


def score_to_submission(args: argparse.Namespace, items: Items, ensemble: Ensemble, device: torch.device) -> int:
    """Score into ``OUT.csv.partial`` batch by batch, then write ``OUT.csv``; returns the number of failures."""
    out, partial = Path(args.submission), partial_path(args.submission)
    names = [n for n, _ in items]
    if len(set(names)) < len(names):
        twice = pd.Index(names)[pd.Index(names).duplicated()][0]
        raise SourceError(f"{twice}: listed twice in the input; a submission needs each img_name once")
    columns = ["img_name", "y_pred", *(ensemble.names if args.per_expert else [])]
    weights_id = scores_fingerprint(read_manifest(args.weights))
    stamp = f"# partial results of infer.py: weights {weights_id}, crop_faces {args.crop_faces}"
    if partial.exists() and not args.resume:
        raise SourceError(f"{partial}: holds the results of an interrupted run; pass --resume to continue it "
                          "or delete it to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set(read_partial(partial, stamp, columns)["img_name"]) if partial.exists() else set()
    todo = [(n, p) for n, p in items if n not in done]
    failed = scored = 0
    start = time.perf_counter()
    with open(partial, "a", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if f.tell() == 0:
            f.write(stamp + "\n")
            writer.writerow(columns)
        try:
            for batch in _batches(args, todo, ensemble, device, progress=True):
                rows = []
                for score in batch:
                    if score.error:
                        failed += 1
                        _report(score, args.debug)
                        continue
                    experts = score.expert_probs if args.per_expert else []
                    rows.append([score.name, f"{score.prob:.6f}", *(f"{p:.6f}" for p in experts)])
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
                scored += len(rows)
        except BaseException:
            tqdm.write(f"note: {len(items) - len(todo) + scored} scored images are kept in {partial}; "
                       "rerun with --resume to continue", file=sys.stderr)
            raise
    seconds = time.perf_counter() - start
    written = write_submission(partial, out, names, stamp, columns)
    partial.unlink()
    resumed = f", {len(items) - len(todo)} were already in {partial.name} (resumed)" if done else ""
    print(f"scored {scored} images in {seconds:.1f}s ({scored / max(seconds, 1e-9):.1f} img/s){resumed}; "
          f"{written} rows written to {out}", file=sys.stderr)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SourceError, WeightsError, DeviceError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
