"""The scoring workers behind the service: a bounded queue, a fixed number of threads running the model.

The web server's event loop only receives uploads and answers; all CPU work (decoding, resizing, the forward
pass, heatmaps, videos) happens in ``workers`` threads that share one loaded :class:`~experts.Ensemble`. A
worker takes one job from the queue and, without waiting, up to ``batch_size - 1`` more images that are
already queued, and scores those images in one forward pass (:func:`scoring.pipeline.score_array_batches`,
the preprocessing and arithmetic of ``infer.py``). :meth:`Scorer.submit` never blocks: a full queue is
:class:`Busy` at once (the service answers 503 with ``Retry-After``), so memory cannot pile up behind a slow
model. A job whose client gave up (the service's time limit) is skipped when a worker reaches it.

Heatmaps (``scoring/heatmaps.py``) hook into the model while they run, so one runs only while no other
worker is inside the model (a shared/exclusive lock); plain scoring runs concurrently.
"""
from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from core.dataset import limit_aspect
from core.files import scratch_file
from core.images import decode_image
from scoring.pipeline import score_array_batches

try:  # videos where the video module is installed (core/video.py, scoring/video.py)
    from core.video import VIDEO_EXTENSIONS
except ImportError:
    VIDEO_EXTENSIONS = frozenset()

log = logging.getLogger("service")


class Busy(Exception):
    """The queue is full: the request is refused at once (503 with ``Retry-After``)."""


class FeatureMissing(Exception):
    """A feature this installation lacks: heatmaps (``status`` 501) or videos (415) without their modules."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One upload to score; ``future`` receives the result dict or the exception to answer with."""

    data: bytes
    name: str
    content_type: str = ""
    heatmap: bool = False
    future: Future = field(default_factory=Future)

    @property
    def is_video(self) -> bool:
        return self.content_type.startswith("video/") or Path(self.name).suffix.lower() in VIDEO_EXTENSIONS


class SharedLock:
    """Many holders in shared mode, or one in exclusive mode (a readers-writer lock, writers first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def optional_features() -> tuple[Callable | None, Callable | None]:
    """``(heatmap_png, score_video)`` from ``scoring/heatmaps.py`` and ``scoring/video.py``, None where absent."""
    try:
        from scoring.heatmaps import heatmap_png
    except ImportError:
        heatmap_png = None
    try:
        from scoring.video import score_video
    except ImportError:
        score_video = None
    return heatmap_png, score_video


class Scorer:
    """``workers`` threads scoring the jobs of a queue of at most ``queue_size`` waiting jobs."""

    def __init__(self, ensemble: Any, *, workers: int = 1, queue_size: int = 8, batch_size: int = 8,
                 device: str = "cpu", tmp_dir: str | Path | None = None, video_frames: int = 16,
                 video_agg: str = "mean", heatmap_fn: Callable | None = None, video_fn: Callable | None = None):
        if workers < 1 or queue_size < 1 or batch_size < 1:
            raise ValueError("workers, queue size and batch size must be at least 1")
        self.ensemble, self.device = ensemble, device
        self.workers, self.batch_size = workers, batch_size
        self.tmp_dir, self.video_frames, self.video_agg = tmp_dir, video_frames, video_agg
        self.heatmap_fn, self.video_fn = heatmap_fn, video_fn
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.model_lock = SharedLock()
        self._threads: list[threading.Thread] = []
        self.scored = 0

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"scorer-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the workers finish their current job and end; queued jobs are cancelled."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        for _ in self._threads:
            try:
                self.queue.put(None, timeout=1.0)
            except queue.Full:  # requests still arriving: the threads are daemons, and the join below is bounded
                break
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises :class:`Busy` at once when the queue is full (never waits)."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
        return job.future

    # ------------------------------------------------------------------------------------------ workers
    def _work(self) -> None:
        carried: list[Job | None] = []  # taken while batching but not batchable: the next round's job
        while True:
            job = carried.pop() if carried else self.queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.batch_size and not job.is_video:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt.is_video:  # a stop sentinel or a video: kept for the next round (putting
                    carried.append(nxt)           # it back could block on a queue refilled meanwhile)
                    break
                jobs.append(nxt)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # skip those given up on
            try:
                if jobs and jobs[0].is_video:
                    self._finish(jobs[0], self._score_video)
                elif jobs:
                    self._score_images(jobs)
            except BaseException as e:  # noqa: BLE001  never lose a worker: the clients get the error
                log.exception("scoring failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)

    @staticmethod
    def _finish(job: Job, fn: Callable[[Job], dict]) -> None:
        try:
            job.future.set_result(fn(job))
        except Exception as e:  # noqa: BLE001  handed to the request, which maps it to a status
            job.future.set_exception(e)

    def _result(self, prob: float, expert_probs: np.ndarray) -> dict[str, Any]:
        return {"prob": float(prob), "verdict": self.ensemble.verdict(float(prob)),
                "threshold": float(self.ensemble.threshold),
                "experts": {name: float(p) for name, p in zip(self.ensemble.names, expert_probs)}}

    def _score_images(self, jobs: list[Job]) -> None:
        images, good = [], []
        for job in jobs:
            if job.heatmap and self.heatmap_fn is None:
                job.future.set_exception(FeatureMissing("heatmaps are not available in this installation "
                                                        "(scoring/heatmaps.py is missing)", 501))
                continue
            try:
                images.append(decode_image(job.data, job.name))
            except Exception as e:  # noqa: BLE001  ImageLoadError, mapped to a 4xx by the service
                job.future.set_exception(e)
                continue
            job.data = b""  # the decoded pixels are all that is needed now
            good.append(job)
        if not good:
            return
        with self.model_lock.shared():  # infer.py's preprocessing and arithmetic, one forward pass
            batch = next(score_array_batches(self.ensemble, images, len(images), self.device))
        probs, expert_probs = batch.probs, batch.expert_probs
        for job, image, prob, experts in zip(good, images, probs, expert_probs):
            result = self._result(prob, experts)
            if job.heatmap:
                try:
                    with self.model_lock.exclusive():  # its hooks would catch other workers' forward passes
                        # limit_aspect first, as scoring does: a 1x60000 strip resized whole would take GBs
                        png = self.heatmap_fn(self.ensemble, limit_aspect(image))
                    result["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                except Exception as e:  # noqa: BLE001
                    log.exception("heatmap failed for %s", job.name)
                    job.future.set_exception(e)
                    continue
            job.future.set_result(result)
        self.scored += len(good)

    def _score_video(self, job: Job) -> dict[str, Any]:
        """A video upload, through ``scoring.video.score_video`` (the decoder needs a path: a scratch file,
        removed at once); its probability and verdict as for an image, plus ``agg`` and each sampled frame."""
        if self.video_fn is None:
            raise FeatureMissing("videos are not supported by this installation (scoring/video.py is missing)", 415)
        suffix = Path(job.name).suffix.lower()
        suffix = suffix if suffix in VIDEO_EXTENSIONS else ".mp4"
        with scratch_file(job.data, suffix, self.tmp_dir) as path:
            job.data = b""
            try:
                with self.model_lock.shared():
                    video = self.video_fn(self.ensemble, path, frames=self.video_frames, agg=self.video_agg,
                                          batch_size=self.batch_size, device=self.device, name=job.name)
            except OSError as e:  # VideoLoadError names the scratch file: name the upload instead
                reason = getattr(e, "reason", None)
                if reason is None:
                    raise
                raise type(e)(job.name, reason) from e
        result = self._result(video.prob, video.expert_probs)
        result["agg"] = video.agg
        result["frames"] = [{"index": int(i), "time_s": round(float(t), 4), "prob": float(p)}
                            for i, t, p in zip(video.frame_indices, video.frame_times, video.frame_probs)]
        return result
