"""Measure a weights folder on the group-disjoint validation part of labelled sets.

    python evaluation/validate.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python evaluation/validate.py data/test/labels.csv --whole --weights my_weights/

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

from data_prep.labels import read_labels, split_by_group
from data_prep.transforms import shortcut_free_eval_transform
from evaluation.metrics import detection_metrics
from evaluation.scoring import score_images
from experts import Ensemble, load_ensemble

COLUMNS = ["n", "auc", "tpr@fpr1e-3", "eer", "acc@0.5", "ap"]


def validate(ensemble: Ensemble, df: pd.DataFrame, jpeg_quality: int = 75, batch_size: int = 32,
             workers: int = 0, device: str = "cpu") -> pd.DataFrame:
    """Metrics table (rows: experts then ``ensemble``) of the ensemble on the rows of ``df``."""
    transform = partial(shortcut_free_eval_transform, jpeg_quality=jpeg_quality)
    scores = list(score_images(ensemble, df["path"], batch_size=batch_size, workers=workers, device=device,
                               transform=transform))
    failed = [s.error for s in scores if s.error]
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    ok = np.array([not s.error for s in scores])
    targets = df["target"].to_numpy()[ok]
    probs = np.stack([s.expert_probs for s in scores])[ok]
    rows = {name: detection_metrics(targets, probs[:, i]) for i, name in enumerate(ensemble.names)}
    rows["ensemble"] = detection_metrics(targets, np.array([s.prob for s in scores])[ok])
    return pd.DataFrame(rows).T[COLUMNS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+", help="labels CSVs (img_name,target[,group])")
    p.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "weights"))
    p.add_argument("--val-fraction", type=float, default=0.2, help="as in training (default: 0.2)")
    p.add_argument("--whole", action="store_true", help="score every row, not only the validation part")
    p.add_argument("--jpeg-quality", type=int, default=75, help="re-encoding quality (default: 75)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    ensemble = load_ensemble(args.weights, args.device)
    for csv in args.csvs:
        df = read_labels(csv)
        if not args.whole:
            df = split_by_group(df, args.val_fraction)[1]
        table = validate(ensemble, df, args.jpeg_quality, args.batch_size, args.workers, args.device)
        part = "all rows" if args.whole else f"validation part ({args.val_fraction:.0%} of groups)"
        print(f"\n{csv}: {part}, {int(table['n'].iloc[-1])} images "
              f"({int(df['target'].sum())} fake), JPEG {args.jpeg_quality}\n")
        print(table.to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    main()
