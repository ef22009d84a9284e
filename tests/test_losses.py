"""train/losses.py: values on hand-computed cases, gradients, and the degenerate batches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train import losses as L


def tiny_net(seed: int = 0) -> nn.Module:
    """A small image classifier whose logits react to its input (a sharp final layer)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 2))
    with torch.no_grad():
        net[-1].weight.mul_(50.0)
    return net


# ------------------------------------------------------------------------------------------- CE, KL
def test_cross_entropy_equals_torch() -> None:
    logits, target = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(L.cross_entropy(logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(L.cross_entropy(logits, target, 0.1), F.cross_entropy(logits, target, label_smoothing=0.1))


def test_kl_distance_values() -> None:
    a = torch.randn(5, 3)
    assert L.kl_distance(a, a).abs() < 1e-6
    p, q = torch.tensor([[0.8, 0.2]]), torch.tensor([[0.5, 0.5]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert L.kl_distance(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-5)
    # Temperature: the distributions of logits/T, times T^2.
    t = 3.0
    soft = lambda x: F.log_softmax(x / t, dim=-1)  # noqa: E731
    manual = F.kl_div(soft(a.flip(0)), soft(a), log_target=True, reduction="batchmean") * t * t
    assert L.kl_distance(a, a.flip(0), temperature=t).item() == pytest.approx(manual.item(), rel=1e-5)


# --------------------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_matches_exact_w1_for_two_classes() -> None:
    p = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]])
    q = torch.tensor([[0.4, 0.6], [0.1, 0.9], [0.0, 1.0]])
    exact = (p[:, 0] - q[:, 0]).abs()
    sharp = L.sinkhorn_rows(p, q, epsilon=0.01, iters=200)
    assert torch.allclose(sharp, exact, atol=2e-3)
    assert L.sinkhorn_distance(p, q, epsilon=0.01, iters=200).item() == pytest.approx(exact.mean().item(), abs=2e-3)
    # The default epsilon is close, and approaches from a little above as epsilon shrinks.
    errors = [(L.sinkhorn_rows(p, q, epsilon=e, iters=300) - exact).abs().max().item() for e in (0.3, 0.1, 0.01)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.02


def test_sinkhorn_matches_exact_ot_for_more_classes() -> None:
    torch.manual_seed(0)
    p, q = torch.rand(4, 5).softmax(-1), (3 * torch.rand(4, 5)).softmax(-1)
    # |i - j| cost: W1 on a line is the L1 distance between the CDFs.
    w1 = (p.cumsum(-1) - q.cumsum(-1)).abs()[:, :-1].sum(-1)
    assert torch.allclose(L.sinkhorn_rows(p, q, epsilon=0.01, iters=500), w1, atol=5e-3)
    # 0-1 cost: the exact OT cost is the total variation distance.
    tv = 0.5 * (p - q).abs().sum(-1)
    assert torch.allclose(L.sinkhorn_rows(p, q, L.ground_cost(5, "zero_one"), epsilon=0.01, iters=500), tv, atol=5e-3)


def test_sinkhorn_is_differentiable_and_finite_with_zero_mass() -> None:
    logits = torch.tensor([[30.0, -30.0], [0.0, 1.0]], requires_grad=True)
    p = logits.softmax(-1)  # first row has ~0 mass in class 1
    d = L.sinkhorn_distance(p, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    d.backward()
    assert torch.isfinite(d) and torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() > 0


# ------------------------------------------------------------------------------ noise consistency
def test_consistency_kl_zero_without_noise_and_positive_with() -> None:
    net, x = tiny_net(), torch.rand(4, 3, 8, 8)
    clean = net(x)
    assert L.consistency_kl(net, x, clean, noise_std=0.0).abs() < 1e-6
    torch.manual_seed(1)
    noisy = L.consistency_kl(net, x, clean, noise_std=0.2)
    assert noisy > 0
    noisy.backward()  # the gradient reaches the model through the noisy pass only
    assert all(p.grad is not None for p in net.parameters())


def test_consistency_kl_clean_target_is_detached() -> None:
    net, x = tiny_net(), torch.rand(4, 3, 8, 8)
    clean = net(x)
    loss = L.consistency_kl(lambda z: net(z), x, clean, noise_std=0.1)
    (g,) = torch.autograd.grad(loss, [clean], allow_unused=True)
    assert g is None


def test_adversarial_direction_has_norm_eps_and_leaves_no_grads() -> None:
    net, x = tiny_net(), torch.rand(3, 3, 8, 8)
    clean = net(x)
    r = L.adversarial_direction(net, x, clean, eps=0.5)
    assert r.shape == x.shape and not r.requires_grad
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((3,), 0.5), atol=1e-5)
    assert all(p.grad is None for p in net.parameters())
    # The full loss also backpropagates into the model only through the final noisy pass.
    loss = L.consistency_kl(net, x, clean, noise_std=0.05, adversarial=True)
    assert all(p.grad is None for p in net.parameters())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_adversarial_noise_hurts_more_than_random_noise_of_the_same_norm() -> None:
    net, x = tiny_net(), torch.rand(16, 3, 8, 8)
    clean = net(x).detach()
    eps = 0.05 * math.sqrt(3 * 8 * 8)
    torch.manual_seed(0)
    adversarial = L.consistency_kl(net, x, clean, adversarial=True, eps=eps).item()
    torch.manual_seed(0)
    random = L.consistency_kl(net, x, clean, noise_std=0.05).item()
    assert adversarial > random


# --------------------------------------------------------------------------------- mutual learning
def test_mutual_learning_one_expert_is_zero_in_graph() -> None:
    logits = torch.randn(4, 2, requires_grad=True)
    out = L.mutual_learning_kl({"a": logits})
    assert out["a"].item() == 0 and out["a"].requires_grad and out["a"].dtype == torch.float32
    out["a"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mutual_learning_values_and_detached_peers() -> None:
    a = torch.randn(5, 2, requires_grad=True)
    b, c = torch.randn(5, 2, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    out = L.mutual_learning_kl({"a": a, "b": b, "c": c})
    peers = (b.softmax(-1) + c.softmax(-1)).detach() / 2
    manual = F.kl_div(a.log_softmax(-1), peers, reduction="batchmean")
    assert out["a"].item() == pytest.approx(manual.item(), rel=1e-5)
    grads = torch.autograd.grad(out["a"], [a, b, c], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None
    same = L.mutual_learning_kl({"a": a, "b": a.detach().clone()})
    assert same["a"].abs() < 1e-6 and same["b"].abs() < 1e-6


# ---------------------------------------------------------------------------------------- real NCE
def test_nce_lower_when_reals_cluster() -> None:
    torch.manual_seed(0)
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    direction = torch.randn(16)
    clustered = torch.cat([direction + 0.1 * torch.randn(4, 16), torch.randn(4, 16)])
    mixed = torch.randn(8, 16)
    for symmetric in (False, True):
        assert L.real_anchor_nce(clustered, target, symmetric=symmetric) < L.real_anchor_nce(mixed, target,
                                                                                              symmetric=symmetric)


def test_nce_hand_computed() -> None:
    # Two reals at +e1, one fake at -e1, T = 1: each real anchor has one positive (sim 1) and the
    # denominator exp(1) + exp(-1).
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    expected = -(1.0 - math.log(math.exp(1.0) + math.exp(-1.0)))
    assert L.real_anchor_nce(f, torch.tensor([0, 0, 1]), temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    # symmetric: the single fake has no positive, so it is no anchor and the value is unchanged.
    assert L.real_anchor_nce(f, torch.tensor([0, 0, 1]), 1.0, symmetric=True).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("target", [[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0]])
def test_nce_degenerate_batches_are_zero_in_graph(target: list[int]) -> None:
    f = torch.randn(len(target), 8, requires_grad=True)
    loss = L.real_anchor_nce(f, torch.tensor(target))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_nce_backpropagates() -> None:
    f = torch.randn(6, 8, requires_grad=True)
    L.real_anchor_nce(f, torch.tensor([0, 0, 0, 1, 1, 1])).backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ weighting
def test_fixed_weighting() -> None:
    w = L.FixedWeighting({"a": 2.0, "b": 0.5})
    total = w({"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    assert total.item() == pytest.approx(8.0)
    assert w.current_weights() == {"a": 2.0, "b": 0.5}
    assert list(w.parameters()) == [] and "weights" not in w.state_dict()
    with pytest.raises(KeyError):
        w({"c": torch.tensor(1.0)})


def test_uncertainty_weighting_value_and_gradient() -> None:
    w = L.UncertaintyWeighting({"a": 1.0, "b": 0.25})
    assert w.current_weights() == pytest.approx({"a": 1.0, "b": 0.25})
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.3, -0.7]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(5.0)}
    total = w(losses)
    s = torch.tensor([0.3, -0.7])
    assert total.item() == pytest.approx(float((torch.exp(-s) * torch.tensor([2.0, 5.0]) + s).sum()), rel=1e-6)
    total.backward()
    # d/ds_k [exp(-s_k) L_k + s_k] = 1 - exp(-s_k) L_k
    assert torch.allclose(w.log_vars.grad, 1 - torch.exp(-s) * torch.tensor([2.0, 5.0]))
    assert w.current_weights() == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.7)})
    assert "log_vars" in w.state_dict()
    with pytest.raises(ValueError):
        L.UncertaintyWeighting({"a": 0.0})


def test_uncertainty_weighting_learns_inverse_loss() -> None:
    w = L.UncertaintyWeighting(["a"])
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        w({"a": torch.tensor(4.0)}).backward()
        opt.step()
    assert w.current_weights()["a"] == pytest.approx(0.25, rel=1e-3)
