"""Choose the decision threshold of a weights folder on labelled data; record it in its manifest with --write.

    python evaluation/threshold.py --folds --weights runs/recipe/weights      # on validation folds (the recipe)
    python evaluation/threshold.py --folds --weights runs/recipe/weights --write   # ... and record it
    python evaluation/threshold.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv
    python evaluation/threshold.py data/holdout/labels.csv --whole --rule balanced --weights my_weights/

``infer.py`` prints a verdict beside each probability: "fake" when the probability is at least the
threshold, else "real". The probability's scale depends on the training run, so 0.5 (what a folder without
a recorded threshold uses) is rarely the best cut; this command picks one on data the experts did not train
on and prints it. Only with ``--write`` is it recorded in ``WEIGHTS/manifest.json`` (``"threshold"``, with
the rule, the sets and the command), where ``infer.py`` reads it: without ``--write`` nothing is written,
and ``--weights`` defaults to the shipped ``weights/``. A set with too few real images for the rule (fewer
than max(100, 10 / FPR) for ``--rule fpr``: the FPR moves in steps of 1 / reals) is warned about on stderr.

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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE, THRESHOLD_FPR, VALIDATION_JPEG_QUALITY
from evaluation.heldout import EvaluationSetError
from evaluation.validate import (SetChoice, add_fold_argument, add_set_arguments, combine_scored, evaluation_sets,
                                 fold_sets, protocol_settings, report_sets, score_labelled, score_out_of_fold)

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from experts import Ensemble

RULES = ("balanced", "fpr")
DEFAULT_RULE = "fpr"
DEFAULT_FPR = THRESHOLD_FPR  # of the validation reals: a detector that accuses 1 real image in 20 at most
REPORT_ONLY = "report only, not used for the choice"
#: Fewest real images behind a threshold worth storing: at least this many, and enough for about ten false
#: positives at the target FPR (10 / FPR), so that one image more or less does not move the rate much.
MIN_REALS = 100
MIN_FALSE_POSITIVES = 10


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

    from sklearn.metrics import roc_curve

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


def small_set_warning(n_real: int, n_fake: int, rule: str, target_fpr: float | None) -> str | None:
    """A warning when the images are too few for the threshold to mean anything, else ``None``.

    ``fpr``: fewer than max(MIN_REALS, MIN_FALSE_POSITIVES / target) real images, i.e. the target rests on
    fewer than about ten false positives (the FPR moves in steps of 1 / reals). ``balanced``: fewer than
    MIN_REALS images of either class.
    """
    step = f"the FPR moves in steps of 1/{n_real} = {1.0 / n_real:.2g}" if n_real else "there is no FPR"
    if rule == "fpr" and target_fpr is not None:
        needed = max(MIN_REALS, int(np.ceil(MIN_FALSE_POSITIVES / target_fpr - 1e-9)))
        if n_real >= needed:
            return None
        none_at_all = "; it asks for no false positive at all here" if target_fpr < 1.0 / max(n_real, 1) else ""
        return (f"warning: only {n_real} real images: {step}, so a target FPR of {target_fpr:g} rests on "
                f"{n_real * target_fpr:.2g} false positives{none_at_all}. A threshold for it needs at least "
                f"{needed} reals (max({MIN_REALS}, {MIN_FALSE_POSITIVES}/FPR)); do not store this one")
    if min(n_real, n_fake) < MIN_REALS:
        return (f"warning: only {n_real} real and {n_fake} fake images: {step}, TPR in steps of "
                f"1/{n_fake}; a balanced threshold needs at least {MIN_REALS} of each; do not store this one")
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_arguments(p)  # the sets, --weights, --whole, --val-fraction, --jpeg-quality, ... as validate.py
    add_fold_argument(p)
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help=f"fpr: lowest threshold with FPR <= --fpr; balanced: best (TPR+TNR)/2 "
                        f"(default: {DEFAULT_RULE})")
    p.add_argument("--fpr", type=float, default=None, metavar="RATE",
                   help=f"target false-positive rate of --rule fpr, in (0, 1) (default: {DEFAULT_FPR})")
    p.add_argument("--write", action="store_true",
                   help="record the threshold in WEIGHTS/manifest.json, where infer.py reads it (without it, "
                        "nothing is written: the choice is only printed)")
    return p


def choose_for_weights(weights: str | Path, choice: SetChoice, *, folds: bool = False, rule: str = DEFAULT_RULE,
                       fpr: float | None = None, jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32,
                       workers: int = 0, device: "str | torch.device" = DEFAULT_DEVICE, write: bool = False,
                       command: str = "") -> dict[str, Any]:
    """Choose a threshold for the ensemble of ``weights`` and print it; with ``write``, record it in the
    manifest. ``choice``: the sets to choose on (or, with ``folds``, to report). Returns the entry."""
    from core.device import resolve_device
    from experts import load_ensemble
    from experts.weights import MANIFEST, set_threshold

    if fpr is not None and rule != "fpr":
        raise ThresholdError("--fpr sets the target of --rule fpr; leave out --rule balanced (or --fpr)")
    if fpr is not None and not 0.0 < fpr < 1.0:
        raise ThresholdError(f"--fpr must lie strictly between 0 and 1, got {fpr:g}")
    target_fpr = (DEFAULT_FPR if fpr is None else fpr) if rule == "fpr" else None
    sets = None if folds else evaluation_sets(choice)
    device = resolve_device(device)
    ensemble = load_ensemble(weights, device)
    previous = ensemble.threshold
    if folds:
        targets, probs, described = out_of_fold_probs(weights, ensemble, choice.splits, jpeg_quality, batch_size,
                                                      workers, device)
    else:
        targets, probs, described = given_probs(ensemble, sets, choice, jpeg_quality, batch_size, workers, device)
    all_targets, all_probs = np.concatenate(list(targets.values())), np.concatenate(list(probs.values()))
    try:
        chosen = choose_threshold(all_targets, all_probs, rule, target_fpr)
    except ThresholdError as e:
        counts = ", ".join(f"{d['name']} ({d['part']}): {d['n'] - d['n_fake']} real, {d['n_fake']} fake"
                           for d in described)
        hint = "" if choice.whole or folds else "; --whole uses every row, a larger --val-fraction more of them"
        raise ThresholdError(f"{e} [{counts}{hint}]") from None

    target = f", target FPR {target_fpr:g}" if target_fpr is not None else ""
    print(f"threshold {chosen['value']:.6f} (rule {rule}{target}) on {chosen['n']} images "
          f"({chosen['n_fake']} fake, {chosen['n_real']} real), JPEG {jpeg_quality}: "
          f"TPR {chosen['tpr']:.4f}, FPR {chosen['fpr']:.4f}, balanced accuracy {chosen['balanced_accuracy']:.4f}")
    for d in described:
        rates = rates_text(targets[d["name"]], probs[d["name"]], chosen["value"])
        print(f"  {d['name']} ({d['part']}): {d['n']} images, {rates}")
    report = (report_rates(weights, choice, ensemble, chosen["value"], jpeg_quality, batch_size, workers, device)
              if folds else [])
    if choice.clusters and not folds:
        print("note: a threshold chosen on held-out clusters spends them as a test; --folds chooses on the "
              "validation folds and reports these clusters", file=sys.stderr)
    warning = small_set_warning(chosen["n_real"], chosen["n_fake"], rule, target_fpr)
    if warning:
        print(warning, file=sys.stderr)

    entry = {
        **chosen,
        "set": "; ".join(f"{d['name']} ({d['part']})" for d in described),
        "sets": described,
        **({"report": report} if report else {}),
        "jpeg_quality": jpeg_quality,
        **({"val_fraction": choice.val_fraction} if choice.csvs and not (choice.whole or folds) else {}),
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = Path(weights) / MANIFEST
    if write:
        set_threshold(weights, entry)
        print(f"recorded in {manifest} (was {previous:g}); infer.py now calls an image fake at "
              f"probability >= {chosen['value']:.6f}")
    else:
        print(f"not written: {manifest} keeps threshold {previous:g} (--write records this one)")
    return entry


def given_probs(ensemble: "Ensemble", sets: dict[str, "pd.DataFrame"], choice: SetChoice,
                jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                device: "str | torch.device" = DEFAULT_DEVICE
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Labels and ensemble probabilities of the sets given (CSVs, clusters), and the sets described."""
    import torch

    targets, probs, described = {}, {}, []
    for name, df in sets.items():
        t, expert_probs = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
        targets[name] = t
        probs[name] = ensemble.combine(torch.from_numpy(expert_probs)).numpy()
        described.append({"name": name, "part": choice.part(name), "n": int(len(t)), "n_fake": int(t.sum())})
    return targets, probs, described


def out_of_fold_probs(weights: str | Path, ensemble: "Ensemble", splits: str | None = None,
                      jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                      device: "str | torch.device" = DEFAULT_DEVICE
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, Any]]]:
    """``--folds``: labels and ensemble probabilities of each fold's validation rows, from the experts that
    never trained on them (their weighted average, as the ensemble would weigh them), and the sets described."""
    sets, scorers = fold_sets(weights, ensemble.names, splits)
    targets, expert_probs = score_out_of_fold(ensemble, sets, scorers, jpeg_quality, batch_size, workers, device)
    ensemble_weights = ensemble.weights.cpu().numpy()
    probs = {name: combine_scored(p, ensemble_weights) for name, p in expert_probs.items()}
    described = [{"name": name, "part": f"out-of-fold validation, scored by {', '.join(scorers[name])}",
                  "n": int(len(targets[name])), "n_fake": int(targets[name].sum())} for name in sets]
    return targets, probs, described


def report_rates(weights: str | Path, choice: SetChoice, ensemble: "Ensemble", threshold: float,
                 jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 0,
                 device: "str | torch.device" = DEFAULT_DEVICE) -> list[dict[str, Any]]:
    """The rates at ``threshold`` of the whole ensemble on the report sets (``--folds``: the test clusters by
    default), printed and returned; they play no part in the choice."""
    import torch

    report = []
    for name, df in report_sets(weights, choice).items():
        t, expert_probs = score_labelled(ensemble, df, jpeg_quality, batch_size, workers, device)
        p = ensemble.combine(torch.from_numpy(expert_probs)).numpy()
        fake = p >= threshold
        part = choice.part(name)
        report.append({"name": name, "part": part, "n": int(len(t)), "n_fake": int(t.sum()),
                       "tpr": float(fake[t == 1].mean()) if (t == 1).any() else None,
                       "fpr": float(fake[t == 0].mean()) if (t == 0).any() else None})
        print(f"  {name} ({part}, {REPORT_ONLY}): {len(t)} images, {rates_text(t, p, threshold)}")
    return report


def rates_text(targets: np.ndarray, probs: np.ndarray, threshold: float) -> str:
    """``"TPR x  FPR y"`` of the verdicts at ``threshold`` (a rate without images of its class is left out)."""
    fake, t = probs >= threshold, targets.astype(bool)
    return "  ".join(f"{label} {fake[mask].mean():.4f}" for label, mask in (("TPR", t), ("FPR", ~t)) if mask.any())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "evaluation/threshold.py", *argv])

    from core.device import DeviceError, resolve_device
    from core.labels import LabelsError
    from experts import WeightsError, read_manifest

    try:
        jpeg_quality, val_fraction = protocol_settings(read_manifest(args.weights), args.jpeg_quality,
                                                       args.val_fraction)
        choice = SetChoice(tuple(args.csvs), args.splits, tuple(args.clusters), args.whole, val_fraction)
        choose_for_weights(args.weights, choice, folds=args.folds, rule=args.rule, fpr=args.fpr,
                           jpeg_quality=jpeg_quality, batch_size=args.batch_size, workers=args.workers,
                           device=resolve_device(args.device), write=args.write, command=command)
    except (ThresholdError, EvaluationSetError, LabelsError, WeightsError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
