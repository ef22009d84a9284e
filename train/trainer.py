"""The joint training loop behind ``train/joint.py``: experts, objective, optimiser, EMAs, validation, weights.

What each expert trains and validates on comes from ``train/data.py``: a group split of each labelled CSV,
or, with ``splits:``, the leave-one-cluster-out folds of ``data_prep/cluster.py`` (expert e trains on its
fold and is validated on the cluster it never saw). All experts see the same batches; their losses are
one module (``train/objective.py``), each has its own AdamW parameter groups and an EMA of its weights and
BatchNorm statistics (torch-ema). After each epoch the EMA weights are validated on images resized and
re-encoded at one JPEG quality for both classes; the ensemble with the best mean AUC is written,
atomically, in the weights format that ``infer.py`` loads. ``OUT_DIR/checkpoint.pt`` (every
``checkpoint_every`` steps and at each epoch end) holds everything a run needs to go on.

The command (``train/joint.py``) reads the options without importing any of this; problems with the config
or its data raise :class:`train.config.ConfigError` (or :class:`core.labels.LabelsError`,
:class:`core.device.DeviceError`), which the command turns into one ``error:`` line.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch_ema import ExponentialMovingAverage

from core.dataset import ImageDataset
from core.device import resolve_device
from core.files import atomic_write
from core.progress import progress_bar
from core.transforms import shortcut_free_eval_transform, train_transform
from scoring.metrics import detection_metrics
from experts import Ensemble, Expert, create_expert, save_ensemble
from scoring.pipeline import score_images
from train.checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from train.config import ConfigError, TrainConfig
from train.data import EpochSampler, Splits, build_splits, expert_key, sampling_weights
from core.distributed import barrier, broadcast, init_distributed, process_device, shutdown, world_size
from train.objective import JointObjective
from train.run_log import RunLog

METRICS = ("auc", "tpr@fpr1e-3", "eer", "acc@0.5", "ap")


# ---------------------------------------------------------------------------------------------- model
def build_experts(cfg: TrainConfig) -> dict[str, Expert]:
    """Experts keyed by a unique name (``key`` in the config, else the registry name); two experts with one
    key are a :class:`ConfigError`."""
    experts = {}
    for spec in cfg.experts:
        spec = dict(spec)
        name, pretrained = spec.pop("name"), spec.pop("pretrained", False)
        key = spec.pop("key", name)
        for training_only in ("weight", "fold", "lr_scale"):
            spec.pop(training_only, None)
        if key in experts:
            raise ConfigError(f"two experts are keyed {key!r}; give one a distinct `key`")
        experts[key] = create_expert(name, pretrained=pretrained, **spec)
    return experts


def build_objective(experts: dict[str, Expert], cfg: TrainConfig,
                    teachers: dict[str, list[str]] | None = None) -> JointObjective:
    """The joint objective of the config; ``teachers`` (``Splits.teachers``) keeps mutual learning within
    what each expert may learn from without seeing its validation rows (default: every other expert)."""
    try:
        return JointObjective(experts, cfg.loss_weights, cfg.loss_weighting, label_smoothing=cfg.label_smoothing,
                              noise_std=cfg.noise_std, adversarial_noise=cfg.adversarial_noise,
                              nce_temperature=cfg.nce_temperature, lib_temperature=cfg.lib_temperature,
                              lib_distance=cfg.lib_distance, teachers=teachers)
    except ValueError as e:  # loss weights, weighting or distance the config names wrongly
        raise ConfigError(str(e)) from None


def build_optimizer(objective: JointObjective, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the heads (and learned loss weights) at a higher rate; no weight decay on 1-D tensors.

    An expert's ``lr_scale`` (config entry, default 1) scales all its rates: a randomly initialised expert
    wants a larger step than a pretrained one trained beside it.
    """
    expert_scale = {expert_key(spec): float(spec.get("lr_scale", 1.0)) for spec in cfg.experts}
    groups = []
    for key, expert in objective.experts.items():
        for is_head in (False, True):
            params = [(n, p) for n, p in expert.named_parameters()
                      if p.requires_grad and n.startswith("head.") == is_head]
            scale = (cfg.head_lr_scale if is_head else 1.0) * expert_scale.get(key, 1.0)
            groups += [{"params": [p for _, p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                       {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    groups.append({"params": [p for p in objective.weighting.parameters() if p.requires_grad], "weight_decay": 0.0,
                   "lr_scale": cfg.head_lr_scale})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(n_images: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimiser steps in one epoch over ``n_images`` (capped by ``cfg.steps_per_epoch``); a pool smaller
    than one step is a :class:`ConfigError`."""
    images_per_step = cfg.batch_size * cfg.accum_steps * world
    steps = n_images // images_per_step
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"{n_images} training images is less than one step of {images_per_step} "
                          "(batch_size x accum_steps x processes)")
    return steps


@dataclass(frozen=True)
class FinishedRun:
    """A run in ``out_dir`` with nothing left to do under the config (see :func:`finished_run`)."""

    out_dir: Path
    epoch: int
    step: int
    best: float
    stopped_early: bool


def finished_run(cfg: TrainConfig) -> FinishedRun | None:
    """The run in ``cfg.out_dir`` when it has nothing left to do: it trained every step of ``cfg`` (or stopped
    early under ``cfg.patience``) and validated its last epoch. ``None`` when there is work left, no
    checkpoint, or ``resume`` is off.

    Only the checkpoint's counters are read (its tensors are memory-mapped, not loaded) and the data split
    is computed to count the steps of an epoch, so answering costs no model: a larger ``epochs`` than the run
    was trained with, or a larger ``patience``, leaves work to do and the run resumes.
    """
    path = Path(cfg.out_dir) / CHECKPOINT
    if not cfg.resume or not path.is_file():
        return None
    state = load_checkpoint(path, mmap=True)
    step = int(state["step"])
    if int(state.get("validated_step", step)) < step:  # killed during a validation: resuming repeats it
        return None
    per_epoch = steps_per_epoch(len(build_splits(cfg).pool), cfg, world_size())
    stopped_early = bool(cfg.patience) and int(state["bad_epochs"]) >= cfg.patience
    if step < cfg.epochs * per_epoch and not stopped_early:
        return None
    return FinishedRun(Path(cfg.out_dir), math.ceil(step / per_epoch), step, float(state["best"]), stopped_early)


# ------------------------------------------------------------------------------------------------ EMA
def ema_tensors(expert: Expert) -> list[torch.Tensor]:
    """What an expert's EMA averages: its trainable parameters, then its saved floating-point buffers.

    The buffers are BatchNorm's running means and variances. Averaging the parameters alone would validate
    and ship EMA weights beside the live statistics of the last step, which were gathered by other weights.
    Integer buffers (BatchNorm's step counter) cannot be averaged and stay live; non-persistent ones are
    constants (the input normalisation) and are left out.
    """
    saved = expert.state_dict(keep_vars=True)
    buffers = [b for name, b in expert.named_buffers() if name in saved and b.is_floating_point()]
    return [p for p in expert.parameters() if p.requires_grad] + buffers


def make_ema(expert: Expert, decay: float) -> ExponentialMovingAverage:
    """torch-ema's average of :func:`ema_tensors`, with its warm-up (``use_num_updates``)."""
    return ExponentialMovingAverage(ema_tensors(expert), decay=decay, use_num_updates=True)


def load_ema(ema: ExponentialMovingAverage, state: dict[str, Any], expert: Expert) -> None:
    """Restore an EMA from a checkpoint, also one written when the EMA held the parameters only.

    Such a checkpoint lists the parameters' averages first, as :func:`ema_tensors` still does; the buffers'
    averages then start from the live statistics the checkpoint has just restored into ``expert``.
    """
    stored, tensors = list(state["shadow_params"]), ema_tensors(expert)
    if len(stored) < len(tensors):
        state = {**state, "shadow_params": stored + [t.detach().clone() for t in tensors[len(stored):]],
                 "collected_params": None}
    ema.load_state_dict(state)


@contextmanager
def ema_weights(emas: dict[str, ExponentialMovingAverage]) -> Iterator[None]:
    """Every expert holds its EMA parameters and BatchNorm statistics inside; the live ones are back after."""
    with ExitStack() as stack:
        for ema in emas.values():
            stack.enter_context(ema.average_parameters())
        yield


# ------------------------------------------------------------------------------------- train and eval
def batch_inputs(batch: dict[str, Any], masks: dict[str, np.ndarray], device: torch.device
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Images per input size, targets and per-expert row masks of a loader batch, on ``device``.

    Unreadable images (reported by the dataset) are left out of every expert's losses.
    """
    ok = np.array([not e for e in batch["error"]])
    index = batch["index"].numpy()
    images = {s: x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
              for s, x in batch["images"].items()}
    row_masks = {k: torch.from_numpy(m[index] & ok).to(device) for k, m in masks.items()}
    return images, batch["target"].to(device), row_masks


def evaluate(experts: dict[str, Expert], emas: dict[str, ExponentialMovingAverage], splits: Splits,
             cfg: TrainConfig, device: torch.device) -> dict[str, dict[str, float]]:
    """Metrics of each expert and of the ensemble, per validation set, with the EMA weights and statistics.

    A set is scored only by the experts it is held out for (a fold's cluster by that fold's experts;
    extra validation CSVs by all). Scoring goes through the same code as ``infer.py`` (``score_images``),
    with the validation protocol's transform: resize, then one JPEG quality for both classes.
    """
    transform = partial(shortcut_free_eval_transform, jpeg_quality=cfg.val_jpeg_quality)
    weights = expert_weights(cfg)
    results: dict[str, dict[str, float]] = {}
    with ema_weights(emas):
        for set_name, df in splits.val.items():
            keys = splits.val_experts[set_name] or list(experts)
            ensemble = Ensemble({k: experts[k] for k in keys}, weights).eval()
            scores = list(score_images(ensemble, df["path"], batch_size=cfg.batch_size, workers=cfg.workers,
                                       device=device, progress=False, transform=transform))
            ok = np.array([not s.error for s in scores])
            targets = df["target"].to_numpy()[ok]
            for i, key in enumerate(keys):
                results[f"{set_name}/{key}"] = detection_metrics(targets, [s.expert_probs[i] for s in scores if not s.error])
            results[f"{set_name}/ensemble"] = detection_metrics(targets, [s.prob for s in scores if not s.error])
    for expert in experts.values():
        expert.train()
    return results


def expert_weights(cfg: TrainConfig) -> dict[str, float]:
    """Each expert's weight in the ensemble average (``weight`` in its config entry, default 1)."""
    return {expert_key(spec): float(spec.get("weight", 1.0)) for spec in cfg.experts}


def selection_score(results: dict[str, dict[str, float]], set_names: list[str]) -> float:
    """Mean ensemble AUC over the (non-test) validation sets: the number the best checkpoint is chosen by."""
    return float(np.nanmean([results[f"{s}/ensemble"]["auc"] for s in set_names]))


def write_weights(experts: dict[str, Expert], emas: dict[str, ExponentialMovingAverage], cfg: TrainConfig,
                  splits: Splits, results: dict[str, dict[str, float]], epoch: int, step: int, command: str) -> Path:
    """Save the EMA weights (and BatchNorm statistics) of every expert as a weights folder, with the run's
    record in the manifest."""
    out = Path(cfg.weights_out or Path(cfg.out_dir) / "weights")
    per_expert = {key: {"val_metrics": {k.split("/")[0]: v for k, v in results.items() if k.endswith(f"/{key}")}}
                  for key in experts}
    if cfg.splits:
        protocol = f"leave-one-cluster-out folds of {cfg.splits}: each expert on the cluster it never trained on"
        data = [cfg.splits]
    else:
        protocol = f"group-disjoint {cfg.val_fraction:.0%} of each training CSV"
        data = [e if isinstance(e, str) else e["csv"] for e in cfg.train]
    metadata = {
        "training": {"command": command, "config": cfg.to_dict(), "epoch": epoch, "step": step, "data": data,
                     "validation": f"{protocol}, resized and re-encoded at JPEG quality {cfg.val_jpeg_quality}",
                     "validation_sets": {k: v for k, v in splits.val_experts.items()},
                     "test_sets": list(splits.test)},
        "val_metrics": {k.split("/")[0]: v for k, v in results.items() if k.endswith("/ensemble")},
    }
    with ema_weights(emas):
        save_ensemble(experts, out, weights=expert_weights(cfg), metadata=metadata, expert_metadata=per_expert)
    return out


# ------------------------------------------------------------------------------------------ the run
class Trainer:
    """One run: the objective (DDP-wrapped under torchrun), optimiser, schedule, EMAs, data and logs."""

    def __init__(self, cfg: TrainConfig, command: str):
        self.cfg, self.command = cfg, command
        device = resolve_device(cfg.device)
        self.dist = init_distributed(device)
        self.device = process_device(device, self.dist)
        random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        self.splits = build_splits(cfg)
        self.steps_per_epoch = steps_per_epoch(len(self.splits.pool), cfg, self.dist.world)  # before any model
        self.experts = {k: e.to(self.device).to(memory_format=torch.channels_last)
                        for k, e in build_experts(cfg).items()}
        self.objective = build_objective(self.experts, cfg, self.splits.teachers).to(self.device)
        self.model = (DistributedDataParallel(self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                      if self.dist.enabled else self.objective)
        sizes = sorted({e.config.input_size for e in self.experts.values()})
        pool = self.splits.pool
        self.train_set = ImageDataset(pool["path"], {s: train_transform(s, cfg.aug_strength) for s in sizes},
                                      pool["target"], seed=cfg.seed)
        self.sampler = EpochSampler(len(pool), cfg.seed, sampling_weights(pool, cfg.balance),
                                    self.dist.rank, self.dist.world)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.objective, cfg)
        self.scheduler = cosine_with_warmup(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16)
                         if self.device.type == "cuda" and cfg.amp else nullcontext())
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and cfg.amp and cfg.amp_dtype == "fp16")
        self.emas = {k: make_ema(e, cfg.ema_decay) for k, e in self.experts.items()}
        self.step, self.best, self.bad_epochs = 0, -math.inf, 0
        self.validated_step = 0  # the step of the last finished validation: a kill during one repeats it
        self.ckpt_path = self.out_dir / CHECKPOINT
        if cfg.resume and self.ckpt_path.exists():
            self.load(load_checkpoint(self.ckpt_path))
        self.log = RunLog(self.out_dir, cfg.tensorboard, self.step) if self.dist.is_main else None

    # --------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain values: loadable with ``weights_only``)."""
        return dict(objective=self.objective.state_dict(), emas={k: m.state_dict() for k, m in self.emas.items()},
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), rng=rng_state(), step=self.step, best=self.best,
                    bad_epochs=self.bad_epochs, validated_step=self.validated_step, config=self.cfg.to_dict())

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` (a checkpoint)."""
        self.objective.load_state_dict(state["objective"])
        for k, ema in self.emas.items():
            load_ema(ema, state["emas"][k], self.experts[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.best, self.bad_epochs = int(state["step"]), float(state["best"]), int(state["bad_epochs"])
        self.validated_step = int(state.get("validated_step", self.step))  # older checkpoints: after validation
        if self.dist.is_main:
            print(f"resumed from {self.ckpt_path} at step {self.step}/{self.total_steps} "
                  f"(best ensemble AUC {self.best:.4f})")

    def checkpoint(self) -> None:
        """Write :meth:`state` to ``OUT_DIR/checkpoint.pt`` (rank 0, atomically)."""
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, **self.state())

    # ------------------------------------------------------------------------------------ training
    def optimizer_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """Accumulate the gradients of ``accum_steps`` micro-batches, then one clipped optimiser step."""
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            images, target, masks = batch_inputs(batch, self.splits.masks, self.device)
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with self.autocast:
                    total, terms = self.model(images, target, masks)
                self.scaler.scale(total / len(micro_batches)).backward()
            for k, v in {"loss": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for ema in self.emas.values():
            ema.update()
        self.step += 1
        return sums

    def train_epoch(self) -> None:
        """Train from the current step to the end of its epoch (or of the run)."""
        cfg = self.cfg
        epoch, start = divmod(self.step, self.steps_per_epoch)
        self.sampler.epoch, self.sampler.start = epoch, start * cfg.batch_size * cfg.accum_steps
        self.train_set.epoch = epoch
        # The loader's own generator: creating it mid-epoch on resume must not draw from the global RNG,
        # or the resumed run's noise would differ from the uninterrupted one's.
        loader = iter(DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=cfg.workers, drop_last=True, pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.seed)))
        bar = progress_bar(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="step", enabled=self.dist.is_main)
        seen, t0 = 0, time.perf_counter()
        while True:
            values = self.optimizer_step([next(loader) for _ in range(cfg.accum_steps)])
            seen += cfg.batch_size * cfg.accum_steps * self.dist.world
            rate = seen / (time.perf_counter() - t0)
            bar.update()
            bar.set_postfix({"loss": f"{values['loss']:.3f}", "img/s": f"{rate:.1f}",
                             "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"})
            if self.log and (self.step % cfg.log_every == 0 or self.step == 1):
                weights = {f"weight/{k}": v for k, v in self.objective.weighting.current_weights().items()}
                self.log.train_step(self.step, {**values, **weights, "lr": self.scheduler.get_last_lr()[0], "img/s": rate})
            if self.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                break
        bar.close()

    def epoch_awaits_validation(self) -> bool:
        """An epoch's last step is done but not yet validated: always after training one, and after a resume
        from the checkpoint that step wrote when the run was killed during its validation."""
        at_epoch_end = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
        return self.step > self.validated_step and at_epoch_end

    def end_epoch(self) -> tuple[bool, dict[str, dict[str, float]]]:
        """Validate (rank 0), keep the best weights, decide on early stopping; returns (stop, results)."""
        epoch = (self.step - 1) // self.steps_per_epoch + 1
        results: dict[str, dict[str, float]] = {}
        stop = False
        self.validated_step = self.step
        if self.dist.is_main:
            results = evaluate(self.experts, self.emas, self.splits, self.cfg, self.device)
            score = selection_score(results, self.splits.selection_sets)
            self.log.epoch(epoch, self.step, {"score": score, **{f"{k}/{m}": v[m] for k, v in results.items() for m in METRICS}})
            print(f"epoch {epoch}: " + ", ".join(f"{k} AUC {v['auc']:.4f}" for k, v in results.items()))
            if score > self.best:
                self.best, self.bad_epochs = score, 0
                out = write_weights(self.experts, self.emas, self.cfg, self.splits, results, epoch, self.step, self.command)
                print(f"new best mean ensemble AUC {self.best:.4f}: EMA weights written to {out}")
            else:
                self.bad_epochs += 1
                stop = bool(self.cfg.patience) and self.bad_epochs >= self.cfg.patience
                if stop:
                    print(f"early stop: no better validation score for {self.bad_epochs} epochs (best {self.best:.4f})")
            self.checkpoint()
        barrier(self.dist)
        stop = broadcast(stop, self.dist)
        self.bad_epochs = broadcast(self.bad_epochs, self.dist)
        return stop, results

    def fit(self) -> dict[str, dict[str, float]]:
        """Train and validate to the end of the run (or an early stop); the last epoch's validation results
        (empty when this call validated nothing)."""
        results: dict[str, dict[str, float]] = {}
        if self.cfg.patience and self.bad_epochs >= self.cfg.patience:
            if self.dist.is_main:
                print(f"{self.out_dir}: this run already stopped early; nothing to do")
            return results
        if self.dist.is_main:
            print(f"training {', '.join(self.experts)} on {len(self.splits.pool)} images ({self.steps_per_epoch} steps "
                  f"x {self.cfg.epochs} epochs, {self.dist.world} process(es)) on {self.device}; validating on "
                  + ", ".join(f"{k} ({len(v)})" for k, v in self.splits.val.items()))
            print("losses: " + ", ".join(self.objective.weighting.names))
        for expert in self.experts.values():
            expert.train()
        while True:
            if self.epoch_awaits_validation():
                stop, results = self.end_epoch()
                if stop:
                    break
            if self.step >= self.total_steps:
                break
            self.train_epoch()
        if self.log:
            self.log.close()
        return results


def run(cfg: TrainConfig, command: str) -> dict[str, dict[str, float]]:
    """Train ``cfg`` (resuming from ``OUT_DIR/checkpoint.pt`` when there is one); ``command`` is recorded in the
    weights' manifest. Returns the last validation's results, as :meth:`Trainer.fit`."""
    trainer = Trainer(cfg, command)
    try:
        return trainer.fit()
    finally:
        shutdown(trainer.dist)
