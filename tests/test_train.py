"""train/joint.py end to end on tiny experts: trains, writes loadable weights, resumes, reproduces."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from experts import load_ensemble, read_manifest
from tests.conftest import ROOT
from train import joint


def write_config(tmp_path, csv, out, **overrides):
    config = {
        "experts": [{"name": "test_efficientnet"}, {"name": "test_convnext", "key": "cnx", "frozen_stages": 1}],
        "train": [{"csv": str(csv), "repeat": 2}],
        "val_fraction": 0.5, "epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "warmup_steps": 1,
        "workers": 0, "out_dir": str(out), "checkpoint_every": 1, **overrides,
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_trains_writes_weights_and_resumes(tmp_path, labelled_csv, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, labelled_csv, out)
    results = joint.main([str(config)])
    assert {"set/test_efficientnet", "set/cnx", "set/ensemble"} <= set(results)
    ensemble = load_ensemble(out / "weights")
    assert ensemble.names == ["test_efficientnet", "cnx"]
    manifest = read_manifest(out / "weights")
    assert manifest["training"]["config"]["batch_size"] == 4
    assert "auc" in manifest["val_metrics"]["set"]
    assert len(pd.read_csv(out / "log.csv")) == 1

    joint.main([str(config), "--epochs=2"])
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert list(pd.read_csv(out / "log.csv")["epoch"]) == [1, 2]


def test_same_seed_same_weights(tmp_path, labelled_csv):
    tensors = []
    for name in ("a", "b"):
        config = write_config(tmp_path, labelled_csv, tmp_path / name, experts=[{"name": "test_convnext"}])
        joint.main([str(config)])
        tensors.append(load_file(str(tmp_path / name / "weights" / "test_convnext" / "model.safetensors")))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_help_documents_every_option_from_the_repo_root():
    result = subprocess.run([sys.executable, "train/joint.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for option in ("--experts", "--train", "--ema_decay", "--lr", "--resume", "--val_jpeg_quality"):
        assert option in result.stdout


def test_unknown_config_key_is_an_error(tmp_path, labelled_csv):
    config = write_config(tmp_path, labelled_csv, tmp_path / "x", learning_rate=0.1)
    with pytest.raises(SystemExit, match="unknown option"):
        joint.main([str(config)])
