"""Video files as sampled RGB frames (PyAV), with one clear error per unusable file.

:func:`iter_frames` picks ``n`` frames evenly spaced over a video and yields them one at a time, decoded to
``[H, W, 3]`` uint8 RGB like :func:`core.images.load_image` (the display rotation applied, as EXIF orientation
is for photos); :func:`read_frames` collects them. Scoring (``scoring/video.py``) consumes the iterator, so
that only one full-size frame is held at a time, however long the video.

How the frames are chosen: a first pass reads the video's packets without decoding any (cheap: no pixels) to
know every frame's presentation timestamp; the video is cut into ``n`` equal parts by frame count and the
frame at the centre of each part is taken (index ``floor((k + 0.5) * count / n)``, ``k = 0 .. n-1``); every
frame when the video has ``n`` or fewer. Close targets are decoded in one streaming pass (stopping after the
last); targets more than :data:`SEEK_GAP` frames apart are each reached by seeking to the keyframe before it,
so a two-hour film is never decoded whole.

Files come from users, so nothing is assumed: a missing, empty or non-video file, a container without a video
stream or frames, frames larger than :data:`MAX_FRAME_PIXELS`, a file truncated (fewer frames or less data
than its header declares, a damaged packet) or undecodable becomes a :class:`VideoLoadError` naming the file,
a subclass of :class:`core.images.ImageLoadError` so every path that reports unreadable images reports it.
PyAV is imported on first use: importing this module costs nothing.
"""
from __future__ import annotations

from array import array
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np

from .images import ImageLoadError

if TYPE_CHECKING:
    import av

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})
DEFAULT_FRAMES = 16
# Refuse frames with more pixels than this (checked on the header before decoding, and on every decoded
# frame): DCI 8K, 35 MP, 106 MB as RGB. Videos are scored one frame at a time, but read_frames() holds n.
MAX_FRAME_PIXELS = 8192 * 4320
# The packet index of a video longer than this many frames (4.6 days at 25 fps) is refused: 8 bytes each.
MAX_INDEXED_FRAMES = 10_000_000
# Targets further apart than this many frames are reached by seeking (to the keyframe before each one)
# instead of decoding every frame between them.
SEEK_GAP = 120


class VideoLoadError(ImageLoadError):
    """A video that cannot be used; ``str(err)`` is one line naming the file and the reason (``path``, ``reason``)."""


class SampledFrame(NamedTuple):
    """One sampled frame: its index among the video's frames (presentation order), its time in seconds from the
    start of the video stream, and its pixels (``[H, W, 3]`` uint8 RGB)."""

    index: int
    time_s: float
    image: np.ndarray


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def sample_indices(count: int, n: int) -> list[int]:
    """``n`` evenly spaced indices out of ``count`` frames: the centre of each of ``n`` equal parts
    (``floor((k + 0.5) * count / n)``), or every frame when ``n >= count``."""
    if n < 1:
        raise ValueError(f"the number of frames to sample must be at least 1, got {n}")
    if n >= count:
        return list(range(count))
    return [((2 * k + 1) * count) // (2 * n) for k in range(n)]


def read_frames(path: str | Path, n: int = DEFAULT_FRAMES) -> tuple[list[np.ndarray], list[float]]:
    """``n`` evenly spaced frames of a video (fewer when it has fewer) as ``[H, W, 3]`` uint8 RGB arrays, and
    their times in seconds. Holds all ``n`` frames: to score a video, iterate :func:`iter_frames` instead.

    Raises:
        VideoLoadError: the file cannot be used as a video (see the module's docstring).
    """
    frames, times = [], []
    for frame in iter_frames(path, n):
        frames.append(frame.image)
        times.append(frame.time_s)
    return frames, times


def iter_frames(path: str | Path, n: int = DEFAULT_FRAMES) -> Iterator[SampledFrame]:
    """Yield the ``n`` sampled frames of :func:`read_frames` one at a time, in order (one held at a time).

    Raises:
        VideoLoadError: as :func:`read_frames`, when iterated. ``ValueError`` when ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"the number of frames to sample must be at least 1, got {n}")
    path = Path(path)
    _check_file(path)
    with _open(path) as container:  # first pass: the packets, not decoded
        if not container.streams.video:
            raise VideoLoadError(path, "no video stream (an audio-only or data file?)")
        stream = container.streams.video[0]
        _check_size(path, stream.codec_context.width, stream.codec_context.height)
        index = _guarded(path, _index, path, container, stream)
    targets = sample_indices(len(index.pts), n)
    seek = index.seekable and len(index.pts) / len(targets) > SEEK_GAP
    with _open(path) as container:  # second pass: decode the targets
        frames = (_decode_by_seeking if seek else _decode_streaming)(path, container, container.streams.video[0],
                                                                     index, targets)
        while True:
            frame = _guarded(path, next, frames, None)
            if frame is None:
                return
            yield frame


def _open(path: Path) -> "av.container.InputContainer":
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.PermissionError as e:
        raise VideoLoadError(path, "permission denied") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoLoadError(path, _open_reason(e)) from e


def _guarded(path: Path, func, *args):
    """``func(*args)``, with whatever PyAV raises on damaged data as a :class:`VideoLoadError`."""
    import av

    try:
        return func(*args)
    except VideoLoadError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as e:
        raise VideoLoadError(path, f"cannot decode the video ({type(e).__name__}: {_one_line(e)})") from e


class _Index(NamedTuple):
    pts: np.ndarray        # presentation timestamps of the video's frames, sorted (presentation order)
    start: int             # the video stream's first timestamp (time 0 of the reported times)
    time_base: Fraction
    seekable: bool         # every packet has a timestamp: frames are matched by pts, seeking works
    fps: float


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoLoadError(path, "file not found")
    if not path.is_file():  # a folder named x.mp4, a FIFO (would block), a device
        raise VideoLoadError(path, "not a regular file")
    try:
        if path.stat().st_size == 0:
            raise VideoLoadError(path, "not a video: the file is empty (0 bytes)")
    except PermissionError as e:
        raise VideoLoadError(path, "permission denied") from e


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise VideoLoadError(path, f"video frames too large ({width}x{height} = {width * height:,} pixels; the limit "
                                   f"is {MAX_FRAME_PIXELS:,} pixels)")


def _open_reason(e: BaseException) -> str:
    import av

    if isinstance(e, av.error.InvalidDataError):
        return "not a video file, or truncated or corrupt (FFmpeg finds no valid container in it)"
    return f"cannot open as a video ({type(e).__name__}: {_one_line(e)})"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no details"


def _index(path: Path, container: "av.container.InputContainer", stream: "av.VideoStream") -> _Index:
    """Read every packet (no decoding): the video's frame timestamps, and whether the file is whole."""
    time_base = stream.time_base or Fraction(1, 1)
    pts, count, data_end, seekable = array("q"), 0, None, True  # 8 bytes a frame
    for packet in container.demux():
        if packet.size == 0 and packet.pts is None:  # the flush packet at the end of each stream
            continue
        if packet.is_corrupt:
            raise VideoLoadError(path, f"truncated or corrupt: a damaged packet{_at(packet)}")
        if packet.pts is not None and packet.time_base is not None:
            end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            data_end = end if data_end is None else max(data_end, end)
        if packet.stream.index != stream.index:
            continue
        count += 1
        if count > MAX_INDEXED_FRAMES:
            raise VideoLoadError(path, f"video too long: more than {MAX_INDEXED_FRAMES:,} frames")
        if packet.pts is None:
            seekable = False
        else:
            pts.append(packet.pts)
    if count == 0:
        raise VideoLoadError(path, "no video frames")
    declared = stream.frames
    if declared and count < declared:
        raise VideoLoadError(path, f"truncated: it holds {count} of the {declared} frames its header declares")
    if container.duration and data_end is not None:
        start = (container.start_time or 0) / 1e6
        duration = container.duration / 1e6
        if start + duration - data_end > max(0.25, 0.05 * duration):
            raise VideoLoadError(path, f"truncated: its data ends at {data_end - start:.2f} s of the "
                                       f"{duration:.2f} s its header declares")
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    if not seekable:  # timestamps unknown: frames are counted in decoding order, one pass, no seeking
        return _Index(np.arange(count, dtype=np.int64), 0, Fraction(1, 1), False, fps)
    order = np.sort(np.frombuffer(pts, dtype=np.int64))
    start = stream.start_time if stream.start_time is not None else int(order[0])
    return _Index(order, int(start), Fraction(time_base), True, fps)


def _at(packet: "av.Packet") -> str:
    return f" at {float(packet.pts * packet.time_base):.2f} s" if packet.pts is not None and packet.time_base else ""


def _decode_streaming(path: Path, container: "av.container.InputContainer", stream: "av.VideoStream",
                      index: _Index, targets: list[int]) -> Iterator[SampledFrame]:
    """One decoding pass from the start, stopping after the last target. A target frame that never comes out of
    the decoder (dropped) is served by the next one; running out of frames first is an error."""
    wanted = [int(index.pts[i]) for i in targets] if index.seekable else list(targets)
    k, decoded = 0, 0
    for frame in container.decode(stream):
        if index.seekable and frame.pts is None:  # cannot be placed among the timestamps
            continue
        key = frame.pts if index.seekable else decoded
        decoded += 1
        if key < wanted[k]:
            continue
        while k < len(wanted) and wanted[k] <= key:
            k += 1
        yield _sampled(path, frame, decoded - 1, index)
        if k == len(wanted):
            return
    raise VideoLoadError(path, f"truncated or corrupt: only {decoded} of its {len(index.pts)} frames could be "
                               f"decoded ({len(targets) - k} sampled frames missing)")


def _decode_by_seeking(path: Path, container: "av.container.InputContainer", stream: "av.VideoStream",
                       index: _Index, targets: list[int]) -> Iterator[SampledFrame]:
    """Each target: seek to the keyframe at or before it, decode up to it (the first frame at or after it)."""
    for target in targets:
        pts = int(index.pts[target])
        container.seek(pts, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= pts:
                yield _sampled(path, frame, target, index)
                break
        else:
            raise VideoLoadError(path, f"truncated or corrupt: the frame at {float((pts - index.start) * index.time_base):.2f} s "
                                       "could not be decoded")


def _sampled(path: Path, frame: "av.VideoFrame", target: int, index: _Index) -> SampledFrame:
    _check_size(path, frame.width, frame.height)
    if index.seekable and frame.pts is not None:
        time_s = float((frame.pts - index.start) * index.time_base)
        target = min(int(np.searchsorted(index.pts, frame.pts)), len(index.pts) - 1)
    else:
        time_s = target / index.fps
    image = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4  # the display matrix: counter-clockwise quarter turns
    if turns:
        image = np.ascontiguousarray(np.rot90(image, k=turns))
    return SampledFrame(target, time_s, image)
