"""The LIB head: local information blocks fused by attention (after Ba et al., AAAI 2024).

"Exposing the Deception: Uncovering More Forgery Clues for Deepfake Detection" observes that a detector
trained with cross-entropy alone latches onto the one forgery clue that separates its training set best,
and fails on forgeries without it. The remedy is to split the representation into several local blocks,
make every block carry information the others lack (the local information loss), and fuse them into one
prediction that keeps what all of them know (the global information loss). This module is our own
rendering of those definitions as a drop-in head on a backbone's pooled feature:

* ``num_blocks`` local blocks, each a small projection of the feature (Linear, LayerNorm, GELU) into
  ``block_dim`` values;
* a fused head: attention weights over the blocks (one shared scorer, softmax across blocks), the weighted
  sum of the block features, and a linear classifier. Its logits are **the prediction**: ``forward``
  returns them, so the head replaces an expert's linear layer at inference;
* an all-blocks head: a linear classifier on the concatenation of every block. Applied with block ``i``
  zeroed it gives the "dropped" prediction ``i``, which shows what the other blocks know without block
  ``i``.

The losses that give the blocks their meaning live in ``train/losses.py`` (``lib_global_loss``,
``lib_local_loss``); the caller also trains the fused and the all-blocks heads with cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LIBOutput:
    """Everything the LIB losses need from one forward pass.

    Attributes:
        fused: ``[B, num_classes]`` logits of the attention-fused head (the prediction).
        whole: ``[B, num_classes]`` logits of the all-blocks head (every block, concatenated).
        dropped: ``[num_blocks, B, num_classes]``: ``dropped[i]`` is the all-blocks head with block ``i``
            zeroed.
        block_features: ``[B, num_blocks, block_dim]`` block features (after the head's dropout), batch
            first like every other field but ``dropped``.
    """

    fused: torch.Tensor
    whole: torch.Tensor
    dropped: torch.Tensor
    block_features: torch.Tensor


def local_block(in_features: int, block_dim: int) -> nn.Module:
    """One local information block: a projection of the pooled feature, normalised so that blocks (and
    the attention scores computed on them) start on a common scale."""
    return nn.Sequential(nn.Linear(in_features, block_dim), nn.LayerNorm(block_dim), nn.GELU())


class LIBHead(nn.Module):
    """Local information blocks, an attention-fused classifier (the prediction) and an all-blocks classifier.

    Args:
        in_features: Width ``D`` of the backbone feature.
        num_classes: Outputs of both classifiers (2 here: real, fake).
        num_blocks: Number ``n`` of local information blocks.
        block_dim: Width of each block.
        drop_rate: Dropout on the block features, before fusion and both classifiers.
    """

    def __init__(self, in_features: int, num_classes: int = 2, num_blocks: int = 4, block_dim: int = 128,
                 drop_rate: float = 0.0):
        super().__init__()
        if num_blocks < 1 or block_dim < 1:
            raise ValueError(f"LIBHead needs num_blocks >= 1 and block_dim >= 1, got {num_blocks}, {block_dim}")
        self.num_blocks, self.block_dim, self.num_classes = num_blocks, block_dim, num_classes
        self.blocks = nn.ModuleList(local_block(in_features, block_dim) for _ in range(num_blocks))
        self.block_drop = nn.Dropout(drop_rate)
        # One scorer shared by every block: the weights compare blocks by content, not by position.
        self.score = nn.Sequential(nn.Linear(block_dim, block_dim), nn.Tanh(), nn.Linear(block_dim, 1))
        self.fused_head = nn.Linear(block_dim, num_classes)
        self.whole_head = nn.Linear(num_blocks * block_dim, num_classes)

    def block_features(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, n, block_dim]``: every block's projection of ``[B, D]`` features."""
        return self.block_drop(torch.stack([block(features) for block in self.blocks], dim=1))

    def attention(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` fusion weights (softmax over blocks) of ``[B, n, block_dim]`` block features."""
        return self.score(blocks).squeeze(-1).softmax(dim=-1)

    def fuse(self, blocks: torch.Tensor) -> torch.Tensor:
        """Fused logits ``[B, num_classes]`` from the block features."""
        fused = (self.attention(blocks).unsqueeze(-1) * blocks).sum(dim=1)
        return self.fused_head(fused)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The prediction: fused logits ``[B, num_classes]`` (index 1 is "fake"), and nothing else computed."""
        return self.fuse(self.block_features(features))

    def forward_all(self, features: torch.Tensor) -> LIBOutput:
        """Fused, all-blocks and dropped logits plus the block features, for the LIB losses."""
        blocks = self.block_features(features)
        n = self.num_blocks
        keep = 1.0 - torch.eye(n, dtype=blocks.dtype, device=blocks.device)  # row i: every block but i
        # [n, B, n, d]: copy i of the batch with block i zeroed, through the same all-blocks classifier.
        without = keep[:, None, :, None] * blocks.unsqueeze(0)
        return LIBOutput(fused=self.fuse(blocks), whole=self.whole_head(blocks.flatten(1)),
                         dropped=self.whole_head(without.flatten(2)), block_features=blocks)
