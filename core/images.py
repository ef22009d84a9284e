"""Loading images from disk as RGB arrays, with one clear error per unreadable file.

Every stage (training, clustering, scoring) reads images through :func:`load_image`, so that they all see
the same pixels: EXIF orientation applied, first frame of animations, any mode converted to 8-bit RGB.

Files come from users and the internet, so the loader assumes nothing: whatever goes wrong while opening
or decoding one (empty, truncated, not an image, a decompression bomb, a format Pillow lacks, a decoder
bug on malformed data) becomes an :class:`ImageLoadError` naming the file, and the caller moves on to the
next image.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF photos (iPhones) when the optional plugin is installed; Pillow itself reads AVIF.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:
    pass

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".avif", ".heic", ".heif"})
# Refuse images with more pixels than this before decoding any (decompression bombs): 144 megapixels is
# above any camera photo (a 108 MP phone shot is 12000x9000) and decodes in about 0.5 GB.
MAX_PIXELS = 12_000 * 12_000


class ImageLoadError(OSError):
    """An image that cannot be used; ``str(err)`` is one line naming the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``[H, W, 3]`` uint8 RGB array.

    Raises:
        ImageLoadError: the file is missing, not a regular file, unreadable, empty, not an image (or in a
            format this Pillow cannot read), truncated, corrupt or too big. The original exception, if
            any, is kept as ``__cause__`` (``infer.py --debug`` prints it).
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():  # a folder named x.jpg, a FIFO (would block), a device
        raise ImageLoadError(path, "not a regular file")
    return _decode(path, path, lambda: path.stat().st_size)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """:func:`load_image` for a file's bytes already in memory (an upload), named ``name`` in errors.

    The same checks, messages and pixels as :func:`load_image` on a file holding ``data``.
    """
    return _decode(Path(name), io.BytesIO(data), lambda: len(data))


def _decode(path: Path, source: Path | io.BytesIO, size: Callable[[], int]) -> np.ndarray:
    """Decode ``source`` (a file, or bytes in memory) as RGB; errors name ``path``."""
    try:
        if size() == 0:
            raise ImageLoadError(path, "not an image: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns above its own pixel limit (89 MP; ours is MAX_PIXELS, checked below) and about
            # odd metadata ("Corrupt EXIF data"): lines that name no file, for images that decode fine.
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageLoadError(path, _too_large(f"{width}x{height} = {width * height:,} pixels"))
                img.seek(0)
                img = ImageOps.exif_transpose(img)
                return np.asarray(_to_rgb(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, _unidentified_reason(path)) from e
    except PermissionError as e:
        raise ImageLoadError(path, "permission denied") from e
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\d+", str(e))  # "Image size (N pixels) exceeds limit of ..."
        raise ImageLoadError(path, _too_large(f"{int(pixels[0]):,} pixels" if pixels else "size unknown")) from e
    except Exception as e:  # noqa: BLE001  Pillow's decoders raise many types on malformed data
        raise ImageLoadError(path, f"cannot decode image ({type(e).__name__}: {_one_line(e)})") from e


def _too_large(size: str) -> str:
    return f"image too large ({size}; the limit is {MAX_PIXELS:,} pixels), refused as a possible decompression bomb"


def _unidentified_reason(path: Path) -> str:
    if path.suffix.lower() in (".heic", ".heif"):
        return "HEIC/HEIF images need the pillow-heif package (pip install pillow-heif)"
    if path.suffix.lower() == ".avif":
        return "not an AVIF image, or this Pillow was built without AVIF support"
    return "not an image file (or a format Pillow cannot read)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no details"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit is scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
