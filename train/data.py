"""What each expert trains and validates on, and the order batches come in.

Two ways to split, chosen by the config:

* **group split** (no ``splits``): each training CSV is split by ``group`` into train and validation parts;
  every expert trains on all the train parts.
* **cluster folds** (``splits: OUT/splits.csv`` from ``data_prep/cluster.py``): expert *e* trains on the
  rows whose ``fold_<f_e>`` column says ``train`` and is validated on cluster ``f_e``, the kind of image
  it never saw. Experts on different folds still share batches (one data pipeline); a row counts in the
  losses of only the experts that train on it, through a per-expert mask.

A config these cannot be built from raises :class:`train.config.ConfigError`; a labels or splits file that
cannot be read raises :class:`core.labels.LabelsError`. Both name the file or option.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from core.labels import read_labels, read_splits, split_by_group
from train.config import BALANCE_MODES, ConfigError, TrainConfig

__all__ = ["BALANCE_MODES", "EpochSampler", "Splits", "build_splits", "expert_folds", "expert_key", "mutual_teachers",
           "sampling_weights", "set_name"]


@dataclass
class Splits:
    """The training pool, which expert trains on which row, and the validation sets.

    Attributes:
        pool: Every row some expert trains on (``path``, ``target``, ``source``, ...), repeated per ``repeat``.
        masks: Expert key -> boolean array over ``pool``: the rows in that expert's losses.
        val: Validation set name -> rows.
        val_experts: Validation set name -> the experts it is held out for (an expert is only measured on
            data it never trained on; ``None``: every expert).
        test: Names of validation sets that are reported but never choose the checkpoint or stop training
            (the ``test_clusters``: held out from every expert, so the ensemble's number on them is clean).
        teachers: Expert key -> the experts it may learn from in mutual learning (see :func:`mutual_teachers`);
            ``None``: every other expert.
    """

    pool: pd.DataFrame
    masks: dict[str, np.ndarray]
    val: dict[str, pd.DataFrame]
    val_experts: dict[str, list[str] | None]
    test: list[str] = field(default_factory=list)
    teachers: dict[str, list[str]] | None = None

    @property
    def selection_sets(self) -> list[str]:
        """The validation sets the best checkpoint and early stopping are decided on."""
        return [name for name in self.val if name not in self.test]


def expert_key(spec: dict) -> str:
    """An expert's unique name in a run: its ``key`` entry, else its registry ``name``."""
    return spec.get("key", spec["name"])


def build_splits(cfg: TrainConfig) -> Splits:
    """The pool, masks and validation sets of the config (cluster folds when ``splits`` is set)."""
    if cfg.test_clusters and not cfg.splits:
        raise ConfigError("`test_clusters` needs `splits` (the splits.csv of data_prep/cluster.py)")
    splits = _fold_splits(cfg) if cfg.splits else _group_splits(cfg)
    for entry in cfg.val_extra:
        path = entry if isinstance(entry, str) else entry["csv"]
        name = set_name(path)
        splits.val[name] = read_labels(path)
        splits.val_experts[name] = None
    if cfg.max_val_images:
        splits.val = {k: v.sample(n=min(len(v), cfg.max_val_images), random_state=cfg.seed).reset_index(drop=True)
                      for k, v in splits.val.items()}
    return splits


def _group_splits(cfg: TrainConfig) -> Splits:
    if not cfg.train:
        raise ConfigError("no training data; set `train: [{csv: path/to/labels.csv}]` (or `splits:`) in the config")
    parts, val = [], {}
    for entry in cfg.train:
        entry = {"csv": entry} if isinstance(entry, str) else entry
        train_df, val_df = split_by_group(read_labels(entry["csv"]), cfg.val_fraction)
        parts.extend([train_df] * int(entry.get("repeat", 1)))
        val[set_name(entry["csv"])] = val_df
    pool = pd.concat(parts, ignore_index=True)
    keys = [expert_key(s) for s in cfg.experts]
    # Every expert is validated on the held-out groups, which no expert trains on: all may teach all.
    teachers = {k: [t for t in keys if t != k] for k in keys}
    return Splits(pool, {k: np.ones(len(pool), bool) for k in keys}, val, {k: None for k in val}, teachers=teachers)


def expert_folds(cfg: TrainConfig, k: int) -> dict[str, int]:
    """Each expert's fold: its ``fold`` entry, else the experts take folds 0, 1, 2, ... in order."""
    folds = {}
    for i, spec in enumerate(cfg.experts):
        fold = int(spec.get("fold", i % k))
        if not 0 <= fold < k:
            raise ConfigError(f"expert {expert_key(spec)!r}: fold {fold} is not in 0..{k - 1} ({cfg.splits})")
        folds[expert_key(spec)] = fold
    return folds


def _fold_splits(cfg: TrainConfig) -> Splits:
    path = Path(cfg.splits)
    rows = read_splits(path)
    fold_cols = sorted((c for c in rows.columns if c.startswith("fold_")), key=lambda c: int(c.split("_")[1]))
    if not fold_cols:
        raise ConfigError(f"{path}: not a splits file of data_prep/cluster.py (missing fold_* columns)")
    folds = expert_folds(cfg, len(fold_cols))
    test_rows = _test_rows(rows, cfg.test_clusters, folds, path)
    trains = {key: (rows[f"fold_{f}"] == "train").to_numpy() & ~test_rows for key, f in folds.items()}
    used = np.logical_or.reduce(list(trains.values()))
    pool = rows[used].reset_index(drop=True)
    masks = {key: m[used] for key, m in trains.items()}
    validated = {key: (rows[f"fold_{f}"] == "val").to_numpy() for key, f in folds.items()}
    val, val_experts = {}, {}
    for f in sorted(set(folds.values())):
        name = f"fold_{f}"
        val[name] = rows[rows[name] == "val"].reset_index(drop=True)
        val_experts[name] = [key for key, kf in folds.items() if kf == f]
    for c in cfg.test_clusters:
        name = f"cluster_{c}"
        val[name] = rows[rows["cluster"] == c].reset_index(drop=True)
        val_experts[name] = None
    return Splits(pool, masks, val, val_experts, test=[f"cluster_{c}" for c in cfg.test_clusters],
                  teachers=mutual_teachers(trains, validated))


def mutual_teachers(trains: dict[str, np.ndarray], validated: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Per expert, the experts allowed to teach it in mutual learning: none that trained on its validation rows.

    Mutual learning pulls an expert toward its teachers' predictions, i.e. distils what they learnt into it.
    A teacher that trained on the rows the student is validated on has learnt those rows' labels, and would
    hand them to the student: its validation score (which chooses the checkpoint, and later the experts and
    threshold that ship) would then measure data it has, in effect, seen. With the cluster folds of
    ``data_prep/cluster.py`` this leaves the experts of the student's own fold.

    Knowledge also travels along chains (c teaches b, b teaches a), so a teacher is kept only if every expert
    that reaches the student through it is allowed to teach the student too.

    Args:
        trains: Expert key -> boolean array over the rows of one table: the rows it trains on.
        validated: Expert key -> boolean array over the same rows: the rows it is validated on.
    """
    keys = list(trains)
    clean = {s: {t for t in keys if t != s and not (trains[t] & validated[s]).any()} for s in keys}
    teachers = {s: set(clean[s]) for s in keys}
    changed = True
    while changed:  # removing a teacher can only shrink what reaches a student: this ends
        changed = False
        for s in keys:
            for t in sorted(teachers[s]):
                if not _sources(teachers, t) <= clean[s] | {s}:
                    teachers[s].discard(t)
                    changed = True
    return {s: [t for t in keys if t in teachers[s]] for s in keys}


def _sources(teachers: dict[str, set[str]], key: str) -> set[str]:
    """``key`` and every expert whose predictions reach it through a chain of teachers."""
    seen, todo = {key}, [key]
    while todo:
        for t in teachers[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def _test_rows(rows: pd.DataFrame, clusters: list[int], folds: dict[str, int], path: Path) -> np.ndarray:
    """Rows of the clusters held out from every expert, after checking the clusters make sense."""
    if not clusters:
        return np.zeros(len(rows), bool)
    if "cluster" not in rows.columns:
        raise ConfigError(f"{path}: no `cluster` column, so `test_clusters` cannot be held out")
    known = set(rows["cluster"].unique())
    unknown = sorted(set(clusters) - known)
    if unknown:
        raise ConfigError(f"test_clusters {unknown} are not clusters of {path} (it has {sorted(known)})")
    clash = {key: f for key, f in folds.items() if f in clusters}
    if clash:
        raise ConfigError(f"experts {sorted(clash)} validate on folds {sorted(set(clash.values()))}, which are "
                          "test_clusters: give them other folds (a test cluster never chooses a checkpoint)")
    return rows["cluster"].isin(clusters).to_numpy()


def set_name(csv_path: str) -> str:
    """A validation set's name: the folder of its labels CSV (``dfdc_faces``)."""
    return Path(csv_path).resolve().parent.name


def sampling_weights(pool: pd.DataFrame, mode: str) -> np.ndarray | None:
    """Per-row sampling weights that give every class (or every source x class cell) equal mass.

    Without balancing a 13:1 real:fake set teaches the head the prior more than the evidence; with it every
    batch holds both classes in about equal numbers. ``None`` for ``mode="none"``: a plain permutation.
    """
    if mode not in BALANCE_MODES:
        raise ConfigError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    cells = pool["target"].astype(str) if mode == "class" else pool["source"].astype(str) + "/" + pool["target"].astype(str)
    counts = cells.map(cells.value_counts())
    return (1.0 / counts).to_numpy(dtype=np.float64)


class EpochSampler(Sampler[int]):
    """A fresh, seeded order per epoch that can start mid-epoch (resume) and be sharded (DDP).

    The order depends only on (seed, epoch): a permutation, or with ``weights`` a draw with replacement in
    proportion to them (class-balanced sampling). Rank ``r`` of ``world`` processes takes every
    ``world``-th index from ``r``, so the ranks see disjoint parts of one epoch.
    """

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.epoch, self.start = 0, 0

    def epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        yield from self.epoch_order()[self.start:].tolist()

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world)) - self.start
