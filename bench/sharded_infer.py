"""Sharded scoring: ``infer.py`` in one process against ``torchrun --nproc_per_node N infer.py``, same images.

    python bench/sharded_infer.py                                    # 256 images, 1 and 2 processes, shipped weights
    python bench/sharded_infer.py --images 512 --processes 1 2 4 --threads 1 --workers 0 --weights DIR

Each run is the command users run, in its own subprocess, writing a submission: one process is ``python
infer.py LIST --submission OUT.csv``, N processes ``python -m torch.distributed.run --standalone
--nproc_per_node N infer.py ...`` (what ``torchrun`` runs). Two times are reported: the wall clock of the whole
command (interpreter and torch start, model load, rendezvous, scoring, writing) and the scoring time that
``infer.py`` prints (the slowest process's, loading excluded), each as images/s. The submissions of all runs
must agree (max |diff| of the probabilities is printed): sharding must not change a score.

The images are the shared DFDC faces (``../shared/data/dfdc_faces/images``, else ``demo/``, repeated), linked
under unique names in a temporary folder. Threads and loader workers are infer.py's defaults unless
``--threads``/``--workers`` are given (then per process); the 1-minute load average before and after is
printed, since other work on the machine changes every figure.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
SCORED = re.compile(r"scored (\d+) images in ([\d.]+)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "weights"), help="weights folder (default: the shipped weights/)")
    p.add_argument("--images", type=int, default=256, help="images to score (default: 256)")
    p.add_argument("--image-dir", default=None,
                   help="where to take them from (default: ../shared/data/dfdc_faces/images, else demo/)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to run (default: 1 2)")
    p.add_argument("--batch-size", type=int, default=32, help="infer.py --batch-size (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="infer.py --threads per process (default: its own)")
    p.add_argument("--workers", type=int, default=None, help="infer.py --workers per process (default: its own)")
    p.add_argument("--device", default="cpu", help="infer.py --device (default: cpu)")
    return p


@dataclass
class ShardedRun:
    """One command's result: processes, wall-clock seconds, the scoring seconds infer.py printed, its output."""

    processes: int
    images: int
    wall_s: float
    scoring_s: float
    submission: Path


def link_images(n: int, folder: Path, image_dir: str | None) -> Path:
    """A CSV list of ``n`` images linked into ``folder`` under unique names (a submission needs each name once)."""
    from bench.infer_speed import sample_images

    lines = ["img_name"]
    for i, source in enumerate(sample_images(n, image_dir)):
        name = f"img_{i:06d}{Path(source).suffix}"
        (folder / name).symlink_to(Path(source).resolve())
        lines.append(name)
    listing = folder / "list.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def command(processes: int, listing: Path, out: Path, options: Sequence[str]) -> list[str]:
    """The command line users would type for ``processes`` processes (``options``: infer.py's others)."""
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)])
    return [*launcher, str(ROOT / "infer.py"), str(listing), "--submission", str(out), "--quiet", *options]


def run_once(processes: int, listing: Path, out: Path, options: Sequence[str]) -> ShardedRun:
    """Run and time one command; its scoring time is what infer.py printed."""
    start = time.perf_counter()
    result = subprocess.run(command(processes, listing, out, options), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    found = SCORED.search(result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{processes} process(es) failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return ShardedRun(processes, int(found[1]), wall, float(found[2]), out)


def max_difference(runs: Sequence[ShardedRun]) -> float:
    """The largest |difference| of a probability between the first run's submission and any other's."""
    import numpy as np
    import pandas as pd

    first = pd.read_csv(runs[0].submission).set_index("img_name")["y_pred"]
    diffs = [np.abs(pd.read_csv(r.submission).set_index("img_name")["y_pred"].reindex(first.index) - first).max()
             for r in runs[1:]]
    return float(max(diffs, default=0.0))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.processes) < 1 or args.images < 1:
        print("error: --processes and --images must be at least 1", file=sys.stderr)
        return 2
    from tabulate import tabulate

    options = ["--weights", args.weights, "--batch-size", str(args.batch_size), "--device", args.device]
    options += ["--threads", str(args.threads)] if args.threads is not None else []
    options += ["--workers", str(args.workers)] if args.workers is not None else []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sharded-bench-") as tmp:
        listing = link_images(args.images, Path(tmp), args.image_dir)
        runs = [run_once(p, listing, Path(tmp) / f"sub-{p}.csv", options) for p in args.processes]
        difference = max_difference(runs)
    rows = [[r.processes, args.threads if args.threads is not None else "auto",
             args.workers if args.workers is not None else "auto", r.images, f"{r.wall_s:.1f}",
             f"{r.images / r.wall_s:.2f}", f"{r.scoring_s:.1f}", f"{r.images / r.scoring_s:.2f}"] for r in runs]
    print(tabulate(rows, headers=["processes", "threads/proc", "workers/proc", "images", "wall s", "img/s (wall)",
                                  "scoring s", "img/s (scoring)"], tablefmt="github"))
    print(f"{os.cpu_count()} CPUs; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"device {args.device}, batch {args.batch_size}; max |diff| of a probability between runs {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
