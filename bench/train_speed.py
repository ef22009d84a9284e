"""Training throughput of each expert: images/s of full optimiser steps, CE only and with every loss.

    python bench/train_speed.py                                      # the CPU-sized experts, batch 16
    python bench/train_speed.py --experts efficientnet_lite0 convnextv2_tiny clip_vit_l14 --device cuda --batch-size 32
    python bench/train_speed.py --experts clip_vit_b16:lib:layernorm   # a CLIP with a LIB head, LN-tuned

Each step is what ``train/joint.py`` does: the expert's forward pass and losses through
``train/objective.py``, backward, AdamW and the EMA update, on random images of the expert's input size
(decoding and augmentation are the data loader's cost, measured separately by ``bench/infer_speed.py``).
Weights are random: speed does not depend on them. On CUDA the run uses bf16 autocast and channels-last,
like training. ``NAME:lib`` gives the expert a LIB head, ``NAME:layernorm`` LN-tunes its backbone.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tabulate import tabulate
from torch_ema import ExponentialMovingAverage

from experts import create_expert
from experts.device import resolve_device
from train.objective import JointObjective

ALL_LOSSES = {"ce": 1.0, "kl_noise": 1.0, "nce": 0.1, "lib_global": 1.0, "lib_local": 0.5}
DEFAULT_EXPERTS = ["efficientnet_lite0", "convnext_atto", "clip_vit_b16:lib:layernorm"]


def parse_expert(spec: str) -> tuple[str, dict]:
    name, *flags = spec.split(":")
    overrides = {}
    for flag in flags:
        if flag == "lib":
            overrides["head"] = "lib"
        elif flag == "layernorm":
            overrides.update(tuning="layernorm", normalize_features=True)
        else:
            raise SystemExit(f"error: {spec}: unknown flag {flag!r} (lib, layernorm)")
    return name, overrides


def images_per_second(spec: str, losses: dict[str, float], batch_size: int, steps: int, device: torch.device) -> float:
    name, overrides = parse_expert(spec)
    torch.manual_seed(0)
    expert = create_expert(name, **overrides).to(device).to(memory_format=torch.channels_last).train()
    objective = JointObjective({name: expert}, losses).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ema = ExponentialMovingAverage([p for p in expert.parameters() if p.requires_grad], decay=0.995)
    size = expert.config.input_size
    images = {size: torch.rand(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)}
    target = torch.arange(batch_size, device=device) % 2
    masks = {name: torch.ones(batch_size, dtype=torch.bool, device=device)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> None:
        with autocast:
            total, _ = objective(images, target, masks)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()

    step()  # warm-up: allocations, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", default=DEFAULT_EXPERTS, help="registry names, optionally :lib / :layernorm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps per measurement (after one warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for spec in args.experts:
        name, overrides = parse_expert(spec)
        lib = overrides.get("head") == "lib"
        full = {k: v for k, v in ALL_LOSSES.items() if lib or not k.startswith("lib_")}
        ce = images_per_second(spec, {"ce": 1.0}, args.batch_size, args.steps, device)
        every = images_per_second(spec, full, args.batch_size, args.steps, device)
        size = create_expert(name, **overrides).config.input_size
        rows.append([spec, size, f"{ce:.1f}", f"{every:.1f}", "+".join(full)])
        print(f"{spec}: {ce:.1f} img/s (CE), {every:.1f} img/s (all losses)", file=sys.stderr)
    print(f"\ntraining images/s on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}\n")
    print(tabulate(rows, headers=["expert", "input px", "CE only", "all losses", "losses"], tablefmt="github"))


if __name__ == "__main__":
    main()
