"""An ensemble averages its experts' fake probabilities, as the original solution did."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping

import torch
from torch import nn

from .base import Expert


DEFAULT_THRESHOLD = 0.5


def check_threshold(value: Any) -> float:
    """``value`` as a float once it is a finite number in [0, 1]; a probability threshold can be nothing else."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"threshold must be a finite number in [0, 1], got {value!r}")
    return float(value)


class Ensemble(nn.Module):
    """Experts keyed by name, with non-negative weights for the average (equal by default).

    ``threshold`` turns the probability into a verdict (:meth:`verdict`); a weights folder records the
    one chosen on validation data (``evaluation/threshold.py``), 0.5 where it records none.
    """

    def __init__(self, experts: Mapping[str, Expert], weights: Mapping[str, float] | None = None,
                 threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        self.threshold = check_threshold(threshold)
        self.experts = nn.ModuleDict(dict(experts))
        w = torch.tensor([float((weights or {}).get(k, 1.0)) for k in self.experts])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"expert weights must be non-negative with a positive sum, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum(), persistent=False)

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    @property
    def backend(self) -> str:
        """``"onnx"`` when any expert runs under onnxruntime (``export.py`` folders), else ``"pytorch"``.

        ONNX experts give logits only: what needs features or gradients (Grad-CAM heat maps, training) must
        check this and ask for the PyTorch weights folder.
        """
        backends = {getattr(e, "backend", "pytorch") for e in self.experts.values()}
        return "onnx" if "onnx" in backends else "pytorch"

    @property
    def input_sizes(self) -> list[int]:
        """The distinct input sizes the experts need; the loader resizes each image once per size."""
        return sorted({e.config.input_size for e in self.experts.values()})

    @torch.inference_mode()
    def expert_probs(self, images: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Fake probability ``[B, E]`` of each expert, given ``{input_size: [B, 3, S, S] in [0, 1]}``.

        Inputs go channels-last: convolutions run about twice as fast that way, on CPU too.
        """
        images = {s: x.contiguous(memory_format=torch.channels_last) for s, x in images.items()}
        probs = [e(images[e.config.input_size])[0].float().softmax(-1)[:, 1] for e in self.experts.values()]
        return torch.stack(probs, dim=1)

    def combine(self, expert_probs: torch.Tensor) -> torch.Tensor:
        """Weighted average ``[B]`` of per-expert probabilities ``[B, E]``."""
        return expert_probs @ self.weights.to(expert_probs)

    def verdict(self, prob: float) -> str:
        """``"fake"`` when ``prob`` reaches the threshold, else ``"real"`` (NaN, an unscored image, is "real")."""
        return "fake" if prob >= self.threshold else "real"

    def forward(self, images: Mapping[int, torch.Tensor]) -> torch.Tensor:
        return self.combine(self.expert_probs(images))
