"""CLIP ViT experts over transformers' ``CLIPVisionModel``.

The feature is the pooled, post-LayerNorm class token. Weights come from a Hugging Face repo id
(``pretrained=True``), a local folder saved with ``save_pretrained`` (``pretrained="path/"``) or random
init from the architecture config stored in the expert's config, which is also how saved experts are
rebuilt offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .base import CLIP_MEAN, CLIP_STD, Expert, ExpertConfig
from .registry import register_expert, register_family

_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=768)
_VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=16, image_size=224, projection_dim=512)
# Sized for CPU training from scratch (no hub weights): ViT-Tiny's width, half its depth.
_VIT_TINY = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                 patch_size=16, image_size=224, projection_dim=192)
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             patch_size=8, image_size=64, projection_dim=32)

_CFGS: dict[str, dict[str, Any]] = {
    "clip_vit_l14": dict(arch="openai/clip-vit-large-patch14", input_size=224, backbone_config=_VIT_L14),
    "clip_vit_b16": dict(arch="openai/clip-vit-base-patch16", input_size=224, backbone_config=_VIT_B16),
    "clip_vit_tiny": dict(arch="clip_vit_tiny", input_size=224, backbone_config=_VIT_TINY),
    "test_clip": dict(arch="test_clip", input_size=64, backbone_config=_TINY),
}


class ClipExpert(Expert):
    """CLIP vision tower plus a linear head on its pooled class token."""

    def __init__(self, config: ExpertConfig, pretrained: bool | str = False):
        vision = _create_vision_model(config, pretrained)
        # Store the resolved architecture so the saved config rebuilds this exact model offline.
        config.backbone_config = _architecture(vision.config)
        super().__init__(config, vision.config.hidden_size)
        self.vision = vision
        self.freeze_stages()

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=x).pooler_output

    def frozen_modules(self) -> list[nn.Module]:
        n = self.config.frozen_stages
        if n <= 0:
            return []
        model = getattr(self.vision, "vision_model", self.vision)  # transformers < 5 nests the tower
        return [model.embeddings, model.pre_layrnorm, *model.encoder.layers[:n]]


def _architecture(config: CLIPVisionConfig) -> dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
            "image_size", "projection_dim", "hidden_act", "layer_norm_eps")
    return {k: getattr(config, k) for k in keys}


def _create_vision_model(config: ExpertConfig, pretrained: bool | str) -> CLIPVisionModel:
    if pretrained is True:
        repo = config.hub_id or config.arch
        if "/" not in repo:
            raise ValueError(f"{config.name}: no hub weights exist for this size; use pretrained=False "
                             "(random init) or a local folder saved with save_pretrained")
        return CLIPVisionModel.from_pretrained(repo)
    if pretrained:
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP weights folder (saved with save_pretrained) not found: {path}")
        return CLIPVisionModel.from_pretrained(path)
    if not config.backbone_config:
        raise ValueError(f"{config.name}: random init needs backbone_config (the CLIP vision architecture)")
    return CLIPVisionModel(CLIPVisionConfig(**config.backbone_config))


@register_family("clip")
def _build(config: ExpertConfig, pretrained: bool | str = False) -> ClipExpert:
    return ClipExpert(config, pretrained)


def _create(name: str, pretrained: bool | str, **overrides: Any) -> ClipExpert:
    cfg = {**_CFGS[name], "mean": CLIP_MEAN, "std": CLIP_STD, **overrides}
    return ClipExpert(ExpertConfig(name=name, family="clip", **cfg), pretrained)


@register_expert
def clip_vit_l14(pretrained: bool | str = False, **overrides: Any) -> ClipExpert:
    """OpenAI CLIP ViT-L/14 vision tower (the CLIP of the original solution)."""
    return _create("clip_vit_l14", pretrained, **overrides)


@register_expert
def clip_vit_b16(pretrained: bool | str = False, **overrides: Any) -> ClipExpert:
    """OpenAI CLIP ViT-B/16 vision tower."""
    return _create("clip_vit_b16", pretrained, **overrides)


@register_expert
def clip_vit_tiny(pretrained: bool | str = False, **overrides: Any) -> ClipExpert:
    """A CLIP vision tower of ViT-Tiny width (6 layers, 2.7 M parameters): random init or a local folder.

    No hub carries weights of this size; it exists so the CLIP family (with LIB) trains on a CPU.
    """
    return _create("clip_vit_tiny", pretrained, **overrides)


@register_expert
def test_clip(pretrained: bool | str = False, **overrides: Any) -> ClipExpert:
    """Tiny random CLIP vision tower for tests."""
    return _create("test_clip", pretrained, **overrides)
