"""How the detector's AUC holds up when images are degraded: JPEG, blur, downscaling, noise.

    python bench/robustness.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python bench/robustness.py labels.csv --whole --limit 500 --weights my_weights/ --plot robustness.png
    python bench/robustness.py --splits runs/clusters/splits.csv --clusters 3 6 --limit 300   # held-out clusters

Each condition degrades every image (both classes alike) at its own resolution, then applies the usual
evaluation resize, and scores it with the code ``infer.py`` runs. By default only the group-disjoint
validation part of each CSV is used (as ``evaluation/validate.py``); ``--whole`` uses every row (a set
never trained on); ``--splits --clusters`` uses held-out clusters of ``data_prep/cluster.py``. Prints one table per CSV (condition x AUC) and saves a plot of AUC against each
degradation's strength.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from core.labels import LabelsError
from core.transforms import eval_transform
from evaluation.metrics import detection_metrics
from scoring.pipeline import score_images
from evaluation.validate import add_set_arguments, evaluation_sets
from experts import Ensemble, load_ensemble

# (degradation, strength) -> the albumentations transform; strength 'none' is the clean baseline.
SWEEPS: dict[str, list[float]] = {
    "jpeg_quality": [100, 90, 70, 50, 30],
    "blur_sigma": [0, 1, 2, 3, 4],
    "downscale": [1.0, 0.75, 0.5, 0.25],
    "noise_std": [0.0, 0.02, 0.05, 0.1],
}


def degradation(kind: str, strength: float) -> list[A.BasicTransform]:
    """The transform of one condition (empty for the no-op strengths: sigma 0, scale 1, noise 0)."""
    if kind == "jpeg_quality":
        return [A.ImageCompression(quality_range=(int(strength), int(strength)), p=1.0)]
    if kind == "blur_sigma":
        return [A.GaussianBlur(sigma_limit=(strength, strength), blur_limit=0, p=1.0)] if strength > 0 else []
    if kind == "downscale":
        # Down, then back up: the detail is lost but the image keeps its size (as a re-shared photo does).
        return [A.Downscale(scale_range=(strength, strength), interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                                  "upscale": cv2.INTER_LINEAR},
                            p=1.0)] if strength < 1 else []
    if kind == "noise_std":
        return [A.GaussNoise(std_range=(strength, strength), p=1.0)] if strength > 0 else []
    raise ValueError(f"unknown degradation {kind!r}; known: {list(SWEEPS)}")


def condition_transform(kind: str, strength: float) -> Callable[[int], A.Compose]:
    return lambda size: A.Compose([*degradation(kind, strength), *eval_transform(size).transforms], seed=0)


def sweep(ensemble: Ensemble, df: pd.DataFrame, batch_size: int = 32, workers: int = 0, device: str = "cpu",
          sweeps: dict[str, list[float]] = SWEEPS) -> pd.DataFrame:
    """Rows (degradation, strength, auc, tpr@fpr1e-3, acc@0.5) of the ensemble on ``df`` under each condition."""
    rows = []
    for kind, strengths in sweeps.items():
        for strength in strengths:
            scores = [s for s in score_images(ensemble, df["path"], batch_size=batch_size, workers=workers,
                                              device=device, progress=False, transform=condition_transform(kind, strength))]
            ok = np.array([not s.error for s in scores])
            m = detection_metrics(df["target"].to_numpy()[ok], [s.prob for s in scores if not s.error])
            rows.append({"degradation": kind, "strength": strength, "auc": m["auc"],
                         "tpr@fpr1e-3": m["tpr@fpr1e-3"], "acc@0.5": m["acc@0.5"]})
            print(f"  {kind}={strength}: AUC {m['auc']:.4f}", file=sys.stderr)
    return pd.DataFrame(rows)


def plot(tables: dict[str, pd.DataFrame], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(4 * len(SWEEPS), 3.4), sharey=True)
    for ax, kind in zip(axes, SWEEPS):
        for name, table in tables.items():
            part = table[table["degradation"] == kind]
            ax.plot(part["strength"], part["auc"], marker="o", label=name)
        ax.set(title=kind, xlabel=kind.replace("_", " "))
        if kind in ("jpeg_quality", "downscale"):
            ax.invert_xaxis()  # left to right: worse, as for blur and noise
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)
    p.add_argument("--limit", type=int, default=0, help="at most this many images per set (a seeded sample)")
    p.add_argument("--plot", default="robustness.png", help="where to save the plot (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        sets = evaluation_sets(args)
    except LabelsError as e:
        raise SystemExit(f"error: {e}") from None
    ensemble = load_ensemble(args.weights, args.device)
    tables = {}
    for name, df in sets.items():
        if args.limit and len(df) > args.limit:
            df = df.sample(n=args.limit, random_state=0).reset_index(drop=True)
        name = name if name.startswith("cluster_") else Path(name).resolve().parent.name
        print(f"{name}: {len(df)} images", file=sys.stderr)
        tables[name] = sweep(ensemble, df, args.batch_size, args.workers, args.device)
    wide = pd.concat({k: v.set_index(["degradation", "strength"])["auc"] for k, v in tables.items()}, axis=1)
    print("\nAUC under each degradation (rows: condition; columns: evaluation set)\n")
    print(wide.to_markdown(floatfmt=".4f"))
    print(f"\nplot saved to {plot(tables, args.plot)}")


if __name__ == "__main__":
    main()
