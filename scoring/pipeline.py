"""The scoring pipeline: images on disk -> the experts -> fake probabilities, as arrays per batch.

The one home of scoring: ``infer.py`` (plain evaluation resize), validation and thresholds (resize plus
one JPEG quality), training's validation passes and the benchmarks all call :func:`score_batches`, so
that reported numbers come from exactly the code users run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.dataset import ImageDataset, preprocess_image, transform_image
from core.faces import crop_face
from core.progress import progress_bar
from core.transforms import eval_transform
from experts import Ensemble


@dataclass
class Score:
    """One image's result: the ensemble's fake probability, each expert's, or ``error`` (scores NaN)."""

    name: str
    prob: float
    expert_probs: np.ndarray
    error: str = ""
    path: str = ""


@dataclass
class BatchScores:
    """One batch's results as arrays: ``probs[B]`` (the ensemble), ``expert_probs[B, E]`` and, per image,
    its name, path, error (``""`` when it was scored; else its scores are NaN) and note (what preprocessing
    reported, e.g. that no face was found and the centre square was scored).

    Iterating gives one :class:`Score` per image, for callers that go image by image.
    """

    names: list[str]
    paths: list[str]
    probs: np.ndarray
    expert_probs: np.ndarray
    errors: list[str]
    notes: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Score]:
        for j, name in enumerate(self.names):
            yield Score(name, float(self.probs[j]), self.expert_probs[j], self.errors[j], self.paths[j])

    @property
    def ok(self) -> np.ndarray:
        """Which images were scored (bool mask)."""
        return np.array([not e for e in self.errors], dtype=bool)


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
                  crop_faces: bool = False) -> Iterator[BatchScores]:
    """:func:`score_images` one batch at a time, so that a caller can save its results batch by batch.

    Nothing is kept between batches: memory stays flat however many images there are. An exception in
    a loader worker, or a worker that dies (killed, out of memory), is raised here by torch's DataLoader
    ("... in DataLoader worker process N", "DataLoader worker ... exited unexpectedly"); an unreadable
    image is not an exception but a Score with ``error``.
    """
    names = list(names) if names is not None else list(paths)
    device = torch.device(device)
    dataset = ImageDataset(paths, {s: transform(s) for s in ensemble.input_sizes},
                           preprocess=face_preprocess(ensemble, crop_faces))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    with progress_bar(total=len(dataset), desc="scoring", enabled=progress) as bar:
        for batch in loader:
            ok = torch.tensor([not e for e in batch["error"]])
            probs = np.full((len(ok), len(ensemble.names)), np.nan)
            if ok.any():
                probs[ok.numpy()] = forward_probs(ensemble, {s: t[ok] for s, t in batch["images"].items()}, device)
            combined = ensemble.combine(torch.from_numpy(probs)).numpy()
            indices = batch["index"].tolist()
            yield BatchScores([names[i] for i in indices], [str(dataset.paths[i]) for i in indices], combined, probs,
                              list(batch["error"]), list(batch["note"]))
            bar.update(len(ok))


def face_crop_only(image: np.ndarray, size: int) -> np.ndarray:
    """The face crop of :func:`core.faces.crop_face`; where it finds no face, its ``NoFaceWarning`` becomes
    the image's note (:class:`BatchScores`), and the centre square is scored."""
    return crop_face(image, size=size, warn=True)[0]


def face_preprocess(ensemble: Ensemble, crop_faces: bool) -> Callable[[np.ndarray], np.ndarray] | None:
    """The preprocessing ``crop_faces`` asks for: :func:`face_crop_only` at the largest input size, or none."""
    return partial(face_crop_only, size=max(ensemble.input_sizes)) if crop_faces else None


def forward_probs(ensemble: Ensemble, images: Mapping[int, torch.Tensor],
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Each expert's fake probability, ``[B, E]`` float64, of a batch ``{input_size: [B, 3, S, S] in [0, 1]}``:
    moved to ``device`` and run there (bf16 autocast on CUDA). The forward pass of :func:`score_batches` and
    :func:`score_array_batches`; ``ensemble.combine`` of it is the ensemble's probability."""
    device = torch.device(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with autocast:
        batch = {s: t.to(device, non_blocking=True) for s, t in images.items()}
        return ensemble.expert_probs(batch).float().cpu().numpy().astype(np.float64)


class ArrayBatch(NamedTuple):
    """One batch of :func:`score_array_batches`: ``probs[B]``, ``expert_probs[B, E]`` and each image's note."""

    probs: np.ndarray
    expert_probs: np.ndarray
    notes: list[str]


def score_array_batches(ensemble: Ensemble, images: Iterable[np.ndarray], batch_size: int = 32,
                        device: str | torch.device = "cpu", transform: Callable[[int], Callable] = eval_transform,
                        crop_faces: bool = False) -> Iterator[ArrayBatch]:
    """Score decoded images (``[H, W, 3]`` uint8 RGB; e.g. a video's frames) ``batch_size`` at a time, in order.

    Each image goes through what an image file goes through in :func:`score_batches` (the aspect limit, the
    optional face crop with its note, ``transform(size)`` per input size, :func:`forward_probs`), so the same
    pixels give the same numbers. ``images`` is consumed lazily: only one batch of resized inputs is held.
    """
    transforms = {s: transform(s) for s in ensemble.input_sizes}
    preprocess = face_preprocess(ensemble, crop_faces)
    pending: list[dict[int, torch.Tensor]] = []
    notes: list[str] = []

    def flush() -> ArrayBatch:
        batch = {s: torch.stack([item[s] for item in pending]) for s in transforms}
        probs = forward_probs(ensemble, batch, device)
        out = ArrayBatch(ensemble.combine(torch.from_numpy(probs)).numpy(), probs, list(notes))
        pending.clear()
        notes.clear()
        return out

    for image in images:
        image, note = preprocess_image(image, preprocess)
        pending.append(transform_image(image, transforms))
        notes.append(note)
        if len(pending) == batch_size:
            yield flush()
    if pending:
        yield flush()

