"""Videos: sampled frames -> the image scoring pipeline -> one probability per video.

:func:`score_video` samples ``frames`` evenly spaced frames (:func:`core.video.iter_frames`: decoded one at a
time, never the whole video), scores them in batches exactly as image files are scored
(:func:`scoring.pipeline.score_array_batches`: same preprocessing, same experts, same arithmetic, so a frame
saved as a PNG and scored as an image gets the same numbers) and aggregates the frames' probabilities into the
video's (:func:`aggregate`). ``infer.py`` calls it for every video it is given, and the web service for an
uploaded file: a library function with typed arguments that raises typed errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.transforms import eval_transform
from core.video import DEFAULT_FRAMES, VideoLoadError, iter_frames
from experts import Ensemble

from .pipeline import score_array_batches

AGGREGATIONS = ("mean", "max", "topk")


def topk_count(n: int) -> int:
    """How many frames ``topk`` averages: the top quarter, ``ceil(n / 4)`` (at least one)."""
    return max(1, math.ceil(n / 4))


def aggregate(probs: np.ndarray, agg: str = "mean") -> np.ndarray:
    """Frame probabilities ``[K]`` (or ``[K, E]``, column by column) to the video's: ``mean``, ``max``, or
    ``topk`` (the mean of the ``ceil(K / 4)`` highest)."""
    probs = np.asarray(probs, dtype=np.float64)
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown video aggregation {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    if len(probs) == 0:
        raise ValueError("no frame probabilities to aggregate")
    if agg == "mean":
        return probs.mean(axis=0)
    if agg == "max":
        return probs.max(axis=0)
    return np.sort(probs, axis=0)[-topk_count(len(probs)):].mean(axis=0)


@dataclass
class VideoScore:
    """One video's result.

    ``prob`` is the aggregation of ``frame_probs`` (the ensemble's probability of each sampled frame);
    ``expert_probs[E]`` aggregates each expert's frame probabilities ``frame_expert_probs[K, E]`` the same way
    (with ``mean``, ``prob`` is their weighted average, as for an image; with ``max``/``topk`` each expert's own
    maximum / top quarter). ``frame_indices`` are the frames' positions in the video (presentation order,
    from 0), ``frame_times`` their times in seconds, ``notes`` what preprocessing reported per frame (no face
    found; ``""`` when nothing). A video that could not be scored has ``error`` (``"PATH: REASON"``), NaN
    probabilities and no frames (:meth:`failed`).
    """

    name: str
    path: str
    prob: float
    expert_probs: np.ndarray
    frame_probs: np.ndarray
    frame_expert_probs: np.ndarray
    frame_indices: np.ndarray
    frame_times: np.ndarray
    notes: list[str] = field(default_factory=list)
    agg: str = "mean"
    error: str = ""

    @classmethod
    def failed(cls, name: str, path: str, error: str | BaseException, n_experts: int) -> "VideoScore":
        """The result of a video that could not be scored (``error``: its message, or the exception)."""
        return cls(name, str(path), float("nan"), np.full(n_experts, np.nan), np.empty(0), np.empty((0, n_experts)),
                   np.empty(0, dtype=np.int64), np.empty(0), [], error=str(error))


def score_video(ensemble: Ensemble, path: str | Path, frames: int = DEFAULT_FRAMES, crop_faces: bool = False,
                agg: str = "mean", batch_size: int = 32, device: str | torch.device = "cpu",
                transform: Callable[[int], Callable] = eval_transform, name: str | None = None) -> VideoScore:
    """Score a video file: ``frames`` evenly spaced frames (fewer when the video has fewer), each scored as an
    image (optionally its face crop: ``crop_faces``), aggregated with ``agg`` (``mean``, ``max`` or ``topk``).

    Only one decoded frame and one batch of resized inputs are held at a time. ``name`` (default: the path)
    is what the result is called. The ensemble must already be on ``device``.

    Raises:
        core.video.VideoLoadError: the file cannot be used as a video (missing, empty, not a video, no video
            stream or frames, truncated, corrupt, frames too large); ``err.path``, ``err.reason``.
        ValueError: ``frames < 1``, ``batch_size < 1`` or an unknown ``agg``.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown video aggregation {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    if frames < 1 or batch_size < 1:
        raise ValueError(f"frames and batch_size must be at least 1, got {frames} and {batch_size}")
    indices: list[int] = []
    times: list[float] = []

    def images():
        for frame in iter_frames(path, frames):
            indices.append(frame.index)
            times.append(frame.time_s)
            yield frame.image

    probs, expert_probs, notes = [], [], []
    for batch in score_array_batches(ensemble, images(), batch_size, device, transform, crop_faces):
        probs.append(batch.probs)
        expert_probs.append(batch.expert_probs)
        notes += batch.notes
    if not probs:  # iter_frames raises before yielding nothing; kept as a guard
        raise VideoLoadError(path, "no video frames")
    frame_probs, frame_expert_probs = np.concatenate(probs), np.concatenate(expert_probs)
    return VideoScore(name if name is not None else str(path), str(path), float(aggregate(frame_probs, agg)),
                      aggregate(frame_expert_probs, agg), frame_probs, frame_expert_probs,
                      np.asarray(indices, dtype=np.int64), np.asarray(times, dtype=np.float64), notes, agg)
