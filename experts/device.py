"""Choosing the torch device from a user's string, the same way in every command."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device the user asked for that this machine does not have."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; ``"cuda[:N]"`` only where CUDA is available."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {name!r}: {e}") from None
