"""The held-out clusters of a ``data_prep/cluster.py`` splits file, as evaluation sets.

    python evaluation/heldout.py runs/clusters_v1/splits.csv              # every cluster: images, fakes, sources
    python evaluation/heldout.py runs/clusters_v1/splits.csv --clusters 3 6

The recipe (``train/configs/recipe.yaml``) holds some clusters out from every expert (``test_clusters``).
Those rows are the only data on which the *ensemble* can be measured cleanly, so the evaluation tools
(``evaluation/validate.py``, ``evaluation/ensembles.py``, ``bench/linear_probe.py``) read them from here:
one set per cluster, named after it and after the labelled sets its rows come from.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas as pd


class EvaluationSetError(ValueError):
    """Labelled sets that cannot be selected as asked (unknown clusters, options that do not go together,
    a weights folder without the record asked for); the message says why."""


def read_splits(path: str | Path) -> "pd.DataFrame":
    """Rows of a splits file with its ``cluster`` column; a bad file raises :class:`core.labels.LabelsError`."""
    from core import labels

    return labels.read_splits(path, required=["cluster"])


def cluster_sets(splits: str | Path, clusters: Sequence[int]) -> dict[str, "pd.DataFrame"]:
    """``{"cluster_3 (dfdc_faces)": rows, ...}``: each held-out cluster as one evaluation set."""
    rows = read_splits(splits)
    known = sorted(int(c) for c in rows["cluster"].unique())
    unknown = [c for c in clusters if c not in known]
    if unknown:
        raise EvaluationSetError(f"clusters {unknown} are not in {splits} (it has {known})")
    sets = {}
    for c in clusters:
        df = rows[rows["cluster"] == c].reset_index(drop=True)
        sources = sorted({Path(p).parent.name for p in df["labels_csv"]}) if "labels_csv" in df else []
        sets[f"cluster_{c}" + (f" ({', '.join(sources)})" if sources else "")] = df
    return sets


def training_rows(splits: str | Path, clusters: Sequence[int]) -> "pd.DataFrame":
    """Every row outside the held-out clusters: what a baseline may train on and stay comparable."""
    rows = read_splits(splits)
    return rows[~rows["cluster"].isin(list(clusters))].reset_index(drop=True)


def describe(sets: dict[str, "pd.DataFrame"]) -> list[str]:
    """One line per set: its name, images, and fakes when it is labelled."""
    lines = []
    for name, df in sets.items():
        fakes = f", {int(df['target'].sum())} fake" if "target" in df else ""
        lines.append(f"{name}: {len(df)} images{fakes}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("splits", help="splits.csv written by data_prep/cluster.py")
    p.add_argument("--clusters", type=int, nargs="+", metavar="N",
                   help="only these clusters (default: every cluster of the file)")
    args = p.parse_args(argv)

    from core.labels import LabelsError

    try:
        clusters = args.clusters or sorted(int(c) for c in read_splits(args.splits)["cluster"].unique())
        sets = cluster_sets(args.splits, clusters)
    except (EvaluationSetError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(describe(sets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
