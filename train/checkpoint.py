"""Checkpoints that survive a kill: atomic writes, tensors only, every RNG restored on resume."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.files import atomic_output

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, as tensors and plain values (loadable with weights_only)."""
    _, np_keys, np_pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
            "python": random.getstate()[1], "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every generator :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically (temp file + rename) so that a kill mid-save keeps the previous checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state, on the CPU. ``weights_only``: tensors and plain containers only, nothing
    executable. ``mmap``: map the tensors instead of reading them (cheap when only the counters are wanted)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
