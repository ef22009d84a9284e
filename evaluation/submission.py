"""Check a competition submission against the labels and score it, verdicts at the stored threshold.

    python evaluation/submission.py submission.csv --labels ../shared/data/gan_faces/labels.csv
    python evaluation/submission.py sub.csv --labels labels.csv --weights my_weights/ --by source --roc roc.png
    python evaluation/submission.py sub.csv --labels labels.csv --threshold 0.5

A submission is ``img_name,y_pred`` (extra columns, such as ``infer.py --per-expert`` writes, are allowed
and ignored). It is refused, with the file, row and problem named, when a labelled image is missing or
listed twice, a row names an image the labels do not have, or a score is not a finite number in [0, 1].
Rows that ``infer.py`` filled for images it could not read (``--fill``, 0.5 by default) are scored as
given, and counted in a note.

Prints AUC, TPR at FPR=1e-3 (the competition's tie-break), EER and average precision, and the verdicts at
the decision threshold ``infer.py`` uses: the one stored in the ``--weights`` folder's manifest (default:
the shipped ``weights/``; 0.5 when it stores none), or ``--threshold``: accuracy, TPR (fakes called fake)
and FPR (reals called fake) at it. ``--by COLUMN`` adds one row per value of a labels column (e.g. the
generator).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from scoring.metrics import detection_metrics, verdict_metrics
from evaluation.validate import DEFAULT_WEIGHTS

if TYPE_CHECKING:
    import pandas as pd

RANKING = ["n", "auc", "tpr@fpr1e-3", "eer", "ap"]
AT_THRESHOLD = ["acc@thr", "tpr@thr", "fpr@thr"]
COLUMNS = RANKING + AT_THRESHOLD
MAX_LISTED = 5


class SubmissionError(ValueError):
    """A submission that cannot be scored; the message names the file, the rows and the problem."""


def read_submission(path: str | Path) -> "pd.DataFrame":
    """``img_name, y_pred`` of a submission CSV, each score a finite number in [0, 1]."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SubmissionError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("img_name", "y_pred") if c not in df.columns]
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    scores = pd.to_numeric(df["y_pred"], errors="coerce")
    bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
    if bad.any():
        raise SubmissionError(f"{path}: y_pred must be a number in [0, 1]: " + _rows(df, bad, "y_pred"))
    duplicated = df["img_name"].duplicated(keep=False)
    if duplicated.any():
        raise SubmissionError(f"{path}: images listed more than once: " + _rows(df, duplicated, "img_name"))
    return df.assign(y_pred=scores.astype(float))


def stored_threshold(weights: str | Path) -> float:
    """The decision threshold ``infer.py`` uses with the weights folder ``weights``: the one its manifest
    stores, 0.5 when it stores none. A missing or malformed manifest raises :class:`experts.WeightsError`."""
    from experts import read_manifest
    from experts.weights import MANIFEST, manifest_threshold

    return manifest_threshold(read_manifest(weights), Path(weights) / MANIFEST)


def check_threshold_option(value: float) -> float:
    """``--threshold``: a probability in [0, 1]."""
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise SubmissionError(f"--threshold must be a probability in [0, 1], got {value:g}")
    return float(value)


def match_labels(submission: "pd.DataFrame", labels: "pd.DataFrame", path: str | Path) -> "pd.DataFrame":
    """The labels rows with their ``y_pred``; every labelled image must be scored once, and nothing else."""
    extra = ~submission["img_name"].isin(labels["img_name"])
    if extra.any():
        raise SubmissionError(f"{path}: rows for images the labels do not list: " + _rows(submission, extra, "img_name"))
    absent = ~labels["img_name"].isin(submission["img_name"])
    if absent.any():
        names = labels.loc[absent, "img_name"].tolist()
        raise SubmissionError(f"{path}: {len(names)} labelled image(s) have no score: {names[:MAX_LISTED]}"
                              + (" ..." if len(names) > MAX_LISTED else "")
                              + " (infer.py writes a row for every input unless run with --fill none)")
    return labels.merge(submission[["img_name", "y_pred"]], on="img_name", how="left", validate="one_to_one")


def _rows(df: "pd.DataFrame", bad: "pd.Series", column: str) -> str:
    """``row N (value)`` for the first few bad rows; N is the line in the file (the header is line 1)."""
    idx = np.flatnonzero(bad.to_numpy())
    listed = ", ".join(f"row {i + 2} ({df[column].iloc[i]!r})" for i in idx[:MAX_LISTED])
    return listed + (f" and {len(idx) - MAX_LISTED} more" if len(idx) > MAX_LISTED else "")


def score_submission(scored: "pd.DataFrame", threshold: float, by: str | None = None) -> "pd.DataFrame":
    """Metrics table: one row ``all``, plus one per value of ``by`` when given. Columns: the ranking metrics
    (``n, auc, tpr@fpr1e-3, eer, ap``) and the verdicts at ``threshold`` (``acc@thr, tpr@thr, fpr@thr``)."""
    import pandas as pd

    def metrics(part: "pd.DataFrame") -> dict[str, float]:
        at = verdict_metrics(part["target"], part["y_pred"], threshold)
        return {**detection_metrics(part["target"], part["y_pred"]),
                "acc@thr": at["acc"], "tpr@thr": at["tpr"], "fpr@thr": at["fpr"]}

    rows = {"all": metrics(scored)}
    if by:
        for value, part in scored.groupby(by, sort=True):
            rows[f"{by}={value}"] = metrics(part)
    return pd.DataFrame(rows).T[COLUMNS]


def filled_rows(scored: "pd.DataFrame", fill: float | None) -> int:
    """How many rows hold exactly ``fill``, the score ``infer.py --fill`` gives images it could not read."""
    return 0 if fill is None else int((scored["y_pred"] == fill).sum())


def plot_roc(scored: "pd.DataFrame", path: str | Path) -> Path:
    """ROC curve with a log-scaled FPR axis, where the competition's tie-break (FPR=1e-3) can be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(scored["target"], scored["y_pred"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.maximum(fpr, 1e-4), tpr)
    ax.axvline(1e-3, color="grey", linestyle=":", label="FPR = 1e-3")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate",
           title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_histogram(scored: "pd.DataFrame", path: str | Path) -> Path:
    """Score histogram per class: how far apart, and how calibrated, real and fake scores are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(0, 1, 41)
    for target, name in ((0, "real"), (1, "fake")):
        ax.hist(scored.loc[scored["target"] == target, "y_pred"], bins=bins, alpha=0.6, label=name)
    ax.set(xlabel="fake probability", ylabel="images", title="scores per class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", help="CSV with img_name,y_pred")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels CSV (img_name,target[,group,source,...])")
    at = p.add_mutually_exclusive_group()
    at.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="DIR",
                    help="verdicts at the threshold stored in DIR/manifest.json, the one infer.py used with "
                         "these weights (default: the shipped weights/)")
    at.add_argument("--threshold", type=float, metavar="P", help="verdicts at this threshold instead")
    p.add_argument("--fill", type=float, default=None, metavar="P",
                   help="the infer.py --fill value of unreadable images; rows holding it are counted in a note "
                        "(default: infer.py's, 0.5)")
    p.add_argument("--by", metavar="COLUMN", help="also score each value of this labels column (e.g. source)")
    p.add_argument("--roc", metavar="PNG", help="save the ROC curve here")
    p.add_argument("--hist", metavar="PNG", help="save the per-class score histogram here")
    args = p.parse_args(argv)

    from core.labels import LabelsError, read_labels
    from scoring.submission import DEFAULT_FILL

    fill = DEFAULT_FILL if args.fill is None else args.fill
    try:
        labels = read_labels(args.labels)
        if args.by and args.by not in labels.columns:
            raise SubmissionError(f"{args.labels}: no column {args.by!r} for --by; columns: {list(labels.columns)}")
        scored = match_labels(read_submission(args.submission), labels, args.submission)
        if args.threshold is not None:
            threshold, source = check_threshold_option(args.threshold), "--threshold"
        else:
            from experts import WeightsError

            try:
                threshold, source = stored_threshold(args.weights), f"stored in {Path(args.weights) / 'manifest.json'}"
            except WeightsError as e:
                raise SubmissionError(f"{e} (or give --threshold)") from None
    except (SubmissionError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = score_submission(scored, threshold, args.by)
    print(f"{args.submission}: {len(scored)} images ({int(scored['target'].sum())} fake); verdicts (@thr) at "
          f"threshold {threshold:.6f}, {source}\n")
    print(table.to_markdown(floatfmt=".4f"))
    filled = filled_rows(scored, fill)
    if filled:
        print(f"note: {filled} row(s) hold {fill:g}, the score infer.py --fill gives images it could not "
              f"read; they are scored as given", file=sys.stderr)
    for option, plot in ((args.roc, plot_roc), (args.hist, plot_histogram)):
        if option:
            print(f"saved {plot(scored, option)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
