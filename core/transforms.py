"""Image transforms (albumentations): training augmentations and the evaluation resize.

Every builder returns an ``A.Compose``: called as ``t(image=rgb_array)["image"]``, reseedable with
``t.set_random_seed``.

Training augmentations are applied to real and fake images alike. Their job is to remove shortcuts (JPEG
quality, file size, up-sampling blur, face size) so that the network must find the traces of synthesis.
"""
from __future__ import annotations

import io
from functools import partial

import albumentations as A
import cv2
import numpy as np
from PIL import Image


def eval_transform(size: int) -> A.Compose:
    """Resize the shorter side to ``size`` (area-averaging when shrinking) and centre-crop a square."""
    return A.Compose([
        A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
        A.CenterCrop(size, size),
    ])


def train_transform(size: int, strength: float = 1.0) -> A.Compose:
    """Random crop-resize, flip, blur/down-up-scale, noise, colour and JPEG re-compression.

    ``strength`` in [0, 1] scales the probabilities of the degradations (0: crop and flip only).
    """
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


def shortcut_free_eval_transform(size: int, jpeg_quality: int = 75) -> A.Compose:
    """The validation protocol: the evaluation resize, then one JPEG quality for both classes.

    Used to measure validation AUC, so that a model cannot score from the classes' different
    compression histories (the trap in ``gan_faces``).
    """
    return A.Compose([*eval_transform(size).transforms, A.Lambda(image=partial(jpeg_reencode, quality=jpeg_quality))])
