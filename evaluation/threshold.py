"""Choose the decision threshold of a weights folder on labelled data, and record it in its manifest.

    python evaluation/threshold.py --folds --weights runs/recipe/weights      # on validation folds (the recipe)
    python evaluation/threshold.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python evaluation/threshold.py data/holdout/labels.csv --whole --rule balanced
    python evaluation/threshold.py --folds --fpr 0.01 --dry-run

``infer.py`` prints a verdict beside each probability: "fake" when the probability is at least the
threshold, else "real". The probability's scale depends on the training run, so 0.5 (what a folder without
a recorded threshold uses) is rarely the best cut; this command picks one on data the experts did not train
on and writes it to ``WEIGHTS/manifest.json`` (``"threshold"``), with the rule, the sets and the command.

The threshold is a choice, so it is made on validation data: a choice made on the test clusters would make
their numbers optimistic. With ``--folds`` (a folder trained on cluster folds, as the recipe is) it is made on
the out-of-fold validation rows: each fold's cluster, scored by the weighted average of the experts validated
on it (which never trained on it), all folds pooled. The sets given (or, by default, the run's test
clusters) are then scored at the chosen threshold for the report only. Without ``--folds`` the threshold is
chosen on the sets given, selected and scored exactly as ``evaluation/validate.py`` does (the group-disjoint
validation part of each CSV, or every row with ``--whole``, or held-out clusters; resize, then one JPEG
quality for both classes), all sets pooled: one threshold serves every image. Rules:

* ``fpr`` (default): the lowest threshold whose false-positive rate on the real images is at most ``--fpr``
  (default 0.05): as many fakes caught as possible while wrongly accusing at most that share of reals;
* ``balanced``: the threshold with the highest balanced accuracy, (TPR + TNR) / 2, so that a set with many
  more fakes than reals does not pull the cut towards calling everything fake.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve

from core.labels import LabelsError
from evaluation.validate import (add_fold_argument, add_set_arguments, combine_scored, evaluation_sets, fold_sets,
                                 report_sets, score_labelled, score_out_of_fold, set_part)
from experts import Ensemble, WeightsError, load_ensemble
from experts.weights import MANIFEST, set_threshold

RULES = ("balanced", "fpr")
DEFAULT_RULE = "fpr"
DEFAULT_FPR = 0.05  # of the validation reals: a detector that accuses 1 real image in 20 at most
REPORT_ONLY = "report only, not used for the choice"


class ThresholdError(ValueError):
    """Data or options from which no meaningful threshold can be chosen; the message says why."""


def choose_threshold(targets: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray,
                     rule: str = "balanced", target_fpr: float | None = None) -> dict[str, Any]:
    """Pick a threshold on the ROC curve of ``probs`` (fake probability) against ``targets`` (1 = fake).

    Candidates are the distinct scores (``roc_curve`` thresholds), so the chosen value is one of ``probs``
    and an image scoring exactly the threshold is called fake, as :meth:`Ensemble.verdict` does.
    ``balanced`` maximises (TPR + TNR) / 2 (ties go to the higher threshold, the one with fewer false
    positives); ``fpr`` takes the lowest threshold whose FPR is at most ``target_fpr``.

    Returns ``value, rule, target_fpr, tpr, fpr, balanced_accuracy, n, n_fake, n_real``, the rates being
    those of the verdicts at ``value`` on these images.
    """
    t = np.asarray(targets)
    s = np.asarray(probs, dtype=np.float64)
    if t.ndim != 1 or t.shape != s.shape:
        raise ThresholdError(f"targets {t.shape} and probabilities {s.shape} must be two vectors of one length")
    if not np.isin(t, (0, 1)).all():
        raise ThresholdError("targets must be 0 (real) or 1 (fake)")
    if not np.isfinite(s).all() or (s < 0).any() or (s > 1).any():
        raise ThresholdError("probabilities must be finite numbers in [0, 1]")
    t = t.astype(int)
    n_fake = int(t.sum())
    n_real = len(t) - n_fake
    if n_fake == 0 or n_real == 0:
        raise ThresholdError(f"a threshold separates real from fake images, so it needs both classes; "
                             f"got {n_real} real and {n_fake} fake images")
    if rule not in RULES:
        raise ThresholdError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "fpr":
        if target_fpr is None or not 0.0 < float(target_fpr) < 1.0:
            raise ThresholdError(f"the fpr rule needs a target false-positive rate in (0, 1), got {target_fpr!r}")
        target_fpr = float(target_fpr)
    elif target_fpr is not None:
        raise ThresholdError("a target false-positive rate applies to the fpr rule only")

    fpr, tpr, thresholds = roc_curve(t, s, drop_intermediate=False)
    keep = thresholds <= s.max()  # drop the first point, above every score (inf, or max + 1 in older sklearn)
    fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]  # thresholds decrease, rates increase
    if rule == "balanced":
        i = int(np.argmax((tpr + 1.0 - fpr) / 2.0))
    else:
        allowed = np.flatnonzero(fpr <= target_fpr + 1e-12)
        if not len(allowed):
            raise ThresholdError(
                f"no threshold keeps the false-positive rate at or below {target_fpr:g}: the top score "
                f"({s.max():.6f}) belongs to real images, so every threshold flags {fpr[0]:.2%} of the "
                f"{n_real} real images; use more real images or a larger target")
        i = int(allowed[-1])
    value = float(thresholds[i])
    fake = s >= value  # the rates as infer.py's verdicts will have them
    tpr_at, fpr_at = float(fake[t == 1].mean()), float(fake[t == 0].mean())
    return {
        "value": value,
        "rule": rule,
        "target_fpr": target_fpr,
        "tpr": tpr_at,
        "fpr": fpr_at,
        "balanced_accuracy": (tpr_at + 1.0 - fpr_at) / 2.0,
        "n": int(len(t)),
        "n_fake": n_fake,
        "n_real": n_real,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)  # the sets, --weights, --whole, --val-fraction, --jpeg-quality, ... as validate.py
    add_fold_argument(p)
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help=f"fpr: lowest threshold with FPR <= --fpr; balanced: best (TPR+TNR)/2 "
                        f"(default: {DEFAULT_RULE})")
    p.add_argument("--fpr", type=float, default=None, metavar="RATE",
                   help=f"target false-positive rate of --rule fpr, in (0, 1) (default: {DEFAULT_FPR})")
    p.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest unchanged")
    return p


def run(args: argparse.Namespace, command: str) -> int:
    if args.fpr is not None and args.rule != "fpr":
        raise ThresholdError("--fpr sets the target of --rule fpr; leave out --rule balanced (or --fpr)")
    if args.fpr is not None and not 0.0 < args.fpr < 1.0:
        raise ThresholdError(f"--fpr must lie strictly between 0 and 1, got {args.fpr:g}")
    target_fpr = (DEFAULT_FPR if args.fpr is None else args.fpr) if args.rule == "fpr" else None
    sets = None if args.folds else evaluation_sets(args)
    ensemble = load_ensemble(args.weights, args.device)
    previous = ensemble.threshold
    targets, probs, described = out_of_fold_probs(args, ensemble) if args.folds else given_probs(args, ensemble, sets)
    all_targets, all_probs = np.concatenate(list(targets.values())), np.concatenate(list(probs.values()))
    try:
        chosen = choose_threshold(all_targets, all_probs, args.rule, target_fpr)
    except ThresholdError as e:
        counts = ", ".join(f"{d['name']} ({d['part']}): {d['n'] - d['n_fake']} real, {d['n_fake']} fake"
                           for d in described)
        hint = "" if args.whole or args.folds else "; --whole uses every row, a larger --val-fraction more of them"
        raise ThresholdError(f"{e} [{counts}{hint}]") from None

    target = f", target FPR {target_fpr:g}" if target_fpr is not None else ""
    print(f"threshold {chosen['value']:.6f} (rule {args.rule}{target}) on {chosen['n']} images "
          f"({chosen['n_fake']} fake, {chosen['n_real']} real), JPEG {args.jpeg_quality}: "
          f"TPR {chosen['tpr']:.4f}, FPR {chosen['fpr']:.4f}, balanced accuracy {chosen['balanced_accuracy']:.4f}")
    for d in described:
        rates = rates_text(targets[d["name"]], probs[d["name"]], chosen["value"])
        print(f"  {d['name']} ({d['part']}): {d['n']} images, {rates}")
    report = report_rates(args, ensemble, chosen["value"]) if args.folds else []
    if args.clusters and not args.folds:
        print("note: a threshold chosen on held-out clusters spends them as a test; --folds chooses on the "
              "validation folds and reports these clusters", file=sys.stderr)
    if target_fpr is not None and target_fpr < 1.0 / chosen["n_real"]:
        print(f"note: {chosen['n_real']} real images measure the FPR in steps of {1.0 / chosen['n_real']:.2g}; "
              f"a target of {target_fpr:g} asks for no false positive at all here", file=sys.stderr)

    entry = {
        **chosen,
        "set": "; ".join(f"{d['name']} ({d['part']})" for d in described),
        "sets": described,
        **({"report": report} if report else {}),
        "jpeg_quality": args.jpeg_quality,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = Path(args.weights) / MANIFEST
    if args.dry_run:
        print(f"dry run: {manifest} left unchanged (threshold {previous:g})")
    else:
        set_threshold(args.weights, entry)
        print(f"recorded in {manifest} (was {previous:g}); infer.py now calls an image fake at "
              f"probability >= {chosen['value']:.6f}")
    return 0


def given_probs(args: argparse.Namespace, ensemble: Ensemble, sets: dict[str, pd.DataFrame]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Labels and ensemble probabilities of the sets given (CSVs, clusters), and the sets described."""
    targets, probs, described = {}, {}, []
    for name, df in sets.items():
        t, expert_probs = score_labelled(ensemble, df, args.jpeg_quality, args.batch_size, args.workers, args.device)
        targets[name] = t
        probs[name] = ensemble.combine(torch.from_numpy(expert_probs)).numpy()
        described.append({"name": name, "part": set_part(name, args), "n": int(len(t)), "n_fake": int(t.sum())})
    return targets, probs, described


def out_of_fold_probs(args: argparse.Namespace, ensemble: Ensemble
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, Any]]]:
    """``--folds``: labels and ensemble probabilities of each fold's validation rows, from the experts that
    never trained on them (their weighted average, as the ensemble would weigh them), and the sets described."""
    sets, scorers = fold_sets(args.weights, ensemble.names, args.splits)
    targets, expert_probs = score_out_of_fold(ensemble, sets, scorers, args.jpeg_quality, args.batch_size,
                                              args.workers, args.device)
    weights = ensemble.weights.cpu().numpy()
    probs = {name: combine_scored(p, weights) for name, p in expert_probs.items()}
    described = [{"name": name, "part": f"out-of-fold validation, scored by {', '.join(scorers[name])}",
                  "n": int(len(targets[name])), "n_fake": int(targets[name].sum())} for name in sets]
    return targets, probs, described


def report_rates(args: argparse.Namespace, ensemble: Ensemble, threshold: float) -> list[dict[str, Any]]:
    """The rates at ``threshold`` of the whole ensemble on the report sets (``--folds``: the test clusters by
    default), printed and returned; they play no part in the choice."""
    report = []
    for name, df in report_sets(args).items():
        t, expert_probs = score_labelled(ensemble, df, args.jpeg_quality, args.batch_size, args.workers, args.device)
        p = ensemble.combine(torch.from_numpy(expert_probs)).numpy()
        fake = p >= threshold
        report.append({"name": name, "part": set_part(name, args), "n": int(len(t)), "n_fake": int(t.sum()),
                       "tpr": float(fake[t == 1].mean()) if (t == 1).any() else None,
                       "fpr": float(fake[t == 0].mean()) if (t == 0).any() else None})
        print(f"  {name} ({set_part(name, args)}, {REPORT_ONLY}): {len(t)} images, {rates_text(t, p, threshold)}")
    return report


def rates_text(targets: np.ndarray, probs: np.ndarray, threshold: float) -> str:
    """``"TPR x  FPR y"`` of the verdicts at ``threshold`` (a rate without images of its class is left out)."""
    fake, t = probs >= threshold, targets.astype(bool)
    return "  ".join(f"{label} {fake[mask].mean():.4f}" for label, mask in (("TPR", t), ("FPR", ~t)) if mask.any())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "evaluation/threshold.py", *argv])
    try:
        return run(args, command)
    except (ThresholdError, LabelsError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
