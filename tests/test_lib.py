"""experts/lib.py (the LIB head over image regions) and its losses in train/losses.py.

The tests that matter for LIB are the ones a plain classifier could not pass: the local information loss must
be ~1 when every block carries the same information and clearly lower when each block adds its own clue,
even where cross-entropy (accuracy) cannot tell the two apart.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from experts.base import ExpertConfig, grid_pool
from experts.lib import LIBHead, LIBOutput
from train import losses as L

N_BLOCKS, REGION_DIM, BLOCK_DIM = 4, 16, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and on a busy CPU the thread pool's waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def head(seed: int = 0, region_dim: int = REGION_DIM, **kwargs) -> LIBHead:
    torch.manual_seed(seed)
    return LIBHead(region_dim, **{"num_blocks": N_BLOCKS, "block_dim": BLOCK_DIM, **kwargs})


def regions(rows: int = 5, seed: int = 0) -> torch.Tensor:
    """``[rows, N_BLOCKS, REGION_DIM]`` random region features."""
    return torch.randn(rows, N_BLOCKS, REGION_DIM, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the head
def test_shapes_and_forward_is_the_fused_prediction() -> None:
    h = head().eval()
    x = regions()
    out = h.forward_all(x)
    assert isinstance(out, LIBOutput)
    assert out.fused.shape == (5, 2) and out.whole.shape == (5, 2)
    assert out.dropped.shape == (N_BLOCKS, 5, 2) and out.block_features.shape == (5, N_BLOCKS, BLOCK_DIM)
    assert torch.allclose(h(x), out.fused)
    assert len(h.left_out_heads) == N_BLOCKS  # one head per left-out block, not one shared head


def test_left_out_head_i_is_blind_to_region_i_and_only_to_it() -> None:
    h = head().eval()
    x = regions()
    before = h.forward_all(x)
    for i in range(N_BLOCKS):
        changed = x.clone()
        changed[:, i] += 3.0 * torch.randn(5, REGION_DIM)
        after = h.forward_all(changed)
        assert torch.allclose(after.dropped[i], before.dropped[i], atol=1e-6)
        assert not torch.allclose(after.whole, before.whole) and not torch.allclose(after.fused, before.fused)
        for j in range(N_BLOCKS):
            if j != i:
                assert not torch.allclose(after.dropped[j], before.dropped[j])


def test_head_refuses_pooled_features_and_too_few_blocks() -> None:
    """Blocks are regions: a pooled ``[B, D]`` vector (the old input) is refused, not silently projected."""
    h = head()
    with pytest.raises(ValueError, match="region features"):
        h(torch.randn(5, REGION_DIM))
    with pytest.raises(ValueError, match="region features"):
        h(torch.randn(5, N_BLOCKS + 1, REGION_DIM))
    with pytest.raises(ValueError, match="num_blocks >= 2"):
        LIBHead(REGION_DIM, num_blocks=1)


# -------------------------------------------------------------------------------- loss definitions
def test_loss_values_by_hand() -> None:
    t = 1.5
    fused, whole = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    dropped = torch.stack([whole, torch.tensor([[0.0, 3.0]])])  # block 0 redundant, block 1 not
    out = LIBOutput(fused=fused, whole=whole, dropped=dropped, block_features=torch.zeros(1, 2, 4))
    p = torch.softmax(torch.tensor([2.0, 0.0]) / t, 0)
    # GIL = KL(p_fused || p_all): the authors' direction, no T^2 factor.
    assert L.lib_global_loss(out, t).item() == pytest.approx(float((p * (p / 0.5).log()).sum()), rel=1e-5)
    q = torch.softmax(torch.tensor([0.0, 3.0]) / t, 0)
    kl_block1 = float((q * (q / 0.5).log()).sum())  # KL(p_-1 || p_all); block 0 adds 0
    assert L.lib_local_loss(out, t).item() == pytest.approx(math.exp(-kl_block1), rel=1e-5)
    # Every left-out prediction equal to the full one: no block adds anything, LIL is exactly 1.
    same = LIBOutput(fused=whole, whole=whole, dropped=torch.stack([whole, whole]), block_features=out.block_features)
    for distance in L.DISTANCES:
        assert L.lib_global_loss(same, t, distance).abs() < 1e-3
        assert L.lib_local_loss(same, t, distance).item() == pytest.approx(1.0, abs=1e-3)
        assert L.lib_local_loss(out, t, distance).item() < 0.95
    with pytest.raises(ValueError):
        L.lib_global_loss(out, t, "l2")


def test_default_temperature_is_the_papers() -> None:
    from train.config import TrainConfig
    from train.objective import JointObjective

    assert L.LIB_TEMPERATURE == 1.5 and TrainConfig.__dataclass_fields__["lib_temperature"].default == 1.5
    assert inspect.signature(JointObjective).parameters["lib_temperature"].default == 1.5


def test_cross_entropy_covers_every_head() -> None:
    out = head().forward_all(regions(6))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    expected = F.cross_entropy(out.fused, y) + F.cross_entropy(out.whole, y)
    expected = expected + sum(F.cross_entropy(d, y) for d in out.dropped)
    assert torch.allclose(L.lib_cross_entropy(out, y), expected)


@pytest.mark.parametrize("distance", L.DISTANCES)
def test_each_loss_detaches_the_all_blocks_head(distance: str) -> None:
    """GIL moves the fused path toward the all-blocks head; LIL moves the left-out heads away from it; neither
    moves the all-blocks head, and LIL leaves the fused path alone."""
    h = head()
    out = h.forward_all(regions(6))
    named = dict(h.named_parameters())

    def reached(loss: torch.Tensor) -> set[str]:
        grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True, allow_unused=True)
        return {n for n, g in zip(named, grads) if g is not None and g.abs().sum() > 0}

    glob = reached(L.lib_global_loss(out, 1.5, distance))
    assert {"fused_head.weight", "fusion.0.weight", "blocks.0.0.weight"} <= glob
    assert not any(n.startswith(("whole_head", "left_out_heads")) for n in glob)
    local = reached(L.lib_local_loss(out, 1.5, distance))
    assert {f"left_out_heads.{i}.weight" for i in range(N_BLOCKS)} <= local and "blocks.0.0.weight" in local
    assert not any(n.startswith(("whole_head", "fused_head", "fusion")) for n in local)


@pytest.mark.parametrize("distance", L.DISTANCES)
def test_losses_finite_bounded_and_reach_every_parameter(distance: str) -> None:
    y = torch.tensor([0, 1] * 4)
    # Large inputs saturate the softmaxes: the losses and their gradients must stay finite and bounded.
    h = head(drop_rate=0.1).train()
    out = h.forward_all(regions(8) * 100)
    ce = L.lib_cross_entropy(out, y)
    local, glob = L.lib_local_loss(out, 1.5, distance), L.lib_global_loss(out, 1.5, distance)
    assert all(torch.isfinite(t) for t in (ce, local, glob))
    assert 0.0 < local.item() <= 1.0 and glob.item() >= 0.0
    (ce + local + glob).backward()
    assert all(torch.isfinite(p.grad).all() for p in h.parameters() if p.grad is not None)
    # Every parameter gets a gradient, measured where no softmax is saturated and in float64: a bias that
    # saturation makes dead would pass or fail on rounding noise, i.e. on the torch build (it did).
    h = head(drop_rate=0.1).double().train()
    out = h.forward_all(regions(8).double())
    (L.lib_cross_entropy(out, y) + L.lib_local_loss(out, 1.5, distance) + L.lib_global_loss(out, 1.5, distance)).backward()
    for name, p in h.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 1e-8, name


# ------------------------------------------------------------- LIL must measure what blocks know
def averaging_head() -> LIBHead:
    """A head whose blocks all compute the same projection and whose classifiers all read the mean block
    (weights ``w / n`` per block for the whole head, ``w / (n - 1)`` for each left-out head): on identical
    regions every left-out prediction then equals the full one exactly."""
    h = head()
    with torch.no_grad():
        for block in h.blocks[1:]:
            block.load_state_dict(h.blocks[0].state_dict())
        w, b = torch.randn(2, BLOCK_DIM) * 3, torch.randn(2)
        h.whole_head.weight.copy_(w.repeat(1, N_BLOCKS) / N_BLOCKS)
        h.whole_head.bias.copy_(b)
        for left_out in h.left_out_heads:
            left_out.weight.copy_(w.repeat(1, N_BLOCKS - 1) / (N_BLOCKS - 1))
            left_out.bias.copy_(b)
    return h.eval()


def test_identical_regions_give_lil_one_and_distinct_regions_lower() -> None:
    h = averaging_head()
    distinct = regions(32)
    identical = distinct[:, :1].expand(-1, N_BLOCKS, -1)
    with torch.no_grad():
        lil_identical = L.lib_local_loss(h.forward_all(identical)).item()
        lil_distinct = L.lib_local_loss(h.forward_all(distinct)).item()
    assert lil_identical == pytest.approx(1.0, abs=1e-5)
    assert lil_distinct < 0.9


def clue_data(kind: str, rows: int, seed: int, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, 4, 16]`` regions and ``[rows]`` labels of equal Bayes accuracy (about 0.98) either way.

    ``"distinct"``: every region holds its own noisy clue of the label (independent noise), so each block
    adds information. ``"same"``: one clue, twice as strong (the SNR of four independent clues), copied into
    every region: any one block knows everything the others do.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (rows,), generator=g)
    sign = (2 * y - 1).float()[:, None]
    direction = torch.ones(REGION_DIM) / REGION_DIM ** 0.5
    if kind == "same":
        clue = sign * strength * N_BLOCKS ** 0.5 * direction + torch.randn(rows, REGION_DIM, generator=g)
        return clue[:, None].expand(rows, N_BLOCKS, REGION_DIM).contiguous(), y
    return sign[:, :, None] * strength * direction + torch.randn(rows, N_BLOCKS, REGION_DIM, generator=g), y


def train_with_ce_only(x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> LIBHead:
    h = head(seed=1)
    opt = torch.optim.Adam(h.parameters(), lr=2e-2)
    for _ in range(steps):
        loss = L.lib_cross_entropy(h.forward_all(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return h.eval()


def test_lil_separates_redundant_from_complementary_blocks_where_ce_cannot() -> None:
    """Heads trained by CE on blocks that all hold the same clue, or each their own: both predict well (a
    test of accuracy passes either way), but only with complementary blocks does leaving one out change the
    prediction, so LIL is ~1 for the first and clearly lower for the second (on held-out rows)."""
    lil, accuracy = {}, {}
    for kind in ("same", "distinct"):
        h = train_with_ce_only(*clue_data(kind, 512, seed=0))
        x, y = clue_data(kind, 1024, seed=1)
        with torch.no_grad():
            out = h.forward_all(x)
        lil[kind] = L.lib_local_loss(out).item()
        accuracy[kind] = (out.fused.argmax(-1) == y).float().mean().item()
    assert min(accuracy.values()) > 0.9, accuracy
    assert lil["same"] > 0.95, lil
    assert lil["distinct"] < 0.85 and lil["same"] - lil["distinct"] > 0.15, lil


def test_training_with_every_lib_loss_fits_and_lowers_lil() -> None:
    """The full LIB objective still fits, and its local term is what pushes the left-out predictions away
    from the full one: from the same start, CE alone leaves LIL high, CE + GIL + LIL brings it well down."""
    x, y = clue_data("distinct", 512, seed=0)
    lil_after = {}
    for with_lib in (False, True):
        h = head(seed=1)
        opt = torch.optim.Adam(h.parameters(), lr=2e-2)
        before = F.cross_entropy(h(x), y).item()
        for _ in range(60):
            out = h.forward_all(x)
            loss = L.lib_cross_entropy(out, y)
            if with_lib:
                loss = loss + L.lib_global_loss(out) + L.lib_local_loss(out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        h.eval()
        with torch.no_grad():
            out = h.forward_all(x)
        assert F.cross_entropy(out.fused, y).item() < 0.5 * before
        assert (out.fused.argmax(-1) == y).float().mean() > 0.9
        lil_after[with_lib] = L.lib_local_loss(out).item()
    assert lil_after[True] < lil_after[False] - 0.2, lil_after


# ------------------------------------------------------------------------------ experts with regions
def test_grid_pool_is_row_major_cell_means() -> None:
    fmap = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 3, 4, 4)
    cells = grid_pool(fmap, 2)
    assert cells.shape == (2, 4, 3)
    assert cells[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # top-left, top-right, bottom-left, bottom-right
    with pytest.raises(ValueError, match="at least"):
        grid_pool(torch.zeros(1, 3, 2, 2), 3)


def test_expert_with_lib_head_reads_regions() -> None:
    """The registry builds a LIB head with one block per region; the expert's features are its flattened
    regions and its logits the fused ones, so ensembles and inference use it like any expert."""
    from experts import create_expert

    torch.manual_seed(0)
    expert = create_expert("test_convnext", head="lib", lib_grid=2, lib_dim=8).eval()
    assert isinstance(expert.head, LIBHead) and expert.head.num_blocks == 4
    images = torch.rand(2, 3, expert.config.input_size, expert.config.input_size)
    with torch.no_grad():
        logits, features = expert(images)
        regions_ = expert.forward_regions(images)
        out = expert.head.forward_all(expert.head_input(features))
    assert logits.shape == (2, 2) and regions_.shape == (2, 4, expert.region_dim)
    assert features.shape == (2, expert.num_features) and torch.allclose(features, regions_.flatten(1))
    assert torch.allclose(out.fused, logits, atol=1e-6) and out.dropped.shape == (4, 2, 2)
    with pytest.raises(ValueError, match="at least"):  # a 2x2 feature map cannot hold a 3x3 grid
        create_expert("test_convnext", head="lib", lib_grid=3)(images)


def test_expert_config_lib_grid_and_legacy_lib_blocks() -> None:
    with pytest.raises(ValueError, match="lib_grid >= 2"):
        ExpertConfig(name="x", family="clip", arch="x", input_size=64, head="lib", lib_grid=1)
    base = dict(name="x", family="efficientnet", arch="x", input_size=64)
    # Every config saved before lib_grid carries lib_blocks; a linear head never used it.
    assert ExpertConfig.from_dict({**base, "lib_blocks": 4}).lib_grid == 2
    with pytest.raises(ValueError, match="retrain"):
        ExpertConfig.from_dict({**base, "head": "lib", "lib_blocks": 4})


def test_joint_objective_lib_branch() -> None:
    """The objective's LIB terms: CE over every head, GIL and LIL at the paper's T, only over the expert's
    rows; an expert without rows still gives every head a (zero) gradient, as DDP needs."""
    from experts import create_expert
    from train.objective import JointObjective

    torch.manual_seed(0)
    expert = create_expert("test_clip", head="lib", lib_dim=8)
    objective = JointObjective({"clip": expert}, {"ce": 1.0, "lib_global": 1.0, "lib_local": 0.5})
    images, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 1, 0])
    rows = torch.tensor([True, True, True, False])
    total, terms = objective({64: images}, y, {"clip": rows})
    with torch.no_grad():
        out = expert.head.forward_all(expert.head_input(expert.forward_features(images[rows])))
    assert terms["clip/ce"].item() == pytest.approx(L.lib_cross_entropy(out, y[rows]).item(), rel=1e-4)
    assert terms["clip/lib_local"].item() == pytest.approx(L.lib_local_loss(out, 1.5).item(), rel=1e-4)
    assert terms["clip/lib_global"].item() == pytest.approx(L.lib_global_loss(out, 1.5).item(), rel=1e-3, abs=1e-6)
    total.backward()
    assert all(p.grad is not None for p in expert.head.parameters())

    expert.zero_grad()
    total, terms = objective({64: images}, y, {"clip": torch.zeros(4, dtype=torch.bool)})
    assert all(t.item() == 0.0 for t in terms.values())
    total.backward()
    assert all(p.grad is not None for p in expert.head.left_out_heads.parameters())
