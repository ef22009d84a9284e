"""Peak memory of ``infer.py --submission`` as the number of images grows: it must stay flat.

    python bench/infer_memory.py                          # 2000 and 20000 images, default weights
    python bench/infer_memory.py --counts 200 2000 --weights my_weights/ --batch-size 64

For each count, N small JPEGs (64x64, generated once into a temporary folder; the smaller counts use the
first N of them through a CSV list) are scored by ``infer.py`` exactly as users run it, in a subprocess of
its own, so the peak resident memory (``ru_maxrss`` of that child, from ``os.wait4``) is that run's alone.
That is host memory: with ``--device cuda`` (or ``auto`` on a machine with a GPU) the model's tensors live
on the GPU and are not counted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from core.protocol import DEFAULT_DEVICE

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[str]:
    """``n`` JPEGs of smooth noise (cheap to write, realistic to decode); returns their names."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        name = f"images/{i:06d}.jpg"
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / name, quality=90)
        names.append(name)
    return names


def peak_rss_of(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; its exit status, peak RSS in MiB (Linux reports KiB) and wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return proc.returncode, usage.ru_maxrss * scale / 2**20, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000], metavar="N",
                        help="numbers of images to score, one run each (default: 2000 20000)")
    parser.add_argument("--weights", default=str(ROOT / "weights"), metavar="DIR",
                        help="weights folder infer.py loads (default: the shipped weights/)")
    parser.add_argument("--batch-size", type=int, default=32, help="infer.py --batch-size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="infer.py --workers (default: %(default)s)")
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help="infer.py --device: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="infer_memory_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        names = make_images(folder, max(args.counts))
        print(f"{len(names)} images of 64x64 written in {time.perf_counter() - start:.0f}s; weights: {args.weights}; "
              f"batch size {args.batch_size}, workers {args.workers}, device {args.device}")
        print(f"{'images':>8} {'peak RSS MiB':>13} {'seconds':>8} {'images/s':>9}")
        for n in args.counts:
            listing = folder / f"list_{n}.csv"
            listing.write_text("img_name\n" + "\n".join(names[:n]) + "\n")
            out = folder / f"sub_{n}.csv"
            cmd = [sys.executable, "infer.py", str(listing), "--submission", str(out), "--weights", args.weights,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                   "--quiet"]
            code, rss, seconds = peak_rss_of(cmd, folder / f"stderr_{n}.txt")
            if code != 0:
                print(f"error: infer.py failed on {n} images:\n{(folder / f'stderr_{n}.txt').read_text()}",
                      file=sys.stderr)
                return 1
            rows = sum(1 for _ in open(out)) - 1
            if rows != n:
                print(f"error: infer.py wrote {rows} rows for {n} images", file=sys.stderr)
                return 1
            print(f"{n:>8} {rss:>13.0f} {seconds:>8.0f} {n / seconds:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
