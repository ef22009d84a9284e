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

import numpy as np
import pandas as pd
import torch

from core.labels import read_labels, split_by_group
from core.transforms import shortcut_free_eval_transform
from evaluation.heldout import cluster_sets, read_splits
from evaluation.metrics import detection_metrics
from scoring.pipeline import score_images
from experts import Ensemble, load_ensemble, read_manifest

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
    if bool(args.splits) != bool(args.clusters) and not (args.splits and getattr(args, "folds", False)):
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


# ------------------------------------------------------------------------- out-of-fold validation
def add_fold_argument(p: argparse.ArgumentParser) -> None:
    """``--folds``: choose on the out-of-fold validation rows; what else is given is scored for the report."""
    p.add_argument("--folds", action="store_true",
                   help="choose on the out-of-fold validation rows of the weights' training folds: each fold's "
                        "cluster scored only by the experts validated on it, which never trained on it (the "
                        "manifest's training.validation_sets; splits file from its config, or --splits). The sets "
                        "given (CSVs, --clusters; default: the run's test clusters) are then scored for the report "
                        "only, never used for the choice")


def training_record(weights: str | Path) -> dict:
    """The ``training`` record of a weights folder's manifest (for a folder merged from one run, that run's)."""
    manifest = read_manifest(weights)
    if "training" in manifest:
        return manifest["training"]
    records = [r["training"] for r in manifest.get("merged_from", []) if r.get("training")]
    if len(records) != 1:
        raise SystemExit(f"error: {weights}: its manifest holds {len(records)} training records; out-of-fold "
                         "validation needs the one run the experts were trained in")
    return records[0]


def fold_experts(training: dict, names: list[str], k: int) -> dict[str, list[str]]:
    """Fold set (``fold_<f>``) -> the experts of ``names`` validated on it, i.e. never trained on its cluster.

    Read from ``training.validation_sets`` as written by ``train/joint.py``; failing that, from each expert's
    ``fold`` in ``training.config.experts`` (default: folds 0, 1, ... in order, as training assigns them).
    """
    recorded = {s: keys for s, keys in (training.get("validation_sets") or {}).items()
                if s.startswith("fold_") and keys}
    if not recorded:
        specs = training.get("config", {}).get("experts", [])
        recorded = {}
        for i, spec in enumerate(specs):
            recorded.setdefault(f"fold_{int(spec.get('fold', i % k))}", []).append(spec.get("key", spec["name"]))
    order = sorted(recorded, key=lambda s: int(s.split("_")[1]))
    return {s: [n for n in names if n in recorded[s]] for s in order}


def fold_sets(weights: str | Path, names: list[str], splits: str | None = None
              ) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """The out-of-fold validation sets of a weights folder trained on cluster folds, and who scores each.

    Fold ``f``'s set is every row of the splits file with ``fold_<f> == "val"``: the cluster its experts
    never trained on (nor, since mutual learning keeps to teachers that never trained on it either, heard
    about: a run from before that rule, with ``kl_mutual`` on, did hear of it). Scored by those experts only,
    these rows are the data on which the experts that ship and the threshold may be chosen; the test
    clusters are held out from every expert and stay for the report.

    Returns:
        Set name -> rows, and set name -> the experts (of ``names``) that score it; a fold none of ``names``
        was validated on (an expert removed by ``train/merge.py --keep``), or without rows, is left out.
    """
    training = training_record(weights)
    path = splits or training.get("config", {}).get("splits")
    if not path:
        raise SystemExit(f"error: {weights} was not trained on cluster folds (its training config has no "
                         "`splits`), so it has no out-of-fold validation rows; choose on labelled CSVs instead")
    rows = read_splits(path)
    k = sum(1 for c in rows.columns if c.startswith("fold_"))
    sets, scorers = {}, {}
    for name, keys in fold_experts(training, names, k).items():
        if name not in rows.columns:
            raise SystemExit(f"error: {path} has no column {name}: not the splits file these experts trained on")
        if keys and (rows[name] == "val").any():  # data_prep/cluster.py warns of a fold left without rows
            sets[name], scorers[name] = rows[rows[name] == "val"].reset_index(drop=True), keys
    if not sets:
        raise SystemExit(f"error: none of the experts {names} of {weights} was validated on a fold")
    return sets, scorers


def report_sets(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """The sets ``--folds`` scores for the report: those given (CSVs, ``--clusters``), else the run's test
    clusters (``training.test_sets`` of the manifest, from the same splits file)."""
    training = training_record(args.weights)
    path = args.splits or training.get("config", {}).get("splits")
    if args.csvs or args.clusters:
        return evaluation_sets(argparse.Namespace(**{**vars(args), "splits": path if args.clusters else args.splits}))
    clusters = [int(name.split("_")[1]) for name in training.get("test_sets", []) if name.startswith("cluster_")]
    return cluster_sets(path, clusters) if clusters and path else {}


def score_out_of_fold(ensemble: Ensemble, sets: dict[str, pd.DataFrame], scorers: dict[str, list[str]],
                      jpeg_quality: int = 75, batch_size: int = 32, workers: int = 0, device: str = "cpu"
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Labels ``[N]`` and per-expert probabilities ``[N, E]`` of each set, NaN for the experts not scoring it.

    Only a set's scorers run on it (``scorers``): an expert's score on rows it trained on is no evidence.
    """
    targets, probs = {}, {}
    for name, df in sets.items():
        keys = scorers[name]
        scoring = Ensemble({k: ensemble.experts[k] for k in keys}).eval()
        targets[name], scored = score_labelled(scoring, df, jpeg_quality, batch_size, workers, device)
        probs[name] = np.full((len(scored), len(ensemble.names)), np.nan)
        probs[name][:, [ensemble.names.index(k) for k in keys]] = scored
    return targets, probs


def combine_scored(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, the weighted average ``[N]`` of the experts that scored it (the finite entries of ``[N, E]``).

    What the ensemble does, restricted to the experts whose score on the row is honest; weights renormalise
    over them, and where they all weigh 0 their plain mean is taken. NaN where no expert scored the row.
    """
    scored = np.isfinite(probs)
    w = np.where(scored, np.asarray(weights, float)[None, :], 0.0)
    w = np.where(w.sum(axis=1, keepdims=True) > 0, w, scored.astype(float))
    with np.errstate(invalid="ignore"):  # 0 / 0: a row no expert scored
        return (np.where(scored, probs, 0.0) * w).sum(axis=1) / w.sum(axis=1)


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
