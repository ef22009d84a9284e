"""Property-based fuzzing of the image loader: whatever the bytes, ``load_image`` returns an RGB uint8 array
or raises ``ImageLoadError`` naming the file, in bounded time. Any other exception, a hang (deadline) or a
crash of the interpreter is a bug.

Each test prints how many inputs it tried and how long it took (``pytest -s tests/test_fuzz.py``).
Set FUZZ_EXAMPLES to try more (e.g. ``FUZZ_EXAMPLES=5000``); the default keeps the file under ~20 s.
"""
from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from core.images import ImageLoadError, load_image

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "800"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=5000, database=None,
                         suppress_health_check=[HealthCheck.too_slow])

# Headers of the formats Pillow knows, so that random bytes get past identification into the decoders.
MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x10\x00\x00WEBPVP8 ", b"BM",
          b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x1cftypavif", b"\x00\x00\x00\x18ftypheic", b"P6\n4 4\n255\n"]
EXTENSIONS = [".jpg", ".png", ".gif", ".webp", ".bmp", ".tif", ".avif", ".heic", ".jpeg"]
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
           **({"AVIF": ".avif"} if features.check("avif") else {})}


def _writable(mode: str, fmt: str) -> bool:
    try:
        Image.new(mode, (2, 2)).save(io.BytesIO(), fmt)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


COMBOS = [(m, f) for m in MODES for f in FORMATS if _writable(m, f)]


def check(path: Path, counter: Counter) -> np.ndarray | None:
    """The loader's contract on one file: an RGB uint8 image, or an ImageLoadError naming the file."""
    counter["tried"] += 1
    try:
        image = load_image(path)
    except ImageLoadError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        counter["refused"] += 1
        return None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape) > 0
    counter["read"] += 1
    return image


def report(name: str, counter: Counter, seconds: float) -> None:
    print(f"\n{name}: {counter['tried']} inputs in {seconds:.1f}s "
          f"({counter['read']} read as images, {counter['refused']} refused with ImageLoadError)")


def test_random_bytes_are_read_or_refused_cleanly(tmp_path):
    counter: Counter = Counter()

    @FUZZ_SETTINGS
    @given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=4096), ext=st.sampled_from(EXTENSIONS))
    def case(magic: bytes, body: bytes, ext: str) -> None:
        path = tmp_path / f"fuzz{ext}"
        path.write_bytes(magic + body)
        check(path, counter)

    start = time.perf_counter()
    case()
    report("random bytes", counter, time.perf_counter() - start)
    assert counter["tried"] >= min(EXAMPLES, 100)


def test_random_images_and_damaged_images(tmp_path):
    counter: Counter = Counter()

    @FUZZ_SETTINGS
    @given(combo=st.sampled_from(COMBOS), width=st.integers(1, 80), height=st.integers(1, 80),
           quality=st.integers(1, 100), seed=st.integers(0, 2**16),
           damage=st.sampled_from(["none", "truncate", "flip", "zero_tail"]), where=st.floats(0.0, 1.0))
    def case(combo: tuple[str, str], width: int, height: int, quality: int, seed: int, damage: str,
             where: float) -> None:
        mode, fmt = combo
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        path = tmp_path / f"fuzz{FORMATS[fmt]}"
        image.save(path, fmt, quality=quality)
        data = bytearray(path.read_bytes())
        at = min(int(where * len(data)), len(data) - 1)
        if damage == "truncate":
            data = data[:at]
        elif damage == "flip":
            data[at] ^= 1 << int(rng.integers(8))
        elif damage == "zero_tail":
            data[at:] = bytes(len(data) - at)
        path.write_bytes(bytes(data))
        loaded = check(path, counter)
        if damage == "none":
            assert loaded is not None and loaded.shape == (height, width, 3), (mode, fmt)

    start = time.perf_counter()
    case()
    report("random images", counter, time.perf_counter() - start)
    assert counter["tried"] >= min(EXAMPLES, 100)
