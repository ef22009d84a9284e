"""Measure a weights folder on the group-disjoint validation part of labelled sets.

    python evaluation/validate.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python evaluation/validate.py data/test/labels.csv --whole --weights my_weights/
    python evaluation/validate.py --splits runs/clusters/splits.csv --clusters 3 6   # the recipe's test clusters

By default each CSV is split exactly as ``train/joint.py`` splits it (groups hashed into a
``--val-fraction`` share), and only the validation part is scored; ``--whole`` scores every row (for a
set never trained on). Images are resized and re-encoded at one JPEG quality for both classes, so that
compression history, the known shortcut, cannot help. The quality and the share are those the weights'
manifest records (its training config, or the stored threshold's), else the project's protocol
(``core/protocol.py``). Prints a Markdown table per set: each expert and the ensemble, with AUC, TPR at
FPR=1e-3, EER, accuracy at 0.5 and average precision.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE, VAL_FRACTION, VALIDATION_JPEG_QUALITY
from evaluation.heldout import EvaluationSetError, cluster_sets, read_splits

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from experts import Ensemble

#: The shipped weights folder, the default of every command's ``--weights``.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
COLUMNS = ["n", "auc", "tpr@fpr1e-3", "eer", "acc@0.5", "ap"]


# ----------------------------------------------------------------------------------- which images
@dataclass(frozen=True)
class SetChoice:
    """Which labelled images to measure: each CSV's validation part (or every row, ``whole``), and the
    held-out ``clusters`` of a ``splits`` file."""

    csvs: tuple[str, ...] = ()
    splits: str | None = None
    clusters: tuple[int, ...] = ()
    whole: bool = False
    val_fraction: float = VAL_FRACTION

    def part(self, name: str) -> str:
        """How the rows of set ``name`` of :func:`evaluation_sets` were chosen, in words for the reports."""
        if name.startswith("cluster_"):
            return "held-out cluster"
        return "all rows" if self.whole else f"validation part ({self.val_fraction:.0%} of groups)"


def evaluation_sets(choice: SetChoice, splits_alone: bool = False) -> dict[str, "pd.DataFrame"]:
    """Set name -> rows: the held-out clusters of ``choice.splits``, then each CSV (its validation part or
    whole). ``splits_alone``: a splits file without clusters is fine (``--folds`` reads its folds)."""
    from core.labels import read_labels, split_by_group

    if not choice.csvs and not choice.clusters:
        raise EvaluationSetError("give labels CSVs, or --splits FILE --clusters N [N ...]")
    if bool(choice.splits) != bool(choice.clusters) and not (choice.splits and splits_alone):
        raise EvaluationSetError("--splits and --clusters go together")
    if not 0.0 < choice.val_fraction < 1.0:
        raise EvaluationSetError(f"--val-fraction must lie strictly between 0 and 1, got {choice.val_fraction:g}")
    sets = cluster_sets(choice.splits, choice.clusters) if choice.clusters else {}
    for csv in choice.csvs:
        df = read_labels(csv)
        sets[csv] = df if choice.whole else split_by_group(df, choice.val_fraction)[1]
    return sets


def set_part(name: str, choice: SetChoice) -> str:
    """How the rows of set ``name`` were chosen (:meth:`SetChoice.part`)."""
    return choice.part(name)


# ------------------------------------------------------------------- the protocol a folder records
def recorded_protocol(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The validation ``jpeg_quality`` and ``val_fraction`` a weights folder's manifest records.

    From its training config (``val_jpeg_quality``, ``val_fraction``: ``train/joint.py`` writes them; for a
    merged folder, every run's, used when they agree), else, for the JPEG quality, from the stored
    threshold's ``jpeg_quality``. A value recorded nowhere (or recorded differently by merged runs) is
    left out; the caller falls back to :mod:`core.protocol`.
    """
    records = [manifest.get("training")] + [r.get("training") for r in manifest.get("merged_from", [])
                                            if isinstance(r, Mapping)]
    configs = [r["config"] for r in records if isinstance(r, Mapping) and isinstance(r.get("config"), Mapping)]
    found: dict[str, Any] = {}
    for key, name in (("jpeg_quality", "val_jpeg_quality"), ("val_fraction", "val_fraction")):
        values = {c[name] for c in configs if c.get(name) is not None}
        if len(values) == 1:
            found[key] = values.pop()
    threshold = manifest.get("threshold")
    if "jpeg_quality" not in found and isinstance(threshold, Mapping) and threshold.get("jpeg_quality") is not None:
        found["jpeg_quality"] = threshold["jpeg_quality"]
    if "jpeg_quality" in found:
        found["jpeg_quality"] = int(found["jpeg_quality"])
    if "val_fraction" in found:
        found["val_fraction"] = float(found["val_fraction"])
    return found


def protocol_settings(manifest: Mapping[str, Any], jpeg_quality: int | None = None,
                      val_fraction: float | None = None) -> tuple[int, float]:
    """The JPEG quality and validation share to measure with: as given, else as the manifest records
    (:func:`recorded_protocol`), else :data:`core.protocol.VALIDATION_JPEG_QUALITY` and
    :data:`core.protocol.VAL_FRACTION`."""
    recorded = recorded_protocol(manifest)
    quality = jpeg_quality if jpeg_quality is not None else recorded.get("jpeg_quality", VALIDATION_JPEG_QUALITY)
    fraction = val_fraction if val_fraction is not None else recorded.get("val_fraction", VAL_FRACTION)
    if not 1 <= quality <= 100:
        raise EvaluationSetError(f"--jpeg-quality must be 1 to 100, got {quality}")
    return quality, fraction


# ------------------------------------------------------------------------------------------ scoring
def score_labelled(ensemble: "Ensemble", df: "pd.DataFrame", jpeg_quality: int = VALIDATION_JPEG_QUALITY,
                   batch_size: int = 32, workers: int = 0, device: "str | torch.device" = DEFAULT_DEVICE,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[N]`` and per-expert fake probabilities ``[N, E]`` of the readable rows of ``df``.

    Unreadable images are reported on stderr and left out, so one bad file does not stop a measurement.
    """
    from functools import partial

    from core.device import resolve_device
    from core.progress import write_line
    from core.transforms import shortcut_free_eval_transform
    from scoring.pipeline import score_batches

    transform = partial(shortcut_free_eval_transform, jpeg_quality=jpeg_quality)
    ok, probs = [], []
    for batch in score_batches(ensemble, df["path"].tolist(), batch_size=batch_size, workers=workers,
                               device=resolve_device(device), progress=progress, transform=transform):
        for error in batch.errors:
            if error:
                write_line(f"error: {error}")
        ok.append(batch.ok)
        probs.append(batch.expert_probs)
    if not probs:
        return df["target"].to_numpy()[:0], np.zeros((0, len(ensemble.names)))
    ok_all = np.concatenate(ok)
    return df["target"].to_numpy()[ok_all], np.concatenate(probs)[ok_all]


def validate(ensemble: "Ensemble", df: "pd.DataFrame", jpeg_quality: int = VALIDATION_JPEG_QUALITY,
             batch_size: int = 32, workers: int = 0, device: "str | torch.device" = DEFAULT_DEVICE
             ) -> "pd.DataFrame":
    """Metrics table (rows: experts then ``ensemble``) of the ensemble on the rows of ``df``."""
    import pandas as pd
    import torch

    from scoring.metrics import detection_metrics

    targets, probs = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
    rows = {name: detection_metrics(targets, probs[:, i]) for i, name in enumerate(ensemble.names)}
    rows["ensemble"] = detection_metrics(targets, ensemble.combine(torch.from_numpy(probs)).numpy())
    return pd.DataFrame(rows).T[COLUMNS]


# -------------------------------------------------------------------------------- shared options
def add_set_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which labelled images to measure and how (shared by the evaluation commands).

    ``--jpeg-quality`` and ``--val-fraction`` default to ``None``: the caller resolves them with
    :func:`protocol_settings` (the weights' recorded values, else :mod:`core.protocol`)."""
    p.add_argument("csvs", nargs="*", metavar="CSV", help="labels CSVs (img_name,target[,group])")
    p.add_argument("--splits", metavar="FILE",
                   help="splits.csv of data_prep/cluster.py: measure its --clusters instead of CSVs")
    p.add_argument("--clusters", type=int, nargs="+", default=[], metavar="N",
                   help="clusters of --splits to measure, one set each (the recipe's test_clusters)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="DIR",
                   help="weights folder (default: the shipped weights/)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="SHARE",
                   help="share of each CSV's groups held out, as in training (default: the weights' training "
                        f"config, else {VAL_FRACTION})")
    p.add_argument("--whole", action="store_true", help="score every row of the CSVs, not only the validation part")
    p.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="re-encoding quality of both classes (default: the one the weights were validated or "
                        f"thresholded at, else {VALIDATION_JPEG_QUALITY})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"auto | cpu | cuda | cuda:N (default: {DEFAULT_DEVICE}, the GPU if any)")


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
    from experts import read_manifest

    manifest = read_manifest(weights)
    if "training" in manifest:
        return manifest["training"]
    records = [r["training"] for r in manifest.get("merged_from", []) if r.get("training")]
    if len(records) != 1:
        raise EvaluationSetError(f"{weights}: its manifest holds {len(records)} training records; out-of-fold "
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
              ) -> tuple[dict[str, "pd.DataFrame"], dict[str, list[str]]]:
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
        raise EvaluationSetError(f"{weights} was not trained on cluster folds (its training config has no "
                                 "`splits`), so it has no out-of-fold validation rows; choose on labelled CSVs "
                                 "instead")
    rows = read_splits(path)
    k = sum(1 for c in rows.columns if c.startswith("fold_"))
    sets, scorers = {}, {}
    for name, keys in fold_experts(training, names, k).items():
        if name not in rows.columns:
            raise EvaluationSetError(f"{path} has no column {name}: not the splits file these experts trained on")
        if keys and (rows[name] == "val").any():  # data_prep/cluster.py warns of a fold left without rows
            sets[name], scorers[name] = rows[rows[name] == "val"].reset_index(drop=True), keys
    if not sets:
        raise EvaluationSetError(f"none of the experts {names} of {weights} was validated on a fold")
    return sets, scorers


def report_sets(weights: str | Path, choice: SetChoice) -> dict[str, "pd.DataFrame"]:
    """The sets ``--folds`` scores for the report: those chosen (CSVs, clusters; clusters of the run's own
    splits file unless ``choice.splits`` names one), else the run's test clusters (``training.test_sets``
    of the manifest, from the same splits file)."""
    training = training_record(weights)
    path = choice.splits or training.get("config", {}).get("splits")
    if choice.csvs or choice.clusters:
        return evaluation_sets(replace(choice, splits=path if choice.clusters else choice.splits))
    clusters = [int(name.split("_")[1]) for name in training.get("test_sets", []) if name.startswith("cluster_")]
    return cluster_sets(path, clusters) if clusters and path else {}


def score_out_of_fold(ensemble: "Ensemble", sets: dict[str, "pd.DataFrame"], scorers: dict[str, list[str]],
                      jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                      device: "str | torch.device" = DEFAULT_DEVICE
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Labels ``[N]`` and per-expert probabilities ``[N, E]`` of each set, NaN for the experts not scoring it.

    Only a set's scorers run on it (``scorers``): an expert's score on rows it trained on is no evidence.
    """
    from experts import Ensemble

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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)
    args = p.parse_args(argv)

    from core.device import DeviceError, resolve_device
    from core.labels import LabelsError
    from experts import WeightsError, load_ensemble, read_manifest

    try:
        jpeg_quality, val_fraction = protocol_settings(read_manifest(args.weights), args.jpeg_quality,
                                                       args.val_fraction)
        choice = SetChoice(tuple(args.csvs), args.splits, tuple(args.clusters), args.whole, val_fraction)
        sets = evaluation_sets(choice)
        device = resolve_device(args.device)
        ensemble = load_ensemble(args.weights, device)
        for name, df in sets.items():
            table = validate(ensemble, df, jpeg_quality, args.batch_size, args.workers, device)
            print(f"\n{name}: {choice.part(name)}, {int(table['n'].iloc[-1])} images "
                  f"({int(df['target'].sum())} fake), JPEG {jpeg_quality}\n")
            print(table.to_markdown(floatfmt=".4f"))
    except (EvaluationSetError, LabelsError, WeightsError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
