"""Face cropping: find the largest face and cut a centred, margin-expanded square around it.

    python data_prep/faces.py ../shared/data/gan_faces/labels.csv --out runs/gan_crops --size 512
    python data_prep/faces.py photos/ --out runs/photo_crops --margin 0.3 --size 512

The detectors were trained on face crops (DFDC crops, FFHQ-aligned faces); a full photo in which the face is
a small part must be cropped the same way before scoring, or the network sees mostly background. Detection
is YuNet (libfacedetection, BSD) through the PyPI package ``yuface``: a small CPU model, milliseconds per
image. :func:`crop_face` is what ``infer.py --crop-faces`` calls. ``yuface`` has wheels only for CPython
3.10/3.11 on Linux x86-64 and Windows; elsewhere this module imports, and detection raises ImportError.

When no face is found, the crop falls back to the centre square of the whole image: ``found`` is ``False``
and a ``NoFaceWarning`` is issued (``warn=False`` silences it, for callers that count fallbacks instead).
The square never leaves the image: near a border it is shifted inwards, and it is shrunk to the shorter
image side when it would not fit, so that no padding (an artificial edge) ever enters the crop.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python data_prep/faces.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from data_prep.images import ImageLoadError, is_image_file, load_image
from data_prep.labels import LabelsError, read_labels

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


# ----------------------------------------------------------------------------------------------------------
# Image lists (shared with sd_augment.py) and the command line


def read_image_list(source: str | Path) -> pd.DataFrame:
    """A labels CSV (every column kept, see :func:`read_labels`) or a folder (searched recursively).

    The frame has at least ``img_name, path, group``; for a folder ``img_name`` (and ``group``) is the path
    relative to it.
    """
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        if not found:
            raise LabelsError(f"{source}: folder holds no image files")
        names = [p.relative_to(path).as_posix() for p in found]
        return pd.DataFrame({"img_name": names, "path": [str(p.resolve()) for p in found], "group": names})
    if path.suffix.lower() == ".csv":
        return read_labels(path, require_target=False)
    raise LabelsError(f"{source}: not a folder or a .csv list of images")


def write_image_atomic(image_rgb: np.ndarray, path: Path, **save_kwargs) -> None:
    """Write an image through a temporary file and a rename: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(image_rgb).save(tmp, format=Image.registered_extensions()[path.suffix.lower()],
                                        **save_kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def crop_name(img_name: str, ext: str) -> str:
    """The output name: the input's relative name with the new extension (``images/a.jpg`` -> ``images/a.png``)."""
    return Path(img_name).with_suffix(ext).as_posix()


def crop_images(source: str | Path, out_dir: str | Path, size: int = DEFAULT_SIZE, margin: float = DEFAULT_MARGIN,
                conf: float = DEFAULT_CONF, ext: str = ".png", progress: bool = True) -> tuple[Path, int, int, int]:
    """Crop every image of a CSV or folder into ``out_dir`` and write ``out_dir/labels.csv``.

    The labels keep every input column (target, group, source...) and add ``origin`` (the input name),
    ``face_found`` and ``crop_box``. Crops that already exist are kept (re-running resumes); each is
    written atomically. Returns ``(labels_path, n_written, n_without_face, n_failed)``.
    """
    df = read_image_list(source)
    out_dir = Path(out_dir)
    names = [crop_name(n, ext) for n in df["img_name"]]
    clash = pd.Series(names).duplicated()
    if clash.any():
        raise LabelsError(f"{source}: two images map to the output name {names[int(clash.idxmax())]!r}")
    rows, no_face, failed = [], 0, 0
    for name, (_, row) in tqdm(zip(names, df.iterrows()), total=len(df), desc="crop faces", disable=not progress):
        out = out_dir / name
        found, box = _crop_one(row["path"], out, size, margin, conf)
        if found is None:
            failed += 1
            continue
        no_face += not found
        rows.append({**{k: v for k, v in row.items() if k != "path"}, "img_name": name,
                     "origin": row["img_name"], "face_found": int(found), "crop_box": box})
    labels = write_csv_atomic(pd.DataFrame(rows), out_dir / "labels.csv")
    return labels, len(rows), no_face, failed


def _crop_one(src: str, out: Path, size: int, margin: float, conf: float) -> tuple[bool | None, str]:
    """Crop one file, or re-detect only (no write) when its crop exists; ``found=None`` if unreadable."""
    try:
        image = load_image(src)
    except ImageLoadError as e:
        tqdm.write(f"error: {e}", file=sys.stderr)
        return None, ""
    crop, found, box = crop_face(image, size, margin, conf, warn=False)
    if not out.exists():
        write_image_atomic(crop, out, **({"quality": 95} if out.suffix == ".jpg" else {}))
    return found, " ".join(map(str, box))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a labels CSV (img_name relative to it) or a folder of images")
    p.add_argument("--out", required=True, help="output folder: crops under their input names, plus labels.csv")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="output side in pixels (default: %(default)s)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="added on every side, as a fraction of the face's longer side (default: %(default)s)")
    p.add_argument("--conf", type=float, default=DEFAULT_CONF, help="detector score threshold (default: %(default)s)")
    p.add_argument("--format", choices=["png", "jpg"], default="png",
                   help="png (default) adds no compression of its own; jpg is smaller")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        labels, n, no_face, failed = crop_images(args.source, args.out, args.size, args.margin, args.conf,
                                                 ext=f".{args.format}", progress=not args.quiet)
    except (LabelsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} crops ({no_face} without a face: centre square used); labels written to {labels}", file=sys.stderr)
    if failed:
        print(f"{failed} images could not be read (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
