"""The frozen-CLIP path end to end on a tiny offline base: token cache, held-out heads, refit, infer parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_BASE, write_labelled_set
from safetensors.torch import load_file

from experts import load_ensemble, read_manifest
from train import heads
from train.token_cache import CacheMismatchError, build_cache, load_cache, shard_path


@pytest.fixture
def two_sets(tmp_path):
    return [write_labelled_set(tmp_path / "a", n=16, seed=1), write_labelled_set(tmp_path / "b", n=12, seed=2)]


@pytest.fixture
def cache(tiny_base, two_sets, tmp_path):
    return build_cache(two_sets, tmp_path / "tokens", expert_name="test_clip", pretrained=TINY_BASE, input_size=64,
                       batch_size=8, workers=0, shard_size=10, progress=False)


def test_cache_holds_every_layers_class_token_and_regions_and_resumes(cache, two_sets, tmp_path):
    rows, tokens, meta = load_cache(cache)
    assert len(rows) == 28 and rows["ok"].all() and sorted(rows["set"].unique()) == ["a", "b"]
    assert tokens.shape == (28, 2, 1 + 4, 32) and tokens.dtype == np.float16  # 2 layers, CLS + 2x2 regions
    stamps = [shard_path(cache, i).stat().st_mtime_ns for i in range(3)]
    shard_path(cache, 2).unlink()  # as if killed before the last shard
    assert len(load_cache(cache, partial=True)[0]) == 20
    with pytest.raises(FileNotFoundError, match="run the cache command again"):
        load_cache(cache)
    build_cache(two_sets, cache, expert_name="test_clip", pretrained=TINY_BASE, input_size=64, batch_size=8,
                workers=0, shard_size=10, progress=False)
    assert [shard_path(cache, i).stat().st_mtime_ns for i in range(2)] == stamps[:2]  # finished shards kept
    np.testing.assert_array_equal(load_cache(cache)[1], tokens)


def test_a_cache_made_with_other_settings_is_not_resumed(cache, two_sets):
    with pytest.raises(CacheMismatchError, match="other settings"):
        build_cache(two_sets, cache, expert_name="test_clip", pretrained=TINY_BASE, input_size=64, grid=1,
                    batch_size=8, workers=0, shard_size=10, progress=False)


def test_cached_features_are_what_the_expert_computes_from_images(cache):
    rows, tokens, meta = load_cache(cache)
    for head, layers in (("linear", [1, 2]), ("lib", [2])):
        spec = heads.HeadSpec(layers=layers, head=head)
        expert = heads.build_expert(meta, spec, with_base=True).eval()
        from core.dataset import ImageDataset
        from core.transforms import shortcut_free_eval_transform
        data = ImageDataset(rows["path"][:4].tolist(), {64: shortcut_free_eval_transform(64, meta["jpeg_quality"])})
        images = torch.stack([data[i]["images"][64] for i in range(4)])
        with torch.no_grad():
            direct = expert.forward_features(images)
        cached = heads.cached_features(tokens[:4], meta, spec)
        torch.testing.assert_close(cached, direct, atol=2e-2, rtol=1e-2)  # the cache is float16


def test_heldout_sets_train_without_the_set_they_score(cache):
    rows, tokens, meta = load_cache(cache)
    sets = heads.heldout_sets(rows, None, [])
    seen = []
    original_fit = heads.fit_head

    def spy(expert, features, targets, weights, spec, progress=False):
        seen.append(len(targets))
        return original_fit(expert, features, targets, weights, spec, progress)

    heads.fit_head = spy
    try:
        report = heads.heldout_report(rows, tokens, meta, heads.HeadSpec(layers=[2], epochs=2), sets)
    finally:
        heads.fit_head = original_fit
    assert seen == [12, 16]  # set a (16 images) held out: trained on b's 12, and the other way round
    assert set(report) == {"set a", "set b"} and all(0 <= r["auc"] <= 1 for r in report.values())


def test_balanced_weights_give_every_set_and_class_equal_mass(cache):
    rows, _, _ = load_cache(cache)
    w = heads.balanced_weights(rows)
    mass = rows.assign(w=w).groupby(["set", "target"])["w"].sum()
    np.testing.assert_allclose(mass.to_numpy(), mass.iloc[0])


def test_refit_writes_an_expert_that_stores_its_head_and_scores_images_like_its_cache(cache, tmp_path, capsys):
    out = tmp_path / "weights"
    assert heads.main([str(cache), "--layers", "1", "2", "--epochs", "3", "--out", str(out)]) == 0
    manifest = read_manifest(out)
    entry = manifest["experts"][0]
    assert entry["base"] == TINY_BASE
    assert set(load_file(str(out / entry["file"]))) == {"head.weight", "head.bias"}
    assert manifest["training"]["parity_max_abs_diff"] < 2e-2
    assert json.loads((out / entry["config"]).read_text())["feature_layers"] == [1, 2]
    ensemble = load_ensemble(out)
    assert ensemble.experts[entry["key"]].config.backbone_config["num_hidden_layers"] == 2
    assert "held out set a" in capsys.readouterr().out


def test_lib_head_trains_on_cached_regions(cache, capsys):
    assert heads.main([str(cache), "--layers", "2", "--head", "lib", "--epochs", "2", "--no-refit"]) == 0
    assert "held out set b" in capsys.readouterr().out


def test_domain_mean_weighs_each_labelled_set_once():
    from evaluation.with_clip import domain_mean
    aucs = {"cluster 0": 0.9, "cluster 1": 0.8, "set general": 0.5}
    domains = {"cluster 0": "dfdc", "cluster 1": "dfdc", "set general": "general"}
    assert domain_mean(aucs, domains) == pytest.approx((0.85 + 0.5) / 2)


def test_a_trained_expert_counts_only_on_sets_it_never_trained_on():
    from evaluation.with_clip import candidate_table, eligible_experts
    manifest = {"experts": [{"key": "a"}, {"key": "b"}],
                "training": {"validation_sets": {"fold_0": ["a"], "fold_1": ["b"]}, "test_sets": ["cluster_3"]}}
    assert eligible_experts(manifest, "cluster 0", 0) == ["a"]
    assert eligible_experts(manifest, "cluster 3", 3) == ["a", "b"]
    assert eligible_experts(manifest, "set x", None) == ["a", "b"]
    targets = np.array([0, 0, 1, 1])
    probs = {"a": np.array([0.1, 0.2, 0.8, 0.9]), "b": np.array([0.9, 0.8, 0.2, 0.1]), "clip": np.array([0.4, 0.3, 0.6, 0.7])}
    table = candidate_table(targets, probs, ["a"])
    assert table["trained experts"]["members"] == ["a"] and table["trained experts"]["auc"] == 1.0
    assert table["trained experts + clip"]["members"] == ["a", "clip"]
    assert "expert b" not in table


def test_clip_choices_parse_head_and_layers():
    import importlib
    bench = importlib.import_module("bench.clip_choices")
    spec = bench.parse_choice("linear:8,12")
    assert spec.head == "linear" and spec.layers == [8, 12]
    assert bench.parse_choice("lib:10").layers == [10]
