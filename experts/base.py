"""The expert interface shared by every backbone family.

An expert is a backbone plus a two-class head. It takes images as float tensors in [0, 1] at its own
square input size and applies its own normalisation, so that an ensemble of experts trained with different
preprocessing only has to resize images, never to know each family's mean and std.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lib import LIBHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = ("linear", "lib")
TUNINGS = ("full", "layernorm")


@dataclass
class ExpertConfig:
    """Everything needed to rebuild an expert offline; saved as the expert's ``config.json``.

    Attributes:
        name: Registry name of the variant (``efficientnet_lite0``, ``convnextv2_tiny``, ...).
        family: Backbone family (``efficientnet``, ``convnext`` or ``clip``).
        arch: The backbone's own name: a timm model name, or a transformers model id for CLIP.
        input_size: Side of the square input in pixels.
        mean: Per-channel mean subtracted from [0, 1] inputs.
        std: Per-channel standard deviation dividing [0, 1] inputs.
        num_classes: Head outputs; 2 (real, fake) for every expert here.
        drop_rate: Dropout before the head.
        frozen_stages: Leading backbone stages kept frozen during training (0: train everything).
        hub_id: Where pretrained weights come from online (timm tag or Hugging Face repo id).
        backbone_config: Architecture hyper-parameters needed to rebuild the backbone without the hub
            (the CLIP vision config); ``None`` where the arch name says it all.
        head: ``"linear"`` (one linear layer) or ``"lib"``: local information blocks fused by attention
            (:class:`experts.lib.LIBHead`, Ba et al. AAAI 2024), trained with the LIB losses.
        lib_blocks: Number of local information blocks of a LIB head.
        lib_dim: Width of each local information block.
        tuning: ``"full"`` trains every backbone parameter (after ``frozen_stages``); ``"layernorm"`` keeps
            the backbone fixed except its LayerNorm weights and biases (LN-tuning: adapts a large pretrained
            CLIP to a new task with a few thousand parameters, without forgetting what it knows).
        normalize_features: L2-normalise the pooled features before the head (features of different
            scales, as CLIP's, then meet the head on one sphere).
    """

    name: str
    family: str
    arch: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 2
    drop_rate: float = 0.0
    frozen_stages: int = 0
    hub_id: str | None = None
    backbone_config: dict[str, Any] | None = field(default=None)
    head: str = "linear"
    lib_blocks: int = 4
    lib_dim: int = 128
    tuning: str = "full"
    normalize_features: bool = False

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"{self.name}: head must be one of {HEADS}, got {self.head!r}")
        if self.tuning not in TUNINGS:
            raise ValueError(f"{self.name}: tuning must be one of {TUNINGS}, got {self.tuning!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown expert config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


class Expert(nn.Module):
    """A backbone that maps images to pooled features, and a linear head on those features.

    Subclasses implement :meth:`backbone_features` (pooled ``[B, D]`` features of normalised images) and
    :meth:`frozen_modules`; everything else (normalisation, head, freezing) lives here.
    """

    def __init__(self, config: ExpertConfig, num_features: int):
        super().__init__()
        self.config = config
        self.num_features = num_features
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = build_head(config, num_features)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Modules of the first ``config.frozen_stages`` stages, the ones training leaves untouched."""
        return []

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` of images given as ``[B, 3, S, S]`` floats in [0, 1]."""
        return self.backbone_features((images - self.mean) / self.std)

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """What the head sees: the pooled features, L2-normalised if configured, through dropout."""
        if self.config.normalize_features:
            features = F.normalize(features, dim=-1)
        return self.head_drop(features)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``; index 1 is "fake"."""
        return self.head(self.head_input(features))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(images)
        return self.forward_head(features), features

    def reset_head(self, num_classes: int = 2) -> None:
        device = next(self.head.parameters()).device
        self.config.num_classes = num_classes
        self.head = build_head(self.config, self.num_features).to(device)

    def freeze_stages(self) -> None:
        """Stop gradients (and BatchNorm statistics) in the frozen stages, and apply LN-tuning.

        Early stages hold generic low-level filters; keeping them fixed makes training on a few thousand
        images cheaper (no backward pass through the high-resolution layers) and less prone to overfit.
        """
        for module in self.frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.config.tuning == "layernorm":
            for name, module in self.named_children():
                if name not in ("head", "head_drop"):
                    tune_only_layernorms(module)

    def train(self, mode: bool = True) -> "Expert":
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self


def build_head(config: ExpertConfig, num_features: int) -> nn.Module:
    """The classifier on the pooled features: a linear layer or a LIB head."""
    if config.head == "lib":
        return LIBHead(num_features, config.num_classes, num_blocks=config.lib_blocks, block_dim=config.lib_dim)
    return nn.Linear(num_features, config.num_classes)


def tune_only_layernorms(module: nn.Module) -> None:
    """Leave only the LayerNorm weights and biases of ``module`` trainable (timm's LayerNorm2d included)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(True)
