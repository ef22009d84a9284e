"""Train one or more experts jointly and write the best EMA ensemble as a weights folder.

    python train/joint.py train/configs/default.yaml                 # the shipped default model
    python train/joint.py train/configs/smoke.yaml --epochs=1        # a tiny run that finishes in seconds
    python train/joint.py CONFIG --out_dir=runs/x --lr=1e-4          # any option overrides the YAML
    python train/joint.py --help                                     # every option

Each labelled CSV is split by group (DFDC videos stay on one side) into train and validation parts. All
experts see the same batches; each has its own cross-entropy loss, optimiser parameter group and EMA of its
weights (torch-ema). Validation uses the EMA weights on images resized and re-encoded at one JPEG quality
for both classes, and the ensemble with the best mean AUC over the validation sets is written, atomically,
in the weights format that ``infer.py`` loads. ``OUT_DIR/checkpoint.pt`` is written every few hundred steps
and at each epoch end; running the same command again resumes from it.
"""
from __future__ import annotations

import csv
import math
import os
import random
import shlex
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python train/joint.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Sampler
from torch_ema import ExponentialMovingAverage
from tqdm import tqdm

from data_prep.dataset import ImageDataset
from data_prep.labels import read_labels, split_by_group
from data_prep.transforms import shortcut_free_eval_transform, train_transform
from evaluation.metrics import detection_metrics
from evaluation.scoring import score_images
from experts import Ensemble, Expert, create_expert, save_ensemble
from experts.device import DeviceError, resolve_device
from train.config import TrainConfig, load_config

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Splits:
    train: pd.DataFrame
    val: dict[str, pd.DataFrame]  # validation set name -> rows


def build_splits(cfg: TrainConfig) -> Splits:
    """Group-disjoint train/validation parts of every training CSV, plus the extra validation CSVs."""
    if not cfg.train:
        raise SystemExit("error: no training data; set `train: [{csv: path/to/labels.csv}]` in the config")
    parts, val = [], {}
    for entry in cfg.train:
        entry = {"csv": entry} if isinstance(entry, str) else entry
        df = read_labels(entry["csv"])
        train_df, val_df = split_by_group(df, cfg.val_fraction)
        parts.extend([train_df] * int(entry.get("repeat", 1)))
        val[_set_name(entry["csv"])] = val_df
    for entry in cfg.val_extra:
        path = entry if isinstance(entry, str) else entry["csv"]
        val[_set_name(path)] = read_labels(path)
    if cfg.max_val_images:
        val = {k: v.sample(n=min(len(v), cfg.max_val_images), random_state=cfg.seed) for k, v in val.items()}
    return Splits(pd.concat(parts, ignore_index=True), val)


def _set_name(csv_path: str) -> str:
    return Path(csv_path).resolve().parent.name


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch), that can start mid-epoch when resuming."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.n, generator=g)[self.start:].tolist()

    def __len__(self) -> int:
        return self.n - self.start


def make_loader(dataset: ImageDataset, cfg: TrainConfig, sampler: Sampler) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True)


# ---------------------------------------------------------------------------------------------- model
def build_experts(cfg: TrainConfig) -> dict[str, Expert]:
    """Experts keyed by a unique name (``key`` in the config, else the registry name)."""
    experts = {}
    for spec in cfg.experts:
        spec = dict(spec)
        name, pretrained = spec.pop("name"), spec.pop("pretrained", False)
        key = spec.pop("key", name)
        spec.pop("weight", None)
        if key in experts:
            raise SystemExit(f"error: two experts are keyed {key!r}; give one a distinct `key`")
        experts[key] = create_expert(name, pretrained=pretrained, **spec)
    return experts


def build_optimizer(experts: dict[str, Expert], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the heads at a higher rate; no weight decay on norms and biases (1-D tensors)."""
    groups = []
    for expert in experts.values():
        for is_head in (False, True):
            params = [(n, p) for n, p in expert.named_parameters()
                      if p.requires_grad and n.startswith("head.") == is_head]
            scale = cfg.head_lr_scale if is_head else 1.0
            decay = [p for n, p in params if p.ndim > 1]
            no_decay = [p for n, p in params if p.ndim <= 1]
            groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------- train and eval
def train_step(experts: dict[str, Expert], batch: dict[str, Any], device: torch.device, cfg: TrainConfig,
               autocast) -> dict[str, torch.Tensor]:
    """Cross-entropy of every expert on the batch; returns the per-expert losses (summed for backward)."""
    ok = torch.tensor([not e for e in batch["error"]])
    target = batch["target"][ok].to(device)
    losses = {}
    with autocast:
        for key, expert in experts.items():
            images = batch["images"][expert.config.input_size][ok].to(device, non_blocking=True)
            logits, _ = expert(images.contiguous(memory_format=torch.channels_last))
            losses[key] = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    return losses


def evaluate(experts: dict[str, Expert], emas: dict[str, ExponentialMovingAverage], val: dict[str, pd.DataFrame],
             cfg: TrainConfig, device: torch.device) -> dict[str, dict[str, float]]:
    """Metrics of each expert and of the ensemble, per validation set, with the EMA weights.

    Scoring goes through the same code as ``infer.py`` (``score_images``), with the validation protocol's
    transform: resize, then one JPEG quality for both classes.
    """
    ensemble = Ensemble(experts, expert_weights(cfg))
    transform = partial(shortcut_free_eval_transform, jpeg_quality=cfg.val_jpeg_quality)
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        for key in experts:
            stack.enter_context(emas[key].average_parameters())
        ensemble.eval()
        for set_name, df in val.items():
            scores = list(score_images(ensemble, df["path"], batch_size=cfg.batch_size, workers=cfg.workers,
                                       device=device, progress=False, transform=transform))
            ok = np.array([not s.error for s in scores])
            targets = df["target"].to_numpy()[ok]
            for i, key in enumerate(experts):
                results[f"{set_name}/{key}"] = detection_metrics(targets, [s.expert_probs[i] for s in scores if not s.error])
            results[f"{set_name}/ensemble"] = detection_metrics(targets, [s.prob for s in scores if not s.error])
    ensemble.train()
    return results


def expert_weights(cfg: TrainConfig) -> dict[str, float]:
    """Each expert's weight in the ensemble average (``weight`` in its config entry, default 1)."""
    return {spec.get("key", spec["name"]): float(spec.get("weight", 1.0)) for spec in cfg.experts}


def selection_score(results: dict[str, dict[str, float]], set_names: list[str]) -> float:
    """Mean ensemble AUC over the validation sets: the number the best checkpoint is chosen by."""
    return float(np.nanmean([results[f"{s}/ensemble"]["auc"] for s in set_names]))


# ------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict[str, Any]:
    _, np_keys, np_pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
            "python": random.getstate()[1], "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically (temp file + rename) so that a kill mid-save keeps the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: tensors and plain containers only, nothing executable.
    return torch.load(path, map_location="cpu", weights_only=True)


def write_weights(experts: dict[str, Expert], emas: dict[str, ExponentialMovingAverage], cfg: TrainConfig,
                  results: dict[str, dict[str, float]], epoch: int, step: int, command: str) -> Path:
    """Save the EMA weights of every expert as a weights folder, with the run's record in the manifest."""
    out = Path(cfg.weights_out or Path(cfg.out_dir) / "weights")
    per_expert = {key: {"val_metrics": {k.split("/")[0]: v for k, v in results.items() if k.endswith(f"/{key}")}}
                  for key in experts}
    metadata = {
        "training": {"command": command, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                     "data": [e if isinstance(e, str) else e["csv"] for e in cfg.train],
                     "validation": f"group-disjoint {cfg.val_fraction:.0%} of each training CSV, "
                                   f"resized and re-encoded at JPEG quality {cfg.val_jpeg_quality}"},
        "val_metrics": {k.split("/")[0]: v for k, v in results.items() if k.endswith("/ensemble")},
    }
    with ExitStack() as stack:
        for key in experts:
            stack.enter_context(emas[key].average_parameters())
        save_ensemble(experts, out, weights=expert_weights(cfg), metadata=metadata, expert_metadata=per_expert)
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = load_config(argv, description=__doc__)
    command = "python train/joint.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    try:
        device = resolve_device(cfg.device)
    except DeviceError as e:
        raise SystemExit(f"error: {e}") from None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp else nullcontext())

    splits = build_splits(cfg)
    experts = {k: e.to(device).to(memory_format=torch.channels_last) for k, e in build_experts(cfg).items()}
    sizes = sorted({e.config.input_size for e in experts.values()})
    train_set = ImageDataset(splits.train["path"], {s: train_transform(s, cfg.aug_strength) for s in sizes},
                             splits.train["target"], seed=cfg.seed)
    sampler = EpochSampler(len(train_set), cfg.seed)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images is less than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(experts, cfg)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    emas = {k: ExponentialMovingAverage([p for p in e.parameters() if p.requires_grad], decay=cfg.ema_decay,
                                        use_num_updates=True) for k, e in experts.items()}

    step, best, log_rows = 0, -math.inf, []
    ckpt_path = out_dir / CHECKPOINT
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        for k, e in experts.items():
            e.load_state_dict(state["experts"][k])
            emas[k].load_state_dict(state["emas"][k])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, best = int(state["step"]), float(state["best"])
        print(f"resumed from {ckpt_path} at step {step}/{total_steps} (best ensemble AUC {best:.4f})")

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, experts={k: e.state_dict() for k, e in experts.items()},
                        emas={k: m.state_dict() for k, m in emas.items()}, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), rng=rng_state(), step=step, best=best,
                        config=cfg.to_dict())

    print(f"training {', '.join(experts)} on {len(train_set)} images ({steps_per_epoch} steps x {cfg.epochs} "
          f"epochs) on {device}; validating on " + ", ".join(f"{k} ({len(v)})" for k, v in splits.val.items()))
    for e in experts.values():
        e.train()
    results: dict[str, dict[str, float]] = {}
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        sampler.epoch, sampler.start, train_set.epoch = epoch, start * cfg.batch_size, epoch
        bar = tqdm(make_loader(train_set, cfg, sampler), total=steps_per_epoch, initial=start,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        for batch in bar:
            losses = train_step(experts, batch, device, cfg, autocast)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            for ema in emas.values():
                ema.update()
            step += 1
            seen += len(batch["target"])
            bar.set_postfix({**{k: f"{v.item():.3f}" for k, v in losses.items()},
                             "img/s": f"{seen / (time.perf_counter() - t0):.1f}",
                             "lr": f"{scheduler.get_last_lr()[0]:.2e}"})
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            if step % steps_per_epoch == 0 or step >= total_steps:
                break
        bar.close()

        results = evaluate(experts, emas, splits.val, cfg, device)
        score = selection_score(results, list(splits.val))
        row = {"epoch": epoch + 1, "step": step, "loss": float(loss.item()), "score": score,
               **{f"{k}/{m}": v[m] for k, v in results.items() for m in ("auc", "tpr@fpr1e-3", "eer", "acc@0.5")}}
        log_rows.append(row)
        _append_log(out_dir / "log.csv", row)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} AUC {v['auc']:.4f}" for k, v in results.items()))
        if score > best:
            best = score
            out = write_weights(experts, emas, cfg, results, epoch + 1, step, command)
            print(f"new best mean ensemble AUC {best:.4f}: EMA weights written to {out}")
        checkpoint()
    return results


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
