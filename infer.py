"""Score images with the deepfake detector: the probability that each image is fake, and a verdict.

    python infer.py demo/dfdc_fake_1.jpg                    # one line per image: probability, verdict, name
    python infer.py photos/ --submission submission.csv     # a folder (recursive), written as img_name,y_pred
    python infer.py test/labels.csv --submission sub.csv    # a CSV list (img_name column, relative to the CSV)
    python infer.py imgs/ --submission sub.csv --per-expert --batch-size 64 --device cuda
    python infer.py big_list.csv --submission sub.csv --resume   # continue a run that was killed
    python infer.py clip.mp4 --frames 32 --video-agg topk --per-frame   # a video: one line, then one per frame
    torchrun --nproc_per_node 4 infer.py test/ --submission sub.csv    # 4 processes, each scoring a shard

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

Under torchrun (``torchrun --nproc_per_node N infer.py INPUTS --submission OUT.csv``; several machines: torchrun's
``--nnodes``, ``--node-rank`` and ``--rdzv-*`` flags, with the inputs and OUT.csv's folder on a filesystem they
all see) each process scores its own contiguous shard of what is left to score into its own
``OUT.csv.partial.RANK``; once every process has finished, process 0 writes ``OUT.csv`` in input order,
atomically, and removes the partial files. ``--resume`` continues from the partial files of any earlier run,
whatever its number of processes. A process that crashes fails the job (torchrun names it); every row written
so far stays in the partial files for ``--resume``. A sharded run writes a --submission (printed lines would
interleave) and cannot make --heatmap maps. On GPUs each process takes ``cuda:LOCAL_RANK``; on CPUs the free
cores are shared out among a machine's processes. torchrun reports exit status 1 (some inputs could not be
scored) as a failure, with its own summary, after the submission is written.

On a CPU, torch uses one thread per core neither taken by the --workers decoding processes nor busy with
other work (the smaller of the 1-minute load average and a 0.1 s sample of /proc/stat); --threads sets it
(``bench/sharded_infer.py`` and ``bench/infer_speed.py --threads-table`` measure the choice).

Videos (.mp4 .mov .avi .mkv .webm .m4v; named directly, in folders, CSV lists and globs) are decoded with
PyAV: --frames evenly spaced frames (16; fewer when the video has fewer) are scored as images are (with
--crop-faces, each frame's face crop), and their probabilities make the video's one probability and verdict
(--video-agg: mean, max, or topk, the mean of the top ceil(N/4) frames). Only the sampled frames are decoded
and kept (long videos are reached by seeking). --per-frame prints each sampled frame's line
``PROB<TAB>VERDICT<TAB>NAME#frame=K`` (K: the frame's index in the video, from 0) after the video's line;
--frame-scores OUT.csv writes ``img_name,frame,time_s,y_pred`` rows (with --per-expert, one column per
expert), with or without --submission. A video that cannot be decoded (not a video, no frames, truncated,
corrupt, frames too large) is an ``error:`` line and a --fill row, like an unreadable image.

--heatmap OUT_DIR also writes, per image, where the experts find their evidence for "fake": Grad-CAM++
(``scoring/heatmaps.py``) over the centre square the model scores, NAME.heatmap.png (the weighted average of
the experts' maps) and NAME.EXPERT.heatmap.png per expert. The scores printed or written are the same.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # the heavy imports happen in run(), after the options are read: --help stays instant
    import torch

    from core.distributed import Dist
    from experts import Ensemble
    from scoring.submission import PartialWriter
    from scoring.pipeline import BatchScores, Score
    from scoring.video import VideoScore

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"
VIDEO_AGGREGATIONS = ("mean", "max", "topk")  # scoring.video.AGGREGATIONS, without importing torch for --help


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
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: 1 on a machine with 4 or more CPUs when there is "
                        "more than one batch to score, else 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, one per CPU neither taken by --workers nor busy with other "
                        "work now)")
    p.add_argument("--crop-faces", action="store_true",
                   help="score a square crop around the largest face (YuNet) instead of the whole image")
    p.add_argument("--frames", type=int, default=16, metavar="N",
                   help="frames sampled per video, evenly spaced over it (default: 16; all of a shorter video)")
    p.add_argument("--video-agg", default="mean", choices=VIDEO_AGGREGATIONS,
                   help="a video's probability from its frames': mean, max, or topk = the mean of the top "
                        "ceil(N/4) frames (default: mean)")
    p.add_argument("--per-frame", action="store_true",
                   help="after each video's line, print one line per sampled frame: PROB, VERDICT, NAME#frame=K "
                        "(K: the frame's index in the video, from 0); with --submission use --frame-scores")
    p.add_argument("--frame-scores", metavar="FRAMES.csv",
                   help="write each video's sampled frames as img_name,frame,time_s,y_pred rows to this CSV "
                        "(replaced only with --overwrite)")
    p.add_argument("--heatmap", metavar="OUT_DIR",
                   help="also write fake-class heat maps (Grad-CAM++) of each image into OUT_DIR: NAME.heatmap.png, "
                        "the experts' weighted average, and NAME.EXPERT.heatmap.png per expert (NAME: the image's "
                        "file name without extension), each laid over the centre square the model scores (the "
                        "face crop with --crop-faces): the map covers that square only; images only, videos are "
                        "skipped; about 0.3 s per image and expert on a CPU; files of these names are replaced")
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
    workers: int | None = None
    threads: int = 0
    crop_faces: bool = False
    per_expert: bool = False
    progress: bool = True
    debug: bool = False
    frames: int = 16
    video_agg: str = "mean"
    per_frame: bool = False
    frame_scores: str | None = None
    heatmap: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0) or self.threads < 0:
            raise OptionError("--batch-size must be at least 1, --workers and --threads at least 0")
        if self.frames < 1 or self.video_agg not in VIDEO_AGGREGATIONS:
            raise OptionError(f"--frames must be at least 1 and --video-agg one of {', '.join(VIDEO_AGGREGATIONS)}")


def score_sources(sources: Sequence[str], run: Run, submission: str | None = None, overwrite: bool = False,
                  resume: bool = False, fill: float | None = 0.5) -> int:
    """Score every image the sources name: printed, or into the ``submission`` CSV; returns the exit status
    (0, or 1 when some images could not be scored). Raises the typed errors ``main()`` maps to status 2.

    Started by torchrun (``WORLD_SIZE`` > 1), it is one process of a sharded run: see
    :func:`score_to_submission`."""
    from core.device import default_workers, resolve_device, set_threads
    from core.distributed import SHARD_WAIT, init_distributed, process_device, shutdown, world_size
    from core.image_lists import read_image_list
    from experts import load_ensemble

    if world_size() > 1:
        _check_sharded(run, submission)
    if resume and not submission:
        raise OptionError("--resume continues a --submission run; pass --submission OUT.csv")
    if submission and Path(submission).exists() and not overwrite:
        raise OptionError(f"{submission} exists; pass --overwrite to replace it")
    if run.frame_scores and Path(run.frame_scores).exists() and not overwrite:
        raise OptionError(f"{run.frame_scores} exists; pass --overwrite to replace it")
    if run.per_frame and submission:
        raise OptionError("--per-frame prints; with --submission, write the frames with --frame-scores FRAMES.csv")
    items = read_image_list(sources, videos=True)
    device = resolve_device(run.device)
    if run.workers is None:
        run = replace(run, workers=default_workers(len(items) // world_size(), run.batch_size))
    set_threads(run.threads, run.workers)
    procs = init_distributed(device, timeout=SHARD_WAIT)
    try:
        device = process_device(device, procs)
        ensemble = load_ensemble(run.weights, device)
        if run.heatmap and ensemble.backend != "pytorch":
            raise OptionError(f"--heatmap needs the experts' gradients, and {run.weights} holds {ensemble.backend} "
                              "graphs: pass the PyTorch weights folder they were exported from")
        names, paths = items["img_name"].tolist(), items["path"].tolist()
        if submission:
            failed = score_to_submission(run, names, paths, ensemble, device, submission, resume, fill, procs)
        else:
            failed = score_to_stdout(run, names, paths, ensemble, device)
    finally:
        shutdown(procs)
    if failed:
        filled = f"; their rows hold --fill {fill}" if submission and fill is not None else ""
        what = "files" if _has_videos(paths) else "images"
        print(f"{failed} of {len(items)} {what} could not be scored (see the errors above){filled}", file=sys.stderr)
        return 1
    return 0


def _check_sharded(run: Run, submission: str | None) -> None:
    """What a sharded run (under torchrun) cannot do: print (the processes' lines would interleave) or write
    heat maps (a tool for looking at a few images)."""
    if not submission:
        raise OptionError("under torchrun each process scores a shard: pass --submission OUT.csv (printed lines of "
                          "several processes would interleave)")
    if run.heatmap:
        raise OptionError("--heatmap is not available under torchrun; run it in one process")


def _batches(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble", device: "torch.device",
             progress: bool) -> Iterator["BatchScores"]:
    from scoring.pipeline import score_batches

    return score_batches(ensemble, paths, names, run.batch_size, run.workers, device,
                         progress=progress and run.progress, crop_faces=run.crop_faces)


def _has_videos(paths: Sequence[str]) -> bool:
    from core.video import is_video_file

    return any(is_video_file(p) for p in paths)


def _results(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble", device: "torch.device",
             progress: bool) -> Iterator["BatchScores | VideoScore"]:
    """Results in input order: each run of consecutive images goes through the batched image pipeline
    (:func:`_batches`), each video through :func:`scoring.video.score_video`, one :class:`VideoScore` each."""
    from core.video import is_video_file

    start = 0
    while start < len(paths):
        video = is_video_file(paths[start])
        end = start + 1
        while end < len(paths) and is_video_file(paths[end]) == video:
            end += 1
        if video:
            for i in range(start, end):
                yield _score_video(run, names[i], paths[i], ensemble, device)
        else:
            yield from _batches(run, names[start:end], paths[start:end], ensemble, device, progress)
        start = end


def _score_video(run: Run, name: str, path: str, ensemble: "Ensemble", device: "torch.device") -> "VideoScore":
    """One video's :class:`VideoScore`; one that cannot be decoded is a failed one (``error``, NaN), like an
    unreadable image (with --debug, its traceback is printed)."""
    from core.video import VideoLoadError
    from scoring.video import VideoScore, score_video

    try:
        return score_video(ensemble, path, run.frames, run.crop_faces, run.video_agg, run.batch_size, device, name=name)
    except VideoLoadError as e:
        if run.debug:
            traceback.print_exc()
        return VideoScore.failed(name, path, e, len(ensemble.names))


def _is_video(result: "BatchScores | VideoScore") -> bool:
    from scoring.video import VideoScore

    return isinstance(result, VideoScore)


def _video_notes(video: "VideoScore") -> None:
    """One line per distinct note of a video's frames (no face found for --crop-faces), naming the frames."""
    from core.progress import write_line

    frames: dict[str, list[str]] = {}
    for index, note in zip(video.frame_indices, video.notes):
        if note:
            frames.setdefault(note, []).append(str(index))
    for note, which in frames.items():
        write_line(f"note: {video.name}: frame{'s' if len(which) > 1 else ''} {', '.join(which)}: {note}")


def _print_video(run: Run, video: "VideoScore", ensemble: "Ensemble") -> None:
    """The video's line, as an image's; with --per-frame, one line per sampled frame after it."""
    from core.progress import write_line

    _video_notes(video)
    extra = "".join(f"\t{p:.6f}" for p in video.expert_probs) if run.per_expert else ""
    write_line(f"{video.prob:.6f}\t{ensemble.verdict(video.prob)}\t{video.name}{extra}", file=sys.stdout)
    if run.per_frame:
        for index, prob, experts in zip(video.frame_indices, video.frame_probs, video.frame_expert_probs):
            extra = "".join(f"\t{p:.6f}" for p in experts) if run.per_expert else ""
            write_line(f"{prob:.6f}\t{ensemble.verdict(prob)}\t{video.name}#frame={index}{extra}", file=sys.stdout)


class _FrameScores:
    """--frame-scores: each video's frames appended to a partial file as it is scored (flushed; under torchrun
    one per process), written to ``FRAMES.csv`` in input order at the end, atomically. A resumed --submission
    run keeps the rows of the videos scored before the kill; any other run starts the partial files over."""

    def __init__(self, out: str, stamp: str, experts: Sequence[str], resume: bool, procs: "Dist"):
        from scoring.submission import FRAME_COLUMNS, FRAME_KEY, partial_files, read_partials

        self.out, self.stamp, self.procs = Path(out), stamp, procs
        self.partial = _own_partial(out, procs)
        self.columns = [*FRAME_COLUMNS, *experts]
        if resume:
            read_partials(partial_files(out), stamp, self.columns, key=FRAME_KEY)  # refuses other settings
        elif procs.is_main:
            for stale in partial_files(out):
                stale.unlink()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.writer: "PartialWriter | None" = None  # opened at the first video: after every process has read
        self.per_expert = bool(experts)

    def add(self, video: "VideoScore") -> None:
        from scoring.submission import PartialWriter

        if video.error:
            return
        if self.writer is None:
            self.writer = PartialWriter(self.partial, self.stamp, self.columns)
        self.writer.write([[video.name, str(index), f"{time:.3f}", f"{prob:.6f}",
                            *(f"{p:.6f}" for p in (experts if self.per_expert else []))]
                           for index, time, prob, experts in zip(video.frame_indices, video.frame_times,
                                                                 video.frame_probs, video.frame_expert_probs)])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def finish(self, names: Sequence[str]) -> int:
        """Write ``FRAMES.csv`` from every process's partial file and remove them (the main process, once all
        are closed); returns the number of rows."""
        from scoring.submission import partial_files, write_frame_scores

        self.close()
        partials = partial_files(self.out)
        rows = write_frame_scores(partials, self.out, names, self.stamp, self.columns)
        for partial in partials:
            partial.unlink()
        return rows


def _own_partial(out: str | Path, procs: "Dist") -> Path:
    """The partial file this process writes for ``out``: its own under torchrun, the one file otherwise."""
    from scoring.submission import partial_path

    return partial_path(out, procs.rank if procs.enabled else None)


def _stamp(run: Run, paths: Sequence[str]) -> str:
    """The first line of a partial file: the settings its rows were scored with (video ones when it has videos)."""
    from experts import read_manifest, scores_fingerprint

    video = f", video frames {run.frames}, video_agg {run.video_agg}" if _has_videos(paths) else ""
    return (f"# partial results of infer.py: weights {scores_fingerprint(read_manifest(run.weights))}, "
            f"crop_faces {run.crop_faces}{video}")


def _frame_scores(run: Run, ensemble: "Ensemble", paths: Sequence[str], resume: bool,
                  procs: "Dist | None" = None) -> "_FrameScores | None":
    from core.distributed import Dist

    if not run.frame_scores:
        return None
    return _FrameScores(run.frame_scores, _stamp(run, paths), ensemble.names if run.per_expert else [], resume,
                        procs or Dist())


class _Heatmaps:
    """--heatmap OUT_DIR: the heat maps of every image scored (``scoring.heatmaps.write_heatmaps``), made after its
    batch is scored; files are named by the image's stem, made unique within the run (``x``, ``x-2``...)."""

    def __init__(self, out_dir: str, ensemble: "Ensemble", crop_faces: bool, debug: bool):
        self.out, self.ensemble, self.crop_faces, self.debug = Path(out_dir), ensemble, crop_faces, debug
        self.stems: set[str] = set()
        self.images = self.videos = self.failed = 0

    def add(self, result: "BatchScores | VideoScore") -> None:
        from core.images import ImageLoadError, load_image
        from core.progress import write_line
        from scoring.heatmaps import write_heatmaps

        if _is_video(result):
            if not result.error:
                self.videos += 1
            return
        for score in result:
            if score.error:  # named already; no map
                continue
            try:
                write_heatmaps(self.ensemble, load_image(score.path), self.out, self._stem(score.name), self.crop_faces)
                self.images += 1
            except (ImageLoadError, OSError, ValueError, RuntimeError) as e:
                self.failed += 1
                if self.debug:
                    traceback.print_exc()
                write_line(f"error: {score.name}: no heat map: {e}")

    def _stem(self, name: str) -> str:
        stem = Path(name).stem or "image"
        unique, k = stem, 2
        while unique in self.stems:
            unique, k = f"{stem}-{k}", k + 1
        self.stems.add(unique)
        return unique

    def finish(self) -> None:
        videos = f"; none for {self.videos} video{'s' * (self.videos != 1)} (images only)" if self.videos else ""
        failed = f"; {self.failed} scored images got none (see the errors above)" if self.failed else ""
        print(f"heatmaps of {self.images} image{'s' * (self.images != 1)} written to {self.out} (NAME.heatmap.png: the experts' average, "
              f"NAME.EXPERT.heatmap.png: each expert){videos}{failed}", file=sys.stderr)


def _heatmaps(run: Run, ensemble: "Ensemble") -> "_Heatmaps | None":
    return _Heatmaps(run.heatmap, ensemble, run.crop_faces, run.debug) if run.heatmap else None


def _with_heatmaps(results: Iterator["BatchScores | VideoScore"], maps: "_Heatmaps | None",
                   ) -> Iterator["BatchScores | VideoScore"]:
    """``results`` as they come; with --heatmap, each batch's maps are made once the caller has reported it."""
    for result in results:
        yield result
        if maps:
            maps.add(result)


def _report(score: "Score", debug: bool) -> None:
    """One line per unreadable image or video; with --debug, the traceback of loading an image again here (a
    video's was printed when it failed)."""
    from core.images import ImageLoadError, load_image
    from core.progress import write_line
    from core.video import is_video_file

    write_line(f"error: {score.error}")
    if debug and score.path and not is_video_file(score.path):
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
    frames = _frame_scores(run, ensemble, paths, resume=False)
    maps = _heatmaps(run, ensemble)
    for batch in _with_heatmaps(_results(run, names, paths, ensemble, device, progress=len(names) > 1), maps):
        if _is_video(batch):
            if batch.error:
                failed += 1
                _report(batch, run.debug)
            else:
                _print_video(run, batch, ensemble)
                if frames:
                    frames.add(batch)
            continue
        _note(batch)
        for score in batch:
            if score.error:
                failed += 1
                _report(score, run.debug)
                continue
            extra = "".join(f"\t{p:.6f}" for p in score.expert_probs) if run.per_expert else ""
            write_line(f"{score.prob:.6f}\t{ensemble.verdict(score.prob)}\t{score.name}{extra}", file=sys.stdout)
    if frames:
        frames.finish(names)
    if maps:
        maps.finish()
    return failed


def score_to_submission(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble",
                        device: "torch.device", submission: str, resume: bool, fill: float | None,
                        procs: "Dist | None" = None) -> int:
    """Score into partial files batch by batch, then write ``OUT.csv``; returns the number of failures.

    Under torchrun (``procs``) each process scores its contiguous shard of what is left to score into its
    own partial file, and the main process writes ``OUT.csv`` once every process has finished its shard.
    """
    from core.distributed import Dist, barrier, shard_bounds
    from scoring.submission import SubmissionError, check_unique, done_names, partial_files

    procs = procs or Dist()
    out = Path(submission)
    check_unique(names)
    columns = ["img_name", "y_pred", *(ensemble.names if run.per_expert else [])]
    stamp = _stamp(run, paths)
    earlier = partial_files(out)
    if earlier and not resume:
        more = f" (and {len(earlier) - 1} more partial files)" if len(earlier) > 1 else ""
        raise SubmissionError(f"{earlier[0]}{more}: holds the results of an interrupted run; pass --resume to "
                              "continue it or delete it to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_names(earlier, stamp, columns)
    frames = _frame_scores(run, ensemble, paths, resume, procs)
    barrier(procs)  # every process has read what earlier runs left before any process writes
    todo = [i for i, n in enumerate(names) if n not in done]
    first, end = shard_bounds(len(todo), procs.rank, procs.world)
    mine = todo[first:end]
    start = time.perf_counter()
    maps = _heatmaps(run, ensemble)
    failed, scored = _score_shard(run, [names[i] for i in mine], [paths[i] for i in mine], ensemble, device,
                                  _ShardOutput(out, procs, stamp, columns, frames, maps, len(done)))
    if frames:
        frames.close()
    return _finish_submission(run, names, paths, out, stamp, columns, fill, procs, frames, maps,
                              (failed, scored, time.perf_counter() - start), n_resumed=len(names) - len(todo))


@dataclass
class _ShardOutput:
    """Where one process's scores go: its partial file, the frame scores and heat maps, and what to say if
    it is stopped (``kept``: rows earlier runs left)."""

    out: Path
    procs: "Dist"
    stamp: str
    columns: list[str]
    frames: "_FrameScores | None"
    maps: "_Heatmaps | None"
    kept: int


def _score_shard(run: Run, names: Sequence[str], paths: Sequence[str], ensemble: "Ensemble",
                 device: "torch.device", to: _ShardOutput) -> tuple[int, int]:
    """Score ``names`` into this process's partial file; returns ``(failed, scored)``. Stopped by an exception,
    it says how many rows the partial file keeps for ``--resume``."""
    from core.progress import write_line
    from scoring.submission import PartialWriter

    partial = _own_partial(to.out, to.procs)
    failed = scored = 0
    with PartialWriter(partial, to.stamp, to.columns) as writer:
        try:
            for batch in _with_heatmaps(_results(run, names, paths, ensemble, device, progress=to.procs.is_main),
                                        to.maps):
                if _is_video(batch):
                    if batch.error:
                        failed += 1
                        _report(batch, run.debug)
                        continue
                    _video_notes(batch)
                    if to.frames:
                        to.frames.add(batch)
                    experts = batch.expert_probs if run.per_expert else []
                    writer.write([[batch.name, f"{batch.prob:.6f}", *(f"{p:.6f}" for p in experts)]])
                    scored += 1
                    continue
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
            who = f"process {to.procs.rank} of {to.procs.world}: " if to.procs.enabled else ""
            earlier = f" (and {to.kept} scored by an earlier run)" if to.kept else ""
            write_line(f"note: {who}{scored} images scored by this run are kept in {partial}{earlier}; "
                       "rerun with --resume to continue")
            raise
    return failed, scored


def _finish_submission(run: Run, names: Sequence[str], paths: Sequence[str], out: Path, stamp: str,
                       columns: list[str], fill: float | None, procs: "Dist", frames: "_FrameScores | None",
                       maps: "_Heatmaps | None", counts: tuple[int, int, float], n_resumed: int) -> int:
    """Once every process has finished its shard, the main process writes ``OUT.csv`` (and FRAMES.csv) from all
    partial files, removes them and reports; returns the failures of the whole run (0 on other processes,
    so that torchrun names the main process's status)."""
    from core.distributed import gather
    from scoring.submission import SubmissionError, partial_files, write_submission

    try:
        every = gather(counts, procs)  # waits for every shard
    except RuntimeError as e:  # torch's DistBackendError: a process died (torchrun then stops the others)
        raise SubmissionError(f"process {procs.rank} of {procs.world}: another process of this run stopped before "
                              f"finishing its shard (its error is above); the rows scored so far are kept in the "
                              f"partial files of {out}; rerun with --resume to continue") from e
    if not procs.is_main:
        return 0
    failed, scored, seconds = sum(c[0] for c in every), sum(c[1] for c in every), max(c[2] for c in every)
    partials = partial_files(out)
    written, filled = write_submission(partials, out, names, stamp, columns, fill)
    for partial in partials:
        partial.unlink()
    if frames:
        frame_rows = frames.finish(names)
        print(f"{frame_rows} frame rows written to {frames.out}", file=sys.stderr)
    resumed = f", {n_resumed} were already in partial files (resumed)" if n_resumed else ""
    filled = f" ({filled} filled with {fill})" if filled else ""
    unit = ("files", "files/s") if _has_videos(paths) else ("images", "img/s")
    by = f" by {procs.world} processes" if procs.enabled else ""
    print(f"scored {scored} {unit[0]} in {seconds:.1f}s ({scored / max(seconds, 1e-9):.1f} {unit[1]}){by}{resumed}; "
          f"{written} rows written to {out}{filled}", file=sys.stderr)
    if maps:
        maps.finish()
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
                  progress=not args.quiet, debug=args.debug, frames=args.frames, video_agg=args.video_agg,
                  per_frame=args.per_frame, frame_scores=args.frame_scores, heatmap=args.heatmap)
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
