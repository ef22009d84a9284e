"""Does a frozen-CLIP expert earn its place beside a trained ensemble? Chosen on folds, reported on test clusters.

    python evaluation/with_clip.py --weights weights --cache runs/tokens/clip_vit_b16-224 \\
        --splits runs/clusters_v1/splits.csv --val-clusters 0 1 --val-sets general_scenes --test-clusters 3 6

The weights folder's experts (e.g. the Lite0 pair of the joint recipe) were trained on cluster folds; a
CLIP head (``train/heads.py``) trains on cached tokens in seconds, so it can be refit for every fold:

* **validation folds** (``--val-clusters``, ``--val-sets``): each scored by the weights' experts that never
  trained on it (the manifest's ``validation_sets``; a set the run never used counts for every expert) and
  by a CLIP head trained without it and without the test clusters. The candidate ensembles (the weights'
  experts, CLIP alone, both) are compared on the validation AUC averaged over labelled sets (each set's
  folds first: two DFDC clusters must not outvote a held-out generator), and the winner's decision threshold
  is chosen on its pooled validation scores (``--fpr`` of validation reals called fake);
* **test clusters** (``--test-clusters``): held out of everything (the recipe's test clusters, and of the
  CLIP head); scored once, for the report, never for a choice.

Every image goes through the validation protocol: resized, re-encoded at the cache's JPEG quality.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE, THRESHOLD_FPR
from scoring.metrics import detection_metrics
from evaluation.validate import DEFAULT_WEIGHTS, score_labelled

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from train.heads import HeadSpec

CLIP = "clip"


def eligible_experts(manifest: dict, set_name: str, cluster: int | None) -> list[str]:
    """The weights' experts that never trained on a set: for cluster c, those whose ``validation_sets``
    entry ``fold_c`` names them, or all of them when c was a test cluster or a set the run never used."""
    keys = [e["key"] for e in manifest["experts"]]
    record = manifest.get("merged_from", [{}])[0].get("training", manifest.get("training", {}))
    if cluster is None:
        return keys
    test = set(record.get("test_sets", []))
    if f"cluster_{cluster}" in test:
        return keys
    validated = (record.get("validation_sets") or {}).get(f"fold_{cluster}")
    return [k for k in keys if k in (validated or [])]


def clip_probs(rows: "pd.DataFrame", features: "torch.Tensor", meta: dict, spec: "HeadSpec", held: np.ndarray,
               excluded: np.ndarray) -> np.ndarray:
    """Fake probabilities of the ``held`` rows from a CLIP head trained on the other usable, non-excluded rows
    (``features``: :func:`train.heads.cached_features` of every cached row, computed once by the caller)."""
    from train.heads import balanced_weights, build_expert, fit_head, predict

    ok, targets = rows["ok"].to_numpy().copy(), rows["target"].to_numpy()
    train = ok & ~held & ~excluded
    expert = fit_head(build_expert(meta, spec, with_base=False), features[train], targets[train],
                      balanced_weights(rows[train]), spec)
    return predict(expert, features[held])


def trained_expert_probs(ensemble, rows: "pd.DataFrame", jpeg_quality: int, workers: int, cache: Path | None,
                         manifest: dict, device: "str | torch.device" = DEFAULT_DEVICE
                         ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_labelled` of the weights' experts, kept in ``cache`` (keyed by the experts' fingerprint
    and the images) so that comparing several CLIP heads scores the trained experts once."""
    from core.files import atomic_output
    from experts import scores_fingerprint

    if cache is None:
        return score_labelled(ensemble, rows, jpeg_quality, workers=workers, device=device)
    key = hashlib.sha256(json.dumps([scores_fingerprint(manifest), jpeg_quality, rows["path"].tolist()]).encode())
    path = cache / f"{key.hexdigest()[:20]}.npz"
    if path.is_file():
        saved = np.load(path)
        return saved["targets"], saved["probs"]
    targets, probs = score_labelled(ensemble, rows, jpeg_quality, workers=workers, device=device)
    with atomic_output(path) as tmp:  # a killed run leaves no half-written cache entry
        np.savez(tmp, targets=targets, probs=probs)
    return targets, probs


def domain_mean(aucs: dict[str, float], domain: dict[str, str]) -> float:
    """Mean AUC over labelled sets, each set's folds averaged first: two DFDC clusters must not outvote
    the one fold that holds out a whole generator, since generalising to new generators is what matters."""
    by_domain: dict[str, list[float]] = {}
    for name, auc in aucs.items():
        by_domain.setdefault(domain[name], []).append(auc)
    return float(np.mean([np.mean(v) for v in by_domain.values()]))


def candidate_table(targets: np.ndarray, probs: dict[str, np.ndarray], eligible: list[str]) -> dict[str, dict]:
    """Metrics of each candidate ensemble (mean of its eligible members' probabilities) on one set."""
    trained = [k for k in probs if k != CLIP and k in eligible]
    candidates = {"trained experts": trained, "clip": [CLIP], "trained experts + clip": trained + [CLIP]}
    out = {}
    for name, members in candidates.items():
        if members:
            p = np.mean([probs[m] for m in members], axis=0)
            out[name] = {**detection_metrics(targets, p), "probs": p, "members": members}
    for key in trained:
        out[f"expert {key}"] = {**detection_metrics(targets, probs[key]), "probs": probs[key], "members": [key]}
    return out


def compare(weights: str | Path, cache: str | Path, splits: str | Path, test_clusters: Sequence[int], *,
            val_clusters: Sequence[int] = (), val_sets: Sequence[str] = (), layers: Sequence[int] = (12,),
            head: str = "linear", fpr: float = THRESHOLD_FPR, workers: int = 1, val_limit: int = 0,
            threshold_into: str | Path | None = None, probs_cache: Path | None = None,
            device: "str | torch.device" = DEFAULT_DEVICE, command: str = "") -> dict[str, dict]:
    """Score every set with the candidates, choose on the validation sets, report the test clusters; with
    ``threshold_into``, write the winner's threshold into that folder's manifest (and nowhere else).
    Returns the results per set."""
    from core.device import resolve_device
    from evaluation.threshold import ThresholdError, choose_threshold
    from experts import load_ensemble, read_manifest
    from experts.weights import set_threshold
    from train.heads import HeadSpec, cached_features, cluster_of_rows
    from train.token_cache import load_cache

    if not 0.0 < fpr < 1.0:
        raise ThresholdError(f"--fpr must lie strictly between 0 and 1, got {fpr:g}")
    rows, tokens, meta = load_cache(cache)
    cluster = cluster_of_rows(rows, splits)
    test_mask = np.isin(cluster, list(test_clusters))
    sets = {f"cluster {c}": (cluster == c, c, "val") for c in val_clusters}
    sets |= {f"set {s}": ((rows["set"] == s).to_numpy() & ~test_mask, None, "val") for s in val_sets}
    sets |= {f"cluster {c}": (cluster == c, c, "test") for c in test_clusters}
    spec = HeadSpec(layers=list(layers), head=head)
    features = cached_features(tokens, meta, spec)  # once: every set's head trains on rows of it
    manifest = read_manifest(weights)
    device = resolve_device(device)
    ensemble = load_ensemble(weights, device)

    results: dict[str, dict] = {}
    for name, (mask, c, part) in sets.items():
        held = mask & rows["ok"].to_numpy()
        if part == "val" and val_limit and held.sum() > val_limit:  # a seeded sample, for speed
            keep = np.random.default_rng(0).choice(np.flatnonzero(held), val_limit, replace=False)
            held = np.isin(np.arange(len(rows)), keep)
        targets, trained = trained_expert_probs(ensemble, rows[held], meta["jpeg_quality"], workers, probs_cache,
                                                manifest, device)
        probs = {k: trained[:, i] for i, k in enumerate(ensemble.names)}
        excluded = test_mask if part == "val" else np.zeros_like(test_mask)
        # The whole set stays out of the head's training, not just the scored sample.
        probs[CLIP] = clip_probs(rows, features, meta, spec, held, excluded | (test_mask & ~held) | mask)
        results[name] = {"part": part, "targets": targets, "domain": rows.loc[held, "set"].mode().iloc[0],
                         "table": candidate_table(targets, probs, eligible_experts(manifest, name, c))}
        for cand, m in results[name]["table"].items():
            print(f"{part:4s} {name:28s} {cand:28s} n {int(m['n']):5d}  AUC {m['auc']:.4f}  "
                  f"TPR@FPR1e-3 {m['tpr@fpr1e-3']:.4f}")

    val = [n for n, r in results.items() if r["part"] == "val"]
    if not val:
        return results
    candidates = ["trained experts", "clip", "trained experts + clip"]
    means = {c: domain_mean({n: results[n]["table"][c]["auc"] for n in val if c in results[n]["table"]},
                            {n: results[n]["domain"] for n in val}) for c in candidates}
    best = max(means, key=means.get)
    print("validation AUC, mean over labelled sets (each set's folds averaged first): "
          + ", ".join(f"{c} {m:.4f}" for c, m in means.items()) + f" -> chosen: {best}")
    pooled_t = np.concatenate([results[n]["targets"] for n in val])
    pooled_p = np.concatenate([results[n]["table"][best]["probs"] for n in val])
    threshold = choose_threshold(pooled_t, pooled_p, rule="fpr", target_fpr=fpr)
    print(f"threshold for {best} at validation FPR {fpr}: {threshold['value']:.4f} "
          f"(TPR {threshold['tpr']:.3f}, FPR {threshold['fpr']:.3f} on {len(pooled_t)} validation images)")
    if threshold_into:
        record = {**{k: v for k, v in threshold.items() if k in ("value", "tpr", "fpr", "n", "n_fake", "n_real")},
                  "rule": "fpr", "target_fpr": fpr, "ensemble": best,
                  "set": "pooled out-of-fold validation scores: " + ", ".join(val),
                  "jpeg_quality": meta["jpeg_quality"], "command": command}
        set_threshold(threshold_into, record)
        print(f"wrote the threshold into {Path(threshold_into) / 'manifest.json'}")
    else:
        print("not written anywhere (--threshold-into DIR records it in DIR/manifest.json)")
    for n, r in results.items():
        if r["part"] == "test":
            m = r["table"][best]
            called = m["probs"][r["targets"] == 0] >= threshold["value"]
            print(f"test (report only) {n}: {best} AUC {m['auc']:.4f}, TPR@FPR1e-3 {m['tpr@fpr1e-3']:.4f}, "
                  f"reals called fake at the threshold {called.mean():.3f}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, metavar="DIR",
                   help="the trained ensemble to compare with, only read (default: the shipped weights/)")
    p.add_argument("--cache", type=Path, required=True, metavar="DIR", help="token cache of train/token_cache.py")
    p.add_argument("--splits", type=Path, required=True, metavar="FILE",
                   help="the splits.csv the weights were trained on")
    p.add_argument("--val-clusters", type=int, nargs="*", default=[], metavar="N",
                   help="validation clusters of --splits (default: none)")
    p.add_argument("--val-sets", nargs="*", default=[], metavar="SET",
                   help="labelled sets (cache 'set' names) the weights never saw (default: none)")
    p.add_argument("--test-clusters", type=int, nargs="+", required=True, metavar="N",
                   help="clusters held out of everything, scored for the report only")
    p.add_argument("--layers", type=int, nargs="+", default=[12], help="CLIP layers the head reads (default: 12)")
    p.add_argument("--head", choices=("linear", "lib"), default="linear", help="head type (default: linear)")
    p.add_argument("--fpr", type=float, default=THRESHOLD_FPR,
                   help=f"threshold: share of validation reals called fake (default: {THRESHOLD_FPR})")
    p.add_argument("--workers", type=int, default=1, help="image-decoding worker processes (default: 1)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"where the trained experts score images: auto | cpu | cuda | cuda:N (default: "
                        f"{DEFAULT_DEVICE}, the GPU if any)")
    p.add_argument("--val-limit", type=int, default=0, metavar="N",
                   help="score at most this many images of each validation set (default: 0, all)")
    p.add_argument("--threshold-into", type=Path, metavar="DIR",
                   help="write the chosen threshold into DIR/manifest.json (the only thing this command ever "
                        "writes into a weights folder; without this option nothing is written)")
    p.add_argument("--probs-cache", type=Path, metavar="DIR",
                   help="keep the trained experts' scores here between runs")
    args = p.parse_args(argv)

    from core.device import DeviceError, resolve_device
    from core.labels import LabelsError
    from evaluation.threshold import ThresholdError
    from experts import WeightsError

    command = shlex.join(["python", "evaluation/with_clip.py", *argv])
    try:
        compare(args.weights, args.cache, args.splits, args.test_clusters, val_clusters=args.val_clusters,
                val_sets=args.val_sets, layers=args.layers, head=args.head, fpr=args.fpr, workers=args.workers,
                val_limit=args.val_limit, threshold_into=args.threshold_into, probs_cache=args.probs_cache,
                device=resolve_device(args.device), command=command)
    except (ThresholdError, LabelsError, WeightsError, DeviceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
