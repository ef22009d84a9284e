"""Which CLIP layers, depth and head: validation AUC of each choice against its cost, from one token cache.

    python bench/clip_choices.py runs/tokens/clip_vit_b16-224 --splits runs/clusters_v1/splits.csv \\
        --val-clusters 0 1 --val-sets general_scenes --exclude-clusters 3 6 --threads 2

Every choice is a head (``train/heads.py``) on cached tokens of the frozen CLIP ViT-B/16: a linear head on
the class token of one layer or several, or a LIB head on one layer's regions. A choice's depth is its
deepest layer: the shipped tower is truncated there, so its cost is the forward pass through that many
blocks, measured here (images/s of the truncated tower on random 224 px images, ``--threads``).

For each validation set (a cluster of ``--splits``, or a whole labelled set) a head is trained on every
other cached image except ``--exclude-clusters`` (the test clusters, which must not steer any choice) and
scores the set. The table gives each choice's AUC per set, the mean over labelled sets (each set's folds
averaged first, so that two DFDC clusters do not outvote the fold that holds out a whole generator), the
cost, and that mean AUC per millisecond.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.heads import HeadSpec

CHOICES = ["linear:12", "linear:10", "linear:8", "linear:6", "linear:8,12", "linear:6,8,10,12",
           "lib:12", "lib:10", "lib:8", "lib:6"]


def parse_choice(text: str) -> HeadSpec:
    """``"lib:10"`` -> a LIB head on layer 10; ``"linear:8,12"`` -> a linear head on layers 8 and 12
    (:class:`ValueError` for anything else)."""
    head, _, layers = text.partition(":")
    if head not in ("linear", "lib") or not layers or not all(x.strip().isdigit() for x in layers.split(",")):
        raise ValueError(f"choice {text!r}: expected linear:LAYER[,LAYER...] or lib:LAYER[,LAYER...]")
    return HeadSpec(layers=[int(x) for x in layers.split(",")], head=head)


def tower_speed(meta: dict[str, Any], depth: int, threads: int, images: int = 32, batch: int = 16) -> float:
    """Images/s of the cache's tower truncated to ``depth`` blocks (random weights: speed does not depend
    on them) with ``threads`` torch threads, after one warm-up batch."""
    import torch

    from train.heads import build_expert

    torch.set_num_threads(threads)
    expert = build_expert(meta, HeadSpec(layers=[depth]), with_base=False).eval()
    size = meta["input_size"]
    x = torch.rand(batch, 3, size, size)
    with torch.inference_mode():
        expert(x)
        start = time.perf_counter()
        for _ in range(images // batch):
            expert(x)
    rate = images / (time.perf_counter() - start)
    torch.set_num_threads(1)  # heads are tiny: one thread, no OpenMP waits
    return rate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="a token cache folder written by train/token_cache.py")
    p.add_argument("--splits", type=Path, required=True, help="splits.csv of data_prep/cluster.py (the clusters)")
    p.add_argument("--val-clusters", type=int, nargs="*", default=[], metavar="N",
                   help="clusters of --splits to validate on, one set each")
    p.add_argument("--val-sets", nargs="*", default=[], metavar="SET",
                   help="labelled sets (the cache's `set` names, e.g. general_scenes) to validate on, whole")
    p.add_argument("--exclude-clusters", type=int, nargs="*", default=[], metavar="N",
                   help="test clusters: never trained on, never validated on")
    p.add_argument("--choices", nargs="+", default=CHOICES, metavar="HEAD:LAYERS",
                   help="HEAD:LAYER[,LAYER...] (default: " + " ".join(CHOICES) + ")")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for timing the tower (default: 0, one per CPU); heads train on one")
    args = p.parse_args(argv)
    import torch

    from core.device import default_threads
    from core.labels import LabelsError
    from scoring.metrics import detection_metrics
    from evaluation.with_clip import domain_mean
    from train.heads import balanced_weights, build_expert, cached_features, cluster_of_rows, fit_head, predict
    from train.token_cache import load_cache

    if args.threads < 0:
        p.error("--threads must be 0 (one per CPU) or more")
    threads = args.threads or default_threads()
    torch.set_num_threads(1)
    try:
        specs = {text: parse_choice(text) for text in args.choices}
        rows, tokens, meta = load_cache(args.cache)
        cluster = cluster_of_rows(rows, args.splits)
    except (FileNotFoundError, LabelsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    excluded = np.isin(cluster, args.exclude_clusters)
    ok, targets = rows["ok"].to_numpy(), rows["target"].to_numpy()
    sets = {f"cluster {c}": cluster == c for c in args.val_clusters}
    sets |= {s: (rows["set"] == s).to_numpy() & ~excluded for s in args.val_sets}
    domains = {name: rows.loc[mask, "set"].mode().iloc[0] for name, mask in sets.items()}
    speeds: dict[int, float] = {}
    print(f"tower timed with {threads} torch threads; validation sets: " + ", ".join(f"{k} ({int(v.sum())})" for k, v in sets.items()))
    print("| choice | depth | " + " | ".join(sets) + " | mean AUC (per labelled set) | tower images/s | ms/image | mean AUC per ms |")
    print("|---" * (len(sets) + 6) + "|")
    for text, spec in specs.items():
        features = cached_features(tokens, meta, spec)
        aucs = []
        for held in sets.values():
            train = ok & ~held & ~excluded
            expert = fit_head(build_expert(meta, spec, with_base=False), features[train], targets[train],
                              balanced_weights(rows[train]), spec)
            test = ok & held
            aucs.append(detection_metrics(targets[test], predict(expert, features[test]))["auc"])
        depth = max(spec.layers)
        if depth not in speeds:
            speeds[depth] = tower_speed(meta, depth, threads)
        ms = 1000 / speeds[depth]
        mean = domain_mean(dict(zip(sets, aucs)), domains)
        print(f"| {text} | {depth} | " + " | ".join(f"{a:.4f}" for a in aucs)
              + f" | {mean:.4f} | {speeds[depth]:.1f} | {ms:.0f} | {mean / ms:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
