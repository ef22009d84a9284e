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

Under ``torchrun`` (:func:`embed_images` with a :class:`core.distributed.Dist`), each process hashes its own
contiguous share of the files and embeds its own contiguous share of the images the cache lacks, writing its
own shards, ``shard-rank<R>-<sha1 of its keys>.safetensors``: two processes never write the same file, and
what a killed process finished stays. The cache must then lie on a filesystem that every process (every
node) reads and writes, because rank 0 reads the other processes' features back from it. A re-run, with any
number of processes, finds every shard whatever its name and embeds only what is missing.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch.utils.data import DataLoader

from core.dataset import ImageDataset
from core.device import resolve_device
from core.distributed import Dist, broadcast, gather, shard_bounds
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
        per_process: Images each process embedded, in rank order (``[n_embedded]`` in one process).

    Under torchrun only rank 0 holds ``features``; the other ranks get ``[0, D]`` and every other field.
    """

    features: np.ndarray
    ok: np.ndarray
    errors: list[str] = field(default_factory=list)
    n_embedded: int = 0
    n_cached: int = 0
    sha1: list[str] = field(default_factory=list)
    per_process: list[int] = field(default_factory=list)


class FeatureCacheError(RuntimeError):
    """Features another process embedded are not in the cache (it is not on a filesystem they share)."""


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
    """Features of one backbone, stored as safetensors shards in ``root/<backbone key>/``.

    ``tag`` goes into the names of the shards this object writes (``shard-<tag><sha1>``): under torchrun
    ``rank<R>-``, so that processes never write the same file. ``index=False`` skips reading the existing
    shards, for a process that only writes (its rank 0 decides what is missing).
    """

    def __init__(self, root: str | Path, key: str, dim: int, tag: str = "", index: bool = True):
        self.dir = Path(root) / key
        self.dim = dim
        self.tag = tag
        self._where: dict[str, tuple[Path, int]] = {}  # file hash -> (shard, row)
        self._indexed: set[Path] = set()
        if index:
            self.refresh()

    def refresh(self) -> None:
        """Index the shards written since this object last looked (e.g. by other processes)."""
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                if shard not in self._indexed:
                    self._index(shard)

    def _index(self, shard: Path) -> None:
        """Read one shard's header (not its tensors); a damaged shard is reported and ignored."""
        self._indexed.add(shard)
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
        path = self.dir / f"shard-{self.tag}{name}.safetensors"
        with atomic_output(path) as tmp:
            save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(tmp),
                      metadata={"sha1": ",".join(hashes)})
        for row, h in enumerate(hashes):
            self._where[h] = (path, row)
        self._indexed.add(path)
        return path


@torch.inference_mode()
def embed_images(paths: Sequence[str | Path], expert: Expert, cache_dir: str | Path | None = None,
                 batch_size: int = 32, device: str | torch.device = DEFAULT_DEVICE, workers: int = 0,
                 progress: bool = True, shard_size: int = SHARD_SIZE, d: Dist = Dist()) -> Embeddings:
    """L2-normalised ``expert.forward_features`` of each image, after :func:`eval_transform` to its input size.

    Every file is hashed first; images already in the cache (or identical to an earlier input) are not
    embedded again. The rest stream through the backbone in batches, and only their features are kept:
    memory is the ``[N, D]`` feature matrix plus one batch. An unreadable image is reported on stderr (one
    line naming the file) and left out; ``Embeddings.ok`` says which inputs have features.

    Under torchrun (``d.enabled``) every process calls this with the same ``paths``: each hashes a contiguous
    share of them and embeds a contiguous share of what rank 0 finds missing from the cache, reporting the
    unreadable files it meets, and writing its own cache shards as it goes. Rank 0 then reads every feature
    back from the cache (which must be on a filesystem all processes share), or, without a cache, gathers
    them from the processes (every process then briefly holds them all).

    Args:
        paths: Image files.
        expert: Any expert; put in eval mode and moved to ``device`` here.
        cache_dir: Folder of the feature cache; ``None`` disables caching.
        batch_size: Images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... (under torchrun, this process's: ``cuda:LOCAL_RANK``).
        workers: DataLoader worker processes decoding images.
        progress: Show progress bars (only ever drawn on a terminal, :mod:`core.progress`; rank 0's only).
        shard_size: New features per cache shard written.
        d: This process's place under torchrun (:func:`core.distributed.init_distributed`); one process
            by default.

    Raises:
        FeatureCacheError: under torchrun, rank 0 cannot find in the cache features another process wrote.
    """
    paths = [str(p) for p in paths]
    device = resolve_device(device)
    expert = expert.eval().to(device, memory_format=torch.channels_last)
    dim = expert.num_features
    progress = progress and d.is_main
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, backbone_key(expert), dim, tag=f"rank{d.rank}-" if d.enabled else "",
                             index=d.is_main)

    hash_of, errors = _hash_files(paths, progress, d)
    rows_of: dict[str, list[int]] = {}  # file hash -> input rows with those bytes
    for row, h in enumerate(hash_of):
        if h is not None:
            rows_of.setdefault(h, []).append(row)
    ok = np.array([h is not None for h in hash_of], dtype=bool)
    hits: dict[str, list[int]] = {}
    if d.is_main:  # one view of the cache decides for every process: another's new shards cannot skew it
        hits = {h: rows for h, rows in rows_of.items() if cache is not None and h in cache}
    misses, n_cached = broadcast(([h for h in rows_of if h not in hits], len(hits)) if d.is_main else None, d)

    run = dict(rows_of=rows_of, paths=paths, expert=expert, cache=cache, errors=errors, ok=ok,
               batch_size=batch_size, device=device, workers=workers, progress=progress, shard_size=shard_size)
    if d.enabled:
        features, per_process = _embed_share(misses, dim, d, **run)
    else:
        features = np.zeros((len(paths), dim), dtype=np.float32)
        if hits:
            cache.fill(hits, features)
        per_process = [_embed(misses, features, rows_of, **run)]
    return Embeddings(_compact(features, ok) if features is not None else np.zeros((0, dim), np.float32), ok,
                      [errors[i] for i in sorted(errors)], sum(per_process), n_cached,
                      [h for h, good in zip(hash_of, ok) if good], per_process)


def _hash_files(paths: list[str], progress: bool, d: Dist) -> tuple[list[str | None], dict[int, str]]:
    """Each file's sha1 (None: unreadable) and ``{input row: why}``; under torchrun each process hashes its
    own contiguous share, reports what it cannot read, and every process gets all of it."""
    lo, hi = shard_bounds(len(paths), d.rank, d.world)
    hashes: list[str | None] = []
    errors: dict[int, str] = {}
    for row in progress_bar(range(lo, hi), desc="hashing", unit="img", enabled=progress, leave=False):
        try:
            hashes.append(file_sha1(paths[row]))
        except ImageLoadError as e:
            _report(errors, row, str(e))
            hashes.append(None)
    if not d.enabled:
        return hashes, errors
    parts = gather((hashes, errors), d)
    return [h for share, _ in parts for h in share], {row: m for _, errs in parts for row, m in errs.items()}


def _embed(todo: list[str], out: np.ndarray, out_rows: dict[str, list[int]], *, rows_of: dict[str, list[int]],
           paths: list[str], expert: Expert, cache: FeatureCache | None, errors: dict[int, str], ok: np.ndarray,
           batch_size: int, device: torch.device, workers: int, progress: bool, shard_size: int) -> int:
    """Run the backbone over the files with the hashes ``todo``, putting each feature in ``out[out_rows[h]]``
    and in the cache (a shard every ``shard_size``); unreadable ones are reported and marked in ``ok``
    (rows of the whole input, ``rows_of``). Returns how many were embedded."""
    size = expert.config.input_size
    dataset = ImageDataset([paths[rows_of[h][0]] for h in todo], {size: eval_transform(size)})
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    pending: list[str] = []  # embedded hashes not yet written to the cache
    with progress_bar(total=len(dataset), desc="embedding", unit="img", enabled=progress) as bar:
        for batch in loader:
            good = [i for i, e in enumerate(batch["error"]) if not e]
            for i, e in enumerate(batch["error"]):
                if e:
                    rows = rows_of[todo[int(batch["index"][i])]]
                    ok[rows] = False
                    for row in rows:
                        _report(errors, row, e if row == rows[0] else f"{paths[row]}: same bytes as {e}")
            if good:
                x = batch["images"][size][good].to(device, non_blocking=True, memory_format=torch.channels_last)
                features = F.normalize(expert.forward_features(x).float(), dim=1).cpu().numpy()
                for j, i in enumerate(good):
                    h = todo[int(batch["index"][i])]
                    out[out_rows[h]] = features[j]
                    pending.append(h)
            while cache is not None and len(pending) >= shard_size:
                shard, pending = pending[:shard_size], pending[shard_size:]
                cache.add(shard, out[[out_rows[h][0] for h in shard]])
            bar.update(len(batch["error"]))
    if cache is not None and pending:
        cache.add(pending, out[[out_rows[h][0] for h in pending]])
    return len(dataset) - sum(1 for h in todo if not ok[rows_of[h][0]])


def _embed_share(misses: list[str], dim: int, d: Dist, **run: Any) -> tuple[np.ndarray | None, list[int]]:
    """Under torchrun: embed this process's contiguous share of ``misses``, then share what each process
    found unreadable; rank 0 assembles the ``[N, D]`` features (from the cache, or gathered without one).
    Returns (features on rank 0, else None; images embedded per process)."""
    rows_of, errors, ok, cache = run["rows_of"], run["errors"], run["ok"], run["cache"]
    lo, hi = shard_bounds(len(misses), d.rank, d.world)
    mine = misses[lo:hi]
    out = np.zeros((len(mine), dim), dtype=np.float32)
    known = set(errors)
    n = _embed(mine, out, {h: [j] for j, h in enumerate(mine)}, **run)
    failed = [h for h in mine if not ok[rows_of[h][0]]]
    parts = gather((n, {r: m for r, m in errors.items() if r not in known}, failed, out if cache is None else None), d)
    for _, new_errors, bad, _ in parts:
        errors.update(new_errors)
        for h in bad:
            ok[rows_of[h]] = False
    per_process = [part[0] for part in parts]
    if not d.is_main:
        return None, per_process
    features = np.zeros((len(run["paths"]), dim), dtype=np.float32)
    if cache is None:
        for rank, (_, _, bad, share) in enumerate(parts):
            start, end = shard_bounds(len(misses), rank, d.world)
            for j, h in enumerate(misses[start:end]):
                if h not in bad:
                    features[rows_of[h]] = share[j]
        return features, per_process
    cache.refresh()  # the shards the other processes wrote
    wanted = {h: rows for h, rows in rows_of.items() if ok[rows[0]]}
    lost = [h for h in wanted if h not in cache]
    if lost:
        raise FeatureCacheError(
            f"{cache.dir}: the features of {len(lost)} image(s) embedded by other processes are not in the cache "
            f"(e.g. {run['paths'][rows_of[lost[0]][0]]}); under torchrun on several machines the cache must lie "
            f"on a filesystem they all share (--cache-dir)")
    cache.fill(wanted, features)
    return features, per_process


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
