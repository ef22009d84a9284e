"""Score images with the deepfake detector: the probability that each image is fake, and a verdict.

    python infer.py demo/dfdc_fake_1.jpg                    # one line per image: probability, verdict, name
    python infer.py photos/ --submission submission.csv     # a folder (recursive), written as img_name,y_pred
    python infer.py test/labels.csv --submission sub.csv    # a CSV list (img_name column, relative to the CSV)
    python infer.py imgs/ --submission sub.csv --per-expert --batch-size 64 --device cuda
    python infer.py big_list.csv --submission sub.csv --resume   # continue a run that was killed

The score is the (weighted) average of the experts' softmax fake probabilities, as in the original
ensemble. Printed, each image is one line ``PROBABILITY<TAB>VERDICT<TAB>NAME`` (no header; with
--per-expert, one more tab-separated probability per expert after the name), e.g.
``0.912345<TAB>fake<TAB>demo/dfdc_fake_1.jpg``. The verdict is ``fake`` when the (unrounded) probability is
at least the decision threshold, else ``real``. The threshold comes from the weights folder's manifest.json
(chosen on validation data by ``evaluation/threshold.py``), 0.5 when the weights folder records none. A
submission (--submission) holds the probability only, as the competition expects.

An image that cannot be read is named on stderr as ``error: FILE: REASON`` and the others are still
scored; in a submission it gets a row with the --fill value (0.5 unless told otherwise), because a
submission with missing rows is rejected. The exit status is then 1 (2 when an input, the weights or an
option is unusable). With --crop-faces, an image in which no face is found is named on stderr too.

A submission is written as it goes: each batch is appended to ``OUT.csv.partial`` and flushed, so memory
stays flat and a killed run loses at most one batch (``--resume`` skips what the partial file holds). At
the end the rows are written to ``OUT.csv`` in input order, atomically, and the partial file is removed.

On a CPU, torch uses one thread per core left over by the --workers decoding processes (--threads sets it;
``bench/infer_speed.py --threads-table`` measures the choice).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # the heavy imports happen in run(), after the options are read: --help stays instant
    import torch

    from experts import Ensemble
    from scoring.pipeline import BatchScores, Score

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="image files, folders, CSV lists (img_name column) or glob patterns")
    p.add_argument("--submission", metavar="OUT.csv",
                   help="write img_name,y_pred (probabilities, no verdict) to this CSV instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --submission file")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --submission run from OUT.csv.partial (its rows are not rescored)")
    p.add_argument("--fill", default="0.5", metavar="P",
                   help="the submission score of an image that cannot be read; 'none' leaves its row out "
                        "(default: 0.5)")
    p.add_argument("--per-expert", action="store_true", help="add one column (or printed value) per expert")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="weights folder (default: the shipped weights/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, the GPU if any)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, one per CPU not taken by --workers)")
    p.add_argument("--crop-faces", action="store_true",
                   help="score a square crop around the largest face (YuNet) instead of the whole image")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks, also for images that cannot be read")
    return p


class OptionError(ValueError):
    """An option value or combination that cannot work."""


@dataclass(frozen=True)
class Run:
    """How to score: the options of a run, checked (see the command's help for each)."""

    weights: str = str(DEFAULT_WEIGHTS)
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    threads: int = 0
    crop_faces: bool = False
    per_expert: bool = False
    progress: bool = True
    debug: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.threads < 0:
            raise OptionError("--batch-size must be at least 1, --workers and --threads at least 0")


def score_sources(sources: Sequence[str], run: Run, submission: str | None = None, overwrite: bool = False,
                  resume: bool = False, fill: float | None = 0.5) -> int:
    """Score every image the sources name: printed, or into the ``submission`` CSV; returns the exit status
    (0, or 1 when some images could not be scored). Raises the typed errors ``main()`` maps to status 2."""
    from core.device import resolve_device, set_threads
    from core.image_lists import read_image_list
    from experts import load_ensemble

    if resume and not submission:
        raise OptionError("--resume continues a --submission run; pass --submission OUT.csv")
    if submission and Path(submission).exists() and not overwrite:
        raise OptionError(f"{submission} exists; pass --overwrite to replace it")
    items = read_image_list(sources)
    device = resolve_device(run.device)
    set_threads(run.threads, run.workers)
    ensemble = load_ensemble(run.weights, device)
    names, paths = items["img_name"].tolist(), items["path"].tolist()
    if submission:
        failed = score_to_submission(run, names, paths, ensemble, device, submission, resume, fill)
    else:
        failed = score_to_stdout(run, names, paths, ensemble, device)
    if failed:
        filled = f"; their rows hold --fill {fill}" if submission and fill is not None else ""
        print(f"{failed} of {len(items)} images could not be scored (see the errors above){filled}", file=sys.stderr)
        return 1
    return 0


def _batches(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble", device: "torch.device",
             progress: bool) -> Iterator["BatchScores"]:
    from scoring.pipeline import score_batches

    return score_batches(ensemble, paths, names, run.batch_size, run.workers, device,
                         progress=progress and run.progress, crop_faces=run.crop_faces)


def _report(score: "Score", debug: bool) -> None:
    """One line per unreadable image; with --debug, the traceback of loading it again here."""
    from core.images import ImageLoadError, load_image
    from core.progress import write_line

    write_line(f"error: {score.error}")
    if debug and score.path:
        try:
            load_image(score.path)
        except ImageLoadError:
            traceback.print_exc()


def _note(batch: "BatchScores") -> None:
    """Name the images whose preprocessing reported something (no face found for --crop-faces)."""
    from core.progress import write_line

    for name, note in zip(batch.names, batch.notes):
        if note:
            write_line(f"note: {name}: {note}")


def score_to_stdout(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble",
                    device: "torch.device") -> int:
    """Print ``probability<TAB>verdict<TAB>name[<TAB>expert probability ...]`` per image as it is scored.

    No header and a fixed column order, so that scripts can cut fields (``cut -f2`` is the verdict);
    returns the number of failures.
    """
    from core.progress import write_line

    failed = 0
    for batch in _batches(run, names, paths, ensemble, device, progress=len(names) > 1):
        _note(batch)
        for score in batch:
            if score.error:
                failed += 1
                _report(score, run.debug)
                continue
            extra = "".join(f"\t{p:.6f}" for p in score.expert_probs) if run.per_expert else ""
            write_line(f"{score.prob:.6f}\t{ensemble.verdict(score.prob)}\t{score.name}{extra}", file=sys.stdout)
    return failed


def score_to_submission(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble",
                        device: "torch.device", submission: str, resume: bool, fill: float | None) -> int:
    """Score into ``OUT.csv.partial`` batch by batch, then write ``OUT.csv``; returns the number of failures."""
    from core.progress import write_line
    from experts import read_manifest, scores_fingerprint
    from scoring.submission import (PartialWriter, SubmissionError, check_unique, done_names, partial_path,
                                    write_submission)

    out, partial = Path(submission), partial_path(submission)
    check_unique(names)
    columns = ["img_name", "y_pred", *(ensemble.names if run.per_expert else [])]
    stamp = (f"# partial results of infer.py: weights {scores_fingerprint(read_manifest(run.weights))}, "
             f"crop_faces {run.crop_faces}")
    if partial.exists() and not resume:
        raise SubmissionError(f"{partial}: holds the results of an interrupted run; pass --resume to continue it "
                              "or delete it to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_names(partial, stamp, columns)
    todo = [i for i, n in enumerate(names) if n not in done]
    failed = scored = 0
    start = time.perf_counter()
    with PartialWriter(partial, stamp, columns) as writer:
        try:
            for batch in _batches(run, [names[i] for i in todo], [paths[i] for i in todo], ensemble, device,
                                  progress=True):
                _note(batch)
                rows = []
                for score in batch:
                    if score.error:
                        failed += 1
                        _report(score, run.debug)
                        continue
                    experts = score.expert_probs if run.per_expert else []
                    rows.append([score.name, f"{score.prob:.6f}", *(f"{p:.6f}" for p in experts)])
                writer.write(rows)
                scored += len(rows)
        except BaseException:
            write_line(f"note: {len(done) + scored} scored images are kept in {partial}; "
                       "rerun with --resume to continue")
            raise
    seconds = time.perf_counter() - start
    written, filled = write_submission(partial, out, names, stamp, columns, fill)
    partial.unlink()
    resumed = f", {len(names) - len(todo)} were already in {partial.name} (resumed)" if done else ""
    filled = f" ({filled} filled with {fill})" if filled else ""
    print(f"scored {scored} images in {seconds:.1f}s ({scored / max(seconds, 1e-9):.1f} img/s){resumed}; "
          f"{written} rows written to {out}{filled}", file=sys.stderr)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.device import DeviceError
    from core.image_lists import ImageListError
    from experts import WeightsError
    from scoring.submission import SubmissionError, parse_fill

    try:
        try:
            fill = parse_fill(args.fill)
        except ValueError as e:
            raise OptionError(str(e)) from None
        run = Run(weights=args.weights, device=args.device, batch_size=args.batch_size, workers=args.workers,
                  threads=args.threads, crop_faces=args.crop_faces, per_expert=args.per_expert,
                  progress=not args.quiet, debug=args.debug)
        return score_sources(args.sources, run, args.submission, args.overwrite, args.resume, fill)
    except (OptionError, ImageListError, SubmissionError, WeightsError, DeviceError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
