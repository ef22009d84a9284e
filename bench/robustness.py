"""How the detector's AUC holds up when images are degraded: JPEG, blur, downscaling, noise.

    python bench/robustness.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python bench/robustness.py labels.csv --whole --limit 500 --weights my_weights/ --plot robustness.png
    python bench/robustness.py --splits runs/clusters/splits.csv --clusters 3 6 --limit 300   # held-out clusters

Each condition degrades every image (both classes alike) at its own resolution, then applies the usual
evaluation resize, and scores it with the code ``infer.py`` runs. By default only the group-disjoint
validation part of each CSV is used (as ``evaluation/validate.py``); ``--whole`` uses every row (a set
never trained on); ``--splits --clusters`` uses held-out clusters of ``data_prep/cluster.py``. Prints one
table per CSV (condition x AUC) and saves a plot of AUC against each degradation's strength.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE
from evaluation.validate import SetChoice, add_set_arguments, evaluation_sets, protocol_settings

if TYPE_CHECKING:  # the heavy imports happen in the functions: --help stays instant
    import albumentations as A
    import pandas as pd
    import torch

    from experts import Ensemble

# (degradation, strength) -> the albumentations transform; strength 'none' is the clean baseline.
SWEEPS: dict[str, list[float]] = {
    "jpeg_quality": [100, 90, 70, 50, 30],
    "blur_sigma": [0, 1, 2, 3, 4],
    "downscale": [1.0, 0.75, 0.5, 0.25],
    "noise_std": [0.0, 0.02, 0.05, 0.1],
}


def degradation(kind: str, strength: float) -> list[A.BasicTransform]:
    """The transform of one condition (empty for the no-op strengths: sigma 0, scale 1, noise 0)."""
    import albumentations as A
    import cv2

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
    """Input size -> the degradation of one condition, then the usual evaluation resize."""
    import albumentations as A

    from core.transforms import eval_transform

    return lambda size: A.Compose([*degradation(kind, strength), *eval_transform(size).transforms], seed=0)


def sweep(ensemble: Ensemble, df: pd.DataFrame, batch_size: int = 32, workers: int = 0,
          device: str | torch.device = DEFAULT_DEVICE, sweeps: dict[str, list[float]] = SWEEPS,
          progress: Callable[[str], Any] | None = None) -> pd.DataFrame:
    """Rows (degradation, strength, auc, tpr@fpr1e-3, acc@0.5) of the ensemble on ``df`` under each condition;
    ``progress`` gets one line per condition done (default: printed on stderr)."""
    import pandas as pd

    from core.device import resolve_device
    from scoring.metrics import detection_metrics
    from scoring.pipeline import score_images

    device = resolve_device(device)
    rows = []
    for kind, strengths in sweeps.items():
        for strength in strengths:
            scores = [s for s in score_images(ensemble, df["path"], batch_size=batch_size, workers=workers,
                                              device=device, progress=False, transform=condition_transform(kind, strength))]
            ok = np.array([not s.error for s in scores])
            m = detection_metrics(df["target"].to_numpy()[ok], [s.prob for s in scores if not s.error])
            rows.append({"degradation": kind, "strength": strength, "auc": m["auc"],
                         "tpr@fpr1e-3": m["tpr@fpr1e-3"], "acc@0.5": m["acc@0.5"]})
            (progress or _stderr)(f"  {kind}={strength}: AUC {m['auc']:.4f}")
    return pd.DataFrame(rows)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def plot(tables: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Save AUC against each degradation's strength, one line per evaluation set, to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.files import atomic_output

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
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--jpeg-quality plays no part here: JPEG quality is one of the swept "
                                       "degradations, and the evaluation transform only resizes.")
    add_set_arguments(p)
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="at most this many images per set, a seeded sample (default: 0, every image)")
    p.add_argument("--plot", default="robustness.png", metavar="PNG",
                   help="where to save the plot (default: %(default)s)")
    args = p.parse_args(argv)

    import pandas as pd

    from core.device import DeviceError, resolve_device
    from core.labels import LabelsError
    from experts import WeightsError, load_ensemble, read_manifest

    try:
        _, val_fraction = protocol_settings(read_manifest(args.weights), None, args.val_fraction)
        sets = evaluation_sets(SetChoice(tuple(args.csvs), args.splits, tuple(args.clusters), args.whole,
                                         val_fraction))
        device = resolve_device(args.device)
        ensemble = load_ensemble(args.weights, device)
    except (DeviceError, LabelsError, WeightsError, ValueError) as e:  # EvaluationSetError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    tables = {}
    for name, df in sets.items():
        if args.limit and len(df) > args.limit:
            df = df.sample(n=args.limit, random_state=0).reset_index(drop=True)
        name = name if name.startswith("cluster_") else Path(name).resolve().parent.name
        print(f"{name}: {len(df)} images", file=sys.stderr)
        tables[name] = sweep(ensemble, df, args.batch_size, args.workers, device)
    wide = pd.concat({k: v.set_index(["degradation", "strength"])["auc"] for k, v in tables.items()}, axis=1)
    print("\nAUC under each degradation (rows: condition; columns: evaluation set)\n")
    print(wide.to_markdown(floatfmt=".4f"))
    print(f"\nplot saved to {plot(tables, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
