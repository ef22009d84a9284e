"""experts/clip_tower.py is a copy of transformers' CLIPVisionModel: same state dict, same outputs.

Each tiny random transformers tower is loaded into a ClipVisionTower (its state dict, unchanged); every output
the experts read (last hidden state, every hidden state, pooled output) must agree within 1e-5, at the
pretraining size and at interpolated ones (bicubic position embeddings), with quick_gelu and with gelu.
"""
from __future__ import annotations

import pytest
import torch

from experts.clip_tower import ClipVisionConfig, ClipVisionTower, build_tower

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
            image_size=64, projection_dim=32)


def reference(hidden_act: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, hidden_act=hidden_act)).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1 and 0: perturb them so that a slip shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_of(model: torch.nn.Module) -> ClipVisionTower:
    return build_tower(ClipVisionConfig.from_dict(model.config.to_dict()), model.state_dict()).eval()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("height, width", [(64, 64), (48, 48), (96, 96), (40, 56)])
def test_tower_equals_transformers_clip_vision_model(hidden_act, height, width):
    theirs = reference(hidden_act)
    ours = ours_of(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same keys, in the same order
    x = torch.randn(2, 3, height, width)
    resize = (height, width) != (64, 64)
    with torch.no_grad():
        a = theirs(pixel_values=x, interpolate_pos_encoding=resize, output_hidden_states=True)
        b = ours(pixel_values=x, interpolate_pos_encoding=resize, output_hidden_states=True)
    assert b.last_hidden_state.shape == (2, 1 + (height // 8) * (width // 8), 32)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=1e-5)
    assert len(b.hidden_states) == len(a.hidden_states) == 1 + TINY["num_hidden_layers"]
    for i, (hb, ha) in enumerate(zip(b.hidden_states, a.hidden_states)):
        torch.testing.assert_close(hb, ha, rtol=0, atol=1e-5, msg=f"hidden state {i}")
    assert ours(pixel_values=x, interpolate_pos_encoding=resize).hidden_states is None


def test_a_size_other_than_the_pretraining_one_needs_interpolation():
    ours = ours_of(reference("quick_gelu"))
    with pytest.raises(ValueError, match="doesn't match model"):
        ours(pixel_values=torch.randn(1, 3, 48, 48))


def test_gradients_match_in_training_mode():
    """LN-tuning and fine-tuning train through the tower: the gradients are transformers' too."""
    theirs = reference("quick_gelu").train()
    ours = ours_of(theirs).train()
    x = torch.randn(2, 3, 48, 48)
    theirs(pixel_values=x, interpolate_pos_encoding=True).pooler_output.square().sum().backward()
    ours(pixel_values=x, interpolate_pos_encoding=True).pooler_output.square().sum().backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_tower_built_for_loading_holds_the_loaded_tensors_and_no_meta_ones():
    theirs = reference("quick_gelu")
    state = theirs.state_dict()
    ours = build_tower(ClipVisionConfig.from_dict(theirs.config.to_dict()), state)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert all(p.requires_grad for p in ours.parameters())
    assert ours.embeddings.patch_embedding.weight.data_ptr() == state["embeddings.patch_embedding.weight"].data_ptr()
    partial = {k: v for k, v in state.items() if "post_layernorm" not in k}
    with pytest.raises(RuntimeError, match="post_layernorm"):
        build_tower(ClipVisionConfig.from_dict(theirs.config.to_dict()), partial)


def test_transformers4_layout_and_position_ids_load():
    """transformers < 5 nests the tower in ``vision_model.`` and some versions kept ``position_ids``."""
    theirs = reference("quick_gelu")
    old = {f"vision_model.{k}": v for k, v in theirs.state_dict().items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(65).unsqueeze(0)
    ours = ClipVisionTower(ClipVisionConfig(**TINY))
    ours.load_state_dict(old, strict=True)
    assert torch.equal(ours.encoder.layers[1].mlp.fc1.weight, theirs.encoder.layers[1].mlp.fc1.weight)


def test_random_init_follows_transformers_distributions():
    torch.manual_seed(0)
    config = ClipVisionConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 4})
    ours = ClipVisionTower(config)
    layer = ours.encoder.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - 64 ** -0.5 * 6 ** -0.5) < 0.01
    assert abs(layer.mlp.fc1.weight.std().item() - 128 ** -0.5) < 0.01
    assert torch.equal(layer.layer_norm1.weight, torch.ones(64)) and not layer.self_attn.q_proj.bias.any()


def test_save_pretrained_folder_loads_in_transformers(tmp_path):
    ours = ClipVisionTower(ClipVisionConfig(**TINY)).eval()
    ours.save_pretrained(tmp_path / "tower")
    theirs = transformers.CLIPVisionModel.from_pretrained(tmp_path / "tower").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values=x).pooler_output, theirs(pixel_values=x).pooler_output,
                                   rtol=0, atol=1e-5)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act"):
        ClipVisionConfig(**TINY, hidden_act="mish")
