"""The joint training objective: every expert's losses on one batch, as one module.

Keeping the whole forward pass (clean and noisy inputs, every expert, the loss weighting) inside one
``nn.Module`` is what lets DistributedDataParallel wrap it: DDP needs the loss to come out of the wrapped
module's ``forward`` to synchronise every gradient, the learned loss weights included.

Per expert *e* and only over the rows it trains on (``masks[e]``): *e* runs on those rows alone, so that
rows it is validated on never reach it, not even through BatchNorm's batch and running statistics.

* ``ce``: cross-entropy of its head (for a LIB head: of the fused, the all-blocks and every left-out head);
* ``kl_noise``: KL(p(y|x) || p(y|x+r)) under random or adversarial input noise r;
* ``kl_mutual``: KL toward its teachers' detached mean prediction (mutual learning), on the rows it shares
  with them; its teachers are the experts that never trained on its validation rows (``teachers``);
* ``nce``: real-anchored contrastive loss on its L2-normalised features;
* ``lib_global``, ``lib_local``: the LIB information losses (experts with ``head: lib``).

Losses whose weight is 0 are not computed at all, so switching one off also saves its cost.
"""
from __future__ import annotations

from dataclasses import fields, replace
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
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
        teachers: Expert key -> the experts whose predictions its ``kl_mutual`` term pulls it toward; default
            every other expert. Mutual learning distils a teacher's knowledge into the student, so a teacher
            that trained on the rows the student is validated on would leak those rows' labels into it and
            make its validation score dishonest: with cluster folds, pass ``Splits.teachers`` (computed once
            from the folds by ``train.data.mutual_teachers``). An expert without teachers has no
            ``kl_mutual`` term at all (as a lone expert has none): a term that is always zero would only
            drive a learned uncertainty weight toward infinity.
    """

    def __init__(self, experts: Mapping[str, Expert], loss_weights: Mapping[str, float], weighting: str = "fixed",
                 label_smoothing: float = 0.0, noise_std: float = 0.03, adversarial_noise: bool = False,
                 nce_temperature: float = 0.1, lib_temperature: float = L.LIB_TEMPERATURE, lib_distance: str = "kl",
                 teachers: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.experts = nn.ModuleDict(dict(experts))
        self.teachers = check_teachers(list(self.experts), teachers)
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
            return bool(self.teachers[key])
        return True

    def is_lib(self, key: str) -> bool:
        return isinstance(self.experts[key].head, LIBHead)

    def forward(self, images: Mapping[int, torch.Tensor], target: torch.Tensor,
                masks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, terms)``: the weighted total to backpropagate and each term (``"<expert>/<loss>"``).

        Args:
            images: Input size -> ``[B, 3, S, S]`` images in [0, 1] (channels-last is fine).
            target: ``[B]`` labels, 1 fake.
            masks: Expert key -> ``[B]`` bool: the rows that expert trains on, the only rows it runs on.
        """
        terms: dict[str, torch.Tensor] = {}
        logits: dict[str, torch.Tensor] = {}  # expert key -> logits of its own rows only
        for key, expert in self.experts.items():
            m = masks[key]
            if not bool(m.any()):
                self._zero_terms(terms, key, expert)
                continue
            x, y = own_rows(images[expert.config.input_size], m), own_rows(target, m)
            add = partial(self._add, terms, key, active=True)
            features = expert.forward_features(x)
            if self.is_lib(key):
                out = expert.head.forward_all(expert.head_input(features))
                logits[key] = out.fused.float()
                # The fused head is the prediction; the all-blocks head (both information losses' reference)
                # and every left-out head (what the local loss measures) are trained with CE too.
                every_head = torch.cat([out.fused, out.whole, out.dropped.flatten(0, 1)])  # zero-term anchor
                add("ce", lambda: L.lib_cross_entropy(out, y, self.label_smoothing), every_head)
                add("lib_global", lambda: L.lib_global_loss(out, self.lib_temperature, self.lib_distance),
                    out.fused)
                add("lib_local", lambda: L.lib_local_loss(out, self.lib_temperature, self.lib_distance),
                    out.dropped)
            else:
                logits[key] = expert.forward_head(features).float()
                add("ce", lambda: self._ce(logits[key], y), logits[key])
            add("kl_noise", lambda: L.consistency_kl(lambda z: expert(z)[0].float(), x, logits[key],
                                                     self.noise_std, self.adversarial), logits[key])
            add("nce", lambda: L.real_anchor_nce(features.float(), y, self.nce_temperature), features)
        for key in logits:
            teacher, student = self._teacher_probs(key, logits, masks)
            self._add(terms, key, "kl_mutual", lambda: kl_to_teacher(teacher, logits[key][student]), logits[key],
                      active=bool(student.any()))
        return self.weighting(terms), terms

    def _teacher_probs(self, key: str, logits: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The detached mean prediction of ``key``'s teachers, and which of ``key``'s rows it covers.

        Each expert's logits hold its own rows only, so rows are matched through the batch: a row of ``key``
        is compared with the mean over the teachers that also ran on it, and left out where none did.

        Returns:
            ``[n, K]`` teacher probabilities, and a ``[len(logits[key])]`` bool: the student's rows they are of.
        """
        rows = masks[key]
        total = logits[key].new_zeros(len(rows), logits[key].shape[-1], dtype=torch.float32)
        count = total.new_zeros(len(rows))
        for t in self.teachers[key]:
            if t in logits:  # a teacher with no row in this batch did not run
                total[masks[t]] += F.softmax(logits[t].detach().float(), dim=-1)
                count[masks[t]] += 1
        student = count[rows] > 0
        return (total[rows][student] / count[rows][student, None]), student

    def _zero_terms(self, terms: dict[str, torch.Tensor], key: str, expert: Expert) -> None:
        """Every term of an expert with no row in the batch, which therefore did not run: zeros connected to
        all its trainable parameters, since DDP expects a gradient, zero or not, for each on every rank."""
        anchor = sum(p.float().sum() for p in expert.parameters() if p.requires_grad) * 0.0
        for name in LOSS_NAMES:
            if f"{key}/{name}" in self.weighting.names:
                terms[f"{key}/{name}"] = anchor

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return L.cross_entropy(logits.float(), target, self.label_smoothing)

    def _add(self, terms: dict[str, torch.Tensor], key: str, name: str, compute: Callable[[], torch.Tensor],
             anchor: torch.Tensor, active: bool) -> None:
        """Compute a switched-on term. An inactive one (a batch with no row to compute it on) gives a zero that
        is still in the graph: DDP expects a gradient, zero or not, for every parameter on every rank."""
        term = f"{key}/{name}"
        if term in self.weighting.names:
            terms[term] = compute() if active else anchor.float().sum() * 0.0


def check_teachers(keys: list[str], teachers: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Every expert's teachers (default: every other expert), refusing unknown experts and self-teaching."""
    if teachers is None:
        return {k: [t for t in keys if t != k] for k in keys}
    missing, unknown = sorted(set(keys) - set(teachers)), sorted(set(teachers) - set(keys))
    bad = sorted({t for k, ts in teachers.items() for t in ts if t not in keys or t == k})
    if missing or unknown or bad:
        raise ValueError(f"mutual-learning teachers: experts without an entry {missing}, entries for unknown "
                         f"experts {unknown}, unknown or self teachers {bad}; experts: {keys}")
    return {k: [t for t in keys if t in teachers[k]] for k in keys}


def own_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]``; ``t`` itself when every row is selected (no copy, and the same computation as before)."""
    return t if bool(rows.all()) else t[rows]


def kl_to_teacher(teacher: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || softmax(student_logits)), batch mean; ``teacher`` (probabilities) is taken as given.

    The mutual-learning KL of ``train.losses.mutual_learning_kl``, for a teacher mean that the caller has
    already matched row by row to the student.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (torch.xlogy(teacher, teacher) - teacher * log_q).sum(dim=-1).mean()


def select_rows(out: LIBOutput, rows: torch.Tensor) -> LIBOutput:
    """The LIB outputs of some batch rows only."""
    return replace(out, **{f.name: getattr(out, f.name)[:, rows] if f.name == "dropped" else getattr(out, f.name)[rows]
                           for f in fields(out)})
