"""Loading images from disk as RGB arrays, with one clear error per unreadable file.

Every stage (training, clustering, scoring) reads images through :func:`load_image`, so that they all see
the same pixels: EXIF orientation applied, first frame of animations, any mode converted to 8-bit RGB.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Refuse images with more pixels than this (decompression bombs); 16k x 16k is far beyond any photo.
MAX_PIXELS = 16384 * 16384


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
        ImageLoadError: the file is missing, not a file, unreadable, not an image, truncated or too big.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageLoadError(path, f"image too large ({img.width}x{img.height} pixels)")
                img.seek(0)
                img = ImageOps.exif_transpose(img)
                return np.asarray(_to_rgb(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (or a format Pillow cannot read)") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(path, f"cannot decode image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit is scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
