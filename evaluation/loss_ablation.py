"""Loss ablation of the joint objective on one cluster fold, with head-only experts on cached CLIP tokens.

    python evaluation/loss_ablation.py runs/tokens/clip_vit_b16-160 --splits runs/clusters_v1/splits.csv \\
        --holdout 3 6 --seeds 0 1 2 3 4 --epochs 30 --threads 1 --out runs/loss_ablation
    python evaluation/loss_ablation.py CACHE --configs ce ce+kl --experts lib:12 linear:10 --seeds 0 1

End-to-end joint training of CLIP is out of reach of a CPU, but a frozen ViT-B/16's tokens of every labelled
image are cached (``train/token_cache.py``). Here E head-only experts (default: a LIB head on layer 12, on
layer 8 and on layer 10 regions) are wrapped so that :class:`train.objective.JointObjective` runs on those
tokens unchanged, and are trained jointly under each loss configuration:

* ``ce``: cross-entropy only (a LIB head still trains its fused, all-blocks and left-out classifiers with CE);
* ``ce+kl``: plus mutual learning (``kl_mutual``);
* ``ce+kl+nce``: plus the real-anchored contrastive loss (``nce``);
* ``ce+kl+nce+lib``: plus the LIB information losses (``lib_global``, ``lib_local``).

The weights of the added losses are the recipe's (``--recipe``, ``loss_weights``; CE keeps weight 1).
Every expert trains on every row outside the ``--holdout`` clusters (rows of labelled sets that the splits
file does not list, e.g. ``general_scenes``, are training rows), so mutual teachers leak nothing; batches
are drawn with replacement with the per-row probabilities of ``train.heads.balanced_weights`` (every
(set, class) cell the same mass), as ``JointObjective`` takes no per-row weights. Each held-out cluster is
then scored by each expert and by the ensemble (mean probability): AUC and TPR at FPR 1e-3, one number per
configuration and seed, summarised as mean +- std over seeds. A configuration and a seed share their
initialisation and batch order across configurations, so differences between configurations are paired.

Caveat, by construction: ``nce`` is computed by ``JointObjective`` on ``expert.forward_features``, which
for a head-only expert are the frozen cached tokens; the term then has no trainable input and changes
nothing (``ce+kl+nce`` trains exactly as ``ce+kl``). The report says so next to its numbers.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # the heavy imports happen in the functions: the command's --help stays instant
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from train.objective import JointObjective

#: Each configuration and the losses it switches on (every other loss weight is 0).
CONFIGS: dict[str, tuple[str, ...]] = {
    "ce": ("ce",),
    "ce+kl": ("ce", "kl_mutual"),
    "ce+kl+nce": ("ce", "kl_mutual", "nce"),
    "ce+kl+nce+lib": ("ce", "kl_mutual", "nce", "lib_global", "lib_local"),
}
DEFAULT_EXPERTS = ("lib:12", "lib:8", "lib:10")
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "recipe.yaml"
#: The FPR of the reported TPR (the metric key of ``detection_metrics``).
TPR_KEY = "tpr@fpr1e-3"
HEADS = ("lib", "linear")


class AblationError(ValueError):
    """Options or data that the ablation cannot run on (unknown configuration, expert or cluster)."""


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ExpertChoice:
    """One head-only expert: its head type and the tower layers (1-based) it reads."""

    head: str
    layers: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.head}_l{'-'.join(map(str, self.layers))}"

    @classmethod
    def parse(cls, text: str) -> "ExpertChoice":
        """``"lib:12"``, ``"linear:10"`` or ``"lib:8,12"`` (several layers, concatenated)."""
        head, _, layers = text.partition(":")
        try:
            parsed = tuple(int(x) for x in layers.split(",") if x.strip())
        except ValueError:
            parsed = ()
        if head not in HEADS or not parsed:
            raise AblationError(f"expert {text!r}: expected HEAD:LAYER[,LAYER...] with HEAD one of {list(HEADS)}, "
                                "e.g. lib:12 or linear:10")
        return cls(head, parsed)


@dataclass
class TrainSettings:
    """How each joint run trains (AdamW on every trainable parameter of the objective, cosine schedule)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass
class ObjectiveSettings:
    """The objective's own parameters (the recipe's, else ``JointObjective``'s defaults)."""

    label_smoothing: float = 0.0
    nce_temperature: float = 0.1
    lib_temperature: float = 1.5
    lib_distance: str = "kl"


@dataclass
class RunResult:
    """One configuration at one seed."""

    config: str
    seed: int
    weights: dict[str, float]
    seconds: float
    metrics: dict[str, dict[str, dict[str, float]]]  # cluster -> ("ensemble" | expert key) -> metric -> value
    loss_curve: list[float]  # mean weighted total per epoch
    term_curves: dict[str, list[float]]  # "<expert>/<loss>" -> mean per epoch
    auc_curve: dict[str, list[float]] = field(default_factory=dict)  # cluster -> ensemble AUC after each epoch


def config_weights(config: str, recipe_weights: Mapping[str, float]) -> dict[str, float]:
    """The loss weights of ``config``: CE 1, each other loss it names at the recipe's weight, the rest 0."""
    if config not in CONFIGS:
        raise AblationError(f"unknown configuration {config!r}; known: {list(CONFIGS)}")
    out = {}
    for name in CONFIGS[config]:
        w = 1.0 if name == "ce" else float(recipe_weights.get(name, 0.0))
        if w <= 0:
            raise AblationError(f"configuration {config!r} switches on {name}, but the recipe weighs it {w}")
        out[name] = w
    return out


def read_recipe(path: str | Path) -> tuple[dict[str, float], ObjectiveSettings]:
    """The recipe's ``loss_weights`` and the objective parameters it sets (defaults for the others)."""
    import yaml

    text = Path(path).read_text()
    recipe = yaml.safe_load(text) or {}
    weights = {str(k): float(v) for k, v in (recipe.get("loss_weights") or {}).items()}
    defaults = ObjectiveSettings()
    settings = ObjectiveSettings(**{k: type(v)(recipe.get(k, v)) for k, v in asdict(defaults).items()})
    return weights, settings


# ------------------------------------------------------------------------------- experts on the cache
@dataclass
class HeadTemplate:
    """What a fresh head of one expert needs, taken once from :func:`train.heads.build_expert`'s expert (its
    tower, random and unused here, is dropped)."""

    choice: ExpertChoice
    config: Any  # experts.base.ExpertConfig
    region_dim: int
    num_regions: int


def head_templates(meta: dict[str, Any], choices: Sequence[ExpertChoice]) -> list[HeadTemplate]:
    """One :class:`HeadTemplate` per expert choice; layers that the cache lacks are refused."""
    from train.heads import HeadSpec, build_expert

    out = []
    for choice in choices:
        missing = [layer for layer in choice.layers if layer not in meta["layers"]]
        if missing:
            raise AblationError(f"expert {choice.key}: layers {missing} are not in the cache (it holds layers "
                                f"{meta['layers'][0]}..{meta['layers'][-1]})")
        expert = build_expert(meta, HeadSpec(layers=list(choice.layers), head=choice.head), with_base=False)
        out.append(HeadTemplate(choice, expert.config, expert.region_dim, expert.num_regions))
        del expert
    return out


@functools.cache
def cached_expert_type() -> type:
    """The class of :func:`cached_expert` (defined on first use: the module imports no torch at import)."""
    import torch
    from torch import nn

    from experts.base import Expert, build_head

    class CachedTokenExpert(nn.Module):
        """A head-only expert on cached tokens, with what :class:`train.objective.JointObjective` uses of an
        expert: ``config.input_size``, ``forward_features``, ``head_input``, ``forward_head``, ``head``,
        ``forward`` and ``parameters`` (the head's only: the tower is the frozen cache).

        Its "images" are a ``[B, L, 1 + R, D]`` batch of cached tokens of the layers ``layer_order`` (tower
        layers, 1-based) in that order; :meth:`forward_features` slices this expert's layers out of it
        exactly as :func:`train.heads.cached_features` does, and ``head_input`` / ``forward_head`` are
        :class:`experts.base.Expert`'s own code.
        """

        head_input = Expert.head_input
        forward_head = Expert.forward_head

        def __init__(self, template: HeadTemplate, layer_order: Sequence[int]):
            super().__init__()
            self.config = template.config
            self.uses_regions = template.choice.head == "lib"
            self.region_dim, self.num_regions = template.region_dim, template.num_regions
            self.head_drop = nn.Dropout(template.config.drop_rate)
            self.head = build_head(template.config, template.region_dim)
            index = [list(layer_order).index(layer) for layer in template.choice.layers]
            self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

        def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
            chosen = tokens[:, self.index].float()  # [B, L, 1 + R, D]
            if self.uses_regions:
                return chosen[:, :, 1:].transpose(1, 2).flatten(2).flatten(1)
            return chosen[:, :, 0].flatten(1)

        def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.forward_features(tokens)
            return self.forward_head(features), features

    return CachedTokenExpert


def cached_expert(template: HeadTemplate, layer_order: Sequence[int], seed: int) -> nn.Module:
    """A fresh head-only expert (head initialised from ``seed``) on token batches of ``layer_order``."""
    import torch

    torch.manual_seed(seed)
    return cached_expert_type()(template, layer_order)


def build_objective(templates: Sequence[HeadTemplate], layer_order: Sequence[int], weights: Mapping[str, float],
                    settings: ObjectiveSettings, seed: int) -> JointObjective:
    """The joint objective of fresh experts (expert ``i``'s head from seed ``1000 * seed + i``, so the
    experts of one run start apart while every configuration starts from the same heads at one seed)."""
    from train.objective import JointObjective

    experts = {}
    for i, t in enumerate(templates):
        key = t.choice.key if t.choice.key not in experts else f"{t.choice.key}_{i}"
        experts[key] = cached_expert(t, layer_order, 1000 * seed + i)
    return JointObjective(experts, weights, "fixed", label_smoothing=settings.label_smoothing,
                          nce_temperature=settings.nce_temperature, lib_temperature=settings.lib_temperature,
                          lib_distance=settings.lib_distance)


# ---------------------------------------------------------------------------------------- training
def train_joint(objective: JointObjective, tokens: torch.Tensor, targets: torch.Tensor, weights: np.ndarray,
                settings: TrainSettings, seed: int, input_size: int,
                after_epoch: Callable[[int], None] | None = None, progress: bool = False
                ) -> tuple[list[float], dict[str, list[float]]]:
    """Train ``objective`` for ``settings.epochs`` epochs of ``len(tokens) // batch_size`` batches, each drawn
    with replacement with probabilities ``weights`` (seeded); returns the mean weighted total per epoch and
    each term's mean per epoch. ``after_epoch(epoch)`` runs after each epoch (the objective back in
    training mode afterwards)."""
    import torch

    from core.progress import progress_bar

    torch.manual_seed(seed)  # dropout, if any
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = max(1, len(tokens) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(weights, dtype=torch.float64)
    masks = {key: torch.ones(settings.batch_size, dtype=torch.bool) for key in objective.experts}
    loss_curve: list[float] = []
    term_curves: dict[str, list[float]] = {}
    bar = progress_bar(total=settings.epochs * steps, desc="joint", unit="step", enabled=progress)
    objective.train()
    for epoch in range(settings.epochs):
        draws = torch.multinomial(probs, steps * settings.batch_size, replacement=True, generator=generator)
        total_sum, term_sums = 0.0, {}
        for rows in draws.view(steps, settings.batch_size):
            total, terms = objective({input_size: tokens[rows]}, targets[rows], masks)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            total_sum += float(total.detach())
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value.detach())
            bar.update()
        loss_curve.append(total_sum / steps)
        for name, value in term_sums.items():
            term_curves.setdefault(name, []).append(value / steps)
        if after_epoch is not None:
            after_epoch(epoch)
            objective.train()
    bar.close()
    objective.eval()
    return loss_curve, term_curves


def predict_experts(objective: JointObjective, tokens: torch.Tensor, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Expert key -> fake probability of each row of ``tokens`` (evaluation mode)."""
    import numpy as np
    import torch

    was_training = objective.training
    objective.eval()
    out: dict[str, list[np.ndarray]] = {key: [] for key in objective.experts}
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            for key, expert in objective.experts.items():
                out[key].append(expert.forward_head(expert.forward_features(batch)).float().softmax(-1)[:, 1].numpy())
    objective.train(was_training)
    return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in out.items()}


def score_sets(objective: JointObjective, sets: Mapping[str, tuple[torch.Tensor, np.ndarray]],
               metrics_fn: Callable[..., dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per held-out set: each expert's and the ensemble's (mean probability) AUC and TPR@FPR 1e-3."""
    import numpy as np

    out = {}
    for name, (tokens, targets) in sets.items():
        probs = predict_experts(objective, tokens)
        probs["ensemble"] = np.mean(list(probs.values()), axis=0)
        out[name] = {key: {m: v for m, v in metrics_fn(targets, p).items() if m in ("auc", TPR_KEY, "n")}
                     for key, p in probs.items()}
    return out


def detection_metrics_fn() -> Callable[..., dict[str, float]]:
    """``detection_metrics``, wherever it lives now (``scoring.metrics`` or ``evaluation.metrics``)."""
    try:
        from scoring.metrics import detection_metrics
    except ImportError:
        from evaluation.metrics import detection_metrics
    return detection_metrics


# -------------------------------------------------------------------------------------- the fold
@dataclass
class Fold:
    """The training rows and the held-out sets of one fold, as tensors of the needed layers only."""

    train_tokens: Any  # torch.Tensor [N, L, 1 + R, D] float16
    train_targets: Any  # torch.Tensor [N] long
    train_weights: Any  # np.ndarray [N]
    heldout: dict[str, tuple[Any, Any]]  # name -> (tokens, np targets)
    layer_order: list[int]
    input_size: int
    description: dict[str, Any]


def make_fold(rows: pd.DataFrame, tokens: np.ndarray, meta: dict[str, Any], splits: str | Path,
              holdout: Sequence[int], choices: Sequence[ExpertChoice], min_cell_rows: int = 0) -> Fold:
    """Train on every readable row outside the ``holdout`` clusters of ``splits``; hold each cluster out.

    ``min_cell_rows``: leave out of training the rows of a (set, class) cell with fewer training rows than
    this. The balanced sampler gives every cell the same mass, so a cell of a handful of rows (the few
    ``gan_faces`` reals that cluster with DFDC faces) would otherwise fill a fifth of every batch with
    those same few images."""
    import numpy as np
    import torch

    from train.heads import balanced_weights, heldout_sets

    layer_order = sorted({layer for c in choices for layer in c.layers})
    missing = [layer for layer in layer_order if layer not in meta["layers"]]
    if missing:
        raise AblationError(f"layers {missing} are not in the cache (it holds layers {meta['layers'][0]}.."
                            f"{meta['layers'][-1]})")
    index = [meta["layers"].index(layer) for layer in layer_order]
    sets = heldout_sets(rows, splits, holdout)
    empty = [name for name, mask in sets.items() if not mask.any()]
    if empty:
        raise AblationError(f"held-out {empty} have no cached rows: are they clusters of {splits}?")
    ok = rows["ok"].to_numpy().copy()
    union = np.logical_or.reduce(list(sets.values()))
    train = ok & ~union
    cell_of = rows["set"].astype(str) + "/" + rows["target"].astype(str)
    small = cell_of[train].value_counts()
    small = set(small[small < min_cell_rows].index)
    dropped = {c: int((train & (cell_of == c).to_numpy()).sum()) for c in sorted(small)}
    train = train & ~cell_of.isin(small).to_numpy()
    targets = rows["target"].to_numpy().astype(np.int64)
    heldout = {}
    for name, mask in sets.items():
        test = ok & mask
        heldout[name] = (torch.from_numpy(np.ascontiguousarray(tokens[test][:, index])), targets[test])
    train_rows = rows[train]
    cells = (train_rows["set"].astype(str) + "/" + train_rows["target"].astype(str)).value_counts().sort_index()
    return Fold(train_tokens=torch.from_numpy(np.ascontiguousarray(tokens[train][:, index])),
                train_targets=torch.from_numpy(targets[train]), train_weights=balanced_weights(train_rows),
                heldout=heldout, layer_order=layer_order, input_size=int(meta["input_size"]),
                description={"train_rows": int(train.sum()), "train_cells": {k: int(v) for k, v in cells.items()},
                             "dropped_cells": dropped,
                             "heldout": {name: {"n": int(len(t)), "fake": int(t.sum())}
                                         for name, (_, t) in heldout.items()}})


def run_one(fold: Fold, templates: Sequence[HeadTemplate], config: str, weights: Mapping[str, float],
            objective_settings: ObjectiveSettings, settings: TrainSettings, seed: int, curve: bool = True,
            progress: bool = False) -> RunResult:
    """Train one configuration at one seed on ``fold`` and score its held-out sets."""
    import numpy as np

    metrics_fn = detection_metrics_fn()
    start = time.perf_counter()
    objective = build_objective(templates, fold.layer_order, weights, objective_settings, seed)
    auc_curve: dict[str, list[float]] = {name: [] for name in fold.heldout}

    def track(epoch: int) -> None:
        for name, (tokens, targets) in fold.heldout.items():
            ensemble = np.mean(list(predict_experts(objective, tokens).values()), axis=0)
            auc_curve[name].append(metrics_fn(targets, ensemble)["auc"])

    loss_curve, term_curves = train_joint(objective, fold.train_tokens, fold.train_targets, fold.train_weights,
                                          settings, seed, fold.input_size, after_epoch=track if curve else None,
                                          progress=progress)
    metrics = score_sets(objective, fold.heldout, metrics_fn)
    seconds = time.perf_counter() - start
    return RunResult(config, seed, dict(weights), seconds, metrics, loss_curve, term_curves,
                     auc_curve if curve else {})


# ------------------------------------------------------------------------------------------ summary
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value); NaNs are left out."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def summarise(results: Sequence[RunResult]) -> dict[str, Any]:
    """Mean +- std over seeds of every (configuration, cluster, model, metric), and the paired difference of
    each configuration from the one before it (same seeds), with its t statistic."""
    configs = list(dict.fromkeys(r.config for r in results))
    by = {c: {r.seed: r for r in results if r.config == c} for c in configs}
    table: dict[str, Any] = {}
    for c in configs:
        runs = list(by[c].values())
        table[c] = {"seconds": mean_std([r.seconds for r in runs]), "seeds": sorted(by[c]), "metrics": {}}
        for cluster, models in runs[0].metrics.items():
            table[c]["metrics"][cluster] = {
                model: {m: mean_std([r.metrics[cluster][model][m] for r in runs]) for m in ("auc", TPR_KEY)}
                for model in models}
    deltas: dict[str, Any] = {}
    for before, after in zip(configs, configs[1:]):
        seeds = sorted(set(by[before]) & set(by[after]))
        if not seeds:
            continue
        deltas[f"{after} - {before}"] = {}
        for cluster in by[after][seeds[0]].metrics:
            entry = {}
            for m in ("auc", TPR_KEY):
                diffs = [by[after][s].metrics[cluster]["ensemble"][m] - by[before][s].metrics[cluster]["ensemble"][m]
                         for s in seeds]
                mean, std = mean_std(diffs)
                noise = max(mean_std([by[before][s].metrics[cluster]["ensemble"][m] for s in seeds])[1],
                            mean_std([by[after][s].metrics[cluster]["ensemble"][m] for s in seeds])[1])
                t = mean / (std / math.sqrt(len(diffs))) if len(diffs) > 1 and std > 0 else float("nan")
                entry[m] = {"mean": mean, "std": std, "t": t, "seed_std": noise,
                            "exceeds_seed_std": bool(abs(mean) > noise) if not math.isnan(mean) else False,
                            "identical": all(d == 0 for d in diffs)}
            deltas[f"{after} - {before}"][cluster] = entry
    return {"table": table, "deltas": deltas}


def _pm(pair: Sequence[float], digits: int = 4) -> str:
    m, s = pair
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(summary: dict[str, Any], header: str = "") -> str:
    """The summary as markdown: the ensemble table, per-expert AUC means, the paired differences."""
    table = summary["table"]
    if not table:
        return header
    first = next(iter(table.values()))
    clusters = list(first["metrics"])
    models = [m for m in first["metrics"][clusters[0]] if m != "ensemble"]
    short = {c: c.split(" (")[0] for c in clusters}
    lines = [header] if header else []
    lines += ["### Ensemble (mean probability), mean ± std over seeds", "",
              "| config | " + " | ".join(f"{short[c]} AUC | {short[c]} TPR@1e-3" for c in clusters) + " | s/run |",
              "|---" * (2 * len(clusters) + 2) + "|"]
    for config, row in table.items():
        cells = [f"{_pm(row['metrics'][c]['ensemble']['auc'])} | {_pm(row['metrics'][c]['ensemble'][TPR_KEY])}"
                 for c in clusters]
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {row['seconds'][0]:.0f} |")
    lines += ["", "### Each expert: mean AUC / mean TPR@1e-3 over seeds", "",
              "| config | " + " | ".join(f"{m} {short[c]}" for m in models for c in clusters) + " |",
              "|---" * (len(models) * len(clusters) + 1) + "|"]
    for config, row in table.items():
        cells = [f"{row['metrics'][c][m]['auc'][0]:.4f} / {row['metrics'][c][m][TPR_KEY][0]:.4f}"
                 for m in models for c in clusters]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    if summary["deltas"]:
        lines += ["", ("### Each added loss: paired difference of the ensemble (same seeds), mean ± std, t; "
                       "'>' marks |mean| above the larger seed std of the two configurations"), "",
                  "| step | " + " | ".join(f"{short[c]} ΔAUC | {short[c]} ΔTPR@1e-3" for c in clusters) + " |",
                  "|---" * (2 * len(clusters) + 1) + "|"]
        for step, entry in summary["deltas"].items():
            cells = []
            for c in clusters:
                for m in ("auc", TPR_KEY):
                    d = entry[c][m]
                    if d["identical"]:
                        cells.append("identical")
                        continue
                    mark = ">" if d["exceeds_seed_std"] else ""
                    cells.append(f"{mark}{d['mean']:+.4f} ± {d['std']:.4f} (t {d['t']:.1f})")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, results: Sequence[RunResult], summary: dict[str, Any], context: dict[str, Any],
                  header: str) -> tuple[Path, Path]:
    """``ablation.json`` (context, summary, every run's numbers and curves) and ``ablation.md`` in ``out``."""
    from core.files import atomic_write

    out = Path(out)
    doc = {**context, "summary": summary, "runs": [asdict(r) for r in results]}
    json_path = atomic_write(out / "ablation.json", json.dumps(doc, indent=1, allow_nan=True) + "\n")
    md_path = atomic_write(out / "ablation.md", markdown(summary, header))
    return json_path, md_path


def run_ablation(rows: pd.DataFrame, tokens: np.ndarray, meta: dict[str, Any], splits: str | Path,
                 holdout: Sequence[int], choices: Sequence[ExpertChoice], configs: Sequence[str],
                 seeds: Sequence[int], recipe_weights: Mapping[str, float], objective_settings: ObjectiveSettings,
                 settings: TrainSettings, curve: bool = True, progress: bool = False, min_cell_rows: int = 0,
                 on_result: Callable[[RunResult], None] | None = None) -> tuple[list[RunResult], dict[str, Any]]:
    """Every configuration at every seed; returns the runs and the fold's description."""
    weights = {c: config_weights(c, recipe_weights) for c in configs}  # unknown configurations fail first
    fold = make_fold(rows, tokens, meta, splits, holdout, choices, min_cell_rows)
    templates = head_templates(meta, choices)
    results = []
    for seed in seeds:
        for config in configs:
            result = run_one(fold, templates, config, weights[config], objective_settings, settings, seed,
                             curve=curve, progress=progress)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results, fold.description


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="a token cache folder written by train/token_cache.py")
    p.add_argument("--splits", type=Path, default=Path("runs/clusters_v1/splits.csv"),
                   help="splits.csv of data_prep/cluster.py (default: %(default)s)")
    p.add_argument("--holdout", type=int, nargs="+", default=[3, 6],
                   help="clusters held out of training, each reported (default: 3 6)")
    p.add_argument("--experts", nargs="+", default=list(DEFAULT_EXPERTS),
                   help="head-only experts, HEAD:LAYER[,LAYER...] with HEAD lib or linear "
                        f"(default: {' '.join(DEFAULT_EXPERTS)})")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                   help=f"loss configurations, of {' '.join(CONFIGS)} (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE,
                   help="the recipe whose loss_weights weigh the added losses (default: train/configs/recipe.yaml)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--min-cell-rows", type=int, default=0,
                   help="leave out of training the (set, class) cells with fewer training rows than this: the "
                        "balanced sampler gives each cell equal mass (default: 0, keep every cell)")
    p.add_argument("--no-curve", action="store_true",
                   help="skip scoring the held-out clusters after every epoch (the convergence curve)")
    p.add_argument("--out", type=Path, default=Path("runs/loss_ablation"),
                   help="folder for ablation.json and ablation.md (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        print("error: --epochs and --batch-size must be at least 1", file=sys.stderr)
        return 2

    from core.device import DeviceError, set_threads
    from core.labels import LabelsError
    from core.progress import write_line
    from train.token_cache import load_cache

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay)
    try:
        threads = set_threads(args.threads)
        choices = [ExpertChoice.parse(e) for e in args.experts]
        recipe_weights, objective_settings = read_recipe(args.recipe)
        rows, tokens, meta = load_cache(args.cache)
        command = "python " + " ".join(shlex.quote(a) for a in ["evaluation/loss_ablation.py",
                                                                *(sys.argv[1:] if argv is None else argv)])
        header = (f"## Loss ablation: {' '.join(args.configs)}\n\n`{command}`\n\n"
                  f"Experts {' '.join(c.key for c in choices)} on {args.cache}; held out clusters "
                  f"{' '.join(map(str, args.holdout))} of {args.splits}; {settings.epochs} epochs of batch "
                  f"{settings.batch_size}, lr {settings.lr}, seeds {' '.join(map(str, args.seeds))}, "
                  f"{threads} thread(s)"
                  + (f"; (set, class) cells under {args.min_cell_rows} training rows left out" if args.min_cell_rows
                     else "") + ".\n")
        print(header)

        context = {"command": command, "cache": str(args.cache), "splits": str(args.splits),
                   "holdout": args.holdout, "experts": [c.key for c in choices],
                   "configs": {c: config_weights(c, recipe_weights) for c in args.configs},
                   "recipe": str(args.recipe), "objective": asdict(objective_settings), "train": asdict(settings),
                   "seeds": args.seeds, "threads": threads, "min_cell_rows": args.min_cell_rows,
                   "sampler": "balanced: rows drawn with replacement with train.heads.balanced_weights probabilities"}
        done: list[RunResult] = []

        def report(r: RunResult) -> None:
            done.append(r)  # every finished run is on disk at once: a long ablation cut short keeps its runs
            write_outputs(args.out, done, summarise(done), {**context, "finished": False}, header)
            parts = [f"{name.split(' (')[0]} AUC {m['ensemble']['auc']:.4f} TPR {m['ensemble'][TPR_KEY]:.4f}"
                     for name, m in r.metrics.items()]
            write_line(f"{r.config} seed {r.seed}: {r.seconds:.0f} s, final loss {r.loss_curve[-1]:.4f}; "
                       + "; ".join(parts), file=sys.stdout)

        results, description = run_ablation(rows, tokens, meta, args.splits, args.holdout, choices, args.configs,
                                            args.seeds, recipe_weights, objective_settings, settings,
                                            curve=not args.no_curve, progress=not args.quiet,
                                            min_cell_rows=args.min_cell_rows, on_result=report)
    except (AblationError, DeviceError, FileNotFoundError, LabelsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarise(results)
    context = {**context, "fold": description, "finished": True}
    json_path, md_path = write_outputs(args.out, results, summary, context, header)
    print(markdown(summary))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
