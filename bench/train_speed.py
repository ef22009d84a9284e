"""Training throughput of each expert, and of the ways to train a CLIP tower on a CPU: images/s, epoch time.

    python bench/train_speed.py                                      # the CPU-sized experts, batch 16
    python bench/train_speed.py efficientnet_lite0 convnextv2_tiny clip_vit_l14 --device cuda --batch-size 32
    python bench/train_speed.py clip_vit_b16:lib:layernorm           # a CLIP with a LIB head, LN-tuned

The options for training a CLIP ViT-B/16 expert on this CPU, in one run:

    python bench/train_speed.py clip_vit_b16:layernorm clip_vit_b16:layernorm@160 clip_vit_b16:layernorm@112 \\
        clip_vit_b16:last2 clip_vit_b16:frozen clip_vit_b16:depth6:fwd clip_vit_b16:depth8:fwd \\
        clip_vit_b16:depth10:fwd clip_vit_b16:depth12:fwd --batch-size 16 --steps 3 --threads 2

(``--experts SPEC ...`` is the older spelling of the positional specs and still works.)

**Specs**: ``NAME[:FLAG...][@SIZE]``, ``NAME`` a registry name (``experts/``), then any of

* ``lib``: a LIB head (``head="lib"``), trained with the LIB losses in "all losses";
* ``layernorm``: LN-tuning (``tuning="layernorm"``, L2-normalised features): only the LayerNorms and the head
  learn, but the gradient still flows back through every block to the first LayerNorm: a full backward pass;
* ``lastK`` (CLIP): tune only the last ``K`` transformer blocks (``frozen_stages = depth - K``: the patch
  embedding, the pre-LayerNorm and the first blocks frozen, so the backward pass stops ``K`` blocks deep);
* ``frozenN``: ``frozen_stages = N``, in the family's own stages (any family);
* ``depthN`` (CLIP): the tower truncated to its first ``N`` blocks (``backbone_config`` ``num_hidden_layers``;
  with pretrained weights, the first ``N`` blocks of the base);
* ``@SIZE``: input size in pixels (the CLIP expert interpolates its position embeddings: 160 px gives 10 x 10
  patches instead of 14 x 14);

and at most one mode (default: train):

* train: full optimiser steps as ``train/joint.py`` runs them (forward and losses through
  ``train/objective.py``, backward, AdamW, EMA), once with CE only and once with every loss (CE, KL to a
  noisy copy, NCE, and the LIB losses for a LIB head); two rows;
* ``frozen``: the frozen-tower route of ``train/token_cache.py`` and ``train/heads.py``: (1) the tower's
  forward pass over a batch as the token cache runs it (every layer's class token and ``g x g`` region means,
  :meth:`experts.clip.ClipExpert.layer_tokens`), paid once per image; (2) ``train.heads.fit_head`` of the
  expert's head on ``--head-rows`` random features of the width it reads, for ``--head-epochs`` epochs, in
  image-epochs/s (a non-CLIP expert's forward pass is its ``forward_features``);
* ``fwd``: forward only (inference mode, the expert and its head), images/s.

Weights are random (``pretrained=False``): speed does not depend on them, and nothing is fetched. Images are
random tensors of the expert's input size (decoding and augmentation are the data loader's cost, measured by
``bench/infer_speed.py``). Each timing follows one untimed warm-up step. On CUDA the run uses bf16 autocast
and channels-last, like training.

The table gives, per row, what was timed, the input size, the depth (CLIP: transformer blocks), the
trainable parameters, images/s (image-epochs/s for a head on cached features) and what one epoch over
10,000 images takes: for training, at that row's images/s; for the frozen tower, the one-off cache pass
(marked "once") and a head epoch. A line under the table adds up a frozen-tower training: the cache once,
then ``HeadSpec.epochs`` head epochs (``train/heads.py``'s default).

**CPU use** (last column) is the process's CPU seconds, every thread, per wall-clock second and per
torch thread, over the timed part: near 100% when the run had its cores to itself, about 50% when another
process took one of two cores (Linux gives each login session its fair share, whatever the ``nice`` of its
processes): that row's images/s are then too low, and should be measured again on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from core.protocol import DEFAULT_DEVICE

if TYPE_CHECKING:  # the heavy imports happen in the functions: --help stays instant
    import torch

ALL_LOSSES = {"ce": 1.0, "kl_noise": 1.0, "nce": 0.1, "lib_global": 1.0, "lib_local": 0.5}
DEFAULT_EXPERTS = ["efficientnet_lite0", "convnext_atto", "clip_vit_b16:lib:layernorm"]
MODES = ("train", "frozen", "fwd")
EPOCH_IMAGES = 10_000
HEADERS = ["spec", "timed", "input px", "depth", "trainable params", "images/s", f"epoch of {EPOCH_IMAGES:,} images",
           "CPU use"]
_NUMBERED = re.compile(r"(last|frozen|depth)(\d+)")


class SpecError(ValueError):
    """A spec string that names no expert, a flag that does not exist, or flags that contradict each other."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec (see the module docstring): what to build, and how to time it."""

    text: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    mode: str = "train"

    def build(self) -> Any:
        """The expert of this spec, with random weights."""
        from experts import create_expert

        return create_expert(self.name, pretrained=False, **self.overrides)

    @property
    def lib(self) -> bool:
        return self.overrides.get("head") == "lib"


def _fail(spec: str, why: str) -> SpecError:
    return SpecError(f"{spec}: {why}")


def parse_spec(text: str) -> Spec:
    """``NAME[:FLAG...][@SIZE]`` -> :class:`Spec`; a bad spec raises :class:`SpecError` naming it and why.

    ``lastK`` and ``depthN`` need the expert's own depth and architecture: they are read from the expert built
    on the ``meta`` device (no memory, no init time).
    """
    import torch

    from experts import create_expert, list_experts

    body, at, size = text.partition("@")
    name, *flags = body.split(":")
    if name not in list_experts():
        raise _fail(text, f"unknown expert {name!r}; registered: {', '.join(list_experts())}")
    overrides: dict[str, Any] = {}
    mode, last, depth, tuning = "train", None, None, []
    if at:
        if not size.isdigit() or int(size) < 1:
            raise _fail(text, f"@{size}: the input size must be a positive whole number of pixels")
        overrides["input_size"] = int(size)
    for flag in flags:
        numbered = _NUMBERED.fullmatch(flag)
        if flag == "lib":
            overrides["head"] = "lib"
        elif flag == "layernorm":
            overrides.update(tuning="layernorm", normalize_features=True)
            tuning.append(flag)
        elif flag in MODES[1:]:
            if mode != "train":
                raise _fail(text, f"two modes ({mode}, {flag}); give at most one of {', '.join(MODES[1:])}")
            mode = flag
        elif numbered:
            kind, n = numbered.group(1), int(numbered.group(2))
            if kind == "last":
                if n < 1:
                    raise _fail(text, "last0 trains no block; use :frozen for a frozen tower")
                last = n
                tuning.append(flag)
            elif kind == "frozen":
                overrides["frozen_stages"] = n
                tuning.append(flag)
            else:
                if n < 1:
                    raise _fail(text, "a tower needs at least one block (depth1 or more)")
                depth = n
        else:
            raise _fail(text, f"unknown flag {flag!r} (lib, layernorm, lastK, frozenN, depthN, frozen, fwd; @SIZE)")
    if mode != "train" and tuning:
        raise _fail(text, f"{', '.join(tuning)} only apply to training; {mode} trains no tower parameter")
    if last is not None and "frozen_stages" in overrides:
        raise _fail(text, "lastK and frozenN both set the frozen stages; give one")
    if last is not None or depth is not None:
        with torch.device("meta"):
            probe = create_expert(name, pretrained=False, **overrides)
        arch = probe.config.backbone_config
        if probe.config.family != "clip" or not arch or "num_hidden_layers" not in arch:
            raise _fail(text, "lastK and depthN count transformer blocks: CLIP experts only")
        if depth is not None:
            overrides["backbone_config"] = {**arch, "num_hidden_layers": depth}
        if last is not None:
            blocks = depth or arch["num_hidden_layers"]
            if last > blocks:
                raise _fail(text, f"last{last}: the tower has {blocks} blocks")
            overrides["frozen_stages"] = blocks - last
    if mode == "frozen":
        overrides["normalize_features"] = True  # as train/heads.py builds the expert whose head it trains
    return Spec(text, name, overrides, mode)


def parse_expert(spec: str) -> tuple[str, dict]:
    """``(registry name, ExpertConfig overrides)`` of a spec (:func:`parse_spec` without the mode)."""
    parsed = parse_spec(spec)
    return parsed.name, dict(parsed.overrides)


@dataclass
class Row:
    """One timing: ``rate`` images/s (image-epochs/s for a head), and what the epoch column shows."""

    spec: str
    timed: str
    input_size: int
    layers: int | None
    trainable: int | None
    rate: float
    epoch: str  # "" for no epoch (forward only), else how an epoch over EPOCH_IMAGES reads
    seconds_per_epoch: float | None = None
    cpu_use: float | None = None  # Timing.cpu_use of the timed part (None on CUDA)


@dataclass
class Timing:
    """Wall-clock and process CPU seconds (every thread) of a timed part, run with ``threads`` torch threads."""

    wall: float
    cpu: float
    threads: int
    cuda: bool = False

    @property
    def cpu_use(self) -> float | None:
        """CPU seconds per wall second per torch thread: near 1 when the process had its cores to itself, about
        0.5 when another process took half of them (its images/s are then too low); None on CUDA."""
        return None if self.cuda else self.cpu / (self.wall * self.threads)


def duration(seconds: float) -> str:
    """``12.3 s``, ``12.3 min`` or ``2.15 h``."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _autocast(device: torch.device) -> Any:
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class _Clock:
    """``with _Clock(device) as clock:`` ... then ``clock.timing``: the block's wall and CPU time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> _Clock:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.timing = Timing(time.perf_counter() - self.start, time.process_time() - self.start_cpu,
                             torch.get_num_threads(), self.cuda)


def _timed(step: Callable[[], object], repeats: int, device: torch.device) -> Timing:
    """The :class:`Timing` of ``repeats`` calls of ``step`` after one untimed warm-up call."""
    step()  # warm-up: allocations, oneDNN / cuDNN choices
    with _Clock(device) as clock:
        for _ in range(repeats):
            step()
    return clock.timing


def _depth(expert: Any) -> int | None:
    return (expert.config.backbone_config or {}).get("num_hidden_layers")


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _images(batch_size: int, size: int, device: torch.device) -> torch.Tensor:
    import torch

    return torch.rand(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)


def images_per_second(spec: str | Spec, losses: dict[str, float], batch_size: int, steps: int,
                      device: torch.device) -> float:
    """Images/s of ``steps`` full training steps of ``spec``'s expert with ``losses`` (after a warm-up step)."""
    return train_rate(spec if isinstance(spec, Spec) else parse_spec(spec), losses, batch_size, steps, device)[0]


def train_rate(spec: Spec, losses: dict[str, float], batch_size: int, steps: int,
               device: torch.device) -> tuple[float, Any, Timing]:
    """``(images/s, expert, timing)`` of full training steps, as ``train/joint.py`` takes them."""
    import torch
    from torch_ema import ExponentialMovingAverage

    from train.objective import JointObjective

    name = spec.name
    torch.manual_seed(0)
    expert = spec.build().to(device).to(memory_format=torch.channels_last).train()
    objective = JointObjective({name: expert}, losses).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ema = ExponentialMovingAverage([p for p in expert.parameters() if p.requires_grad], decay=0.995)
    size = expert.config.input_size
    images = {size: _images(batch_size, size, device)}
    target = torch.arange(batch_size, device=device) % 2
    masks = {name: torch.ones(batch_size, dtype=torch.bool, device=device)}
    autocast = _autocast(device)

    def step() -> None:
        with autocast:
            total, _ = objective(images, target, masks)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()

    timing = _timed(step, steps, device)
    return batch_size * steps / timing.wall, expert, timing


def forward_rate(spec: Spec, batch_size: int, steps: int, device: torch.device,
                 as_cache: bool) -> tuple[float, Any, Timing]:
    """``(images/s, expert, timing)`` of inference-mode forward passes: the expert with its head, or (``as_cache``)
    what ``train/token_cache.py`` computes per batch (every layer's tokens of a CLIP tower)."""
    import torch

    from experts.clip import ClipExpert

    torch.manual_seed(0)
    expert = spec.build().to(device).to(memory_format=torch.channels_last).eval()
    x = _images(batch_size, expert.config.input_size, device)
    autocast = _autocast(device)
    if as_cache and isinstance(expert, ClipExpert):
        layers = list(range(1, _depth(expert) + 1))

        def run() -> Any:
            return expert.layer_tokens(expert.normalize(x), layers, expert.config.lib_grid)
    elif as_cache:
        def run() -> Any:
            return expert.forward_features(x)
    else:
        def run() -> Any:
            return expert(x)

    def step() -> None:
        with torch.inference_mode(), autocast:
            run()

    timing = _timed(step, steps, device)
    return batch_size * steps / timing.wall, expert, timing


def head_rate(expert: Any, rows: int, epochs: int) -> tuple[float, int, Timing]:
    """``(image-epochs/s, head parameters, timing)`` of ``train.heads.fit_head`` training ``expert``'s head on ``rows``
    random features of the width the head reads, ``epochs`` epochs (after a one-epoch warm-up fit); on CPU,
    as ``train/heads.py`` trains."""
    import numpy as np
    import torch

    from train.heads import HeadSpec, fit_head

    head = HeadSpec(layers=[_depth(expert) or 1], head=expert.config.head)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(rows, expert.num_features, generator=generator)
    targets = (np.arange(rows) % 2).astype(np.int64)
    weights = np.ones(rows, dtype=np.float32)
    expert = expert.cpu()
    fit_head(expert, features[:head.batch_size], targets[:head.batch_size], weights[:head.batch_size],
             HeadSpec(layers=head.layers, head=head.head, epochs=1))  # warm-up
    with _Clock(torch.device("cpu")) as clock:
        fit_head(expert, features, targets, weights, HeadSpec(layers=head.layers, head=head.head, epochs=epochs))
    return rows * epochs / clock.timing.wall, _trainable(expert.head), clock.timing


def measure_spec(spec: Spec, batch_size: int, steps: int, device: torch.device, head_rows: int = 4096,
                 head_epochs: int = 2, log: Callable[[str], None] | None = None) -> list[Row]:
    """The rows of one spec (two per spec: see the module docstring)."""
    size = None
    rows = []
    if spec.mode == "train":
        full = {k: v for k, v in ALL_LOSSES.items() if spec.lib or not k.startswith("lib_")}
        for label, losses in (("train step, CE only", {"ce": 1.0}), (f"train step, {'+'.join(full)}", full)):
            rate, expert, timing = train_rate(spec, losses, batch_size, steps, device)
            size, depth, trainable = expert.config.input_size, _depth(expert), _trainable(expert)
            seconds = EPOCH_IMAGES / rate
            rows.append(Row(spec.text, label, size, depth, trainable, rate, duration(seconds), seconds,
                            timing.cpu_use))
            del expert
    elif spec.mode == "fwd":
        rate, expert, timing = forward_rate(spec, batch_size, steps, device, as_cache=False)
        rows.append(Row(spec.text, "forward only (inference)", expert.config.input_size, _depth(expert), None,
                        rate, "", None, timing.cpu_use))
    else:
        rate, expert, timing = forward_rate(spec, batch_size, steps, device, as_cache=True)
        seconds = EPOCH_IMAGES / rate
        size, depth = expert.config.input_size, _depth(expert)
        rows.append(Row(spec.text, "frozen tower: forward once per image (token cache)", size, depth, 0, rate,
                        f"once: {duration(seconds)}", seconds, timing.cpu_use))
        rate, trainable, timing = head_rate(expert, head_rows, head_epochs)
        seconds = EPOCH_IMAGES / rate
        rows.append(Row(spec.text, f"{expert.config.head} head on cached features (fit_head)", size, depth,
                        trainable, rate, duration(seconds), seconds, timing.cpu_use))
    if log:
        for row in rows:
            log(f"{row.spec}: {row.timed}: {row.rate:.3g}/s" + _use(row.cpu_use, ", CPU use "))
    return rows


def _use(value: float | None, prefix: str = "") -> str:
    return "" if value is None else f"{prefix}{100 * value:.0f}%"


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def report(rows: Sequence[Row]) -> str:
    """The Markdown table, and per frozen-tower spec a line adding up a whole head training."""
    from tabulate import tabulate

    from train.heads import HeadSpec

    table = [[r.spec, r.timed, r.input_size, "-" if r.layers is None else r.layers,
              "-" if r.trainable is None else f"{r.trainable:,}", _rate(r.rate), r.epoch or "-",
              _use(r.cpu_use) or "-"] for r in rows]
    lines = [tabulate(table, HEADERS, tablefmt="github", disable_numparse=True), ""]
    epochs = HeadSpec.epochs
    for cache, head in zip(rows, rows[1:]):
        if cache.epoch.startswith("once:") and head.spec == cache.spec:
            total = cache.seconds_per_epoch + epochs * head.seconds_per_epoch
            lines.append(f"{cache.spec}, {EPOCH_IMAGES:,} images: the token cache once "
                         f"({duration(cache.seconds_per_epoch)}) + {epochs} head epochs "
                         f"({duration(epochs * head.seconds_per_epoch)}) = {duration(total)}")
    return "\n".join(lines).rstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="NAME[:FLAG...][@SIZE] (see above) (default: " + " ".join(DEFAULT_EXPERTS) + ")")
    p.add_argument("--experts", nargs="+", default=None, metavar="SPEC", help="the same specs (older spelling)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps (batches) per measurement, after one warm-up (default: %(default)s)")
    p.add_argument("--head-rows", type=int, default=4096,
                   help="random cached features a frozen spec's head trains on (default: %(default)s)")
    p.add_argument("--head-epochs", type=int, default=2,
                   help="timed head epochs, after a one-epoch warm-up fit (default: %(default)s)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, one per CPU)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.head_rows, args.head_epochs) < 1 or args.threads < 0:
        p.error("--batch-size, --steps, --head-rows and --head-epochs must be positive, --threads not negative")
    import torch

    from core.device import DeviceError, resolve_device, set_threads

    try:
        specs = [parse_spec(s) for s in [*(args.specs or []), *(args.experts or [])] or DEFAULT_EXPERTS]
        set_threads(args.threads)
        device = resolve_device(args.device)
    except (SpecError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]  # before this run adds to it: other work on the machine
    rows = []
    for spec in specs:
        rows += measure_spec(spec, args.batch_size, args.steps, device, args.head_rows, args.head_epochs,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"\ntraining speed on {device} ({torch.get_num_threads()} torch threads), batch {args.batch_size}, "
          f"{args.steps} timed steps after 1 warm-up, random weights and images; load average before the run "
          f"{load:.2f} on {os.cpu_count()} CPUs\n")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
