"""Face cropping: find the largest face and cut a centred, margin-expanded square around it.

The detectors were trained on face crops (DFDC crops, FFHQ-aligned faces); a full photo in which the face is
a small part must be cropped the same way before scoring, or the network sees mostly background. Detection
is YuNet (libfacedetection, BSD) through the PyPI package ``yuface``: a small CPU model, milliseconds per
image. :func:`crop_face` is what ``infer.py --crop-faces`` and ``python data_prep/faces.py`` (crops of a whole
set) call. ``yuface`` has wheels only for CPython
3.10/3.11 on Linux x86-64 and Windows; elsewhere this module imports, and detection raises ImportError.

When no face is found, the crop falls back to the centre square of the whole image: ``found`` is ``False``
and a ``NoFaceWarning`` is issued (``warn=False`` silences it, for callers that count fallbacks instead).
The square never leaves the image: near a border it is shifted inwards, and it is shrunk to the shorter
image side when it would not fit, so that no padding (an artificial edge) ever enters the crop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

DEFAULT_SIZE = 512      # the input size the original expert models were trained at
DEFAULT_MARGIN = 0.3    # added on every side, as a fraction of the face box's longer side
DEFAULT_CONF = 0.5      # YuNet score threshold (its scores are in [0, 1])
DETECT_MAX_SIDE = 640   # YuNet degrades above ~960 px (the package warns); faces stay large enough at 640

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


class NoFaceWarning(UserWarning):
    """No face was found; the centre square of the whole image was used instead."""


@dataclass(frozen=True)
class Face:
    """A detected face: ``box`` is ``(x, y, w, h)`` in input pixels (may reach past the borders)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # [5, 2] x, y: right eye, left eye, nose tip, right and left mouth corners

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


def has_detector() -> bool:
    """Whether ``yuface`` is installed (its wheels: CPython <= 3.11 on Linux x86-64 and Windows AMD64)."""
    try:
        _detector()
    except ImportError:
        return False
    return True


def _detector():
    """Import yuface on first use, so that modules importing this one work without it."""
    try:
        import yuface
    except ImportError:
        raise ImportError("face detection needs the `yuface` package (pip install yuface; wheels exist for "
                          "CPython 3.10/3.11 on Linux x86-64 and Windows only)") from None
    return yuface


def _check_rgb(image_rgb: np.ndarray) -> None:
    if not (isinstance(image_rgb, np.ndarray) and image_rgb.ndim == 3 and image_rgb.shape[2] == 3
            and image_rgb.dtype == np.uint8):
        shape = getattr(image_rgb, "shape", None)
        dtype = getattr(image_rgb, "dtype", type(image_rgb).__name__)
        raise ValueError(f"expected an [H, W, 3] uint8 RGB array, got shape {shape} and dtype {dtype}")


def detect_faces(image_rgb: np.ndarray, conf: float = DEFAULT_CONF, max_side: int = DETECT_MAX_SIDE) -> list[Face]:
    """All faces YuNet finds with a score of at least ``conf``, in the input's pixel coordinates.

    Large images are shrunk to ``max_side`` for detection (YuNet is trained on small inputs and slows
    down with size); boxes are scaled back.
    """
    _check_rgb(image_rgb)
    h, w = image_rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = image_rgb if scale == 1.0 else cv2.resize(
        image_rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    scores, boxes, landmarks = _detector().detect(bgr, conf=conf)
    return [Face(box=tuple(float(v) / scale for v in box), score=float(s) / 100.0,
                 landmarks=np.asarray(lm, dtype=np.float32).reshape(5, 2) / scale)
            for s, box, lm in zip(scores, boxes, landmarks)]


def largest_face(image_rgb: np.ndarray, conf: float = DEFAULT_CONF) -> Face | None:
    """The face with the largest box (the subject, not a bystander), or ``None``."""
    faces = detect_faces(image_rgb, conf)
    return max(faces, key=lambda f: (f.area, f.score)) if faces else None


def square_around(box: Sequence[float], width: int, height: int, margin: float = DEFAULT_MARGIN) -> Box:
    """The square around ``box`` (``x, y, w, h``), ``margin`` x its longer side added on every side.

    Clamped to the image: shifted inwards at a border and shrunk to the shorter image side if needed, so
    the face stays as centred as the image allows and nothing outside the image is ever needed.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x, y, bw, bh = (float(v) for v in box)
    side = int(round(min(max(bw, bh) * (1 + 2 * margin), width, height)))
    side = max(1, side)
    cx, cy = x + bw / 2, y + bh / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return x0, y0, x0 + side, y0 + side


def centre_square(width: int, height: int) -> Box:
    """The largest centred square of the image: the fallback crop when no face is found."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def resize_square(image_rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize a square crop to ``size``: area-averaging when shrinking, bicubic when enlarging (as eval)."""
    if image_rgb.shape[0] == size and image_rgb.shape[1] == size:
        return image_rgb
    shrink = image_rgb.shape[0] > size
    return cv2.resize(image_rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def crop_face(image_rgb: np.ndarray, size: int = DEFAULT_SIZE, margin: float = DEFAULT_MARGIN,
              conf: float = DEFAULT_CONF, warn: bool = True) -> tuple[np.ndarray, bool, Box]:
    """A ``[size, size, 3]`` uint8 crop centred on the largest face, with ``margin`` around it.

    Returns:
        ``(crop, found, box)``: ``found`` is ``False`` when no face was detected, in which case the crop is
        the centre square of the whole image and a :class:`NoFaceWarning` is issued unless ``warn=False``.
        ``box`` is the square that was cut, ``(x0, y0, x1, y1)`` in input pixels.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    _check_rgb(image_rgb)
    h, w = image_rgb.shape[:2]
    face = largest_face(image_rgb, conf)
    if face is None:
        if warn:
            warnings.warn(f"no face found in a {w}x{h} image; using the centre square", NoFaceWarning, stacklevel=2)
        box = centre_square(w, h)
    else:
        box = square_around(face.box, w, h, margin)
    x0, y0, x1, y1 = box
    return resize_square(image_rgb[y0:y1, x0:x1], size), face is not None, box
