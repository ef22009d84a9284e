"""Embedding images with an expert's backbone, with an on-disk cache keyed by file content.

Clustering a few thousand images takes minutes of CPU time to embed and seconds to cluster, so the
embeddings are cached: a re-run (another ``k``, one more labels CSV) only embeds images it has not seen.

The cache is a folder per backbone, named after the expert, its input size and a fingerprint of its weights
(so a fine-tuned or randomly initialised expert never reuses another's features)::

    feature_cache/
      efficientnet_lite0-224-3f2a9c0d1e4b/
        shard-<sha1 of its keys>.safetensors    # "features": [M, D] float32; metadata "sha1": M file hashes

A shard is written (atomically) every ``shard_size`` new images, so an interrupted run keeps most of its
work. Images are keyed by the sha1 of their bytes: a renamed or copied file is still a cache hit, an edited
one is not.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch.utils.data import DataLoader

from core.dataset import ImageDataset
from core.device import resolve_device
from core.files import atomic_output
from core.images import ImageLoadError
from core.progress import progress_bar, write_line
from core.protocol import DEFAULT_DEVICE
from core.transforms import eval_transform

if TYPE_CHECKING:  # experts is only needed for the annotation; keep data_prep importable on its own
    from experts import Expert

SHARD_SIZE = 1024
_HASH_CHUNK = 1 << 20


@dataclass
class Embeddings:
    """The result of :func:`embed_images`.

    Attributes:
        features: ``[N_ok, D]`` float32, L2-normalised, one row per readable input image, in input order.
        ok: ``[N]`` bool, which inputs have a row in ``features`` (False: unreadable, see ``errors``).
        errors: One line per unreadable image, ``"path: reason"``, in input order.
        n_embedded: Images run through the backbone in this call (cache misses).
        n_cached: Distinct images whose features came from the cache.
        sha1: ``[N_ok]`` content hash of each row of ``features`` (byte-identical files share one).
    """

    features: np.ndarray
    ok: np.ndarray
    errors: list[str] = field(default_factory=list)
    n_embedded: int = 0
    n_cached: int = 0
    sha1: list[str] = field(default_factory=list)


def file_sha1(path: str | Path) -> str:
    """Hex sha1 of a file's bytes, read in chunks so that a large image is never held twice.

    Raises:
        ImageLoadError: the file is missing or cannot be read (the message names it).
    """
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "not a regular file") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file ({e.strerror or e})") from None
    return digest.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hex sha1 of a module's state dict (names, shapes, dtypes and values): which weights made a feature."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_key(expert: Expert) -> str:
    """Cache folder name: ``<expert name>-<input size>-<weights fingerprint>``."""
    return f"{expert.config.name}-{expert.config.input_size}-{weights_fingerprint(expert)[:12]}"


class FeatureCache:
    """Features of one backbone, stored as safetensors shards in ``root/<backbone key>/``."""

    def __init__(self, root: str | Path, key: str, dim: int):
        self.dir = Path(root) / key
        self.dim = dim
        self._where: dict[str, tuple[Path, int]] = {}  # file hash -> (shard, row)
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                self._index(shard)

    def _index(self, shard: Path) -> None:
        """Read one shard's header (not its tensors); a damaged shard is reported and ignored."""
        try:
            with safe_open(str(shard), framework="np") as f:
                hashes = (f.metadata() or {}).get("sha1", "")
                shape = f.get_slice("features").get_shape()
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            print(f"warning: {shard}: unreadable feature cache shard, ignored ({e})", file=sys.stderr)
            return
        hashes = hashes.split(",") if hashes else []
        if len(shape) != 2 or shape[0] != len(hashes) or shape[1] != self.dim:
            print(f"warning: {shard}: features {shape} do not fit {len(hashes)} hashes of dimension {self.dim}, "
                  "ignored", file=sys.stderr)
            return
        for row, h in enumerate(hashes):
            self._where[h] = (shard, row)

    def __contains__(self, file_hash: str) -> bool:
        return file_hash in self._where

    def __len__(self) -> int:
        return len(self._where)

    def fill(self, wanted: dict[str, list[int]], out: np.ndarray) -> None:
        """Copy the cached features of ``wanted`` (file hash -> rows of ``out``) into ``out``.

        One shard is loaded at a time, so memory grows by at most one shard beyond ``out``.
        """
        by_shard: dict[Path, list[tuple[int, list[int]]]] = {}
        for h, rows in wanted.items():
            shard, row = self._where[h]
            by_shard.setdefault(shard, []).append((row, rows))
        for shard, items in by_shard.items():
            with safe_open(str(shard), framework="np") as f:
                features = f.get_tensor("features")
            for row, rows in items:
                out[rows] = features[row]

    def add(self, hashes: Sequence[str], features: np.ndarray) -> Path:
        """Write one shard (temp file + rename, so a crash never leaves half a shard) and index it."""
        if features.shape != (len(hashes), self.dim):
            raise ValueError(f"features {features.shape} do not fit {len(hashes)} hashes of dimension {self.dim}")
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(",".join(hashes).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.safetensors"
        with atomic_output(path) as tmp:
            save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(tmp),
                      metadata={"sha1": ",".join(hashes)})
        for row, h in enumerate(hashes):
            self._where[h] = (path, row)
        return path


@torch.inference_mode()
def embed_images(paths: Sequence[str | Path], expert: Expert, cache_dir: str | Path | None = None,
                 batch_size: int = 32, device: str | torch.device = DEFAULT_DEVICE, workers: int = 0,
                 progress: bool = True, shard_size: int = SHARD_SIZE) -> Embeddings:
    """L2-normalised ``expert.forward_features`` of each image, after :func:`eval_transform` to its input size.

    Every file is hashed first; images already in the cache (or identical to an earlier input) are not
    embedded again. The rest stream through the backbone in batches, and only their features are kept:
    memory is the ``[N, D]`` feature matrix plus one batch. An unreadable image is reported on stderr (one
    line naming the file) and left out; ``Embeddings.ok`` says which inputs have features.

    Args:
        paths: Image files.
        expert: Any expert; put in eval mode and moved to ``device`` here.
        cache_dir: Folder of the feature cache; ``None`` disables caching.
        batch_size: Images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        workers: DataLoader worker processes decoding images.
        progress: Show progress bars (only ever drawn on a terminal, :mod:`core.progress`).
        shard_size: New features per cache shard written.
    """
    paths = [str(p) for p in paths]
    device = resolve_device(device)
    expert = expert.eval().to(device, memory_format=torch.channels_last)
    dim = expert.num_features
    cache = FeatureCache(cache_dir, backbone_key(expert), dim) if cache_dir is not None else None

    errors: dict[int, str] = {}  # input row -> why it has no features
    rows_of: dict[str, list[int]] = {}  # file hash -> input rows with those bytes
    hash_of: list[str | None] = []
    for path in progress_bar(paths, desc="hashing", unit="img", enabled=progress, leave=False):
        try:
            h = file_sha1(path)
        except ImageLoadError as e:
            _report(errors, len(hash_of), str(e))
            h = None
        hash_of.append(h)
        if h is not None:
            rows_of.setdefault(h, []).append(len(hash_of) - 1)

    features = np.zeros((len(paths), dim), dtype=np.float32)
    ok = np.array([h is not None for h in hash_of], dtype=bool)
    hits = {h: rows for h, rows in rows_of.items() if cache is not None and h in cache}
    if hits:
        cache.fill(hits, features)
    misses = [h for h in rows_of if h not in hits]

    size = expert.config.input_size
    dataset = ImageDataset([paths[rows_of[h][0]] for h in misses], {size: eval_transform(size)})
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    pending: list[str] = []  # embedded hashes not yet written to the cache
    with progress_bar(total=len(dataset), desc="embedding", unit="img", enabled=progress) as bar:
        for batch in loader:
            good = [i for i, e in enumerate(batch["error"]) if not e]
            for i, e in enumerate(batch["error"]):
                if e:
                    rows = rows_of[misses[int(batch["index"][i])]]
                    ok[rows] = False
                    for row in rows:
                        _report(errors, row, e if row == rows[0] else f"{paths[row]}: same bytes as {e}")
            if good:
                x = batch["images"][size][good].to(device, non_blocking=True, memory_format=torch.channels_last)
                out = F.normalize(expert.forward_features(x).float(), dim=1).cpu().numpy()
                for j, i in enumerate(good):
                    h = misses[int(batch["index"][i])]
                    features[rows_of[h]] = out[j]
                    pending.append(h)
            while cache is not None and len(pending) >= shard_size:
                shard, pending = pending[:shard_size], pending[shard_size:]
                cache.add(shard, features[[rows_of[h][0] for h in shard]])
            bar.update(len(batch["error"]))
    if cache is not None and pending:
        cache.add(pending, features[[rows_of[h][0] for h in pending]])

    n_embedded = len(dataset) - sum(1 for h in misses if not ok[rows_of[h][0]])
    return Embeddings(_compact(features, ok), ok, [errors[i] for i in sorted(errors)], n_embedded, len(hits),
                      [h for h, good in zip(hash_of, ok) if good])


def _report(errors: dict[int, str], row: int, message: str) -> None:
    """Record an unreadable image and print it at once (without tearing a progress bar being drawn)."""
    errors[row] = message
    write_line(f"error: {message} (skipped)")


def _compact(features: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Drop the rows of unreadable images in place (no second copy of the matrix)."""
    if ok.all():
        return features
    for j, i in enumerate(np.flatnonzero(ok)):
        if i != j:
            features[j] = features[i]
    return features[: int(ok.sum())]
