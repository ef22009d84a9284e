"""evaluation/loss_ablation.py on a tiny synthetic token cache with a planted signal: each configuration
switches on exactly its losses, the ensemble learns the signal, runs are seeded, --help imports no torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import loss_ablation as la
from tests.conftest import ROOT

N_LAYERS, WIDTH = 2, 32  # test_clip's tower: 2 layers of width 32
SETTINGS = la.TrainSettings(epochs=3, batch_size=32, lr=3e-3)


def write_tiny_cache(folder: Path, n: int = 240, seed: int = 0) -> tuple[Path, Path]:
    """A cache in train/token_cache.py's format (``cache.json``, ``index.csv``, one safetensors shard) of
    random tokens where fakes carry a planted shift in every token, and a splits file: set ``a`` in clusters
    0..2, set ``b`` unlisted (a training set for every fold)."""
    from safetensors.numpy import save_file

    from experts.clip import _CFGS

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target = np.arange(n) % 2
    tokens = rng.normal(size=(n, N_LAYERS, 5, WIDTH)).astype(np.float32)
    tokens[:, :, :, :4] += 1.5 * target[:, None, None, None]  # the planted signal, in every layer and region
    sets = np.where(np.arange(n) < 3 * n // 4, "a", "b")
    paths = [str(folder / "images" / f"{s}_{i:04d}.jpg") for i, s in enumerate(sets)]
    rows = pd.DataFrame({"img_name": [Path(p).name for p in paths], "target": target, "path": paths, "set": sets})
    rows.to_csv(folder / "index.csv", index=False)
    meta = {"expert": "test_clip", "pretrained": "none", "input_size": 64, "grid": 2, "jpeg_quality": 90,
            "layers": list(range(1, N_LAYERS + 1)),
            "config": {"backbone_config": _CFGS["test_clip"]["backbone_config"]},
            "csvs": [], "n": n, "shard_size": n}
    (folder / "cache.json").write_text(json.dumps(meta))
    save_file({"tokens": tokens.astype(np.float16), "ok": np.ones(n, np.uint8)},
              str(folder / "shard-00000.safetensors"))
    listed = rows[rows["set"] == "a"].assign(cluster=lambda d: (np.arange(len(d)) // 2) % 3)
    listed[["img_name", "target", "path", "cluster"]].to_csv(folder / "splits.csv", index=False)
    return folder, folder / "splits.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train.token_cache import load_cache

    torch.set_num_threads(1)
    cache, splits = write_tiny_cache(tmp_path_factory.mktemp("tokens"))
    rows, tokens, meta = load_cache(cache)
    choices = [la.ExpertChoice.parse(e) for e in ("lib:2", "lib:1", "linear:2")]
    fold = la.make_fold(rows, tokens, meta, splits, [2], choices)
    return {"cache": cache, "splits": splits, "fold": fold, "templates": la.head_templates(meta, choices)}


@pytest.fixture(scope="module")
def recipe():
    return la.read_recipe(la.DEFAULT_RECIPE)


def test_parsing_and_config_weights(recipe):
    assert la.ExpertChoice.parse("lib:8,12") == la.ExpertChoice("lib", (8, 12))
    for bad in ("lib", "conv:3", "lib:x"):
        with pytest.raises(la.AblationError):
            la.ExpertChoice.parse(bad)
    weights, _ = recipe
    for config, names in la.CONFIGS.items():
        w = la.config_weights(config, weights)
        assert set(w) == set(names) and w["ce"] == 1.0
        assert all(w[n] == weights[n] for n in names if n != "ce")  # the recipe's weights
    with pytest.raises(la.AblationError):
        la.config_weights("ce+foo", weights)


@pytest.mark.parametrize("config", list(la.CONFIGS))
def test_each_config_switches_on_exactly_its_losses(tiny, recipe, config):
    weights, objective_settings = recipe
    fold = tiny["fold"]
    objective = la.build_objective(tiny["templates"], fold.layer_order, la.config_weights(config, weights),
                                   objective_settings, seed=0)
    on = {name for name, w in objective.weights.items() if w > 0}
    assert on == set(la.CONFIGS[config])
    masks = {key: torch.ones(16, dtype=torch.bool) for key in objective.experts}
    total, terms = objective({fold.input_size: fold.train_tokens[:16]}, fold.train_targets[:16], masks)
    assert torch.isfinite(total)
    for key in objective.experts:
        names = {t.split("/", 1)[1] for t in terms if t.startswith(key + "/")}
        expected = set(la.CONFIGS[config]) - (set() if key.startswith("lib") else {"lib_global", "lib_local"})
        assert names == expected, (key, names)


def test_small_cells_can_be_left_out(tiny):
    from train.token_cache import load_cache

    rows, tokens, meta = load_cache(tiny["cache"])
    full = tiny["fold"].description
    assert full["train_cells"] == {"a/0": 60, "a/1": 60, "b/0": 30, "b/1": 30} and full["dropped_cells"] == {}
    fold = la.make_fold(rows, tokens, meta, tiny["splits"], [2], [la.ExpertChoice("lib", (2,))], min_cell_rows=31)
    assert fold.description["dropped_cells"] == {"b/0": 30, "b/1": 30} and len(fold.train_tokens) == 120


def test_cached_expert_matches_cached_features(tiny):
    """forward_features on a token batch is train.heads.cached_features of the same rows."""
    from train.heads import HeadSpec, cached_features

    fold = tiny["fold"]
    tokens = fold.train_tokens[:8].numpy()
    for template in tiny["templates"]:
        expert = la.cached_expert(template, fold.layer_order, seed=0)
        spec = HeadSpec(layers=list(template.choice.layers), head=template.choice.head)
        meta = {"layers": fold.layer_order}
        assert torch.equal(expert.forward_features(fold.train_tokens[:8]), cached_features(tokens, meta, spec))
        assert set(dict(expert.named_parameters())) == {f"head.{k}" for k, _ in expert.head.named_parameters()}


def test_runs_learn_the_signal_and_are_seeded(tiny, recipe):
    weights, objective_settings = recipe
    w = la.config_weights("ce+kl+nce+lib", weights)
    runs = [la.run_one(tiny["fold"], tiny["templates"], "ce+kl+nce+lib", w, objective_settings, SETTINGS, seed)
            for seed in (0, 0, 1)]
    (name, scores), = runs[0].metrics.items()
    assert scores["ensemble"]["auc"] > 0.9, scores  # chance is 0.5
    assert runs[0].metrics == runs[1].metrics and runs[0].loss_curve == runs[1].loss_curve
    assert runs[0].loss_curve != runs[2].loss_curve
    assert len(runs[0].loss_curve) == SETTINGS.epochs and len(runs[0].auc_curve[name]) == SETTINGS.epochs
    assert set(runs[0].term_curves) == {f"{k}/{n}" for k in ("lib_l2", "lib_l1", "linear_l2")
                                        for n in la.CONFIGS["ce+kl+nce+lib"]
                                        if k.startswith("lib") or not n.startswith("lib")}


def test_nce_on_frozen_tokens_changes_nothing(tiny, recipe):
    """JointObjective computes nce on forward_features, here the frozen cache: no gradient reaches a head."""
    weights, objective_settings = recipe
    a, b = (la.run_one(tiny["fold"], tiny["templates"], c, la.config_weights(c, weights), objective_settings,
                       SETTINGS, 0, curve=False) for c in ("ce+kl", "ce+kl+nce"))
    assert a.metrics == b.metrics and a.term_curves.items() <= b.term_curves.items()


def test_command_writes_json_and_markdown(tiny, tmp_path, capsys):
    out = tmp_path / "ablation"
    code = la.main([str(tiny["cache"]), "--splits", str(tiny["splits"]), "--holdout", "2", "--experts", "lib:2",
                    "linear:1", "--configs", "ce", "ce+kl", "--seeds", "0", "1", "--epochs", "2", "--batch-size",
                    "32", "--threads", "1", "--no-curve", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ce+kl |" in printed and "ce+kl - ce" in printed
    doc = json.loads((out / "ablation.json").read_text())
    assert len(doc["runs"]) == 4 and doc["configs"]["ce+kl"]["kl_mutual"] > 0
    assert set(doc["summary"]["table"]) == {"ce", "ce+kl"}
    assert "| ce |" in (out / "ablation.md").read_text()
    assert la.main([str(tiny["cache"]), "--splits", str(tiny["splits"]), "--holdout", "9", "--experts", "lib:2",
                    "--threads", "1", "--out", str(out)]) == 2
    assert "no cached rows" in capsys.readouterr().err


def test_help_imports_no_torch(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['loss_ablation.py', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "print('HEAVY', sorted(m for m in ('torch', 'pandas', 'sklearn', 'train', 'experts') if m in sys.modules))"
            ) % str(ROOT / "evaluation" / "loss_ablation.py")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "usage:" in result.stdout and "HEAVY []" in result.stdout, result.stdout + result.stderr
