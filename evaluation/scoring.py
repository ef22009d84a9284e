"""The scoring loop: images on disk -> the ensemble's fake probabilities, batch by batch.

Shared by ``infer.py`` (plain evaluation resize) and validation (resize plus one JPEG quality), so that
reported numbers come from exactly the code users run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.dataset import ImageDataset
from data_prep.faces import crop_face
from data_prep.transforms import eval_transform
from experts import Ensemble


@dataclass
class Score:
    name: str
    prob: float
    expert_probs: np.ndarray
    error: str = ""
    path: str = ""


def score_images(ensemble: Ensemble, paths: Sequence[str], names: Sequence[str] | None = None,
                 batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu",
                 progress: bool = True, transform: Callable[[int], Callable] = eval_transform,
                 crop_faces: bool = False) -> Iterator[Score]:
    """Yield a :class:`Score` per image, in input order; unreadable images carry ``error`` and NaN scores.

    ``transform(size)`` builds the preprocessing for each input size the experts need. ``crop_faces``
    first cuts a square around the largest face (YuNet; the centre square where none is found), the
    face-centred input the original solution expected.
    """
    for batch in score_batches(ensemble, paths, names, batch_size, workers, device, progress, transform, crop_faces):
        yield from batch


def score_batches(ensemble: Ensemble, paths: Sequence[str], names: Sequence[str] | None = None,
                  batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True, transform: Callable[[int], Callable] = eval_transform,
                  crop_faces: bool = False) -> Iterator[list[Score]]:
    """:func:`score_images` one batch at a time, so that a caller can save its results batch by batch.

    Nothing is kept between batches: memory stays flat however many images there are. An exception in
    a loader worker, or a worker that dies (killed, out of memory), is raised here by torch's DataLoader
    ("... in DataLoader worker process N", "DataLoader worker ... exited unexpectedly"); an unreadable
    image is not an exception but a Score with ``error``.
    """
    names = list(names) if names is not None else list(paths)
    device = torch.device(device)
    preprocess = partial(face_crop_only, size=max(ensemble.input_sizes)) if crop_faces else None
    dataset = ImageDataset(paths, {s: transform(s) for s in ensemble.input_sizes}, preprocess=preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with tqdm(total=len(dataset), desc="scoring", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            ok = torch.tensor([not e for e in batch["error"]])
            probs = np.full((len(ok), len(ensemble.names)), np.nan)
            if ok.any():
                with autocast:
                    images = {s: t[ok].to(device, non_blocking=True) for s, t in batch["images"].items()}
                    probs[ok.numpy()] = ensemble.expert_probs(images).float().cpu().numpy()
            combined = ensemble.combine(torch.from_numpy(probs)).numpy()
            yield [Score(names[index], float(combined[j]), probs[j], batch["error"][j], str(dataset.paths[index]))
                   for j, index in enumerate(batch["index"].tolist())]
            bar.update(len(ok))


def face_crop_only(image: np.ndarray, size: int) -> np.ndarray:
    """The face crop of :func:`data_prep.faces.crop_face`, without its warning (scoring goes on)."""
    return crop_face(image, size=size, warn=False)[0]
