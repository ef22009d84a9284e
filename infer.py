"""Score images with the deepfake detector: the probability that each image is fake.

    python infer.py demo/fake_1.jpg                         # one line per image: probability, name
    python infer.py photos/ --submission submission.csv     # a folder (recursive), written as img_name,y_pred
    python infer.py test/labels.csv --submission sub.csv    # a CSV list (img_name column, relative to the CSV)
    python infer.py imgs/ --submission sub.csv --per-expert --batch-size 64 --device cuda

The score is the (weighted) average of the experts' softmax fake probabilities, as in the original
ensemble. An image that cannot be read is reported on stderr with the reason, the others are still scored
and written, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from data_prep.images import is_image_file
from data_prep.labels import LabelsError, read_labels
from evaluation.scoring import Score, score_images
from experts import WeightsError, load_ensemble
from experts.device import DeviceError, resolve_device

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"


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
            matches = sorted(m for m in glob.glob(source, recursive=True) if is_image_file(m))
            if not matches:
                raise SourceError(f"{source}: pattern matches no image files")
            items += [(m, m) for m in matches]
        else:
            raise SourceError(f"{source}: no such file or folder")
    return items


def write_submission(scores: Sequence[Score], out: str | Path, expert_names: Sequence[str] | None = None) -> Path:
    """Write ``img_name,y_pred`` (plus one column per expert when ``expert_names``) atomically."""
    out = Path(out)
    df = pd.DataFrame({"img_name": [s.name for s in scores], "y_pred": [s.prob for s in scores]})
    for i, name in enumerate(expert_names or []):
        df[name] = [s.expert_probs[i] for s in scores]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False, float_format="%.6f")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="image files, folders, CSV lists (img_name column) or glob patterns")
    p.add_argument("--submission", metavar="OUT.csv", help="write img_name,y_pred to this CSV instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --submission file")
    p.add_argument("--per-expert", action="store_true", help="add one column (or printed value) per expert")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="weights folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--crop-faces", action="store_true",
                   help="score a square crop around the largest face (YuNet) instead of the whole image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    if args.submission and Path(args.submission).exists() and not args.overwrite:
        raise SourceError(f"{args.submission} exists; pass --overwrite to replace it")
    if args.batch_size < 1 or args.workers < 0:
        raise SourceError("--batch-size must be at least 1 and --workers at least 0")
    items = collect_images(args.sources)
    device = resolve_device(args.device)
    ensemble = load_ensemble(args.weights, device)
    start = time.perf_counter()
    show_bar = not args.quiet and (bool(args.submission) or len(items) > 1)
    scores, failed = [], 0
    for score in score_images(ensemble, [p for _, p in items], [n for n, _ in items], args.batch_size,
                              args.workers, device, progress=show_bar, crop_faces=args.crop_faces):
        if score.error:
            failed += 1
            tqdm.write(f"error: {score.error}", file=sys.stderr)
            continue
        scores.append(score)
        if not args.submission:
            extra = "".join(f"\t{p:.6f}" for p in score.expert_probs) if args.per_expert else ""
            tqdm.write(f"{score.prob:.6f}\t{score.name}{extra}")
    seconds = time.perf_counter() - start
    if args.submission:
        out = write_submission(scores, args.submission, ensemble.names if args.per_expert else None)
        print(f"scored {len(scores)} images in {seconds:.1f}s ({len(scores) / max(seconds, 1e-9):.1f} img/s); "
              f"submission written to {out}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(items)} images could not be scored (see the errors above)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SourceError, WeightsError, DeviceError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
