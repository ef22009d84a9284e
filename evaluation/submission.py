"""Check a competition submission against the labels and score it.

    python evaluation/submission.py submission.csv --labels ../shared/data/gan_faces/labels.csv
    python evaluation/submission.py sub.csv --labels labels.csv --by source --roc roc.png --hist hist.png

A submission is ``img_name,y_pred`` (extra columns, such as ``infer.py --per-expert`` writes, are allowed
and ignored). It is refused, with the file, row and problem named, when a labelled image is missing or
listed twice, a row names an image the labels do not have, or a score is not a finite number in [0, 1].
Prints AUC, TPR at FPR=1e-3 (the competition's tie-break), EER, accuracy at 0.5 and average precision;
``--by COLUMN`` adds one row per value of a labels column (e.g. the generator).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.labels import LabelsError, read_labels
from evaluation.metrics import detection_metrics

COLUMNS = ["n", "auc", "tpr@fpr1e-3", "eer", "acc@0.5", "ap"]
MAX_LISTED = 5


class SubmissionError(ValueError):
    """A submission that cannot be scored; the message names the file, the rows and the problem."""


def read_submission(path: str | Path) -> pd.DataFrame:
    """``img_name, y_pred`` of a submission CSV, each score a finite number in [0, 1]."""
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


def match_labels(submission: pd.DataFrame, labels: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """The labels rows with their ``y_pred``; every labelled image must be scored once, and nothing else."""
    extra = ~submission["img_name"].isin(labels["img_name"])
    if extra.any():
        raise SubmissionError(f"{path}: rows for images the labels do not list: " + _rows(submission, extra, "img_name"))
    absent = ~labels["img_name"].isin(submission["img_name"])
    if absent.any():
        names = labels.loc[absent, "img_name"].tolist()
        raise SubmissionError(f"{path}: {len(names)} labelled image(s) have no score: {names[:MAX_LISTED]}"
                              + (" ..." if len(names) > MAX_LISTED else ""))
    return labels.merge(submission[["img_name", "y_pred"]], on="img_name", how="left", validate="one_to_one")


def _rows(df: pd.DataFrame, bad: pd.Series, column: str) -> str:
    """``row N (value)`` for the first few bad rows; N is the line in the file (the header is line 1)."""
    idx = np.flatnonzero(bad.to_numpy())
    listed = ", ".join(f"row {i + 2} ({df[column].iloc[i]!r})" for i in idx[:MAX_LISTED])
    return listed + (f" and {len(idx) - MAX_LISTED} more" if len(idx) > MAX_LISTED else "")


def score_submission(scored: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Metrics table: one row ``all``, plus one per value of ``by`` when given."""
    rows = {"all": detection_metrics(scored["target"], scored["y_pred"])}
    if by:
        for value, part in scored.groupby(by, sort=True):
            rows[f"{by}={value}"] = detection_metrics(part["target"], part["y_pred"])
    return pd.DataFrame(rows).T[COLUMNS]


def plot_roc(scored: pd.DataFrame, path: str | Path) -> Path:
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


def plot_histogram(scored: pd.DataFrame, path: str | Path) -> Path:
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
    p.add_argument("--labels", required=True, help="labels CSV (img_name,target[,group,source,...])")
    p.add_argument("--by", metavar="COLUMN", help="also score each value of this labels column (e.g. source)")
    p.add_argument("--roc", metavar="PNG", help="save the ROC curve here")
    p.add_argument("--hist", metavar="PNG", help="save the per-class score histogram here")
    args = p.parse_args(argv)
    try:
        labels = read_labels(args.labels)
        if args.by and args.by not in labels.columns:
            raise SubmissionError(f"{args.labels}: no column {args.by!r} for --by; columns: {list(labels.columns)}")
        scored = match_labels(read_submission(args.submission), labels, args.submission)
    except (SubmissionError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = score_submission(scored, args.by)
    print(f"{args.submission}: {len(scored)} images ({int(scored['target'].sum())} fake)\n")
    print(table.to_markdown(floatfmt=".4f"))
    for option, plot in ((args.roc, plot_roc), (args.hist, plot_histogram)):
        if option:
            print(f"saved {plot(scored, option)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
