"""The full joint recipe on tiny experts: every loss, LIB and LN-tuning, cluster folds, accumulation,
early stopping, resume after a kill, and two-process DDP (gloo on CPU)."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import infer
from experts import load_ensemble, read_manifest
from tests.conftest import ROOT, write_labelled_set
from train import joint, trainer
from train.data import build_splits, mutual_teachers
from train.config import ConfigError, TrainConfig, load_config
from train.objective import JointObjective

ALL_LOSSES = {"ce": 1.0, "kl_noise": 0.5, "kl_mutual": 0.5, "nce": 0.1, "lib_global": 1.0, "lib_local": 0.5}
THREE_FAMILIES = [
    {"name": "test_efficientnet", "key": "eff"},
    {"name": "test_convnext", "key": "cnx"},
    {"name": "test_clip", "key": "clip", "head": "lib", "lib_grid": 2, "lib_dim": 16, "tuning": "layernorm",
     "normalize_features": True},
]


@pytest.fixture
def set32(tmp_path):
    return write_labelled_set(tmp_path / "set32", n=32)


def write_config(tmp_path, name, **options):
    config = {"experts": THREE_FAMILIES, "val_fraction": 0.5, "epochs": 1, "batch_size": 4, "steps_per_epoch": 2,
              "warmup_steps": 1, "workers": 0, "out_dir": str(tmp_path / name), "checkpoint_every": 1,
              "tensorboard": False, "log_every": 1, **options}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_every_loss_trains_resumes_and_gives_weights_infer_loads(tmp_path, set32, capsys):
    config = write_config(tmp_path, "all", train=[{"csv": str(set32)}], loss_weights=ALL_LOSSES, tensorboard=True)
    joint.main([str(config)])
    log = pd.read_csv(tmp_path / "all" / "train_log.csv")
    for key in ("eff", "cnx", "clip"):
        for loss in ("ce", "kl_noise", "kl_mutual", "nce"):
            assert np.isfinite(log[f"{key}/{loss}"]).all()
    assert np.isfinite(log["clip/lib_global"]).all() and np.isfinite(log["clip/lib_local"]).all()
    assert "eff/lib_global" not in log  # LIB losses only for the expert with a LIB head
    assert list((tmp_path / "all" / "tensorboard").iterdir())

    joint.main([str(config), "--epochs=2"])
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(tmp_path / "all" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert list(pd.read_csv(tmp_path / "all" / "log.csv")["epoch"]) == [1, 2]

    weights = tmp_path / "all" / "weights"
    ensemble = load_ensemble(weights)
    assert ensemble.names == ["eff", "cnx", "clip"]
    assert read_manifest(weights)["experts"][2]["name"] == "test_clip"
    image = str(set32.parent / "images" / "000.jpg")
    assert infer.main([image, "--weights", str(weights), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert 0.0 <= float(line.split("\t")[0]) <= 1.0


def test_layernorm_tuning_changes_only_layernorms_and_the_head(tmp_path, set32):
    spec = THREE_FAMILIES[2]
    config = write_config(tmp_path, "ln", train=[{"csv": str(set32)}], experts=[spec], lr=0.05, ema_decay=0.0)
    joint.main([str(config)])
    torch.manual_seed(0)  # the run's seed: the same initial weights
    initial = trainer.create_expert("test_clip", **{k: v for k, v in spec.items() if k not in ("name", "key")}).state_dict()
    trained = load_file(str(tmp_path / "ln" / "weights" / "clip" / "model.safetensors"))
    changed = {k for k, v in trained.items() if not torch.allclose(v.float(), initial[k], atol=2e-3)}
    assert changed, "training changed nothing"
    layernorms = {f"{n}.{p}" for n, m in trainer.create_expert("test_clip").named_modules()
                  if isinstance(m, torch.nn.LayerNorm) for p in ("weight", "bias")}
    assert changed - layernorms and all(k in layernorms or k.startswith("head.") for k in changed), sorted(changed)
    assert changed & layernorms


def test_uncertainty_weighting_and_gradient_accumulation(tmp_path, set32):
    config = write_config(tmp_path, "unc", train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:2],
                          loss_weights={"ce": 1.0, "kl_mutual": 1.0}, loss_weighting="uncertainty", accum_steps=2,
                          batch_size=2)
    joint.main([str(config)])
    log = pd.read_csv(tmp_path / "unc" / "train_log.csv")
    assert {"weight/eff/ce", "weight/cnx/kl_mutual"} <= set(log.columns)
    state = torch.load(tmp_path / "unc" / "checkpoint.pt", weights_only=True)
    learned = [v for k, v in state["objective"].items() if k.startswith("weighting.")]
    assert learned and any(float(t.abs().sum()) > 0 for t in learned)  # the log-variances moved


def write_fold_splits(csv_path, out):
    """A splits.csv as data_prep/cluster.py writes it: two clusters by image number, groups kept whole."""
    df = pd.read_csv(csv_path)
    df["path"] = [str(csv_path.parent / n) for n in df["img_name"]]
    df["cluster"] = [int(int(n[7:10]) >= 16) for n in df["img_name"]]
    for f in (0, 1):
        df[f"fold_{f}"] = np.where(df["cluster"] == f, "val", "train")
    df.to_csv(out, index=False)
    return out


def test_cluster_folds_give_each_expert_its_own_training_rows(tmp_path, set32):
    splits_csv = write_fold_splits(set32, tmp_path / "splits.csv")
    experts = [{"name": "test_efficientnet", "key": "a", "fold": 0}, {"name": "test_convnext", "key": "b", "fold": 1}]
    cfg = TrainConfig(experts=experts, splits=str(splits_csv))
    splits = build_splits(cfg)
    rows = pd.read_csv(splits_csv)
    assert len(splits.pool) == 32
    assert splits.masks["a"].sum() == 16 and splits.masks["b"].sum() == 16
    assert not (splits.masks["a"] & splits.masks["b"]).any()
    assert set(splits.val) == {"fold_0", "fold_1"} and splits.val_experts == {"fold_0": ["a"], "fold_1": ["b"]}
    assert set(splits.val["fold_0"]["img_name"]) == set(rows.loc[rows["cluster"] == 0, "img_name"])

    config = write_config(tmp_path, "folds", splits=str(splits_csv), experts=experts, loss_weights=ALL_LOSSES)
    results = trainer.run(load_config([str(config)]), "test")
    assert set(results) == {"fold_0/a", "fold_0/ensemble", "fold_1/b", "fold_1/ensemble"}
    assert "leave-one-cluster-out" in read_manifest(tmp_path / "folds" / "weights")["training"]["validation"]


def write_three_cluster_splits(csv_path, out):
    """Three clusters of about 11 images; fold f holds out cluster f."""
    df = pd.read_csv(csv_path)
    df["path"] = [str(csv_path.parent / n) for n in df["img_name"]]
    df["cluster"] = [int(n[7:10]) // 11 for n in df["img_name"]]
    for f in (0, 1, 2):
        df[f"fold_{f}"] = np.where(df["cluster"] == f, "val", "train")
    df.to_csv(out, index=False)
    return out


def test_test_clusters_are_held_out_from_every_expert_and_never_choose_the_checkpoint(tmp_path, set32):
    splits_csv = write_three_cluster_splits(set32, tmp_path / "splits.csv")
    rows = pd.read_csv(splits_csv)
    experts = [{"name": "test_efficientnet", "key": "a", "fold": 0}, {"name": "test_convnext", "key": "b", "fold": 1}]
    splits = build_splits(TrainConfig(experts=experts, splits=str(splits_csv), test_clusters=[2]))
    assert (splits.pool["cluster"] != 2).all()
    assert not splits.masks["a"][splits.pool["cluster"].to_numpy() == 0].any()
    assert splits.masks["a"][splits.pool["cluster"].to_numpy() == 1].all()
    assert set(splits.val["cluster_2"]["img_name"]) == set(rows.loc[rows["cluster"] == 2, "img_name"])
    assert splits.val_experts["cluster_2"] is None and splits.test == ["cluster_2"]
    assert splits.selection_sets == ["fold_0", "fold_1"]

    config = write_config(tmp_path, "test", splits=str(splits_csv), experts=experts, test_clusters=[2])
    results = trainer.run(load_config([str(config)]), "test")
    assert {"cluster_2/a", "cluster_2/b", "cluster_2/ensemble"} <= set(results)
    assert read_manifest(tmp_path / "test" / "weights")["training"]["test_sets"] == ["cluster_2"]


@pytest.mark.parametrize("options, message", [
    ({"test_clusters": [7]}, "not clusters"),
    ({"test_clusters": [1]}, "are test_clusters"),
])
def test_bad_test_clusters_are_refused(tmp_path, set32, options, message):
    splits_csv = write_three_cluster_splits(set32, tmp_path / "splits.csv")
    experts = [{"name": "test_efficientnet", "key": "a", "fold": 0}, {"name": "test_convnext", "key": "b", "fold": 1}]
    with pytest.raises(ConfigError, match=message):
        build_splits(TrainConfig(experts=experts, splits=str(splits_csv), **options))
    with pytest.raises(ConfigError, match="needs `splits`"):
        build_splits(TrainConfig(experts=experts, train=[{"csv": str(set32)}], test_clusters=[2]))


def test_an_experts_lr_scale_scales_all_its_rates():
    cfg = TrainConfig(experts=[{"name": "test_efficientnet", "key": "a"},
                               {"name": "test_convnext", "key": "b", "lr_scale": 3.0}], lr=1e-3, head_lr_scale=10.0)
    experts = trainer.build_experts(cfg)
    optimizer = trainer.build_optimizer(trainer.build_objective(experts, cfg), cfg)
    rates = {}
    for group in optimizer.param_groups:
        owner = next(k for k, e in experts.items() if any(p is group["params"][0] for p in e.parameters())) \
            if group["params"] else None
        if owner:
            rates.setdefault(owner, set()).add(round(group["lr"], 9))
    assert rates == {"a": {1e-3, 1e-2}, "b": {3e-3, 3e-2}}


def test_early_stopping_with_patience(tmp_path, set32, capsys):
    config = write_config(tmp_path, "stop", train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:1], epochs=5,
                          lr=0.0, patience=1)
    joint.main([str(config)])
    out = capsys.readouterr().out
    assert "early stop" in out
    assert len(pd.read_csv(tmp_path / "stop" / "log.csv")) == 2
    assert joint.main([str(config)]) == 0  # again: nothing to do, and it says why
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'stop'}: training already finished at epoch 2 (stopped "
                                              "early: no better validation score for --patience epochs); nothing to do")


def _run(config, *extra, env=None):
    return subprocess.Popen([sys.executable, "train/joint.py", str(config), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, set32):
    options = dict(train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:1], loss_weights={"ce": 1.0, "kl_noise": 1.0},
                   epochs=2, steps_per_epoch=4, batch_size=2)
    whole = write_config(tmp_path, "whole", **options)
    assert _run(whole).wait(timeout=300) == 0

    killed = write_config(tmp_path, "killed", **options)
    proc = _run(killed)
    log = tmp_path / "killed" / "train_log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(pd.read_csv(log)) < 3):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 8, "the kill should land mid-run"
    resumed = _run(killed)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a = load_file(str(tmp_path / "whole" / "weights" / "eff" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "weights" / "eff" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(pd.read_csv(log)["step"]) == sorted(set(pd.read_csv(log)["step"]))  # no step logged twice


def test_a_run_killed_during_validation_validates_that_epoch_on_resume(tmp_path, set32, monkeypatch):
    options = dict(train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:1], loss_weights={"ce": 1.0},
                   epochs=2, steps_per_epoch=2, batch_size=2)
    joint.main([str(write_config(tmp_path, "whole", **options))])

    killed = write_config(tmp_path, "killed", **options)
    real_evaluate = trainer.evaluate

    def killed_in_validation(*args, **kwargs):
        raise KeyboardInterrupt  # the step-2 checkpoint is on disk; this epoch's validation is not

    monkeypatch.setattr(trainer, "evaluate", killed_in_validation)
    with pytest.raises(KeyboardInterrupt):
        joint.main([str(killed)])
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    joint.main([str(killed)])

    epochs = pd.read_csv(tmp_path / "killed" / "log.csv")["epoch"].tolist()
    assert epochs == [1, 2]  # epoch 1 was validated after the resume, not skipped
    whole_log, killed_log = pd.read_csv(tmp_path / "whole" / "log.csv"), pd.read_csv(tmp_path / "killed" / "log.csv")
    assert np.allclose(whole_log["score"], killed_log["score"])
    a = load_file(str(tmp_path / "whole" / "weights" / "eff" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "weights" / "eff" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_on_cpu(tmp_path, set32):
    config = write_config(tmp_path, "ddp", train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:2],
                          loss_weights={"ce": 1.0, "kl_mutual": 0.5, "nce": 0.1}, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                           "train/joint.py", str(config), "--device=cpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert load_ensemble(tmp_path / "ddp" / "weights").names == ["eff", "cnx"]


# ------------------------------------------------------------------------------------- honest folds
def _objective(specs: dict[str, str], loss_weights: dict[str, float], **kwargs) -> JointObjective:
    torch.manual_seed(0)
    return JointObjective({key: trainer.create_expert(name) for key, name in specs.items()}, loss_weights, **kwargs)


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * (n // 2))


def _rows(n: int, rows) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(rows)] = True
    return mask


def _sharpen(expert, factor: float = 20.0) -> None:
    """Confident predictions: the KL between two experts is then far above float32 rounding."""
    with torch.no_grad():
        expert.head.weight.mul_(factor)


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """KL(teacher || student) of two probability tensors, batch mean."""
    return F.kl_div(student.log(), teacher, reduction="batchmean").item()


def test_mutual_learning_teachers_never_trained_on_the_students_validation_rows(tmp_path, set32):
    splits_csv = write_three_cluster_splits(set32, tmp_path / "splits.csv")
    experts = [{"name": "test_efficientnet", "key": "a", "fold": 0}, {"name": "test_convnext", "key": "a2", "fold": 0},
               {"name": "test_convnext", "key": "b", "fold": 1}]
    cfg = TrainConfig(experts=experts, splits=str(splits_csv), out_dir=str(tmp_path / "run"), workers=0,
                      batch_size=4, tensorboard=False)
    splits = build_splits(cfg)
    # b trains on cluster 0, a's validation cluster (and a on b's): only the same fold's expert teaches.
    assert splits.teachers == {"a": ["a2"], "a2": ["a"], "b": []}
    assert trainer.Trainer(cfg, "test").objective.teachers == splits.teachers
    # Without folds every expert trains on the same rows and is validated on rows none of them saw.
    group = build_splits(TrainConfig(experts=experts, train=[{"csv": str(set32)}]))
    assert group.teachers == {"a": ["a2", "b"], "a2": ["a", "b"], "b": ["a", "a2"]}


def test_kl_mutual_learns_only_from_the_given_teachers():
    objective = _objective({"a": "test_convnext", "b": "test_convnext", "c": "test_convnext"},
                           {"ce": 1.0, "kl_mutual": 1.0}, teachers={"a": ["b"], "b": ["a"], "c": []}).eval()
    _sharpen(objective.experts["b"])
    x, y = _batch()
    masks = {k: torch.ones(len(y), dtype=torch.bool) for k in "abc"}
    _, terms = objective({64: x}, y, masks)
    assert "c/kl_mutual" not in terms and "c/kl_mutual" not in objective.weighting.names  # no teacher, no term
    with torch.no_grad():
        pa, pb = (objective.experts[k](x)[0].softmax(-1) for k in "ab")
    assert terms["a/kl_mutual"].item() == pytest.approx(_kl(pa, pb), rel=1e-4)
    assert terms["b/kl_mutual"].item() == pytest.approx(_kl(pb, pa), rel=1e-4)
    _sharpen(objective.experts["c"], -50.0)  # c saw a's validation rows: whatever it predicts, a never hears it
    _, again = objective({64: x}, y, masks)
    assert again["a/kl_mutual"].item() == pytest.approx(terms["a/kl_mutual"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="teachers"):
        _objective({"a": "test_convnext", "b": "test_convnext"}, {"ce": 1.0, "kl_mutual": 1.0},
                   teachers={"a": ["z"], "b": []})


def test_mutual_learning_compares_two_experts_on_the_rows_both_train_on():
    objective = _objective({"a": "test_convnext", "b": "test_convnext"}, {"ce": 1.0, "kl_mutual": 1.0}).eval()
    _sharpen(objective.experts["b"])
    x, y = _batch()
    _, terms = objective({64: x}, y, {"a": _rows(6, [0, 1, 2, 3]), "b": _rows(6, [2, 3, 4, 5])})
    with torch.no_grad():
        pa, pb = (objective.experts[k](x[2:4])[0].softmax(-1) for k in "ab")
        ce_a = F.cross_entropy(objective.experts["a"](x[:4])[0], y[:4]).item()
    assert terms["a/kl_mutual"].item() == pytest.approx(_kl(pa, pb), rel=1e-4)
    assert terms["b/kl_mutual"].item() == pytest.approx(_kl(pb, pa), rel=1e-4)
    assert terms["a/ce"].item() == pytest.approx(ce_a, rel=1e-4)


def test_batchnorm_never_sees_rows_outside_the_experts_mask():
    objective = _objective({"a": "test_efficientnet"}, {"ce": 1.0, "kl_noise": 1.0}).train()
    initial = {k: v.clone() for k, v in objective.state_dict().items() if "running" in k}
    x, y = _batch()
    outcomes = []
    for outside in (0.0, 1e3):  # the rows a does not train on: black, or far out of range
        run = copy.deepcopy(objective)
        images = x.clone()
        images[4:] = outside
        torch.manual_seed(1)  # the same kl_noise noise
        _, terms = run({64: images}, y, {"a": _rows(6, range(4))})
        outcomes.append(({k: v for k, v in run.state_dict().items() if "running" in k}, terms))
    (stats, terms), (stats_huge, terms_huge) = outcomes
    assert any(not torch.equal(stats[k], initial[k]) for k in stats)  # the statistics did move
    assert all(torch.allclose(stats[k], stats_huge[k], rtol=1e-4, atol=1e-6) for k in stats)
    assert all(terms[k].item() == pytest.approx(terms_huge[k].item(), rel=1e-4) for k in terms)


def test_an_expert_without_rows_in_the_batch_gets_zeros_connected_to_all_its_parameters():
    objective = _objective({"a": "test_efficientnet", "b": "test_convnext"},
                           {"ce": 1.0, "kl_noise": 1.0, "kl_mutual": 1.0, "nce": 0.1}).train()
    x, y = _batch(4)
    total, terms = objective({64: x}, y, {"a": _rows(4, []), "b": _rows(4, range(4))})
    for name in ("ce", "kl_noise", "kl_mutual", "nce"):
        assert terms[f"a/{name}"].item() == 0 and terms[f"a/{name}"].requires_grad
    assert terms["b/kl_mutual"].item() == 0  # its only teacher has no row in this batch
    total.backward()
    assert all(p.grad is not None for p in objective.experts["a"].parameters() if p.requires_grad)


def _running_stats(expert) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in expert.named_buffers() if "running" in n}


def test_evaluated_and_written_weights_carry_the_ema_of_batchnorm_statistics(tmp_path, set32, monkeypatch):
    config = write_config(tmp_path, "ema", train=[{"csv": str(set32)}], experts=THREE_FAMILIES[:1], ema_decay=0.5)
    live: list[dict[str, torch.Tensor]] = []
    seen: dict[str, dict[str, torch.Tensor]] = {}
    step, save, score = trainer.Trainer.optimizer_step, trainer.save_ensemble, trainer.score_images

    def recording_step(self, batches):
        if not live:
            live.append(_running_stats(self.experts["eff"]))
        out = step(self, batches)
        live.append(_running_stats(self.experts["eff"]))
        return out

    def recording_save(experts, *args, **kwargs):
        seen["written"] = _running_stats(experts["eff"])
        return save(experts, *args, **kwargs)

    def recording_score(ensemble, *args, **kwargs):
        seen["evaluated"] = _running_stats(ensemble.experts["eff"])
        return score(ensemble, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "optimizer_step", recording_step)
    monkeypatch.setattr(trainer, "save_ensemble", recording_save)
    monkeypatch.setattr(trainer, "score_images", recording_score)
    joint.main([str(config)])

    expected = live[0]  # torch-ema's rule, warm-up included
    for k, stats in enumerate(live[1:], start=1):
        decay = min(0.5, (1 + k) / (10 + k))
        expected = {n: decay * expected[n] + (1 - decay) * stats[n] for n in stats}
    assert expected and len(live) == 3
    for which in ("evaluated", "written"):
        assert all(torch.allclose(seen[which][n], expected[n], rtol=1e-5, atol=1e-7) for n in expected), which
    assert any(not torch.allclose(live[-1][n], expected[n], rtol=1e-3, atol=1e-5) for n in expected)


def test_a_teacher_is_dropped_when_a_chain_of_teachers_brings_the_students_validation_labels():
    # Rows 0, 1, 2 are the validation rows of a, b, c. c trained on row 0 (a's): it may not teach a, nor
    # may b, whom c teaches.
    trains = {"a": np.array([0, 0, 1], bool), "b": np.array([0, 0, 1], bool), "c": np.array([1, 0, 0], bool)}
    validated = {k: np.eye(3, dtype=bool)[i] for i, k in enumerate("abc")}
    assert mutual_teachers(trains, validated) == {"a": [], "b": ["a", "c"], "c": []}


def test_an_ema_checkpoint_of_parameters_only_still_loads():
    """Checkpoints from before the EMA covered BatchNorm statistics resume, the statistics' average starting
    from the live ones."""
    torch.manual_seed(0)
    expert = trainer.create_expert("test_efficientnet")
    old = trainer.ExponentialMovingAverage([p for p in expert.parameters() if p.requires_grad], decay=0.9)
    with torch.no_grad():
        for name, b in expert.named_buffers():
            if "running_mean" in name:
                b.add_(1.0)
    ema = trainer.make_ema(expert, 0.9)
    trainer.load_ema(ema, old.state_dict(), expert)
    tensors = trainer.ema_tensors(expert)
    assert len(ema.shadow_params) == len(tensors) > len(old.shadow_params)
    assert all(torch.equal(s, t) for s, t in zip(ema.shadow_params, tensors))
