"""train/joint.py end to end on tiny experts: trains, writes loadable weights, resumes, reproduces, and says
so when a run has nothing left to do."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import torch
import yaml
from safetensors.torch import load_file

from experts import load_ensemble, read_manifest
from tests.conftest import ROOT
from train import joint, trainer
from train.checkpoint import CHECKPOINT, save_checkpoint
from train.config import load_config


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
    results = trainer.run(load_config([str(config)]), "test")
    assert {"set/test_efficientnet", "set/cnx", "set/ensemble"} <= set(results)
    ensemble = load_ensemble(out / "weights")
    assert ensemble.names == ["test_efficientnet", "cnx"]
    manifest = read_manifest(out / "weights")
    assert manifest["training"]["config"]["batch_size"] == 4
    assert "auc" in manifest["val_metrics"]["set"]
    assert len(pd.read_csv(out / "log.csv")) == 1

    assert joint.main([str(config), "--epochs=2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert list(pd.read_csv(out / "log.csv")["epoch"]) == [1, 2]

    # The same command again: the run is finished, and the command says so instead of a silent banner.
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert joint.main([str(config), "--epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert printed == (f"{out}: training already finished at epoch 2; nothing to do (use --out_dir elsewhere or "
                       "delete it to retrain; a larger --epochs trains on)\n")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == written  # nothing rewritten


def test_a_run_is_finished_only_when_every_step_is_trained_and_validated(tmp_path, labelled_csv):
    """finished_run reads the checkpoint's counters and the data split, no model: 2 steps per epoch here."""
    out = tmp_path / "run"
    out.mkdir()
    config = write_config(tmp_path, labelled_csv, out, epochs=2)
    cfg = load_config([str(config)])
    assert trainer.finished_run(cfg) is None  # no checkpoint yet

    def counters(**state):
        save_checkpoint(out / CHECKPOINT, **{"best": 0.75, "bad_epochs": 0, **state})

    counters(step=4, validated_step=4)
    assert trainer.finished_run(cfg) == trainer.FinishedRun(out, epoch=2, step=4, best=0.75, stopped_early=False)
    assert trainer.finished_run(load_config([str(config), "--epochs=3"])) is None  # more epochs: it trains on
    assert trainer.finished_run(load_config([str(config), "--resume=false"])) is None
    counters(step=4, validated_step=2)  # killed during the last validation: resuming repeats it
    assert trainer.finished_run(cfg) is None
    counters(step=2, validated_step=2, bad_epochs=1)  # epoch 1 of 2, one epoch without a better score
    assert trainer.finished_run(cfg) is None
    done = trainer.finished_run(load_config([str(config), "--patience=1"]))
    assert done is not None and done.epoch == 1 and done.stopped_early


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


def test_unknown_config_key_is_an_error(tmp_path, labelled_csv, capsys):
    config = write_config(tmp_path, labelled_csv, tmp_path / "x", learning_rate=0.1)
    assert joint.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown option(s) ['learning_rate']" in err and "Traceback" not in err
