"""The joint training objective: every expert's losses on one batch, as one module.

Keeping the whole forward pass (clean and noisy inputs, every expert, the loss weighting) inside one
``nn.Module`` is what lets DistributedDataParallel wrap it: DDP needs the loss to come out of the wrapped
module's ``forward`` to synchronise every gradient, the learned loss weights included.

Per expert *e* and only over the rows it trains on (``masks[e]``):

* ``ce``: cross-entropy of its head (for a LIB head: of the fused head and of the all-blocks head);
* ``kl_noise``: KL(p(y|x) || p(y|x+r)) under random or adversarial input noise r;
* ``kl_mutual``: KL toward the other experts' detached mean prediction (mutual learning);
* ``nce``: real-anchored contrastive loss on its L2-normalised features;
* ``lib_global``, ``lib_local``: the LIB information losses (experts with ``head: lib``).

Losses whose weight is 0 are not computed at all, so switching one off also saves its cost.
"""
from __future__ import annotations

from dataclasses import fields, replace
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from experts import Expert
from experts.lib import LIBHead, LIBOutput
from train import losses as L

LOSS_NAMES = ("ce", "kl_noise", "kl_mutual", "nce", "lib_global", "lib_local")
WEIGHTINGS = ("fixed", "uncertainty")


def check_loss_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """All six loss weights (missing ones 0), refusing unknown names and negative weights."""
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown} in loss_weights; known: {list(LOSS_NAMES)}")
    out = {name: float(weights.get(name, 0.0)) for name in LOSS_NAMES}
    negative = [k for k, v in out.items() if v < 0]
    if negative:
        raise ValueError(f"loss_weights must be non-negative: {negative}")
    if not any(out.values()):
        raise ValueError("every loss weight is 0: nothing to train")
    return out


class JointObjective(nn.Module):
    """Experts plus their losses; ``forward`` returns every named loss term and the weighted total.

    Args:
        experts: Expert key -> expert.
        loss_weights: Loss name -> weight (see :data:`LOSS_NAMES`); 0 switches a loss off.
        weighting: ``"fixed"`` uses the weights as given; ``"uncertainty"`` learns one weight per switched-on
            term (Kendall et al. 2018), starting from the given weights.
        label_smoothing, noise_std, adversarial_noise, nce_temperature, lib_temperature, lib_distance:
            The losses' own parameters (see ``train/losses.py``).
    """

    def __init__(self, experts: Mapping[str, Expert], loss_weights: Mapping[str, float], weighting: str = "fixed",
                 label_smoothing: float = 0.0, noise_std: float = 0.03, adversarial_noise: bool = False,
                 nce_temperature: float = 0.1, lib_temperature: float = 2.0, lib_distance: str = "kl"):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.experts = nn.ModuleDict(dict(experts))
        self.weights = check_loss_weights(loss_weights)
        self.label_smoothing, self.noise_std, self.adversarial = label_smoothing, noise_std, adversarial_noise
        self.nce_temperature, self.lib_temperature, self.lib_distance = nce_temperature, lib_temperature, lib_distance
        terms = {f"{key}/{name}": w for key in self.experts for name, w in self.weights.items()
                 if w > 0 and self._applies(key, name)}
        self.weighting = (L.UncertaintyWeighting(terms) if weighting == "uncertainty" else L.FixedWeighting(terms))

    def _applies(self, key: str, name: str) -> bool:
        if name.startswith("lib_"):
            return self.is_lib(key)
        if name == "kl_mutual":
            return len(self.experts) > 1
        return True

    def is_lib(self, key: str) -> bool:
        return isinstance(self.experts[key].head, LIBHead)

    def forward(self, images: Mapping[int, torch.Tensor], target: torch.Tensor,
                masks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, terms)``: the weighted total to backpropagate and each term (``"<expert>/<loss>"``).

        Args:
            images: Input size -> ``[B, 3, S, S]`` images in [0, 1] (channels-last is fine).
            target: ``[B]`` labels, 1 fake.
            masks: Expert key -> ``[B]`` bool: the rows that count in that expert's losses.
        """
        terms: dict[str, torch.Tensor] = {}
        logits: dict[str, torch.Tensor] = {}
        for key, expert in self.experts.items():
            x, m = images[expert.config.input_size], masks[key]
            add = partial(self._add, terms, key, active=bool(m.any()))
            features = expert.forward_features(x)
            if self.is_lib(key):
                out = expert.head.forward_all(expert.head_input(features))
                logits[key] = out.fused.float()
                # The fused head is the prediction; the all-blocks head is trained too: it is the global
                # information loss's teacher.
                add("ce", lambda: self._ce(out.fused[m], target[m]) + self._ce(out.whole[m], target[m]), out.fused)
                add("lib_global", lambda: L.lib_global_loss(select_rows(out, m), self.lib_temperature, self.lib_distance),
                    out.fused)
                add("lib_local", lambda: L.lib_local_loss(select_rows(out, m), self.lib_distance), out.fused)
            else:
                logits[key] = expert.forward_head(features).float()
                add("ce", lambda: self._ce(logits[key][m], target[m]), logits[key])
            add("kl_noise", lambda: L.consistency_kl(lambda z: expert(z)[0].float(), x[m], logits[key][m],
                                                     self.noise_std, self.adversarial), logits[key])
            add("nce", lambda: L.real_anchor_nce(features[m].float(), target[m], self.nce_temperature), features)
        for key in self.experts:
            m = masks[key]
            self._add(terms, key, "kl_mutual", lambda: L.mutual_learning_kl({k: v[m] for k, v in logits.items()})[key],
                      logits[key], active=bool(m.any()))
        return self.weighting(terms), terms

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return L.cross_entropy(logits.float(), target, self.label_smoothing)

    def _add(self, terms: dict[str, torch.Tensor], key: str, name: str, compute: Callable[[], torch.Tensor],
             anchor: torch.Tensor, active: bool) -> None:
        """Compute a switched-on term. A batch with none of the expert's rows gives a zero that is still in
        the graph: DDP expects a gradient, zero or not, for every parameter on every rank."""
        term = f"{key}/{name}"
        if term in self.weighting.names:
            terms[term] = compute() if active else anchor.float().sum() * 0.0


def select_rows(out: LIBOutput, rows: torch.Tensor) -> LIBOutput:
    """The LIB outputs of some batch rows only."""
    return replace(out, **{f.name: getattr(out, f.name)[:, rows] if f.name == "dropped" else getattr(out, f.name)[rows]
                           for f in fields(out)})
