"""experts/lib.py (the LIB head) and its losses in train/losses.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts.lib import LIBHead, LIBOutput
from train import losses as L


def head(seed: int = 0, **kwargs) -> LIBHead:
    torch.manual_seed(seed)
    return LIBHead(16, **{"num_blocks": 3, "block_dim": 8, **kwargs})


def test_shapes_and_forward_is_the_fused_prediction() -> None:
    h = head().eval()
    x = torch.randn(5, 16)
    out = h.forward_all(x)
    assert isinstance(out, LIBOutput)
    assert out.fused.shape == (5, 2) and out.whole.shape == (5, 2)
    assert out.dropped.shape == (3, 5, 2) and out.block_features.shape == (5, 3, 8)
    assert torch.allclose(h(x), out.fused)
    weights = h.attention(out.block_features)
    assert weights.shape == (5, 3) and torch.allclose(weights.sum(-1), torch.ones(5))


def test_dropped_is_whole_head_with_one_block_zeroed() -> None:
    h = head().eval()
    x = torch.randn(4, 16)
    out = h.forward_all(x)
    for i in range(3):
        z = out.block_features.clone()
        z[:, i] = 0
        assert torch.allclose(out.dropped[i], h.whole_head(z.flatten(1)), atol=1e-6)
        assert not torch.allclose(out.dropped[i], out.whole)  # every block matters at random init
    # A block the all-blocks classifier ignores changes nothing when dropped.
    with torch.no_grad():
        h.whole_head.weight[:, 8:16] = 0  # block 1
    out = h.forward_all(x)
    assert torch.allclose(out.dropped[1], out.whole, atol=1e-6)
    assert L.lib_local_loss(out, margin=0.1) > 0


def test_lib_losses_values() -> None:
    same = LIBOutput(fused=torch.tensor([[1.0, -1.0]]), whole=torch.tensor([[1.0, -1.0]]),
                     dropped=torch.tensor([[[1.0, -1.0]], [[-3.0, 3.0]]]), block_features=torch.zeros(1, 2, 4))
    assert L.lib_global_loss(same, 2.0).abs() < 1e-6
    assert L.lib_global_loss(same, 2.0, "sinkhorn").abs() < 1e-3
    # Block 0's dropped prediction equals the full one (hinge at its margin); block 1's is far past it.
    for distance in L.DISTANCES:
        assert L.lib_local_loss(same, distance, margin=0.2).item() == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError):
        L.lib_global_loss(same, 2.0, "l2")


def test_global_loss_detaches_the_all_blocks_head() -> None:
    h = head()
    out = h.forward_all(torch.randn(6, 16))
    for distance in L.DISTANCES:
        loss = L.lib_global_loss(out, 2.0, distance)
        grads = torch.autograd.grad(loss, [h.whole_head.weight, h.fused_head.weight], retain_graph=True,
                                    allow_unused=True)
        assert grads[0] is None and grads[1].abs().sum() > 0


@pytest.mark.parametrize("distance", L.DISTANCES)
def test_losses_finite_and_reach_every_parameter(distance: str) -> None:
    h = head(drop_rate=0.1).train()
    x, y = torch.randn(8, 16), torch.tensor([0, 1] * 4)
    out = h.forward_all(x)
    ce = F.cross_entropy(out.fused, y) + F.cross_entropy(out.whole, y)
    local = L.lib_local_loss(out, distance, margin=10.0)  # a margin no block reaches: the hinge is active
    glob = L.lib_global_loss(out, 2.0, distance)
    assert all(torch.isfinite(t) for t in (ce, local, glob))
    (ce + local + glob).backward()
    for name, p in h.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_local_loss_bounded() -> None:
    h = head()
    out = h.forward_all(torch.randn(8, 16) * 100)
    for distance in L.DISTANCES:
        assert 0 <= L.lib_local_loss(out, distance, margin=0.3).item() <= 0.3


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from threads, and on a busy CPU the thread pool's waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_on_separable_toy_reduces_fused_ce(one_thread: None) -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 2, (64,))
    x = torch.randn(64, 16) + (2 * y[:, None] - 1) * torch.ones(16)  # class means 8 apart
    h = head(seed=1)
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    before = F.cross_entropy(h(x), y).item()
    for _ in range(15):
        out = h.forward_all(x)
        loss = (F.cross_entropy(out.fused, y) + F.cross_entropy(out.whole, y) + L.lib_global_loss(out)
                + L.lib_local_loss(out))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = F.cross_entropy(h(x), y).item()
    assert after < 0.5 * before
    assert (h(x).argmax(-1) == y).float().mean() > 0.95


def test_expert_with_lib_head() -> None:
    """The registry builds a LIB head from the expert config, and the expert's logits are its fused ones."""
    from experts import create_expert

    expert = create_expert("test_convnext", head="lib", lib_blocks=2, lib_dim=8).eval()
    assert isinstance(expert.head, LIBHead)
    images = torch.rand(2, 3, expert.config.input_size, expert.config.input_size)
    logits, features = expert(images)
    assert logits.shape == (2, 2)
    out = expert.head.forward_all(expert.head_input(features))
    assert torch.allclose(out.fused, logits, atol=1e-6) and out.dropped.shape == (2, 2, 2)
