"""Train a frozen CLIP expert's head on cached tokens: validate on held-out clusters, refit, write weights.

    python train/token_cache.py ../shared/data/*/labels.csv --out runs/tokens/clip_vit_b16-224
    python train/heads.py runs/tokens/clip_vit_b16-224 --splits runs/clusters/splits.csv --clusters 3 6 \\
        --layers 8 --out runs/clip_head                      # held-out figures, then a refit on every image
    python train/heads.py CACHE --layers 8 --head lib --no-refit  # held-out figures only
    python train/heads.py runs/tokens/clip_vit_b16-160 --layers 12 --head lib --out weights   # the shipped weights/

Why frozen: UnivFD (CVPR 2023) showed that a linear head on frozen CLIP features generalises to unseen
generators better than fine-tuned CNNs, and on this CPU a backward pass through ViT-B/16 is the expensive
part (``bench/train_speed.py``). With the tower frozen, its tokens are computed once
(``train/token_cache.py``) and a head trains in seconds, so the held-out protocol (train without cluster
c, score cluster c) can be run per cluster, per layer choice and per head type.

The head is the expert's own module: features are sliced from the cache exactly as
:meth:`experts.clip.ClipExpert.forward_features` computes them, the loss goes through
``expert.forward_head`` (L2 normalisation, dropout) or, for a LIB head, ``expert.head.forward_all`` and the
LIB losses, and the written expert (base weights by name plus its head, a few KB) scores images in
``infer.py`` exactly as its head scored the cache (checked on real images before writing).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # the heavy imports happen in the functions: the command's --help stays instant
    import pandas as pd
    import torch

    from experts.clip import ClipExpert

#: Largest |difference| of fake probability allowed between an expert scoring images and its head scoring
#: their cached tokens before the head is written.
PARITY_TOLERANCE = 2e-2


class ParityError(ValueError):
    """An expert that scores images unlike its head scored their cached tokens (a cache of another tower)."""


@dataclass
class HeadSpec:
    """What a head is and how it trains.

    Attributes:
        layers: Tower layers (1-based) whose tokens feed the head; the written expert's tower is truncated
            to the deepest one. Default: 12, the last of ViT-B/16 (the shipped head's).
        head: ``"linear"`` (on the concatenated class tokens) or ``"lib"`` (one block per region).
        epochs, batch_size, lr, weight_decay: AdamW on the head's parameters.
        lib_global, lib_local: Weights of the LIB information losses (LIB heads; CE is always on).
        drop_rate: Dropout before the head.
        seed: Initialisation and batch order.
    """

    layers: list[int] = field(default_factory=lambda: [12])
    head: str = "linear"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lib_global: float = 1.0
    lib_local: float = 0.1
    drop_rate: float = 0.0
    seed: int = 0


def build_expert(meta: dict[str, Any], spec: HeadSpec, with_base: bool) -> ClipExpert:
    """The expert a head belongs to: the cache's tower truncated to ``max(spec.layers)``, L2-normalised
    features, and a fresh head. ``with_base=False`` skips loading the tower's weights (the head alone trains
    on cached tokens), but the config still names the base, so the saved expert loads over it."""
    import torch

    from experts import create_expert

    config = meta["config"]
    arch = {**config["backbone_config"], "num_hidden_layers": max(spec.layers)}
    extra = {"lib_grid": meta["grid"]} if spec.head == "lib" else {}
    torch.manual_seed(spec.seed)  # the head's initialisation: the same in every script that builds this spec
    expert = create_expert(meta["expert"], pretrained=meta["pretrained"] if with_base else False,
                           input_size=meta["input_size"], backbone_config=arch, feature_layers=list(spec.layers),
                           normalize_features=True, head=spec.head, drop_rate=spec.drop_rate, **extra)
    expert.config.base = meta["pretrained"]
    return expert


def cached_features(tokens: np.ndarray, meta: dict[str, Any], spec: HeadSpec) -> torch.Tensor:
    """``[N, F]`` float32: what ``forward_features`` of :func:`build_expert`'s expert returns, from the cache.

    Linear head: the class tokens of ``spec.layers``, concatenated. LIB head: each region's tokens of those
    layers concatenated (layer-major), regions flattened, as ``ClipExpert.backbone_regions`` lays them out.
    """
    import torch

    missing = [layer for layer in spec.layers if layer not in meta["layers"]]
    if missing:
        raise ValueError(f"layers {missing} are not in the cache (it holds layers {meta['layers'][0]}.."
                         f"{meta['layers'][-1]})")
    index = [meta["layers"].index(layer) for layer in spec.layers]
    chosen = torch.from_numpy(tokens[:, index].astype(np.float32))  # [N, L, 1 + R, D]
    if spec.head == "lib":
        return chosen[:, :, 1:].transpose(1, 2).flatten(2).flatten(1)
    return chosen[:, :, 0].flatten(1)


def balanced_weights(rows: pd.DataFrame) -> np.ndarray:
    """Per-row weights giving every (set, class) cell equal mass, so 8000 DFDC faces do not drown 600 GAN
    faces, and each set's reals weigh as much as its fakes."""
    cell = rows["set"].astype(str) + "/" + rows["target"].astype(str)
    counts = cell.map(cell.value_counts())
    return (1.0 / counts).to_numpy() / (1.0 / counts).sum() * len(rows)


def fit_head(expert: ClipExpert, features: torch.Tensor, targets: np.ndarray, weights: np.ndarray,
             spec: HeadSpec, progress: bool = False) -> ClipExpert:
    """Train ``expert.head`` on ``features`` (rows of :func:`cached_features`) with weighted CE (+ LIB)."""
    import torch

    from core.progress import progress_bar

    torch.manual_seed(spec.seed)
    head_params = list(expert.head.parameters())
    optimizer = torch.optim.AdamW(head_params, lr=spec.lr, weight_decay=spec.weight_decay)
    y = torch.tensor(np.asarray(targets), dtype=torch.long)
    w = torch.tensor(np.asarray(weights), dtype=torch.float32)
    n = len(y)
    steps = spec.epochs * max(1, n // spec.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(spec.seed)
    expert.train()
    bar = progress_bar(total=steps, desc="head", unit="step", enabled=progress)
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - spec.batch_size + 1 if n >= spec.batch_size else 1, spec.batch_size):
            rows = order[start:start + spec.batch_size]
            loss = head_loss(expert, features[rows], y[rows], w[rows], spec)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
    bar.close()
    return expert.eval()


def head_loss(expert: ClipExpert, features: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
              spec: HeadSpec) -> torch.Tensor:
    """Weighted CE of the prediction; a LIB head adds CE of its other classifiers and the LIB losses."""
    import torch

    from train import losses as L

    w = w / w.sum()
    if spec.head != "lib":
        return (torch.nn.functional.cross_entropy(expert.forward_head(features), y, reduction="none") * w).sum()
    out = expert.head.forward_all(expert.head_input(features))
    ce = sum((torch.nn.functional.cross_entropy(logits, y, reduction="none") * w).sum()
             for logits in (out.fused, out.whole, *out.dropped))
    return ce + spec.lib_global * L.lib_global_loss(out) + spec.lib_local * L.lib_local_loss(out)


def predict(expert: ClipExpert, features: torch.Tensor) -> np.ndarray:
    """Fake probability of each row of cached features."""
    import torch

    expert.eval()
    with torch.inference_mode():
        return expert.forward_head(features).float().softmax(-1)[:, 1].numpy()


def cluster_of_rows(rows: pd.DataFrame, splits: str | Path) -> np.ndarray:
    """Each cached row's cluster in ``splits`` (matched by resolved path); -1 for images it does not list
    (a labelled set that was not clustered: training data for every held-out set)."""
    from core.labels import read_splits

    table = read_splits(splits, required=("path", "cluster"))
    cluster_of = dict(zip(table["path"].map(lambda p: str(Path(p).resolve())), table["cluster"]))
    return rows["path"].map(lambda p: cluster_of.get(str(Path(p).resolve()), -1)).to_numpy()


def heldout_sets(rows: pd.DataFrame, splits: str | Path | None, clusters: Sequence[int]) -> dict[str, np.ndarray]:
    """``{name: bool mask over rows}`` of each held-out set: a cluster of ``splits``, or with no splits
    each labelled set (``set`` column) in turn."""
    if splits is None:
        return {f"set {s}": (rows["set"] == s).to_numpy() for s in rows["set"].unique()}
    assigned = cluster_of_rows(rows, splits)
    sets = {}
    for c in clusters:
        mask = assigned == c
        names = ", ".join(sorted(rows.loc[mask, "set"].unique()))
        sets[f"cluster {c} ({names})"] = mask
    return sets


def heldout_report(rows: pd.DataFrame, tokens: np.ndarray, meta: dict[str, Any], spec: HeadSpec,
                   sets: dict[str, np.ndarray], jointly: bool = False) -> dict[str, dict[str, Any]]:
    """Per held-out set, the detection metrics (``auc``, ``tpr@fpr1e-3``, ...) and ``probs`` of a head that
    never saw it: one head per set trained on every other row, or (``jointly``) one head trained without
    any of the sets, as the recipe's test clusters are held out from every expert."""
    from scoring.metrics import detection_metrics

    ok = rows["ok"].to_numpy().copy()  # a writable mask: torch warns on indexing with a read-only one
    targets = rows["target"].to_numpy()
    features = cached_features(tokens, meta, spec)
    union = np.logical_or.reduce(list(sets.values())) if sets else np.zeros(len(rows), bool)
    report, joint_expert = {}, None
    for name, held in sets.items():
        if joint_expert is None or not jointly:
            train = ok & ~(union if jointly else held)
            joint_expert = fit_head(build_expert(meta, spec, with_base=False), features[train], targets[train],
                                    balanced_weights(rows[train]), spec)
        test = ok & held
        probs = predict(joint_expert, features[test])
        report[name] = {**detection_metrics(targets[test], probs), "probs": probs, "rows": np.flatnonzero(test)}
    return report


def check_parity(expert: ClipExpert, rows: pd.DataFrame, features: torch.Tensor, meta: dict[str, Any],
                 n: int = 8) -> float:
    """Max |difference| of the fake probability between the expert scoring ``n`` real images end to end and
    its head scoring their cached tokens; a head that scores the cache unlike the images is refused."""
    import torch

    from core.dataset import ImageDataset
    from core.transforms import shortcut_free_eval_transform

    size = meta["input_size"]
    picks = np.flatnonzero(rows["ok"].to_numpy())[:n]
    dataset = ImageDataset(rows["path"].iloc[picks].tolist(), {size: shortcut_free_eval_transform(size, meta["jpeg_quality"])})
    images = torch.stack([dataset[i]["images"][size] for i in range(len(picks))])
    with torch.inference_mode():
        direct = expert(images)[0].float().softmax(-1)[:, 1].numpy()
    return float(np.abs(direct - predict(expert, features[picks])).max())


def refit(rows: pd.DataFrame, tokens: np.ndarray, meta: dict[str, Any], spec: HeadSpec,
          progress: bool = True) -> tuple[ClipExpert, float]:
    """The expert with its head trained on every readable cached image, and its parity gap (see
    :func:`check_parity`); :class:`ParityError` when the gap is over :data:`PARITY_TOLERANCE`."""
    ok = rows["ok"].to_numpy().copy()  # a writable mask: torch warns on indexing with a read-only one
    features = cached_features(tokens, meta, spec)
    expert = build_expert(meta, spec, with_base=True)
    fit_head(expert, features[ok], rows["target"].to_numpy()[ok], balanced_weights(rows[ok]), spec, progress=progress)
    gap = check_parity(expert, rows[ok].reset_index(drop=True), features[ok], meta)
    if gap > PARITY_TOLERANCE:
        raise ParityError(f"the expert scores images unlike its head scored their cached tokens "
                          f"(max |diff| {gap:.4f}); is the cache from this tower?")
    return expert, gap


def main(argv: Sequence[str] | None = None) -> int:
    defaults = HeadSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="a folder written by train/token_cache.py")
    p.add_argument("--layers", type=int, nargs="+", default=defaults.layers,
                   help="tower layers (1-based) whose tokens feed the head "
                        f"(default: {' '.join(map(str, defaults.layers))})")
    p.add_argument("--head", choices=("linear", "lib"), default=defaults.head,
                   help="linear: on the layers' class tokens; lib: a LIB head on their regions (default: %(default)s)")
    p.add_argument("--splits", type=Path,
                   help="splits.csv of data_prep/cluster.py: report its --clusters held out of one head "
                        "(without it: each labelled set held out in turn)")
    p.add_argument("--clusters", type=int, nargs="*", default=[],
                   help="held-out clusters of --splits to report, all held out of one head (as the recipe's test "
                        "clusters)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="head training epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--lib-global", type=float, default=defaults.lib_global,
                   help="weight of the global LIB loss, lib heads (default: %(default)s)")
    p.add_argument("--lib-local", type=float, default=defaults.lib_local,
                   help="weight of the local LIB loss, lib heads (default: %(default)s)")
    p.add_argument("--partial", action="store_true", help="use the finished part of a cache still being built")
    p.add_argument("--out", type=Path,
                   help="weights folder for the head refit on every cached image (without it: held-out figures only)")
    p.add_argument("--no-refit", action="store_true", help="held-out figures only, even with --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    args = p.parse_args(argv)

    from core.device import DeviceError, set_threads
    from core.labels import LabelsError
    from experts import save_ensemble
    from train.token_cache import load_cache

    spec = HeadSpec(layers=args.layers, head=args.head, epochs=args.epochs, lr=args.lr,
                    weight_decay=args.weight_decay, lib_global=args.lib_global, lib_local=args.lib_local)
    try:
        set_threads(args.threads)
        rows, tokens, meta = load_cache(args.cache, partial=args.partial)
        print(f"{len(rows)} cached images ({rows['ok'].sum()} readable) of {', '.join(rows['set'].unique())}; "
              f"head {spec.head} on layers {spec.layers}")
        sets = heldout_sets(rows, args.splits, args.clusters)
        report = heldout_report(rows, tokens, meta, spec, sets, jointly=args.splits is not None)
        for name, m in report.items():
            print(f"held out {name}: n {int(m['n'])}  AUC {m['auc']:.4f}  TPR@FPR1e-3 {m['tpr@fpr1e-3']:.4f}  "
                  f"EER {m['eer']:.4f}")
        if args.no_refit or not args.out:
            return 0
        expert, gap = refit(rows, tokens, meta, spec, progress=not args.quiet)
    except (DeviceError, FileNotFoundError, LabelsError, ParityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key = f"clip_vit_b16_l{'-'.join(map(str, spec.layers))}_{spec.head}"
    metadata = {"training": {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                             "head": asdict(spec), "cache": str(args.cache), "data": meta["csvs"],
                             "n_images": int(rows["ok"].sum()), "parity_max_abs_diff": gap,
                             "heldout": {k: {m: v for m, v in r.items() if m not in ("probs", "rows")} for k, r in report.items()},
                             "validation": "each held-out set scored by a head trained without it (same recipe), "
                                           "images resized and re-encoded at JPEG quality "
                                           f"{meta['jpeg_quality']}; the written head is refit on every image"}}
    save_ensemble({key: expert}, args.out, metadata=metadata)
    print(f"wrote {args.out} (parity with end-to-end scoring: max |diff| {gap:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
