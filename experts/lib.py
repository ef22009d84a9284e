"""The LIB head: local information blocks over image regions (after Ba et al., AAAI 2024).

"Exposing the Deception: Uncovering More Forgery Clues for Deepfake Detection" observes that a detector
trained with cross-entropy alone latches onto the one forgery clue that separates its training set best,
and fails on forgeries without it. The remedy is to split the representation into several local
information blocks, make every block carry information the others lack (the local information loss, LIL),
and fuse them into one global feature that keeps what all of them know (the global information loss, GIL).

What a block is. In the authors' code (github.com/QingyuLiu/Exposing-the-Deception, ``models/MI_Net.py``)
each block is a whole backbone of its own (``num_LIBs`` ResNet-34s, each fed the full image). Copying a
backbone per block is out of reach for a CLIP ViT-L/14, so here one backbone is shared and a block is an
image **region**: the expert cuts its last feature map (CNN) or its patch-token map (ViT, the class token
left out) into a ``g x g`` grid and mean-pools each cell (``Expert.forward_regions``, ``[B, n, D]`` with
``n = g * g``, row-major). Each region then goes through its own projection (Linear, LayerNorm, GELU), the
counterpart of the authors' separate backbones: block ``i`` always sees region ``i``.

The heads, as in the authors' ``MI_Net``:

* **fused** (the prediction, ``p(y|z)``): a bottleneck MLP on the concatenated blocks gives the global
  feature ``z``, and a linear classifier reads it. ``forward`` returns these logits, so the head replaces an
  expert's linear layer at inference;
* **whole** (``p(y|f_1..f_n)``): one linear classifier on the concatenation of every block;
* **left-out** (``p(y|f_-i)``, ``n`` of them): classifier ``i`` sees every block but block ``i``. One head per
  left-out block (not the whole head with block ``i`` zeroed): a head trained on ``n - 1`` blocks is the
  best estimate of what those blocks know, which is what the local information loss compares.

The losses live in ``train/losses.py`` (``lib_cross_entropy``, ``lib_global_loss``, ``lib_local_loss``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LIBOutput:
    """Everything the LIB losses need from one forward pass.

    Attributes:
        fused: ``[B, num_classes]`` logits of the fused head (the prediction, ``p(y|z)``).
        whole: ``[B, num_classes]`` logits of the all-blocks head (``p(y|f_1..f_n)``).
        dropped: ``[num_blocks, B, num_classes]``: ``dropped[i]`` is left-out head ``i``'s logits, from every
            block but block ``i`` (``p(y|f_-i)``). Block-first, unlike every other field.
        block_features: ``[B, num_blocks, block_dim]`` block features (after the head's dropout).
    """

    fused: torch.Tensor
    whole: torch.Tensor
    dropped: torch.Tensor
    block_features: torch.Tensor


def local_block(in_features: int, block_dim: int) -> nn.Module:
    """One local information block: a projection of one region's feature, normalised so that blocks start
    on a common scale whatever the backbone's feature scale."""
    return nn.Sequential(nn.Linear(in_features, block_dim), nn.LayerNorm(block_dim), nn.GELU())


def fusion_bottleneck(num_blocks: int, block_dim: int) -> nn.Module:
    """The fusion layer: concatenated blocks ``[B, n * d]`` -> global feature ``z`` ``[B, d]``.

    The authors' fusion is an MLP bottleneck on the concatenation (``ChannelCompress``); LayerNorm stands in
    for their BatchNorm1d so that a batch of one row (an expert's share of a batch can be that small)
    trains and evaluates the same way.
    """
    return nn.Sequential(nn.Linear(num_blocks * block_dim, block_dim), nn.LayerNorm(block_dim), nn.GELU())


class LIBHead(nn.Module):
    """Local information blocks over regions, a fused classifier (the prediction), an all-blocks classifier
    and one classifier per left-out block.

    Args:
        in_features: Width ``D`` of a region feature.
        num_classes: Outputs of every classifier (2 here: real, fake).
        num_blocks: Number ``n`` of blocks, one per region; at least 2 (a left-out head needs a block left).
        block_dim: Width ``d`` of each block.
        drop_rate: Dropout on the block features, before fusion and every classifier.
    """

    def __init__(self, in_features: int, num_classes: int = 2, num_blocks: int = 4, block_dim: int = 128,
                 drop_rate: float = 0.0):
        super().__init__()
        if num_blocks < 2 or block_dim < 1:
            raise ValueError(f"LIBHead needs num_blocks >= 2 and block_dim >= 1, got {num_blocks}, {block_dim}")
        self.in_features, self.num_blocks = in_features, num_blocks
        self.block_dim, self.num_classes = block_dim, num_classes
        self.blocks = nn.ModuleList(local_block(in_features, block_dim) for _ in range(num_blocks))
        self.block_drop = nn.Dropout(drop_rate)
        self.fusion = fusion_bottleneck(num_blocks, block_dim)
        self.fused_head = nn.Linear(block_dim, num_classes)
        self.whole_head = nn.Linear(num_blocks * block_dim, num_classes)
        self.left_out_heads = nn.ModuleList(nn.Linear((num_blocks - 1) * block_dim, num_classes)
                                            for _ in range(num_blocks))

    def block_features(self, regions: torch.Tensor) -> torch.Tensor:
        """``[B, n, d]``: block ``i``'s projection of region ``i``, from ``[B, n, D]`` region features."""
        if regions.dim() != 3 or regions.shape[1:] != (self.num_blocks, self.in_features):
            raise ValueError(f"LIBHead expects region features [B, {self.num_blocks}, {self.in_features}], "
                             f"got {list(regions.shape)}")
        return self.block_drop(torch.stack([block(regions[:, i]) for i, block in enumerate(self.blocks)], dim=1))

    def fuse(self, blocks: torch.Tensor) -> torch.Tensor:
        """Fused logits ``[B, num_classes]`` from ``[B, n, d]`` block features, through the global feature z."""
        return self.fused_head(self.fusion(blocks.flatten(1)))

    def left_out(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n, B, num_classes]``: left-out head ``i`` on every block but block ``i``."""
        n = self.num_blocks
        return torch.stack([head(blocks[:, [j for j in range(n) if j != i]].flatten(1))
                            for i, head in enumerate(self.left_out_heads)])

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """The prediction: fused logits ``[B, num_classes]`` (index 1 is "fake") of ``[B, n, D]`` regions; the
        other heads are not computed."""
        return self.fuse(self.block_features(regions))

    def forward_all(self, regions: torch.Tensor) -> LIBOutput:
        """Fused, all-blocks and left-out logits plus the block features of ``[B, n, D]`` regions."""
        blocks = self.block_features(regions)
        return LIBOutput(fused=self.fuse(blocks), whole=self.whole_head(blocks.flatten(1)),
                         dropped=self.left_out(blocks), block_features=blocks)
