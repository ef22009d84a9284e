"""Experts over timm backbones (EfficientNet and ConvNeXt families share this wrapper)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .base import Expert, ExpertConfig


class TimmExpert(Expert):
    """A timm classifier with its own head removed; timm pools, the expert's head classifies."""

    def __init__(self, config: ExpertConfig, pretrained: bool | str = False):
        backbone = create_timm_backbone(config, pretrained)
        super().__init__(config, backbone.num_features)
        self.backbone = backbone
        self.freeze_stages()

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def backbone_regions(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, g * g, D]``: the unpooled final feature map cut into a ``g x g`` grid, each cell through
        what timm does after its global pooling (``forward_head(pre_logits=True)``: ConvNeXt's head norm,
        nothing for EfficientNet).

        A region's feature is thus the backbone's pooled feature restricted to that region: for
        EfficientNet, when ``g`` divides the map, the regions' mean is exactly :meth:`backbone_features`.
        """
        cells = self.pool_regions(self.backbone.forward_features(x))  # [B, n, D]
        b, n, d = cells.shape
        pooled = self.backbone.forward_head(cells.reshape(b * n, d, 1, 1), pre_logits=True)
        return pooled.reshape(b, n, -1)

    def frozen_modules(self) -> list[nn.Module]:
        n = self.config.frozen_stages
        if n <= 0:
            return []
        stem = [m for m in (getattr(self.backbone, a, None) for a in ("conv_stem", "bn1", "stem")) if m is not None]
        stages = getattr(self.backbone, "blocks", None) or getattr(self.backbone, "stages", None)
        if stages is None:
            raise ValueError(f"{self.config.arch}: cannot find stages to freeze")
        return stem + list(stages[:n])


def create_timm_backbone(config: ExpertConfig, pretrained: bool | str) -> nn.Module:
    """Create the timm model without classifier; ``pretrained`` is False, True (hub) or a local file.

    A local file goes through timm's own loader via ``pretrained_cfg_overlay=dict(file=...)``, so any
    checkpoint timm can read (safetensors or a timm state dict) works without internet.
    """
    kwargs = dict(num_classes=0, drop_rate=0.0)
    if pretrained is True:
        return timm.create_model(config.hub_id or config.arch, pretrained=True, **kwargs)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        return timm.create_model(
            config.arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
    return timm.create_model(config.arch, pretrained=False, **kwargs)
