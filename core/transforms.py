"""Image transforms: the evaluation resize (OpenCV) and training augmentations (albumentations).

Every builder returns a transform called as ``t(image=rgb_array)["image"]`` and reseedable with
``t.set_random_seed`` (a no-op for the deterministic evaluation transforms).

The evaluation transforms (:func:`eval_transform`, :func:`shortcut_free_eval_transform`) are
:class:`EvalTransform`: the very OpenCV calls albumentations' ``SmallestMaxSize`` (bicubic, area when
shrinking) and ``CenterCrop`` make, without importing albumentations (2.5 s of start-up on this project's
CPU, more than the scoring of one image). ``tests/test_data.py`` checks that their pixels equal the
albumentations pipeline's (:meth:`EvalTransform.to_albumentations`); ``.transforms`` gives that pipeline's
steps, for callers that compose them with albumentations augmentations (``bench/robustness.py``).
albumentations itself is imported only by the builders that need it.

Training augmentations are applied to real and fake images alike. Their job is to remove shortcuts (JPEG
quality, file size, up-sampling blur, face size) so that the network must find the traces of synthesis.
"""
from __future__ import annotations

import io
from functools import partial
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import albumentations as A


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Scale ``[H, W, C]`` so that its shorter side is ``size``: bicubic, or area-averaging when shrinking.

    albumentations' ``SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC,
    area_for_downscale="image")``, step for step: scale ``size / min(H, W)``, sides rounded (at least 1),
    the image returned as it is when they do not change.
    """
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) == (height, width):
        return image
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    out = cv2.resize(np.ascontiguousarray(image), (new_width, new_height), interpolation=interpolation)
    if image.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel
        out = out[..., None]
    return out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size x size`` square of ``[H, W, C]`` (albumentations' ``CenterCrop``: offsets rounded down)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} out of a {height}x{width} image")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


class EvalTransform:
    """Resize the shorter side to ``size`` (area-averaging when shrinking), centre-crop a square and, with
    ``jpeg_quality``, re-encode it as JPEG (:func:`jpeg_reencode`). Deterministic; no albumentations."""

    def __init__(self, size: int, jpeg_quality: int | None = None):
        self.size = int(size)
        self.jpeg_quality = None if jpeg_quality is None else int(jpeg_quality)

    def __call__(self, *, image: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
        out = np.ascontiguousarray(center_crop(resize_shorter_side(image, self.size), self.size))
        if self.jpeg_quality is not None:
            out = jpeg_reencode(out, self.jpeg_quality)
        return {"image": out}

    def set_random_seed(self, seed: int | None) -> None:
        """Nothing to seed: the transform is deterministic (``core.dataset`` reseeds every transform)."""

    @property
    def transforms(self) -> list[Any]:
        """The same steps as albumentations transforms (imports albumentations)."""
        import albumentations as A

        steps = [A.SmallestMaxSize(max_size=self.size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
                 A.CenterCrop(self.size, self.size)]
        if self.jpeg_quality is not None:
            steps.append(A.Lambda(image=partial(jpeg_reencode, quality=self.jpeg_quality)))
        return steps

    def to_albumentations(self) -> "A.Compose":
        """This transform as the albumentations pipeline it reproduces (imports albumentations)."""
        import albumentations as A

        return A.Compose(self.transforms)

    def __repr__(self) -> str:
        jpeg = f", jpeg_quality={self.jpeg_quality}" if self.jpeg_quality is not None else ""
        return f"EvalTransform(size={self.size}{jpeg})"


def eval_transform(size: int) -> EvalTransform:
    """Resize the shorter side to ``size`` (area-averaging when shrinking) and centre-crop a square."""
    return EvalTransform(size)


def train_transform(size: int, strength: float = 1.0) -> "A.Compose":
    """Random crop-resize, flip, blur/down-up-scale, noise, colour and JPEG re-compression.

    ``strength`` in [0, 1] scales the probabilities of the degradations (0: crop and flip only).
    """
    import albumentations as A

    s = float(strength)
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), ratio=(0.85, 1.18),
                            interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
        A.HorizontalFlip(p=0.5),
        A.OneOf([
            A.GaussianBlur(sigma_limit=(0.2, 1.2), p=1.0),
            A.Downscale(scale_range=(0.5, 0.9), p=1.0),
        ], p=0.3 * s),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.15 * s),
        A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.3 * s),
        A.ImageCompression(quality_range=(50, 100), p=0.8 * s),
    ])


def jpeg_reencode(image: np.ndarray, quality: int, **_: object) -> np.ndarray:
    """Re-encode an RGB array as JPEG at ``quality`` (Pillow, 4:2:0), to put every image on one footing."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


def shortcut_free_eval_transform(size: int, jpeg_quality: int = 75) -> EvalTransform:
    """The validation protocol: the evaluation resize, then one JPEG quality for both classes.

    Used to measure validation AUC, so that a model cannot score from the classes' different
    compression histories (the trap in ``gan_faces``).
    """
    return EvalTransform(size, jpeg_quality)
