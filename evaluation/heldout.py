"""The held-out clusters of a ``data_prep/cluster.py`` splits file, as evaluation sets.

The recipe (``train/configs/recipe.yaml``) holds some clusters out from every expert (``test_clusters``).
Those rows are the only data on which the *ensemble* can be measured cleanly, so the evaluation tools
(``evaluation/validate.py``, ``evaluation/ensembles.py``, ``bench/linear_probe.py``) read them from here:
one set per cluster, named after it and after the labelled sets its rows come from.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core import labels


def read_splits(path: str | Path) -> pd.DataFrame:
    """Rows of a splits file with its ``cluster`` column; a bad file ends the command with its reason."""
    try:
        return labels.read_splits(path, required=["cluster"])
    except labels.LabelsError as e:
        raise SystemExit(f"error: {e}") from None


def cluster_sets(splits: str | Path, clusters: list[int]) -> dict[str, pd.DataFrame]:
    """``{"cluster_3 (dfdc_faces)": rows, ...}``: each held-out cluster as one evaluation set."""
    rows = read_splits(splits)
    known = sorted(rows["cluster"].unique())
    unknown = [c for c in clusters if c not in known]
    if unknown:
        raise SystemExit(f"error: clusters {unknown} are not in {splits} (it has {known})")
    sets = {}
    for c in clusters:
        df = rows[rows["cluster"] == c].reset_index(drop=True)
        sources = sorted({Path(p).parent.name for p in df["labels_csv"]}) if "labels_csv" in df else []
        sets[f"cluster_{c}" + (f" ({', '.join(sources)})" if sources else "")] = df
    return sets


def training_rows(splits: str | Path, clusters: list[int]) -> pd.DataFrame:
    """Every row outside the held-out clusters: what a baseline may train on and stay comparable."""
    rows = read_splits(splits)
    return rows[~rows["cluster"].isin(clusters)].reset_index(drop=True)
