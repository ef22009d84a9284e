"""A torch Dataset of image files, resized once per input size that the experts need.

A file that cannot be read does not stop the loader: its item carries the error message and zero
images, and the consumer (training or scoring) decides what to do with it.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageLoadError, load_image

# The longer side is cut (centred) to at most this many times the shorter one before the transforms: a
# shorter-side resize would turn a 1x60000 strip (a tiny PNG) into 224x13,440,000 pixels, about 9 GB and
# a minute of CPU. Photos and panoramas stay below it, and the centre square that scoring uses is kept.
MAX_ASPECT = 16


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def limit_aspect(image: np.ndarray, max_aspect: int = MAX_ASPECT) -> np.ndarray:
    """Centre-crop the longer side of ``[H, W, C]`` to at most ``max_aspect`` times the shorter one."""
    height, width = image.shape[:2]
    if width > max_aspect * height:
        left = (width - max_aspect * height) // 2
        return image[:, left:left + max_aspect * height]
    if height > max_aspect * width:
        top = (height - max_aspect * width) // 2
        return image[top:top + max_aspect * width]
    return image


def preprocess_image(image: np.ndarray,
                     preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, str]:
    """What every decoded image (or video frame) goes through before the transforms: :func:`limit_aspect`,
    then ``preprocess`` (e.g. a face crop). A warning it issues (no face found) is returned as the image's
    note, for the caller to report next to the image's name, instead of once, anonymously, per process."""
    image = limit_aspect(image)
    if preprocess is None:
        return image, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = preprocess(image)
    return image, "; ".join(str(w.message) for w in caught)


def transform_image(image: np.ndarray, transforms: Mapping[int, Callable[..., dict[str, Any]]]) -> dict[int, torch.Tensor]:
    """``{size: [3, S, S] float in [0, 1]}``: the image through each input size's transform."""
    return {s: to_tensor(t(image=image)["image"]) for s, t in transforms.items()}


class ImageDataset(Dataset):
    """Items ``{"index", "target", "images": {size: [3, S, S]}, "error"}``.

    Args:
        paths: Image file paths.
        transforms: One transform per input size, called as ``t(image=array)["image"]`` and reseeded with
            ``t.set_random_seed(seed)`` (an albumentations pipeline, or :class:`core.transforms.EvalTransform`).
        targets: Labels (0 real, 1 fake); -1 where unknown.
        preprocess: Applied to every decoded image before the transforms (e.g. face cropping).
        seed: When given, item ``i`` of epoch ``e`` is augmented with a seed derived from (seed, e, i), so a
            run is reproducible whatever the number of loader workers. Set :attr:`epoch` before each epoch.
    """

    def __init__(self, paths: Sequence[str], transforms: Mapping[int, Callable[..., dict[str, Any]]],
                 targets: Sequence[int] | None = None, seed: int | None = None,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None = None):
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        if len(self.targets) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.targets)} targets")
        self.transforms = dict(transforms)
        self.seed = seed
        self.preprocess = preprocess
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"index": index, "target": self.targets[index], "error": "", "note": ""}
        try:
            image, item["note"] = preprocess_image(load_image(self.paths[index]), self.preprocess)
        except ImageLoadError as e:
            item["error"] = str(e)
            item["images"] = {s: torch.zeros(3, s, s) for s in self.transforms}
            return item
        if self.seed is not None:
            self._reseed(index)
        item["images"] = transform_image(image, self.transforms)
        return item

    def _reseed(self, index: int) -> None:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        for transform in self.transforms.values():
            transform.set_random_seed(seed)
