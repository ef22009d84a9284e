"""Measure a weights folder on the group-disjoint validation part of labelled sets.

    python evaluation/validate.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python evaluation/validate.py data/test/labels.csv --whole --weights my_weights/
    python evaluation/validate.py --splits runs/clusters/splits.csv --clusters 3 6   # the recipe's test clusters

By default each CSV is split exactly as ``train/joint.py`` splits it (groups hashed into a
``--val-fraction`` share), and only the validation part is scored; ``--whole`` scores every row (for a
set never trained on). Images are resized and re-encoded at one JPEG quality for both classes, so that
compression history, the known shortcut, cannot help. Prints a Markdown table per set: each expert and
the ensemble, with AUC, TPR at FPR=1e-3, EER, accuracy at 0.5 and average precision.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/validate.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch

from data_prep.labels import read_labels, split_by_group
from data_prep.transforms import shortcut_free_eval_transform
from evaluation.heldout import cluster_sets
from evaluation.metrics import detection_metrics
from evaluation.scoring import score_images
from experts import Ensemble, load_ensemble

COLUMNS = ["n", "auc", "tpr@fpr1e-3", "eer", "acc@0.5", "ap"]


def score_labelled(ensemble: Ensemble, df: pd.DataFrame, jpeg_quality: int = 75, batch_size: int = 32,
                   workers: int = 0, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[N]`` and per-expert fake probabilities ``[N, E]`` of the readable rows of ``df``.

    Unreadable images are reported on stderr and left out, so one bad file does not stop a measurement.
    """
    transform = partial(shortcut_free_eval_transform, jpeg_quality=jpeg_quality)
    scores = list(score_images(ensemble, df["path"], batch_size=batch_size, workers=workers, device=device,
                               transform=transform))
    for s in scores:
        if s.error:
            print(f"error: {s.error}", file=sys.stderr)
    ok = np.array([not s.error for s in scores])
    probs = np.stack([s.expert_probs for s in scores])[ok]
    return df["target"].to_numpy()[ok], probs


def validate(ensemble: Ensemble, df: pd.DataFrame, jpeg_quality: int = 75, batch_size: int = 32,
             workers: int = 0, device: str = "cpu") -> pd.DataFrame:
    """Metrics table (rows: experts then ``ensemble``) of the ensemble on the rows of ``df``."""
    targets, probs = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
    rows = {name: detection_metrics(targets, probs[:, i]) for i, name in enumerate(ensemble.names)}
    rows["ensemble"] = detection_metrics(targets, ensemble.combine(torch.from_numpy(probs)).numpy())
    return pd.DataFrame(rows).T[COLUMNS]


def add_set_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which labelled images to measure (shared by the evaluation commands)."""
    p.add_argument("csvs", nargs="*", help="labels CSVs (img_name,target[,group])")
    p.add_argument("--splits", help="splits.csv of data_prep/cluster.py: measure its --clusters instead of CSVs")
    p.add_argument("--clusters", type=int, nargs="+", default=[],
                   help="clusters of --splits to measure, one set each (the recipe's test_clusters)")
    p.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "weights"))
    p.add_argument("--val-fraction", type=float, default=0.2, help="as in training (default: 0.2)")
    p.add_argument("--whole", action="store_true", help="score every row of the CSVs, not only the validation part")
    p.add_argument("--jpeg-quality", type=int, default=75, help="re-encoding quality (default: 75)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")


def evaluation_sets(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Set name -> rows: the held-out clusters of ``--splits``, then each CSV (its validation part or whole)."""
    if not args.csvs and not args.clusters:
        raise SystemExit("error: give labels CSVs, or --splits FILE --clusters N [N ...]")
    if bool(args.splits) != bool(args.clusters):
        raise SystemExit("error: --splits and --clusters go together")
    sets = cluster_sets(args.splits, args.clusters) if args.clusters else {}
    for csv in args.csvs:
        df = read_labels(csv)
        sets[csv] = df if args.whole else split_by_group(df, args.val_fraction)[1]
    return sets


def set_part(name: str, args: argparse.Namespace) -> str:
    """How the rows of set ``name`` of :func:`evaluation_sets` were chosen, in words for the reports."""
    if name.startswith("cluster_"):
        return "held-out cluster"
    return "all rows" if args.whole else f"validation part ({args.val_fraction:.0%} of groups)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)
    args = p.parse_args(argv)
    ensemble = load_ensemble(args.weights, args.device)
    for name, df in evaluation_sets(args).items():
        table = validate(ensemble, df, args.jpeg_quality, args.batch_size, args.workers, args.device)
        print(f"\n{name}: {set_part(name, args)}, {int(table['n'].iloc[-1])} images "
              f"({int(df['target'].sum())} fake), JPEG {args.jpeg_quality}\n")
        print(table.to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    main()
