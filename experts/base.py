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
        head: ``"linear"`` (one linear layer on the pooled features) or ``"lib"``: local information blocks
            over image regions, fused into one prediction (:class:`experts.lib.LIBHead`, Ba et al. AAAI 2024),
            trained with the LIB losses.
        lib_grid: Side ``g`` of the grid of regions: a LIB head has ``g * g`` local information blocks, one per
            cell of the final feature map (CNN) or of the patch-token map (ViT). At least 2.
        lib_dim: Width of each local information block.
        tuning: ``"full"`` trains every backbone parameter (after ``frozen_stages``); ``"layernorm"`` keeps
            the backbone fixed except its LayerNorm weights and biases (LN-tuning: adapts a large pretrained
            CLIP to a new task with a few thousand parameters, without forgetting what it knows).
        base: Name of offline pretrained base weights (:data:`experts.base_weights.BASE_WEIGHTS`) the backbone
            starts from. A saved expert with a base stores only the tensors training changed; loading it
            fetches the base (once, into a cache, sha256-checked) and lays the saved tensors over it.
        feature_layers: Transformer layers (1-based) whose class tokens, each through the final LayerNorm,
            are concatenated as the pooled feature (intermediate layers carry more low-level forgery cues
            than the last); ``None``: the last layer's. CLIP only.
        normalize_features: L2-normalise the pooled features (for a LIB head: each region's feature) before
            the head (features of different scales, as CLIP's, then meet the head on one sphere).
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
    lib_grid: int = 2
    lib_dim: int = 128
    tuning: str = "full"
    normalize_features: bool = False
    base: str | None = None
    feature_layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"{self.name}: head must be one of {HEADS}, got {self.head!r}")
        if self.tuning not in TUNINGS:
            raise ValueError(f"{self.name}: tuning must be one of {TUNINGS}, got {self.tuning!r}")
        if self.head == "lib" and self.lib_grid < 2:
            raise ValueError(f"{self.name}: a LIB head needs lib_grid >= 2 (a left-out head needs a block left), "
                             f"got {self.lib_grid}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertConfig":
        known = {f for f in cls.__dataclass_fields__}
        d = _drop_legacy_keys(d)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown expert config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


def _drop_legacy_keys(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without keys of older configs that no longer mean anything.

    ``lib_blocks`` (LIB blocks as projections of one pooled feature) was written into every saved config,
    LIB head or not; for a linear head it never mattered and is dropped. A saved LIB expert of that design
    cannot be rebuilt: its head's weights belong to another architecture.
    """
    if "lib_blocks" not in d:
        return d
    if d.get("head") == "lib":
        raise ValueError(f"{d.get('name')}: this LIB expert was saved with lib_blocks (blocks projected from one "
                         "pooled feature); LIB blocks are now image regions (lib_grid): retrain it")
    return {k: v for k, v in d.items() if k != "lib_blocks"}


class Expert(nn.Module):
    """A backbone that maps images to pooled (or region) features, and a head on those features.

    Subclasses implement :meth:`backbone_features` (pooled ``[B, D]`` features of normalised images),
    :meth:`backbone_regions` (``[B, g * g, D]`` region features of normalised images) and
    :meth:`frozen_modules`; everything else (normalisation, head, freezing) lives here.

    What :meth:`forward_features` returns depends on the head, so that ``forward_head(forward_features(x))``
    is always ``forward(x)[0]``: pooled features ``[B, D]`` for a linear head, the flattened regions
    ``[B, g * g * D]`` for a LIB head (its blocks are regions, which a pooled vector no longer holds).
    ``num_features`` is that width; ``region_dim`` is ``D``.
    """

    backend = "pytorch"  # what runs it; experts.onnx_expert.OnnxExpert says "onnx" (see Ensemble.backend)

    def __init__(self, config: ExpertConfig, num_features: int):
        super().__init__()
        self.config = config
        self.region_dim = num_features
        self.num_regions = config.lib_grid ** 2
        self.num_features = num_features * self.num_regions if self.uses_regions else num_features
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = build_head(config, num_features)

    @property
    def uses_regions(self) -> bool:
        """Whether the head reads region features (a LIB head) rather than pooled ones."""
        return self.config.head == "lib"

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backbone_regions(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, g * g, D]`` features of the ``g x g`` grid of regions (``g = config.lib_grid``, row-major) of
        normalised images ``[B, 3, S, S]``; subclasses cut their final feature map with :meth:`pool_regions`."""
        raise NotImplementedError

    def pool_regions(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, D, H, W]`` -> ``[B, g * g, D]``: :func:`grid_pool` with this expert's ``lib_grid``."""
        return grid_pool(feature_map, self.config.lib_grid)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules of the first ``config.frozen_stages`` stages, the ones training leaves untouched."""
        return []

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` images in [0, 1] -> the backbone's input (this expert's mean and std)."""
        return (images - self.mean) / self.std

    def forward_regions(self, images: torch.Tensor) -> torch.Tensor:
        """Region features ``[B, g * g, D]`` of images given as ``[B, 3, S, S]`` floats in [0, 1]: the
        ``g x g`` grid (``g = config.lib_grid``, row-major) of the final feature map, each cell mean-pooled."""
        return self.backbone_regions(self.normalize(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, num_features]`` features of images given as ``[B, 3, S, S]`` floats in [0, 1]: pooled
        ``[B, D]``, or for a LIB head the flattened regions ``[B, g * g * D]``."""
        if self.uses_regions:
            return self.forward_regions(images).flatten(1)
        return self.backbone_features(self.normalize(images))

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """What the head sees: the features, L2-normalised if configured, through dropout. For a LIB head
        the flattened regions are unflattened to ``[B, g * g, D]`` and each region is normalised alone."""
        if self.uses_regions:
            features = features.unflatten(-1, (self.num_regions, self.region_dim))
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
        self.head = build_head(self.config, self.region_dim).to(device)

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
    """The classifier: a linear layer on ``num_features``-wide pooled features, or a LIB head with one block
    per region of ``num_features``-wide region features."""
    if config.head == "lib":
        return LIBHead(num_features, config.num_classes, num_blocks=config.lib_grid ** 2, block_dim=config.lib_dim)
    return nn.Linear(num_features, config.num_classes)


def grid_pool(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, D, H, W]`` feature map -> ``[B, grid * grid, D]``: the mean of each cell of a ``grid x grid``
    partition, row-major.

    Cells are adaptive-pooling bins: equal when ``grid`` divides ``H`` and ``W``, else neighbours share a row
    or column. A map smaller than the grid is refused: its cells would repeat positions, and identical
    blocks are exactly what the local information loss is meant to rule out.
    """
    h, w = feature_map.shape[-2:]
    if h < grid or w < grid:
        raise ValueError(f"a {grid}x{grid} grid of regions needs a feature map of at least that size, got {h}x{w}: "
                         "use a smaller lib_grid or a larger input")
    return F.adaptive_avg_pool2d(feature_map, grid).flatten(2).transpose(1, 2)


def tune_only_layernorms(module: nn.Module) -> None:
    """Leave only the LayerNorm weights and biases of ``module`` trainable (timm's LayerNorm2d included)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(True)
