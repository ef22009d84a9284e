"""evaluation/validate.py: the command behind the README's AUC table."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import ensembles, validate
from experts import create_expert, save_ensemble


def test_validate_prints_a_table_per_set(tmp_path, labelled_csv, capsys):
    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w")
    assert validate.main([str(labelled_csv), "--weights", str(weights), "--whole"]) == 0
    out = capsys.readouterr().out
    assert "all rows, 16 images (8 fake), JPEG 75" in out
    assert "| eff " in out and "| ensemble " in out and "auc" in out
    validate.main([str(labelled_csv), "--weights", str(weights), "--val-fraction", "0.5"])
    assert "validation part (50% of groups)" in capsys.readouterr().out


def test_the_protocol_comes_from_the_manifest_where_it_records_one(tmp_path, labelled_csv, capsys):
    """JPEG quality and validation share: as given, else as the weights recorded them, else core.protocol."""
    from core.protocol import VAL_FRACTION, VALIDATION_JPEG_QUALITY

    assert validate.protocol_settings({}) == (VALIDATION_JPEG_QUALITY, VAL_FRACTION)
    assert validate.protocol_settings({"threshold": {"value": 0.5, "jpeg_quality": 60}}) == (60, VAL_FRACTION)
    trained = {"training": {"config": {"val_jpeg_quality": 90, "val_fraction": 0.5}},
               "threshold": {"value": 0.5, "jpeg_quality": 60}}
    assert validate.protocol_settings(trained) == (90, 0.5)
    assert validate.protocol_settings(trained, jpeg_quality=30, val_fraction=0.25) == (30, 0.25)
    merged = {"merged_from": [{"training": {"config": {"val_jpeg_quality": 90}}},
                              {"training": {"config": {"val_jpeg_quality": 80}}}]}
    assert validate.protocol_settings(merged) == (VALIDATION_JPEG_QUALITY, VAL_FRACTION)  # runs disagree

    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w", metadata=trained)
    assert validate.main([str(labelled_csv), "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "validation part (50% of groups)" in out and "JPEG 90" in out


def write_splits(labelled_csv, out):
    """A splits file as data_prep/cluster.py writes it: clusters 0 and 1 by image number."""
    df = pd.read_csv(labelled_csv)
    df["path"] = [str(labelled_csv.parent / n) for n in df["img_name"]]
    df["labels_csv"] = str(labelled_csv)
    df["cluster"] = [i % 2 for i in range(len(df))]
    df.to_csv(out, index=False)
    return out


def test_held_out_clusters_are_measured_as_sets(tmp_path, labelled_csv, capsys):
    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w")
    splits = write_splits(labelled_csv, tmp_path / "splits.csv")
    assert validate.main(["--splits", str(splits), "--clusters", "1", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert f"cluster_1 ({labelled_csv.parent.name}): held-out cluster, 8 images" in out
    pd.read_csv(splits).drop(columns="cluster").to_csv(tmp_path / "no_cluster.csv", index=False)
    # bad choices are one "error:" line and exit status 2, raised as typed errors below main()
    for args, message in [
        (["--splits", str(splits), "--clusters", "5"], "not in"),
        ([str(labelled_csv), "--clusters", "1"], "go together"),
        (["--splits", str(tmp_path / "no_cluster.csv"), "--clusters", "1"],
         r"not a splits file of data_prep/cluster.py \(missing \['cluster'\]\)"),
        (["--splits", str(tmp_path / "nope.csv"), "--clusters", "1"], "splits file not found"),
        ([], "give labels CSVs"),
        ([str(labelled_csv), "--device", "cuda:7" if not torch.cuda.is_available() else "nodevice"], "device"),
    ]:
        assert validate.main([*args, "--weights", str(weights)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    with pytest.raises(validate.EvaluationSetError, match="go together"):
        validate.evaluation_sets(validate.SetChoice(csvs=(str(labelled_csv),), clusters=(1,)))


def test_subset_table_finds_the_expert_that_does_not_help():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 400)
    good = np.clip(targets * 0.6 + rng.normal(0.2, 0.2, 400), 0, 1)
    noise = rng.random(400)
    table = ensembles.subset_table({"s": targets}, {"s": np.stack([good, noise], 1)}, ["good", "noise"])
    assert list(table["experts"]) == ["good", "good + noise", "noise"]
    assert table["s AUC"].iloc[0] > 0.9 and abs(table["s AUC"].iloc[2] - 0.5) < 0.1
    # weights renormalise within a subset: a zero-weight expert leaves the pair equal to the single one
    weighted = ensembles.subset_table({"s": targets}, {"s": np.stack([good, noise], 1)}, ["good", "noise"], [1.0, 0.0])
    pair = weighted.set_index("experts").loc["good + noise", "s AUC"]
    assert pair == weighted.set_index("experts").loc["good", "s AUC"]


def test_ensembles_command_prints_every_subset(tmp_path, labelled_csv, capsys):
    torch.manual_seed(0)
    weights = save_ensemble({"a": create_expert("test_efficientnet"), "b": create_expert("test_convnext")},
                            tmp_path / "w")
    assert ensembles.main([str(labelled_csv), "--whole", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    for row in ("| a ", "| b ", "| a + b "):
        assert row in out
    assert "mean AUC" in out


# ------------------------------------------------------------------ choosing on validation folds only
def fold_trained_weights(tmp_path, labelled_csv):
    """A weights folder as the recipe writes it: a (fold 0), b and c (fold 1), cluster 2 held out as the test.

    Its splits file has three clusters (image number mod 3) and a fold column per cluster, as
    data_prep/cluster.py writes them.
    """
    df = pd.read_csv(labelled_csv)
    df["path"] = [str(labelled_csv.parent / n) for n in df["img_name"]]
    df["labels_csv"] = str(labelled_csv)
    df["cluster"] = [i % 3 for i in range(len(df))]
    for f in range(3):
        df[f"fold_{f}"] = np.where(df["cluster"] == f, "val", "train")
    splits = tmp_path / "splits.csv"
    df.to_csv(splits, index=False)
    torch.manual_seed(0)
    experts = {"a": create_expert("test_efficientnet"), "b": create_expert("test_convnext"),
               "c": create_expert("test_convnext")}
    training = {"config": {"splits": str(splits), "experts": [{"name": "test_efficientnet", "key": "a", "fold": 0},
                                                             {"name": "test_convnext", "key": "b", "fold": 1},
                                                             {"name": "test_convnext", "key": "c", "fold": 1}]},
                "validation_sets": {"fold_0": ["a"], "fold_1": ["b", "c"], "cluster_2": None},
                "test_sets": ["cluster_2"]}
    return save_ensemble(experts, tmp_path / "w", metadata={"training": training})


def designed_scores(ensemble, df, *args, **kwargs):
    """In place of scoring: a is right everywhere, b only on cluster 1 (its validation fold), c only on
    cluster 2 (the test cluster). "Right": 0.75 for fakes and 0.25 for reals; wrong: the reverse."""
    t, cluster = df["target"].to_numpy(), df["cluster"].to_numpy()
    right = {"a": np.ones(len(t), bool), "b": cluster == 1, "c": cluster == 2}
    return t, np.stack([np.where(right[k], 0.25 + 0.5 * t, 0.75 - 0.5 * t) for k in ensemble.names], axis=1)


@pytest.fixture
def designed(monkeypatch):
    for module in (validate, ensembles):
        monkeypatch.setattr(module, "score_labelled", designed_scores)


def test_experts_are_chosen_on_the_validation_folds_and_the_test_cluster_only_reported(tmp_path, labelled_csv,
                                                                                        designed, capsys):
    weights = fold_trained_weights(tmp_path, labelled_csv)
    assert ensembles.main(["--folds", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    # On the test cluster a + c would win (b is wrong there); on the validation folds, where c is wrong
    # and b right, a + b does: the choice follows the validation folds.
    assert "chosen on the validation folds: a + b " in out
    validation, report = out.split("report only, not used for the choice")
    assert "cluster_2" not in validation and "fold_1" not in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| a")}
    assert set(rows) == {"a + b", "a + b + c"}  # the choice and the whole ensemble, nothing to choose from


def test_subset_table_counts_a_subset_on_a_fold_through_its_members_validated_there():
    targets = {"fold_0": np.array([0, 1, 0, 1]), "fold_1": np.array([0, 1, 0, 1])}
    nan = np.full(4, np.nan)
    good, bad = np.array([0.25, 0.75, 0.25, 0.75]), np.array([0.75, 0.25, 0.75, 0.25])
    probs = {"fold_0": np.stack([good, nan, nan], 1), "fold_1": np.stack([nan, good, bad], 1)}
    table = ensembles.subset_table(targets, probs, ["a", "b", "c"]).set_index("experts")
    assert table.loc["a + b", "mean AUC"] == 1.0 and table.loc["a + c", "mean AUC"] == 0.5
    assert np.isnan(table.loc["b + c", "fold_0 AUC"]) and np.isnan(table.loc["b + c", "mean AUC"])
    assert ensembles.choose_subset(ensembles.subset_table(targets, probs, ["a", "b", "c"])) == "a + b"
