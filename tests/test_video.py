"""Videos: frames sampled evenly (PyAV), scored as images are, aggregated into one probability per video; bad
videos are one error line and a --fill row, like unreadable images. Every video is made here, with PyAV."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import infer
from core import video as video_module
from core.image_lists import read_image_list
from core.images import ImageLoadError
from core.video import VideoLoadError, iter_frames, read_frames, sample_indices
from experts import create_expert, load_ensemble, save_ensemble
from scoring.video import AGGREGATIONS, aggregate, score_video, topk_count

N_FRAMES, FPS, WIDTH, HEIGHT = 24, 24, 64, 48


def codec_for(suffix: str) -> str | None:
    """An encoder this PyAV build has for the container, or None."""
    choices = {".mp4": ["libx264", "mpeg4"], ".mkv": ["libx264", "mpeg4"], ".avi": ["mpeg4"],
               ".mov": ["libx264", "mpeg4"], ".webm": ["libvpx-vp9", "libvpx"]}[suffix]
    return next((c for c in choices if c in av.codecs_available), None)


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS, faststart: bool = False,
                rotation: int | None = None) -> Path:
    codec = codec_for(path.suffix)
    if codec is None:
        pytest.skip(f"this PyAV build has no encoder for {path.suffix}")
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def solid_frames(n: int = N_FRAMES) -> list[np.ndarray]:
    """Frame k is a solid grey of value 10 k: which frames were sampled can be read off their pixels."""
    return [np.full((HEIGHT, WIDTH, 3), 10 * k, np.uint8) for k in range(n)]


def moving_frames(n: int = N_FRAMES, seed: int = 0) -> list[np.ndarray]:
    """Random texture sliding to the right, with a bright square moving down: frames the model tells apart."""
    base = np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = []
    for k in range(n):
        frame = np.roll(base, 2 * k, axis=1).copy()
        frame[k: k + 12, 20:32] = 255
        frames.append(frame)
    return frames


def grey_level(image: np.ndarray) -> int:
    return int(round(float(image.mean()) / 10))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    experts = {"eff": create_expert("test_efficientnet"), "clip": create_expert("test_clip")}
    return save_ensemble(experts, tmp_path_factory.mktemp("w") / "weights")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", moving_frames())


def run_infer(capsys, *args: str) -> tuple[int, list[str], str]:
    code = infer.main([*map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


# ----------------------------------------------------------------------------------------------- sampling
def test_sample_indices_are_the_centres_of_equal_parts():
    assert sample_indices(24, 4) == [3, 9, 15, 21]
    assert sample_indices(24, 1) == [12]
    assert sample_indices(5, 4) == [0, 1, 3, 4]
    assert sample_indices(3, 16) == [0, 1, 2]  # fewer frames than asked: all of them
    assert sample_indices(1000, 16) == sorted(set(sample_indices(1000, 16)))
    with pytest.raises(ValueError):
        sample_indices(10, 0)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi", ".mkv"])
def test_frames_are_sampled_evenly_and_decoded_as_they_were_written(tmp_path, suffix):
    path = write_video(tmp_path / f"solid{suffix}", solid_frames())
    sampled = list(iter_frames(path, 4))
    assert [f.index for f in sampled] == [3, 9, 15, 21]
    assert [grey_level(f.image) for f in sampled] == [3, 9, 15, 21]  # the pixels are those frames'
    assert [f.time_s for f in sampled] == pytest.approx([k / FPS for k in (3, 9, 15, 21)], abs=2e-3)
    assert all(f.image.shape == (HEIGHT, WIDTH, 3) and f.image.dtype == np.uint8 for f in sampled)
    frames, times = read_frames(path, 100)  # more than the video has: every frame, once
    assert [grey_level(f) for f in frames] == list(range(N_FRAMES))
    assert times == sorted(times) and len(times) == N_FRAMES


def test_seeking_gives_the_frames_a_streaming_pass_gives(tmp_path, monkeypatch):
    """Long videos are reached by seeking to the keyframe before each target: the same frames, the same pixels."""
    path = write_video(tmp_path / "moving.mp4", moving_frames(48))
    streamed = list(iter_frames(path, 5))
    monkeypatch.setattr(video_module, "SEEK_GAP", 1)
    sought = list(iter_frames(path, 5))
    assert [f.index for f in sought] == [f.index for f in streamed] == [4, 14, 24, 33, 43]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(sought, streamed))


def test_display_rotation_is_applied(tmp_path):
    """A phone video stored landscape with a rotation in its display matrix is seen upright, as EXIF is for photos."""
    frames = solid_frames(4)
    path = write_video(tmp_path / "portrait.mp4", frames, rotation=-90)
    images, _ = read_frames(path, 2)
    assert images[0].shape == (WIDTH, HEIGHT, 3)


# -------------------------------------------------------------------------------------------------- scoring
def test_video_probability_aggregates_frames_scored_exactly_as_images(weights, clip, tmp_path, capsys):
    """Same pixels in, same numbers out: the sampled frames written as PNGs and scored as images give the
    frame probabilities, and the video's is their mean (default), max or top-quarter mean."""
    frames, _ = read_frames(clip, 6)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(pngs / f"{k}.png")
    code, lines, _ = run_infer(capsys, *sorted(pngs.glob("*.png")), "--weights", weights, "--per-expert")
    assert code == 0
    as_images = np.array([[float(v) for v in (line.split("\t")[0], *line.split("\t")[3:])] for line in lines])

    for agg in AGGREGATIONS:
        code, lines, err = run_infer(capsys, clip, "--weights", weights, "--frames", 6, "--per-frame", "--per-expert",
                                     "--video-agg", agg)
        assert code == 0, err
        fields = [line.split("\t") for line in lines]
        assert [f[2] for f in fields] == [str(clip)] + [f"{clip}#frame={k}" for k in (2, 6, 10, 14, 18, 22)]
        video, per_frame = fields[0], np.array([[float(v) for v in (f[0], *f[3:])] for f in fields[1:]])
        np.testing.assert_allclose(per_frame, as_images, atol=1e-5)
        expected = {"mean": per_frame[:, 0].mean(), "max": per_frame[:, 0].max(),
                    "topk": np.sort(per_frame[:, 0])[-2:].mean()}[agg]  # topk of 6 frames: the top ceil(6/4) = 2
        assert float(video[0]) == pytest.approx(expected, abs=2e-6)
        assert video[1] == ("fake" if float(video[0]) >= 0.5 else "real")
        assert [f[1] for f in fields[1:]] == ["fake" if p >= 0.5 else "real" for p in per_frame[:, 0]]


def test_score_video_as_a_library_function(weights, clip):
    ensemble = load_ensemble(weights, "cpu")
    result = score_video(ensemble, clip, frames=8, batch_size=3, agg="topk")  # batches of 3, 3 and 2 frames
    assert list(result.frame_indices) == sample_indices(N_FRAMES, 8) and not result.error
    assert result.frame_expert_probs.shape == (8, 2) and len(result.frame_times) == 8
    assert result.prob == pytest.approx(np.sort(result.frame_probs)[-topk_count(8):].mean())
    np.testing.assert_allclose(result.frame_probs, ensemble.combine(torch.from_numpy(result.frame_expert_probs)))
    one_batch = score_video(ensemble, clip, frames=8, batch_size=32, agg="topk")
    np.testing.assert_allclose(one_batch.frame_probs, result.frame_probs, atol=1e-6)
    with pytest.raises(ValueError, match="unknown video aggregation"):
        score_video(ensemble, clip, agg="median")
    with pytest.raises(VideoLoadError) as info:
        score_video(ensemble, Path(clip).with_name("missing.mp4"))
    assert isinstance(info.value, ImageLoadError) and info.value.reason == "file not found"


def test_aggregations():
    probs = np.array([0.1, 0.9, 0.3, 0.7, 0.5])
    assert aggregate(probs, "mean") == pytest.approx(0.5)
    assert aggregate(probs, "max") == pytest.approx(0.9)
    assert aggregate(probs, "topk") == pytest.approx(0.8)  # the top ceil(5/4) = 2: 0.9 and 0.7
    assert [topk_count(n) for n in (1, 4, 5, 16, 17)] == [1, 1, 2, 4, 5]
    assert aggregate(np.stack([probs, 1 - probs], axis=1), "max").tolist() == pytest.approx([0.9, 0.9])
    assert infer.VIDEO_AGGREGATIONS == AGGREGATIONS


def test_more_frames_asked_than_the_video_has(weights, tmp_path, capsys):
    short = write_video(tmp_path / "short.mp4", moving_frames(5))
    code, lines, _ = run_infer(capsys, short, "--weights", weights, "--frames", 100, "--per-frame")
    assert code == 0
    assert [line.split("\t")[2] for line in lines[1:]] == [f"{short}#frame={k}" for k in range(5)]


# ---------------------------------------------------------------------------------------------- bad videos
def truncated(source: Path, fraction: float = 0.6):
    return lambda path: path.write_bytes(source.read_bytes()[: int(source.stat().st_size * fraction)])


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of bad videos, and each one's name -> what its error's reason says."""
    root = tmp_path_factory.mktemp("bad")
    good = write_video(root / "good.mp4", moving_frames(48))
    faststart = write_video(root / "faststart.mp4", moving_frames(48), faststart=True)
    folder = root / "videos"
    folder.mkdir()
    made = {
        "cut.mp4": (truncated(good), "not a video file, or truncated or corrupt"),  # its index (moov) is at the end
        "cut_faststart.mp4": (truncated(faststart), "truncated"),  # index first, data cut
        "noise.mp4": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a video file"),
        "empty.mp4": (lambda p: p.write_bytes(b""), "the file is empty"),
        "text.mov": (lambda p: p.write_text("not a video\n"), "not a video file"),
    }
    if codec_for(".webm"):
        webm = write_video(root / "good.webm", moving_frames(48))
        made["cut.webm"] = (truncated(webm, 0.5), "truncated: its data ends at")
    if "aac" in av.codecs_available:
        def audio_only(path: Path) -> None:
            with av.open(str(path), "w") as container:
                stream = container.add_stream("aac", rate=16000)
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
                for packet in [*stream.encode(frame), *stream.encode()]:
                    container.mux(packet)
        made["audio.m4v"] = (audio_only, "no video stream")
    for name, (make, _) in made.items():
        make(folder / name)
    return folder, {name: reason for name, (_, reason) in made.items()}


def test_each_bad_video_is_refused_naming_it(bad_videos):
    folder, reasons = bad_videos
    for name, reason in reasons.items():
        with pytest.raises(VideoLoadError) as info:
            read_frames(folder / name, 4)
        message = str(info.value)
        assert message.startswith(f"{folder / name}: ") and reason in message and "\n" not in message, message


def test_bad_videos_get_an_error_line_and_a_fill_row_in_input_order(weights, bad_videos, tmp_path, capsys):
    """A folder of images, a good video and every bad one: one error line per bad video, the others scored,
    every input a row, in input order (the bad ones with --fill), exit status 1."""
    folder, reasons = bad_videos
    bad = sorted(reasons)
    write_video(folder / "b_good.mp4", moving_frames(12))
    Image.fromarray(moving_frames(1)[0]).save(folder / "a_image.png")
    Image.fromarray(moving_frames(1, seed=1)[0]).save(folder / "z_image.jpg")
    out = tmp_path / "sub.csv"
    code, _, err = run_infer(capsys, folder, "--weights", weights, "--submission", out, "--frames", 4,
                             "--frame-scores", tmp_path / "frames.csv")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad)
    for name in bad:
        [line] = [e for e in errors if e.startswith(f"error: {folder / name}: ")]
        assert reasons[name] in line
    assert "Traceback" not in err and f"{len(bad)} of {len(bad) + 3} files could not be scored" in err
    df = pd.read_csv(out)
    assert list(df["img_name"]) == sorted(["a_image.png", "b_good.mp4", "z_image.jpg", *bad])
    assert (df.set_index("img_name").loc[bad, "y_pred"] == 0.5).all()
    scored = df[~df["img_name"].isin(bad)]
    assert scored["y_pred"].between(0, 1).all() and not (scored["y_pred"] == 0.5).any()
    frames = pd.read_csv(tmp_path / "frames.csv")
    assert list(frames.columns) == ["img_name", "frame", "time_s", "y_pred"]
    assert list(frames["img_name"]) == ["b_good.mp4"] * 4 and list(frames["frame"]) == sample_indices(12, 4)
    video = df.set_index("img_name").loc["b_good.mp4", "y_pred"]
    assert video == pytest.approx(frames["y_pred"].mean(), abs=2e-6)

    # printed: the same error lines, the good inputs' lines in input order, exit status 1
    code, lines, err = run_infer(capsys, folder, "--weights", weights, "--frames", 4)
    assert code == 1 and len([line for line in err.splitlines() if line.startswith("error: ")]) == len(bad)
    assert [line.split("\t")[2] for line in lines] == ["a_image.png", "b_good.mp4", "z_image.jpg"]


def test_frames_too_large_are_refused_before_decoding(clip, monkeypatch):
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", WIDTH * HEIGHT - 1)
    with pytest.raises(VideoLoadError, match=r"video frames too large \(64x48 = 3,072 pixels"):
        read_frames(clip, 4)


# ----------------------------------------------------------------------------------------- lists, options
def test_folders_and_globs_list_videos_only_when_asked(clip):
    folder = Path(clip).parent
    assert read_image_list(folder, videos=True)["img_name"].tolist() == ["clip.mp4"]
    assert read_image_list(str(folder / "*.mp4"), videos=True)["img_name"].tolist() == [str(clip)]
    with pytest.raises(Exception, match="holds no image files"):  # the image-only readers are unchanged
        read_image_list(folder)


def test_per_frame_with_a_submission_points_to_frame_scores(weights, clip, tmp_path, capsys):
    code, _, err = run_infer(capsys, clip, "--weights", weights, "--submission", tmp_path / "s.csv", "--per-frame")
    assert code == 2 and "--frame-scores" in err
    code, _, err = run_infer(capsys, clip, "--weights", weights, "--frames", 0)
    assert code == 2 and "--frames must be at least 1" in err


def test_crop_faces_on_a_video_without_faces_scores_centre_squares(weights, clip, capsys):
    pytest.importorskip("yuface")
    code, lines, err = run_infer(capsys, clip, "--weights", weights, "--frames", 3, "--crop-faces")
    assert code == 0 and len(lines) == 1 and 0 <= float(lines[0].split("\t")[0]) <= 1
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {clip}: frames 4, 12, 20: no face found in a 64x48 image; using the centre square"]
    assert not math.isnan(float(lines[0].split("\t")[0]))


def test_a_killed_run_with_videos_resumes(weights, tmp_path, capsys, monkeypatch):
    """Interrupted at the second video, then --resume: every row, and the frame rows of both runs, once each."""
    import scoring.video

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        write_video(folder / f"{k}.mp4", moving_frames(8, seed=k))
    real, calls = scoring.video.score_video, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out, frames = tmp_path / "sub.csv", tmp_path / "frames.csv"
    command = [folder, "--weights", weights, "--frames", 2, "--submission", out, "--frame-scores", frames]
    monkeypatch.setattr(scoring.video, "score_video", interrupted)
    assert run_infer(capsys, *command)[0] == 130 and not out.exists()
    monkeypatch.setattr(scoring.video, "score_video", real)
    assert run_infer(capsys, *command, "--resume")[0] == 0
    assert pd.read_csv(out)["img_name"].tolist() == ["0.mp4", "1.mp4", "2.mp4"]
    rows = pd.read_csv(frames)
    assert list(zip(rows["img_name"], rows["frame"])) == [(f"{k}.mp4", i) for k in range(3) for i in (2, 6)]
