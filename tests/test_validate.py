"""evaluation/validate.py: the command behind the README's AUC table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import ensembles, validate
from experts import create_expert, save_ensemble


def test_validate_prints_a_table_per_set(tmp_path, labelled_csv, capsys):
    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w")
    validate.main([str(labelled_csv), "--weights", str(weights), "--whole"])
    out = capsys.readouterr().out
    assert "all rows, 16 images (8 fake), JPEG 75" in out
    assert "| eff " in out and "| ensemble " in out and "auc" in out
    validate.main([str(labelled_csv), "--weights", str(weights), "--val-fraction", "0.5"])
    assert "validation part (50% of groups)" in capsys.readouterr().out


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
    validate.main(["--splits", str(splits), "--clusters", "1", "--weights", str(weights)])
    out = capsys.readouterr().out
    assert f"cluster_1 ({labelled_csv.parent.name}): held-out cluster, 8 images" in out
    with pytest.raises(SystemExit, match="not in"):
        validate.main(["--splits", str(splits), "--clusters", "5", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="go together"):
        validate.main([str(labelled_csv), "--clusters", "1", "--weights", str(weights)])
    pd.read_csv(splits).drop(columns="cluster").to_csv(tmp_path / "no_cluster.csv", index=False)
    with pytest.raises(SystemExit, match=r"not a splits file of data_prep/cluster.py \(missing \['cluster'\]\)"):
        validate.main(["--splits", str(tmp_path / "no_cluster.csv"), "--clusters", "1", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="splits file not found"):
        validate.main(["--splits", str(tmp_path / "nope.csv"), "--clusters", "1", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="give labels CSVs"):
        validate.main(["--weights", str(weights)])


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
    ensembles.main([str(labelled_csv), "--whole", "--weights", str(weights)])
    out = capsys.readouterr().out
    for row in ("| a ", "| b ", "| a + b "):
        assert row in out
    assert "mean AUC" in out
