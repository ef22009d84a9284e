"""Forgery-making edits: turn a real image into a labelled fake, with a mask of what was changed.

Each edit takes an RGB uint8 array ``[H, W, 3]`` and a ``numpy.random.Generator`` and returns an
:class:`Edited`, which unpacks as ``(image, mask)``: the edited image (same shape, uint8) and a uint8
``[H, W]`` mask, 255 where the image was manipulated, 0 where it was left untouched, and in between on the
soft (feathered) border of a blended region. Pixels where the mask is 0 are exactly the input's. The
parameters an edit drew are in ``Edited.params`` (JSON-ready), so a labels file can say what was done.

Why: detectors trained only on the fakes of a few generators learn those generators. Fakes made from real
images by generic manipulations (blending boundaries, spliced regions, inpainting, resampling and double
compression traces) teach the traces shared by many forgeries; Self-Blended Images (Shiohara & Yamasaki,
CVPR 2022) showed this for face swaps. Everything here is written from the papers' ideas.

Content-preserving augmentations (crop, flip, blur, noise, JPEG) are not edits: they keep the label and
live in :func:`core.transforms.train_transform`, applied at training time to real and fake alike.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import albumentations as A
import cv2
import numpy as np

from core.transforms import jpeg_reencode


class Edited(tuple):
    """``(image, mask)``, unpackable as a pair, plus ``params``: what the edit drew, for the labels file."""

    params: dict[str, Any]

    def __new__(cls, image: np.ndarray, mask: np.ndarray, params: dict[str, Any]) -> "Edited":
        self = super().__new__(cls, (image, mask))
        self.params = {k: _plain(v) for k, v in params.items()}
        return self

    @property
    def image(self) -> np.ndarray:
        return self[0]

    @property
    def mask(self) -> np.ndarray:
        return self[1]


# ---------------------------------------------------------------------------------------------- masks
def region_mask(shape: tuple[int, int], rng: np.random.Generator, area: tuple[float, float] = (0.04, 0.2),
                kind: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A binary uint8 mask (0/255) of one random region covering about ``area`` of the image.

    ``kind`` is ``"rect"``, ``"ellipse"`` or ``"polygon"`` (a star-shaped blob); drawn when None. Real
    forgeries come in all these shapes, so a detector should not learn one boundary shape.
    """
    h, w = shape
    kind = kind or str(rng.choice(["rect", "ellipse", "polygon"]))
    frac = rng.uniform(*area)
    aspect = rng.uniform(0.6, 1.6)
    # half-sizes for an ellipse of the wanted area, clipped so the region fits inside the image
    rx = min(np.sqrt(frac * h * w / (np.pi * aspect)), (w - 2) / 2)
    ry = min(rx * aspect, (h - 2) / 2)
    rx, ry = max(rx, 1.0), max(ry, 1.0)
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    mask = np.zeros((h, w), np.uint8)
    if kind == "rect":
        # a rectangle of the same area as the ellipse: half-sides scaled by sqrt(pi)/2
        hx, hy = rx * np.sqrt(np.pi) / 2, ry * np.sqrt(np.pi) / 2
        cv2.rectangle(mask, (int(round(cx - hx)), int(round(cy - hy))), (int(round(cx + hx)), int(round(cy + hy))),
                      255, thickness=-1)
    elif kind == "ellipse":
        angle = rng.uniform(0, 180)
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (int(round(rx)), int(round(ry))), angle, 0, 360, 255, -1)
    elif kind == "polygon":
        n = int(rng.integers(6, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.6, 1.15, n)
        points = np.stack([cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255)
    else:
        raise ValueError(f"unknown region kind {kind!r}; expected rect, ellipse or polygon")
    if not mask.any():  # a region too small to rasterise: take the centre pixel
        mask[int(cy), int(cx)] = 255
    return mask, {"region": kind, "area": float(mask.mean() / 255), "center": [round(cx, 1), round(cy, 1)]}


def face_mask(shape: tuple[int, int], rng: np.random.Generator,
              landmarks: np.ndarray | None = None) -> np.ndarray:
    """A binary uint8 mask of the face region: the convex hull of ``landmarks`` (``[N, 2]`` x, y) if given.

    Without landmarks, a jittered ellipse near the centre, which is where the face is in a face crop
    (``dfdc_faces``, ``gan_faces``): the hull of points on it with random radii, as in SBI's hull masks.
    """
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    if landmarks is not None:
        points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            raise ValueError(f"landmarks: need at least 3 points, got {len(points)}")
    else:
        cx, cy = w * rng.uniform(0.45, 0.55), h * rng.uniform(0.47, 0.57)
        rx, ry = w * rng.uniform(0.24, 0.34), h * rng.uniform(0.30, 0.42)
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False) + rng.uniform(0, 2 * np.pi / 16)
        radii = rng.uniform(0.85, 1.1, len(angles))
        points = np.stack([cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)], axis=1)
    hull = cv2.convexHull(np.round(points).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255)
    return mask


def feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a binary mask into a soft uint8 one; a hard edge would be an easy, unrealistic tell."""
    if sigma <= 0:
        return mask.copy()
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_CONSTANT)


def _feather_sigma(mask: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] = (0.03, 0.1)) -> float:
    """A blur width proportional to the region's size, so small and large regions look alike."""
    return float(rng.uniform(*scale) * np.sqrt(max(np.count_nonzero(mask), 1)))


def blend(base: np.ndarray, overlay: np.ndarray, mask: np.ndarray, ratio: float = 1.0) -> np.ndarray:
    """``overlay`` over ``base`` through ``mask`` (uint8, 255 = overlay) scaled by ``ratio``.

    Where ``mask`` is 0 the result is exactly ``base``.
    """
    alpha = mask.astype(np.float32)[..., None] * (float(ratio) / 255.0)
    out = overlay.astype(np.float32) * alpha + base.astype(np.float32) * (1.0 - alpha)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[mask == 0] = base[mask == 0]
    return out


# ---------------------------------------------------------------------------------------------- edits
def self_blend(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
               blend_ratio: float | None = None, max_shift: float = 0.03, max_scale: float = 0.05) -> Edited:
    """Self-Blended Image: blend a transformed copy of the image back into its own face region.

    After Shiohara & Yamasaki (CVPR 2022): the "source" is the image with colour (RGB/HSV shifts,
    brightness-contrast), frequency (down-up-scaling or sharpening) and JPEG changes, shifted and scaled
    by a few percent; it is blended into the untouched image through a deformed, blurred face mask
    (landmark hull, or a central ellipse hull without landmarks) at a ratio in {0.25, 0.5, 0.75, 1}. The
    result has the blending boundary and statistic mismatch of face swaps but no generator fingerprint,
    so a detector trained on it generalises to unseen swap methods.

    Args:
        landmarks: ``[N, 2]`` (x, y) face landmarks; their convex hull is the blended region.
        blend_ratio: Weight of the source inside the mask; drawn from SBI's {.25, .5, .75, 1, 1, 1} if None.
        max_shift, max_scale: Largest translation (fraction of the size) and scale change of the source.
    """
    _check_image(image)
    h, w = image.shape[:2]
    hull = face_mask((h, w), rng, landmarks)
    # SBI deforms the hull: grow or shrink it a little, then blur with a random width
    k = max(1, int(round(min(h, w) * rng.uniform(0.0, 0.04))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    hull = cv2.erode(hull, kernel) if rng.random() < 0.5 else cv2.dilate(hull, kernel)
    if not hull.any():
        hull = face_mask((h, w), rng, landmarks)
    sigma = _feather_sigma(hull, rng, (0.02, 0.08))
    mask = feather(hull, sigma)
    ratio = float(blend_ratio if blend_ratio is not None else rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))
    seed = int(rng.integers(2**31))
    pipeline = _sbi_source_transform()
    pipeline.set_random_seed(seed)
    source = pipeline(image=image)["image"]
    scale = float(rng.uniform(1 - max_scale, 1 + max_scale))
    shift = rng.uniform(-max_shift, max_shift, 2) * (w, h)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    matrix[:, 2] += shift
    source = cv2.warpAffine(source, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out = blend(image, source, mask, ratio)
    return Edited(out, mask, {"blend_ratio": ratio, "scale": round(scale, 4), "shift": np.round(shift, 2).tolist(),
                              "feather": round(sigma, 2), "landmarks": landmarks is not None, "transform_seed": seed})


@lru_cache(maxsize=1)
def _sbi_source_transform() -> A.Compose:
    """SBI's source-target augmentation: colour, then always one frequency change, sometimes JPEG."""
    return A.Compose([
        A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.3),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=20, p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.3),
        A.OneOf([
            A.Downscale(scale_range=(0.4, 0.8), interpolation_pair={"downscale": cv2.INTER_LINEAR,
                                                                    "upscale": cv2.INTER_LINEAR}, p=1.0),
            A.Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0), p=1.0),
        ], p=1.0),
        A.ImageCompression(quality_range=(40, 100), p=0.5),
    ])


def splice(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.04, 0.2),
           colour_match: bool = True) -> Edited:
    """Paste a region of another real image (``donor``) into ``image`` through a soft mask.

    The donor is resized to the image's size and shifted so that a random region of it lands on a random
    region of the image; with ``colour_match`` its colours are moved to the image's statistics under the
    mask (mean and spread per Lab channel, after Reinhard et al. 2001), as a careful forger would, so that
    the detector must look at the boundary and noise mismatch rather than at a colour jump.
    """
    _check_image(image)
    _check_image(donor, "donor")
    h, w = image.shape[:2]
    if donor.shape[:2] != (h, w):
        shrink = donor.shape[0] * donor.shape[1] > h * w
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    region, info = region_mask((h, w), rng, area)
    ys, xs = np.nonzero(region)
    # where in the donor the pasted region comes from: any placement that keeps it inside the donor
    dx = rng.integers(-xs.min(), w - xs.max()) if w > 1 else 0
    dy = rng.integers(-ys.min(), h - ys.max()) if h > 1 else 0
    shifted = cv2.warpAffine(donor, np.float32([[1, 0, -dx], [0, 1, -dy]]), (w, h), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_REFLECT_101)
    if colour_match:
        shifted = _match_colours(shifted, image, region)
    sigma = _feather_sigma(region, rng)
    mask = feather(region, sigma)
    out = blend(image, shifted, mask)
    return Edited(out, mask, {**info, "donor_offset": [int(dx), int(dy)], "colour_match": colour_match,
                              "feather": round(sigma, 2)})


def _match_colours(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``source`` with the mean and standard deviation of ``target`` under ``region``, per Lab channel."""
    src = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float32)
    tgt = cv2.cvtColor(target, cv2.COLOR_RGB2LAB).astype(np.float32)
    inside = region > 0
    s_mean, s_std = src[inside].mean(0), src[inside].std(0) + 1e-3
    t_mean, t_std = tgt[inside].mean(0), tgt[inside].std(0) + 1e-3
    out = (src - s_mean) * np.minimum(t_std / s_std, 3.0) + t_mean
    return cv2.cvtColor(np.clip(np.rint(out), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def copy_move(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.1),
              max_rotation: float = 15.0, scale_range: tuple[float, float] = (0.9, 1.1)) -> Edited:
    """Copy a region of the image to another place in it, slightly rotated and scaled, through a soft mask.

    Copy-move hides or duplicates content with the image's own camera noise and colours, so only the
    duplicated structure and the paste boundary give it away. The destination is chosen to overlap the
    source as little as possible.
    """
    _check_image(image)
    h, w = image.shape[:2]
    region, info = region_mask((h, w), rng, area)
    ys, xs = np.nonzero(region)
    centre = (float(xs.mean()), float(ys.mean()))
    angle = float(rng.uniform(-max_rotation, max_rotation))
    scale = float(rng.uniform(*scale_range))
    best = None
    for _ in range(20):  # the least overlapping of a few random destinations
        dest = (rng.uniform(0, w), rng.uniform(0, h))
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        matrix[:, 2] += (dest[0] - centre[0], dest[1] - centre[1])
        moved = cv2.warpAffine(region, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        size = np.count_nonzero(moved)
        if size < 0.5 * len(xs):  # mostly outside the image
            continue
        overlap = np.count_nonzero(moved & region) / size
        if best is None or overlap < best[0]:
            best = (overlap, matrix, moved, dest)
        if overlap == 0:
            break
    if best is None:  # tiny images: mirror the region through the centre
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        matrix[:, 2] += (w - 2 * centre[0], h - 2 * centre[1])
        moved = cv2.warpAffine(region, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        best = (float("nan"), matrix, moved, (w - centre[0], h - centre[1]))
    overlap, matrix, moved, dest = best
    copied = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    sigma = _feather_sigma(moved, rng, (0.01, 0.06))
    mask = feather(moved, sigma)
    out = blend(image, copied, mask)
    return Edited(out, mask, {**info, "destination": [round(dest[0], 1), round(dest[1], 1)], "angle": round(angle, 2),
                              "scale": round(scale, 4), "overlap": round(float(overlap), 3), "feather": round(sigma, 2)})


def inpaint_region(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.01, 0.08),
                   method: str | None = None, radius: int | None = None, strokes: bool | None = None) -> Edited:
    """Remove a random region (a blob, or free-form brush strokes) with OpenCV inpainting.

    Object removal fills a hole from its surroundings (Telea 2004's fast marching, or Navier-Stokes), which
    leaves over-smooth, noise-free texture: a trace that classical inpainting and many learned ones share.

    Args:
        method: ``"telea"`` or ``"ns"``; drawn if None.
        radius: Neighbourhood radius of the inpainting, in pixels; drawn in [3, 7] if None.
        strokes: Brush strokes (as in free-form inpainting datasets) rather than one blob; drawn if None.
    """
    _check_image(image)
    h, w = image.shape[:2]
    method = method or str(rng.choice(["telea", "ns"]))
    flags = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
    if method not in flags:
        raise ValueError(f"unknown inpainting method {method!r}; expected telea or ns")
    radius = int(radius if radius is not None else rng.integers(3, 8))
    strokes = bool(rng.random() < 0.4) if strokes is None else strokes
    if strokes:
        mask, info = _stroke_mask((h, w), rng, area)
    else:
        mask, info = region_mask((h, w), rng, area)
    out = cv2.inpaint(np.ascontiguousarray(image), mask, radius, flags[method])
    return Edited(out, mask, {**info, "method": method, "radius": radius})


def _stroke_mask(shape: tuple[int, int], rng: np.random.Generator,
                 area: tuple[float, float]) -> tuple[np.ndarray, dict[str, Any]]:
    """Random thick polylines until about ``area`` of the image is covered (free-form inpainting holes)."""
    h, w = shape
    target = rng.uniform(*area)
    width = max(2, int(round(min(h, w) * rng.uniform(0.02, 0.06))))
    mask = np.zeros((h, w), np.uint8)
    for _ in range(50):
        if mask.mean() / 255 >= target:
            break
        n = int(rng.integers(3, 7))
        start = rng.uniform((0, 0), (w, h))
        steps = rng.normal(0, min(h, w) * 0.12, (n, 2))
        points = np.clip(start + np.cumsum(steps, axis=0), 0, (w - 1, h - 1))
        cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, thickness=width)
    return mask, {"region": "strokes", "area": float(mask.mean() / 255), "width": width}


def resample_trace(image: np.ndarray, rng: np.random.Generator, whole: bool | None = None,
                   factor: float | None = None, method: str | None = None,
                   area: tuple[float, float] = (0.1, 0.4)) -> Edited:
    """Down-sample then up-sample the image or a region of it, leaving the periodic traces of resampling.

    Generators synthesise by up-sampling (nearest, bilinear, or transposed convolutions whose uneven
    kernel overlap leaves a checkerboard); the traces show in the spectrum whatever the content. A region
    so treated and blended back is also the trace of a pasted, rescaled object.

    Args:
        whole: Resample the whole image (mask all 255) rather than a region; drawn (30%) if None.
        factor: Down-sampling factor in (0, 1); drawn in [0.35, 0.75] if None (exactly 1/2 for
            ``"transposed_conv"``, which up-samples by zero insertion at stride 2).
        method: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` or ``"transposed_conv"``; drawn if None.
    """
    _check_image(image)
    h, w = image.shape[:2]
    methods = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
    method = method or str(rng.choice([*methods, "transposed_conv"]))
    whole = bool(rng.random() < 0.3) if whole is None else whole
    params: dict[str, Any] = {"method": method, "whole": whole}
    if method == "transposed_conv":
        factor = 0.5
        resampled, params["kernel_jitter"] = _transposed_conv_upsample(image, rng)
    elif method in methods:
        factor = float(factor if factor is not None else rng.uniform(0.35, 0.75))
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        small = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
        resampled = cv2.resize(small, (w, h), interpolation=methods[method])
    else:
        raise ValueError(f"unknown resampling method {method!r}; expected one of {[*methods, 'transposed_conv']}")
    params["factor"] = round(float(factor), 4)
    if whole:
        return Edited(resampled, np.full((h, w), 255, np.uint8), params)
    region, info = region_mask((h, w), rng, area)
    sigma = _feather_sigma(region, rng, (0.01, 0.05))
    mask = feather(region, sigma)
    return Edited(blend(image, resampled, mask), mask, {**params, **info, "feather": round(sigma, 2)})


def _transposed_conv_upsample(image: np.ndarray, rng: np.random.Generator, jitter: float = 0.15) -> tuple[np.ndarray, float]:
    """Halve the image, then double it as a stride-2 transposed convolution with a slightly uneven kernel.

    The kernel is bilinear with each tap scaled by a random factor; its four phases then no longer sum to
    the same gain, which is the checkerboard artefact of learned up-convolutions (Odena et al. 2016).
    """
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, (w + 1) // 2), max(1, (h + 1) // 2)), interpolation=cv2.INTER_AREA)
    zeros = np.zeros((small.shape[0] * 2, small.shape[1] * 2, 3), np.float32)
    zeros[::2, ::2] = small
    taps = np.array([0.5, 1.0, 0.5], np.float32)
    kernel = np.outer(taps, taps) * rng.uniform(1 - jitter, 1 + jitter, (3, 3)).astype(np.float32)
    kernel *= 4.0 / kernel.sum()  # unit gain on average over the four phases
    up = cv2.filter2D(zeros, -1, kernel, borderType=cv2.BORDER_REFLECT_101)[:h, :w]
    return np.clip(np.rint(up), 0, 255).astype(np.uint8), jitter


def double_jpeg(image: np.ndarray, rng: np.random.Generator, q1: int | None = None, q2: int | None = None,
                shift: tuple[int, int] | None = None, region: bool | None = None,
                area: tuple[float, float] = (0.1, 0.4)) -> Edited:
    """Compress at quality ``q1``, then again at a different ``q2``, optionally on a shifted 8x8 grid.

    Double compression is what an edited photo goes through (saved by the camera, then again by the
    editor); the two quantisations leave periodic DCT-histogram traces, and a misaligned second grid
    (``shift``, 1-7 pixels) leaves blocking at two offsets. With ``region``, only a soft region carries
    the double-compressed pixels, as when a pasted object has another compression history.

    Caution: JPEG history alone is a shortcut (see ``gan_faces`` in the shared data's README); keep
    training-time JPEG re-compression of both classes (:func:`core.transforms.train_transform`).
    """
    _check_image(image)
    h, w = image.shape[:2]
    q1 = int(q1 if q1 is not None else rng.integers(50, 96))
    if q2 is None:
        choices = [q for q in range(50, 96) if abs(q - q1) >= 10]
        q2 = int(rng.choice(choices))
    if q1 == q2:
        raise ValueError(f"q1 and q2 must differ, both are {q1}")
    if shift is None:
        shift = (0, 0) if rng.random() < 0.5 else (int(rng.integers(0, 8)), int(rng.integers(1, 8)))
    dy, dx = (int(s) % 8 for s in shift)
    once = jpeg_reencode(image, q1)
    # padding the top-left by (dy, dx) moves the second 8x8 grid against the first
    padded = np.pad(once, ((dy, 0), (dx, 0), (0, 0)), mode="edge")
    twice = jpeg_reencode(padded, q2)[dy:, dx:]
    region = bool(rng.random() < 0.5) if region is None else region
    params: dict[str, Any] = {"q1": q1, "q2": int(q2), "shift": [dy, dx], "whole": not region}
    if not region:
        return Edited(twice, np.full((h, w), 255, np.uint8), params)
    binary, info = region_mask((h, w), rng, area)
    sigma = _feather_sigma(binary, rng, (0.01, 0.05))
    mask = feather(binary, sigma)
    return Edited(blend(image, twice, mask), mask, {**params, **info, "feather": round(sigma, 2)})


# ---------------------------------------------------------------------------------------------- registry
EDITS: dict[str, Callable[..., Edited]] = {
    "self_blend": self_blend,
    "splice": splice,
    "copy_move": copy_move,
    "inpaint_region": inpaint_region,
    "resample_trace": resample_trace,
    "double_jpeg": double_jpeg,
}
NEEDS_DONOR = frozenset({"splice"})


def apply_edit(name: str, image: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None,
               **params: Any) -> Edited:
    """Run the edit called ``name``; ``donor`` is required by (and only passed to) the edits that need one."""
    if name not in EDITS:
        raise ValueError(f"unknown edit {name!r}; choose from {', '.join(EDITS)}")
    if name in NEEDS_DONOR:
        if donor is None:
            raise ValueError(f"edit {name!r} needs a donor image")
        return EDITS[name](image, donor, rng, **params)
    return EDITS[name](image, rng, **params)


def parse_edit_names(text: str | Sequence[str]) -> list[str]:
    """``"self_blend,splice"`` (or a list) -> checked names, in order, without repeats."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in EDITS]
    if unknown or not names:
        raise ValueError(f"unknown edit(s) {unknown or names}; choose from {', '.join(EDITS)}")
    return list(dict.fromkeys(names))


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected an RGB uint8 array [H, W, 3], got {got}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"{name}: too small to edit ({image.shape[1]}x{image.shape[0]} pixels; need 8x8)")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python values, so params serialise as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
