"""Does each expert earn its place? Every subset of a weights folder's experts, chosen on validation folds.

    python evaluation/ensembles.py --folds --weights runs/recipe/weights        # choose; test clusters reported
    python evaluation/ensembles.py --splits runs/clusters/splits.csv --clusters 3 6   # every subset on given sets
    python evaluation/ensembles.py ../shared/data/gan_faces/labels.csv --whole --weights my_weights/

Each image is scored once by every expert (validation protocol: resize, then one JPEG quality for both
classes); then every non-empty subset of experts is measured as the weighted average of its members'
probabilities, which is what the ensemble does. The table (sorted by mean AUC over the sets) puts each
single expert beside the pairs and the whole ensemble, so an expert that does not help shows up as a subset
without it scoring at least as well.

Which experts ship is a choice, and a choice made on the data that then measures it makes that measurement
optimistic. With ``--folds`` (a folder trained on cluster folds) the choice is made on the out-of-fold
validation rows only: each fold's cluster is scored by the experts validated on it, which never trained on
it, and a subset counts there through those of its members. Only a subset with a member on every fold has a
mean AUC (a fold none of its members may score says nothing about it), and the best such subset is chosen.
The test clusters (the run's ``test_clusters``, or the sets given) are scored afterwards for the chosen
subset and the whole ensemble, for the report only. Without ``--folds`` every subset is measured on the sets
given, as a report; choose on validation data, never on the test clusters.
"""
from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE, VALIDATION_JPEG_QUALITY
from evaluation.heldout import EvaluationSetError
from evaluation.validate import (SetChoice, add_fold_argument, add_set_arguments, combine_scored, evaluation_sets,
                                 fold_sets, protocol_settings, report_sets, score_labelled, score_out_of_fold)

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from experts import Ensemble

REPORT_ONLY = "report only, not used for the choice"


def subset_table(targets: dict[str, np.ndarray], probs: dict[str, np.ndarray], names: list[str],
                 weights: np.ndarray | None = None, sort: bool = True) -> "pd.DataFrame":
    """AUC and TPR@FPR=1e-3 of every subset's average on every set, sorted by mean AUC (best first).

    Args:
        targets: Set name -> labels ``[N]``.
        probs: Set name -> per-expert fake probabilities ``[N, E]`` (columns in the order of ``names``); NaN
            where an expert does not score the set (out-of-fold: it trained on it). A subset is measured on
            a set through its members that score it, and has no metrics (NaN) there when none does.
        names: The experts' names.
        weights: The experts' weights in the average (default: equal); a subset renormalises its own
            (a subset of zero-weight experts alone is a plain mean).
        sort: Sort by mean AUC (NaN last); else keep the order of the subsets (by size, then by name order).
    """
    import pandas as pd

    from scoring.metrics import detection_metrics

    w = np.ones(len(names)) if weights is None else np.asarray(weights, float)
    rows = []
    for k in range(1, len(names) + 1):
        for members in combinations(range(len(names)), k):
            m = list(members)
            row = {"experts": " + ".join(names[i] for i in m), "size": k}
            for set_name, p in probs.items():
                average = combine_scored(p[:, m], w[m])
                metrics = (detection_metrics(targets[set_name], average) if np.isfinite(average).all()
                           else {"auc": float("nan"), "tpr@fpr1e-3": float("nan")})
                row[f"{set_name} AUC"] = metrics["auc"]
                row[f"{set_name} TPR@1e-3"] = metrics["tpr@fpr1e-3"]
            row["mean AUC"] = float(np.mean([row[f"{s} AUC"] for s in probs]))
            rows.append(row)
    table = pd.DataFrame(rows)
    if sort:
        table = table.sort_values("mean AUC", ascending=False, kind="stable", na_position="last")
    return table.reset_index(drop=True)


def choose_subset(table: "pd.DataFrame") -> str | None:
    """The experts (``"a + b"``) of the best row of a sorted :func:`subset_table` with a mean AUC; ``None``
    when no subset has one (no subset scores every set)."""
    measured = table[np.isfinite(table["mean AUC"].to_numpy(dtype=float))]
    return None if measured.empty else str(measured["experts"].iloc[0])


def choose_on_folds(weights_dir: str | Path, choice: SetChoice, ensemble: "Ensemble", weights: np.ndarray,
                    jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                    device: "str | torch.device" = DEFAULT_DEVICE) -> str | None:
    """``--folds``: the subset table of the out-of-fold validation rows, the choice, then the test report
    (on the sets of ``choice``, else the run's test clusters)."""
    sets, scorers = fold_sets(weights_dir, ensemble.names, choice.splits)
    targets, probs = score_out_of_fold(ensemble, sets, scorers, jpeg_quality, batch_size, workers, device)
    for name in sets:
        print(f"{name}: {len(targets[name])} images ({int(targets[name].sum())} fake), out-of-fold validation, "
              f"scored by {', '.join(scorers[name])}")
    table = subset_table(targets, probs, ensemble.names, weights)
    print(f"\nevery subset of {weights_dir} on the out-of-fold validation rows (a subset counts on a fold "
          f"through its members validated there; no mean AUC: some fold has none), JPEG {jpeg_quality}\n")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    chosen = choose_subset(table)
    if chosen is None:
        print("\nno subset has an expert validated on every fold: nothing can be chosen on validation data")
        return None
    keep = chosen.split(" + ")
    print(f"\nchosen on the validation folds: {chosen}  (python train/merge.py {weights_dir} --keep "
          f"{' '.join(keep)} --out weights)")
    report_test_sets(weights_dir, choice, ensemble, weights, [chosen, " + ".join(ensemble.names)], jpeg_quality,
                     batch_size, workers, device)
    return chosen


def report_test_sets(weights_dir: str | Path, choice: SetChoice, ensemble: "Ensemble", weights: np.ndarray,
                     subsets: list[str], jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32,
                     workers: int = 0, device: "str | torch.device" = DEFAULT_DEVICE) -> None:
    """The chosen subset and the whole ensemble on the test sets, printed as a report that chooses nothing."""
    sets = report_sets(weights_dir, choice)
    if not sets:
        return
    targets, probs = {}, {}
    for name, df in sets.items():
        targets[name], probs[name] = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
    table = subset_table(targets, probs, ensemble.names, weights, sort=False).set_index("experts")
    rows = table.loc[list(dict.fromkeys(subsets))].reset_index()
    print(f"\ntest sets ({REPORT_ONLY}): {', '.join(f'{n} ({len(targets[n])} images)' for n in sets)}\n")
    print(rows.to_markdown(index=False, floatfmt=".4f"))


def every_subset(ensemble: "Ensemble", sets: dict[str, "pd.DataFrame"], weights: np.ndarray,
                 jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                 device: "str | torch.device" = DEFAULT_DEVICE) -> "pd.DataFrame":
    """Without ``--folds``: every subset measured on the sets given (a report, not a choice), printed."""
    targets, probs = {}, {}
    for set_name, df in sets.items():
        targets[set_name], probs[set_name] = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
        print(f"{set_name}: {len(targets[set_name])} images ({int(targets[set_name].sum())} fake)")
    return subset_table(targets, probs, ensemble.names, weights)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)
    add_fold_argument(p)
    args = p.parse_args(argv)

    from core.device import DeviceError, resolve_device
    from core.labels import LabelsError
    from experts import WeightsError, load_ensemble, read_manifest

    try:
        jpeg_quality, val_fraction = protocol_settings(read_manifest(args.weights), args.jpeg_quality,
                                                       args.val_fraction)
        choice = SetChoice(tuple(args.csvs), args.splits, tuple(args.clusters), args.whole, val_fraction)
        sets = None if args.folds else evaluation_sets(choice)
        device = resolve_device(args.device)
        ensemble = load_ensemble(args.weights, device)
        weights = ensemble.weights.cpu().numpy()
        scoring = dict(jpeg_quality=jpeg_quality, batch_size=args.batch_size, workers=args.workers, device=device)
        if args.folds:
            choose_on_folds(args.weights, choice, ensemble, weights, **scoring)
            return 0
        table = every_subset(ensemble, sets, weights, **scoring)
    except (EvaluationSetError, LabelsError, WeightsError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nevery subset of {args.weights} (average of its experts' probabilities), JPEG {jpeg_quality}\n")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.clusters:
        print("\nnote: held-out clusters measure the ensemble; to choose which experts ship without spending "
              "them, use --folds (the choice on validation folds, these clusters then as the report)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
