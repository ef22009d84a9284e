"""Detection metrics of fake-probability scores (scikit-learn underneath, imported when first used).

The competition ranks by AUC and breaks ties with the true-positive rate at a false-positive rate of
1e-3; EER, accuracy at 0.5 and average precision complete the picture. :func:`verdict_metrics` gives the
rates of the verdicts at a decision threshold (the one a weights folder stores and ``infer.py`` uses).
"""
from __future__ import annotations

import numpy as np


def tpr_at_fpr(targets: np.ndarray, scores: np.ndarray, max_fpr: float = 1e-3) -> float:
    """Highest true-positive rate whose false-positive rate does not exceed ``max_fpr``.

    Every ROC point is kept (``drop_intermediate=False``): the default drops points that lie on a straight
    segment between two others, which can be exactly the last point at or below ``max_fpr`` (tied scores
    make such segments), and the rate would then be read at an earlier, lower point.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(targets, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max(initial=0.0))


def equal_error_rate(targets: np.ndarray, scores: np.ndarray) -> float:
    """The error rate where the false-positive and false-negative rates meet."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(targets, scores)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2.0)


def _checked(targets, scores) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(targets).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if t.shape != s.shape:
        raise ValueError(f"{t.shape[0]} targets but {s.shape[0]} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return t, s


def detection_metrics(targets, scores) -> dict[str, float]:
    """AUC, TPR@FPR=1e-3, EER, accuracy at 0.5 and AP of scores (fake probability) against 0/1 targets.

    Returns NaN for the ranking metrics when only one class is present, rather than failing mid-training.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    t, s = _checked(targets, scores)
    out = {"n": float(len(t)), "acc@0.5": float(((s >= 0.5) == t).mean()) if len(t) else float("nan")}
    if len(np.unique(t)) < 2:
        return {**out, "auc": float("nan"), "tpr@fpr1e-3": float("nan"), "eer": float("nan"), "ap": float("nan")}
    return {
        **out,
        "auc": float(roc_auc_score(t, s)),
        "tpr@fpr1e-3": tpr_at_fpr(t, s),
        "eer": equal_error_rate(t, s),
        "ap": float(average_precision_score(t, s)),
    }


def verdict_metrics(targets, scores, threshold: float) -> dict[str, float]:
    """The verdicts at ``threshold`` (fake when the score is at least it, as ``infer.py`` decides):
    ``acc`` (accuracy), ``tpr`` (fakes called fake), ``fpr`` (reals called fake) and ``bacc``
    ((TPR + TNR) / 2); a rate without images of its class is NaN."""
    t, s = _checked(targets, scores)
    fake, is_fake = s >= threshold, t == 1
    nan = float("nan")
    tpr = float(fake[is_fake].mean()) if is_fake.any() else nan
    fpr = float(fake[~is_fake].mean()) if (~is_fake).any() else nan
    return {"acc": float((fake == is_fake).mean()) if len(t) else nan, "tpr": tpr, "fpr": fpr,
            "bacc": (tpr + 1.0 - fpr) / 2.0}
