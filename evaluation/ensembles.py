"""Does each expert earn its place? Every subset of a weights folder's experts, on held-out data.

    python evaluation/ensembles.py --splits runs/clusters/splits.csv --clusters 3 6
    python evaluation/ensembles.py ../shared/data/gan_faces/labels.csv --whole --weights my_weights/

Each image is scored once by every expert (validation protocol: resize, then one JPEG quality for both
classes); then every non-empty subset of experts is measured as the plain average of its members'
probabilities, which is what the ensemble does. The table (sorted by mean AUC over the sets) puts each
single expert beside the pairs and the whole ensemble, so an expert that does not help shows up as a subset
without it scoring at least as well. Only data no expert trained on gives a fair answer: the recipe's
``test_clusters`` (``--splits --clusters``) or sets never trained on (``--whole``).
"""
from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/ensembles.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from evaluation.metrics import detection_metrics
from evaluation.validate import add_set_arguments, evaluation_sets, score_labelled
from experts import load_ensemble


def subset_table(targets: dict[str, np.ndarray], probs: dict[str, np.ndarray], names: list[str],
                 weights: np.ndarray | None = None) -> pd.DataFrame:
    """AUC and TPR@FPR=1e-3 of every subset's average on every set, sorted by mean AUC (best first).

    Args:
        targets: Set name -> labels ``[N]``.
        probs: Set name -> per-expert fake probabilities ``[N, E]`` (columns in the order of ``names``).
        names: The experts' names.
        weights: The experts' weights in the average (default: equal); a subset renormalises its own
            (a subset of zero-weight experts alone is a plain mean).
    """
    w = np.ones(len(names)) if weights is None else np.asarray(weights, float)
    rows = []
    for k in range(1, len(names) + 1):
        for members in combinations(range(len(names)), k):
            m = list(members)
            row = {"experts": " + ".join(names[i] for i in m), "size": k}
            for set_name, p in probs.items():
                wm = w[m] if w[m].sum() > 0 else np.ones(len(m))  # zero-weight experts alone: plain mean
                average = p[:, m] @ (wm / wm.sum())
                metrics = detection_metrics(targets[set_name], average)
                row[f"{set_name} AUC"] = metrics["auc"]
                row[f"{set_name} TPR@1e-3"] = metrics["tpr@fpr1e-3"]
            row["mean AUC"] = float(np.mean([row[f"{s} AUC"] for s in probs]))
            rows.append(row)
    return pd.DataFrame(rows).sort_values("mean AUC", ascending=False, kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)
    args = p.parse_args(argv)
    ensemble = load_ensemble(args.weights, args.device)
    targets, probs = {}, {}
    for set_name, df in evaluation_sets(args).items():
        targets[set_name], probs[set_name] = score_labelled(ensemble, df, args.jpeg_quality, args.batch_size,
                                                            args.workers, args.device)
        print(f"{set_name}: {len(targets[set_name])} images ({int(targets[set_name].sum())} fake)")
    weights = ensemble.weights.cpu().numpy()
    table = subset_table(targets, probs, ensemble.names, weights)
    print(f"\nevery subset of {args.weights} (average of its experts' probabilities), JPEG {args.jpeg_quality}\n")
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
