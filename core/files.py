"""The one way this project writes a file: through a temporary file beside it and a rename.

A killed run (Ctrl-C, out of memory, a pre-empted job) never leaves half a submission, manifest, shard or
image behind: the target is either the old file or the new one. The file gets the mode a plain ``open``
would give it (``0o666`` less the user's umask, or the mode of the file it replaces), so that graders and
uploaders can read what we write: ``tempfile.mkstemp`` alone would leave it private (``0o600``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` creates files with."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_output(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block finishes, it replaces ``path``.

    The temporary name ends with ``path``'s suffix, so writers that choose a format by extension (Pillow,
    ``np.save``) behave as they would on ``path``. On an exception the temporary file is removed and
    ``path`` is left as it was. Parent folders are created.

        with atomic_output("out/labels.csv") as tmp:
            frame.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o777 if path.exists() else default_mode()
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8",
                 errors: str = "strict") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_output`); returns ``path``."""
    with atomic_output(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding=encoding, errors=errors, newline="") as f:
                f.write(data)
    return Path(path)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block finishes, it takes ``path``'s place.

    An existing ``path`` is moved aside first and deleted only once the new folder is in place, so a kill
    at any moment leaves either the old folder or the new one (and at worst a ``.old`` folder to delete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a weights folder is meant to be shared
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """The file's sha256 as hex, read in 1 MiB chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def scratch_file(data: bytes, suffix: str = "", folder: str | Path | None = None) -> Iterator[Path]:
    """``data`` in a private temporary file for the duration of the block, for readers that need a path
    (a video decoder scoring an upload); the file is removed when the block ends, however it ends.

    ``folder`` defaults to the system's temporary folder; ``suffix`` (e.g. ``".mp4"``) ends the name.
    """
    fd, name = tempfile.mkstemp(prefix="deepfake-upload-", suffix=suffix, dir=folder)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        path.unlink(missing_ok=True)
