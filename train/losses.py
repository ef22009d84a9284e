"""The training losses of the joint objective, each a small function of logits, features or images.

Conventions: logits are ``[B, K]`` with index 1 "fake"; a KL is summed over classes and averaged over the
batch (``F.kl_div``'s ``batchmean``); the distribution-based losses work in float32 whatever the input
dtype (a KL in bfloat16 loses the small differences it is meant to measure). Nothing here knows about
experts or the training loop: ``train/objective.py`` combines these per expert with configured weights.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # only the fields are used: no import of the experts package at run time
    from experts.lib import LIBOutput

DISTANCES = ("kl", "sinkhorn")


# ------------------------------------------------------------------------------------------- helpers
def _kl_rows(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities ``[..., K]``; 0 * log 0 counts as 0."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def _zero_like_graph(t: Tensor) -> Tensor:
    """A float32 zero that is still connected to ``t``'s graph (DDP and ``backward`` both accept it)."""
    return t.float().sum() * 0.0


def _per_sample_unit(v: Tensor) -> Tensor:
    """``v`` scaled to unit L2 norm per sample (over every dimension but the first)."""
    norm = v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return v / norm.view(-1, *([1] * (v.dim() - 1)))


# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``[B, K]`` logits against ``[B]`` class indices (exactly ``F.cross_entropy``)."""
    return F.cross_entropy(logits, target.long(), label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- noise consistency
def adversarial_direction(forward: Callable[[Tensor], Tensor], images: Tensor, clean_logits: Tensor,
                          eps: float, xi: float | None = None) -> Tensor:
    """The VAT perturbation: ``eps`` times the unit (per sample) direction in which the KL grows fastest.

    One power iteration (Miyato et al. 2018): a random unit direction ``d``, the gradient of
    KL(p(y|x) || p(y|x + xi d)) with respect to ``d`` only, normalised per sample. ``torch.autograd.grad``
    is taken with respect to ``d`` alone, so no ``.grad`` lands on the model's parameters (nor do DDP's
    gradient hooks fire). A sample whose gradient is exactly zero (a saturated prediction, or a probe lost
    to rounding) keeps the random direction.

    ``xi`` (the probe's length) defaults to ``eps``. The textbook 1e-6 does not survive floating point
    here: images span [0, 1] over ~1e5 pixels, so a unit-norm probe times 1e-6 changes the logits less than
    float32 rounding (the direction comes out unrelated to the float64 one), and under bfloat16 autocast
    not at all (the gradient is exactly 0). With two classes the power iteration's direction is the
    gradient of the logit margin at the probe point whatever ``xi`` is, so a probe at the perturbation's
    own radius loses little: it is the "random start, then one gradient step" of fast adversarial training.

    Returns:
        ``r``, detached, shaped like ``images``, with per-sample L2 norm ``eps``.
    """
    xi = eps if xi is None else xi
    target = F.softmax(clean_logits.detach().float(), dim=-1)
    d = _per_sample_unit(torch.randn_like(images))
    d.requires_grad_(True)
    probe = F.log_softmax(forward(images.detach() + xi * d).float(), dim=-1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - probe)).sum(dim=-1).sum()
    (grad,) = torch.autograd.grad(kl, [d])
    grad = grad.detach()
    zero = grad.flatten(1).abs().amax(dim=1) == 0
    grad = torch.where(zero.view(-1, *([1] * (grad.dim() - 1))), d.detach(), grad)
    return eps * _per_sample_unit(grad)


def consistency_kl(forward: Callable[[Tensor], Tensor], images: Tensor, clean_logits: Tensor,
                   noise_std: float = 0.03, adversarial: bool = False, xi: float | None = None,
                   eps: float | None = None) -> Tensor:
    """KL(p(y|x) || p(y|x+r)): the prediction should not move under a small input perturbation ``r``.

    The clean distribution is detached: it is the target the noisy prediction is pulled toward, not pulled
    toward the noisy one itself (as in VAT and the Pi-model). ``x + r`` is clamped to [0, 1], the range of
    valid images.

    Args:
        forward: Images -> logits, e.g. ``lambda x: expert(x)[0]``. In training mode every call also
            updates BatchNorm statistics (twice with ``adversarial``), as in the usual VAT code.
        images: ``[B, C, H, W]`` in [0, 1].
        clean_logits: ``[B, K]`` logits of the clean images (detached here).
        noise_std: Standard deviation of the random Gaussian noise, in [0, 1] pixel units.
        adversarial: Find ``r`` VAT-style (:func:`adversarial_direction`) instead of at random.
        xi: Length of the VAT probe; default ``eps`` (see :func:`adversarial_direction` for why not 1e-6).
        eps: L2 norm of the adversarial ``r`` per sample; default ``noise_std * sqrt(C*H*W)``, the expected
            norm of the random noise, so both modes spend the same perturbation energy.
    """
    if adversarial:
        if eps is None:
            eps = noise_std * math.sqrt(images[0].numel())
        r = adversarial_direction(forward, images, clean_logits, eps, xi)
    else:
        r = noise_std * torch.randn_like(images)
    noisy = forward((images.detach() + r).clamp(0.0, 1.0))
    target = F.log_softmax(clean_logits.detach().float(), dim=-1)
    return _kl_rows(target, F.log_softmax(noisy.float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------- mutual learning
def mutual_learning_kl(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per expert: KL(mean of the other experts' detached probabilities || this expert's probabilities).

    Deep mutual learning (Zhang et al. 2018) with a peer ensemble as teacher: each expert is pulled toward
    what the others agree on, while the others are not pulled back through this term (their probabilities
    are detached; each gets its own term). With a single expert there is no peer, and every term is a zero
    still connected to that expert's logits.
    """
    if len(logits) < 2:
        return {k: _zero_like_graph(v) for k, v in logits.items()}
    probs = {k: F.softmax(v.detach().float(), dim=-1) for k, v in logits.items()}
    total = sum(probs.values())
    out = {}
    for k, v in logits.items():
        peers = (total - probs[k]) / (len(logits) - 1)
        log_q = F.log_softmax(v.float(), dim=-1)
        out[k] = (torch.xlogy(peers, peers) - peers * log_q).sum(dim=-1).mean()
    return out


# ------------------------------------------------------------------------------- contrastive (NCE)
def real_anchor_nce(features: Tensor, target: Tensor, temperature: float = 0.1, symmetric: bool = False) -> Tensor:
    """Supervised InfoNCE anchored on real images: reals cluster together, fakes are pushed away from them.

    Real images share one distribution while every forgery method leaves its own trace, so only the reals
    are asked to form one cluster (as in one-class / real-anchored deepfake detectors). On L2-normalised
    features with similarities ``s_ij = z_i . z_j / temperature``, each real anchor ``i`` scores
    ``-mean_{p real, p != i} [s_ip - logsumexp_{j != i} s_ij]`` (SupCon's "L_out" form): its positives are
    the other reals, its denominator every other sample. ``symmetric=True`` also uses fakes as anchors with
    the other fakes as positives (plain SupCon). The mean is over anchors.

    A batch without two samples of an anchor class, or without a sample of the other class, has nothing to
    contrast: it gives a zero still connected to ``features`` (never NaN).

    Args:
        features: ``[B, D]`` features (normalised here).
        target: ``[B]`` labels, 0 real, 1 fake.
    """
    target = target.long()
    real = target == 0
    n_real, n_fake = int(real.sum()), int((~real).sum())
    if n_real == 0 or n_fake == 0:
        return _zero_like_graph(features)
    z = F.normalize(features.float(), dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    positive = (target[:, None] == target[None, :]) & ~eye
    anchor = real & (n_real >= 2)
    if symmetric:
        anchor = anchor | (~real & (n_fake >= 2))
    if not bool(anchor.any()):
        return _zero_like_graph(features)
    per_anchor = -(log_prob * positive).sum(dim=1)[anchor] / positive.sum(dim=1)[anchor]
    return per_anchor.mean()


# ---------------------------------------------------------------------------------------- distances
def kl_distance(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(p/T) || softmax(q/T)) * T^2, batch mean (Hinton's distillation scaling: the T^2 keeps the
    gradient's size independent of T). Nothing is detached: detach the teacher before calling."""
    return kl_distance_rows(p_logits, q_logits, temperature).mean()


def kl_distance_rows(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`kl_distance` per row, ``[B]``."""
    t = temperature
    return _kl_rows(F.log_softmax(p_logits.float() / t, dim=-1), F.log_softmax(q_logits.float() / t, dim=-1)) * t * t


def ground_cost(k: int, kind: str = "ordinal", device: torch.device | None = None) -> Tensor:
    """``[k, k]`` transport cost between classes: ``"ordinal"`` ``|i - j|`` (ordered classes), or
    ``"zero_one"`` ``1 - I`` (every class equally far from every other). Both are the same for k = 2."""
    i = torch.arange(k, dtype=torch.float32, device=device)
    if kind == "ordinal":
        return (i[:, None] - i[None, :]).abs()
    if kind == "zero_one":
        return 1.0 - torch.eye(k, device=device)
    raise ValueError(f"cost kind must be 'ordinal' or 'zero_one', got {kind!r}")


def sinkhorn_rows(p: Tensor, q: Tensor, cost: Tensor | None = None, epsilon: float = 0.1, iters: int = 50) -> Tensor:
    """:func:`sinkhorn_distance` per row, ``[B]``."""
    p, q = p.float(), q.float()
    c = (ground_cost(p.shape[-1], device=p.device) if cost is None else cost.to(p.device, torch.float32))
    c = c.expand(p.shape[0], *c.shape[-2:])
    # Log-domain Sinkhorn on the dual potentials f, g: no exp(-C/eps) that underflows for small eps.
    # Probabilities are floored so that log(0) never enters the graph (its gradient would be NaN).
    log_a, log_b = p.clamp_min(1e-12).log(), q.clamp_min(1e-12).log()
    m = -c / epsilon
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    for _ in range(iters):
        f = epsilon * (log_a - torch.logsumexp(m + g[:, None, :] / epsilon, dim=2))
        g = epsilon * (log_b - torch.logsumexp(m + f[:, :, None] / epsilon, dim=1))
    plan = torch.exp(m + (f[:, :, None] + g[:, None, :]) / epsilon)
    return (plan * c).sum(dim=(1, 2))


def sinkhorn_distance(p: Tensor, q: Tensor, cost: Tensor | None = None, epsilon: float = 0.1,
                      iters: int = 50) -> Tensor:
    """Entropic optimal transport cost between probability vectors ``p`` and ``q`` (``[B, K]``), batch mean.

    Unlike a KL, a transport distance stays finite and informative when the two distributions barely
    overlap. Computed with ``iters`` log-domain Sinkhorn iterations (unrolled, so differentiable with
    respect to ``p`` and ``q``), it is the cost ``<P, C>`` of the entropic plan ``P``, which tends to the
    exact Wasserstein distance as ``epsilon`` goes to 0 (for K = 2 and the default cost: ``|p0 - q0|``).

    Args:
        cost: ``[K, K]`` (or ``[B, K, K]``) ground cost; default ``|i - j|`` (see :func:`ground_cost`).
        epsilon: Entropic regularisation, in the cost's units: smaller is sharper but needs more iterations.
    """
    return sinkhorn_rows(p, q, cost, epsilon, iters).mean()


# ------------------------------------------------------------------------------------ loss weighting
def _weights_of(weights: Mapping[str, float] | Iterable[str]) -> dict[str, float]:
    if isinstance(weights, Mapping):
        return {str(k): float(v) for k, v in weights.items()}
    return {str(k): 1.0 for k in weights}


class FixedWeighting(nn.Module):
    """Total = sum of the named losses times fixed weights.

    Args:
        weights: Loss name -> weight, or just names (weight 1). The weights are configuration, not state:
            they are kept out of ``state_dict``, so a resumed run uses the weights of its current config.
    """

    def __init__(self, weights: Mapping[str, float] | Iterable[str]):
        super().__init__()
        w = _weights_of(weights)
        self.names = tuple(w)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.register_buffer("weights", torch.tensor(list(w.values()), dtype=torch.float32), persistent=False)

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of ``losses`` (a subset of :attr:`names`; an unknown name raises ``KeyError``)."""
        total = self.weights.new_zeros(())
        for name, loss in losses.items():
            total = total + self.weights[self._position(name)] * loss
        return total

    def _position(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"loss {name!r} is not weighted; known: {list(self.names)}")
        return self._index[name]

    def current_weights(self) -> dict[str, float]:
        """Loss name -> the weight its loss is multiplied by now (for logging)."""
        return dict(zip(self.names, self.weights.tolist()))


class UncertaintyWeighting(FixedWeighting):
    """Learned weights (Kendall, Gal and Cipolla 2018): total = sum_k exp(-s_k) * L_k + s_k.

    Each loss gets a learned log-variance ``s_k``; a loss that stays large (noisy, or in larger units) is
    down-weighted, and the ``+ s_k`` term stops every weight from collapsing to 0. At the optimum
    ``exp(-s_k) = 1 / L_k``. ``s_k`` starts at ``-log(w_k)``, so training starts from the given weights
    (which must then be positive). The ``s_k`` are parameters: train them with the model (no weight decay).
    """

    def __init__(self, weights: Mapping[str, float] | Iterable[str]):
        super().__init__(weights)
        if bool((self.weights <= 0).any()):
            given = FixedWeighting.current_weights(self)
            raise ValueError(f"uncertainty weighting needs positive initial weights, got {given}")
        self.log_vars = nn.Parameter(-self.weights.log())

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        total = self.log_vars.new_zeros(())
        for name, loss in losses.items():
            s = self.log_vars[self._position(name)]
            total = total + torch.exp(-s) * loss + s
        return total

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.names, torch.exp(-self.log_vars.detach()).tolist()))


# --------------------------------------------------------------------------------------- LIB losses
# Ba et al., AAAI 2024, as the authors' code computes them (github.com/QingyuLiu/Exposing-the-Deception,
# ``losses/mi_loss.py`` with ``method='mi'``, the one ``training.py`` uses): both information losses compare
# tempered softmaxes (T = 1.5 there) and both treat the all-blocks prediction p(y|f_1..f_n) as the fixed
# reference, detached. One difference, on purpose: their ``nn.KLDivLoss()`` keeps its default elementwise
# ``'mean'``, which also divides the KL by the number of classes K (half the true KL for K = 2); here a KL
# is summed over classes and averaged over the batch, the true KL, like every other KL in this file. Nor is a
# KL scaled by T^2 here: neither loss is a distillation term weighed against a CE at T = 1.
LIB_TEMPERATURE = 1.5


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"LIB distance must be one of {DISTANCES}, got {distance!r}")


def _distance_rows(p_logits: Tensor, q_logits: Tensor, distance: str, temperature: float = 1.0) -> Tensor:
    """Per-row distance ``[...]`` from softmax(p / T) to softmax(q / T), logits ``[..., K]``: KL(p || q), or
    the Sinkhorn transport cost between them (the authors' ``mi_calculator='w'``). Not scaled by T^2."""
    _check_distance(distance)
    if distance == "kl":
        return _kl_rows(F.log_softmax(p_logits.float() / temperature, dim=-1),
                        F.log_softmax(q_logits.float() / temperature, dim=-1))
    soft = lambda x: F.softmax(x.float() / temperature, dim=-1)  # noqa: E731
    k = p_logits.shape[-1]
    return sinkhorn_rows(soft(p_logits).reshape(-1, k), soft(q_logits).reshape(-1, k)).reshape(p_logits.shape[:-1])


def lib_cross_entropy(out: "LIBOutput", target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE of every LIB classifier: the fused one (the prediction), the all-blocks one and each left-out one.

    Summed, as the authors do: the all-blocks head is the reference of both information losses and each
    left-out head is what the local loss measures, so each must be a calibrated classifier of its own blocks,
    not a free output that the information losses could bend at will.
    """
    ce = cross_entropy(out.fused.float(), target, label_smoothing) + cross_entropy(out.whole.float(), target,
                                                                                 label_smoothing)
    for left_out in out.dropped:
        ce = ce + cross_entropy(left_out.float(), target, label_smoothing)
    return ce


def lib_global_loss(out: "LIBOutput", temperature: float = LIB_TEMPERATURE, distance: str = "kl") -> Tensor:
    """Global information loss (GIL): the global feature z must keep what all the blocks know together.

    ``GIL = mean_b KL(p(y|z) || sg(p(y|f_1..f_n)))`` at temperature T, where ``p(y|z)`` is the fused head (the
    prediction) and ``p(y|f_1..f_n)`` the all-blocks head; the paper's I(z; y) should reach I(f_1..f_n; y).
    The direction, KL from the fused to the all-blocks distribution, is the authors' (``KLDivLoss(log
    p_all.detach(), p_z)``).

    Detached: the all-blocks side (``sg``), as in the authors' code. It is the teacher: a plain linear
    classifier that sees every block, fitted by CE alone. The gradient moves the fused head, the fusion
    bottleneck and, through it, the blocks, so that z passes on all the blocks' information; left free, the
    loss would equally pull the all-blocks head down to what a bottleneck that dropped a clue still predicts.
    """
    return _distance_rows(out.fused, out.whole.detach(), distance, temperature).mean()


def lib_local_loss(out: "LIBOutput", temperature: float = LIB_TEMPERATURE, distance: str = "kl") -> Tensor:
    """Local information loss (LIL): every block must carry information that the other blocks lack.

    ``LIL = exp(-sum_i mean_b KL(p(y|f_-i) || sg(p(y|f_1..f_n))))`` at temperature T, where ``p(y|f_-i)``
    is left-out head ``i`` (every block but ``i``, a head of its own trained with CE). If block ``i`` held
    nothing the others lack, the best prediction without it equals the one with it: KL 0. Hence
    ``LIL = 1`` when all the blocks are redundant (e.g. identical), and it falls toward 0 as each block
    becomes indispensable. The exponential bounds the loss to (0, 1]: maximising a KL is unbounded, and the
    bound stops it from drowning the CE terms once the blocks differ.

    Detached: the all-blocks side, as in the authors' code. Raising the KL by changing the reference would
    be the cheap way out (make the all-blocks head worse), so only the left-out heads and the blocks they
    read get the gradient, while CE keeps each left-out head an honest classifier of its ``n - 1`` blocks.
    Caveat, of the paper's loss itself: a left-out head that is more confident than the all-blocks head also
    raises the KL, so LIL is a training signal, not a proof of complementary blocks.

    Args:
        out: LIB outputs; ``out.dropped`` is ``[n, B, K]``.
        temperature: T of the tempered softmaxes (the authors' 1.5).
        distance: ``"kl"`` or ``"sinkhorn"``.
    """
    reference = out.whole.detach().unsqueeze(0).expand_as(out.dropped)
    per_block = _distance_rows(out.dropped, reference, distance, temperature).mean(dim=1)  # [n]
    return torch.exp(-per_block.sum())
