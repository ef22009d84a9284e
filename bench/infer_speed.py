"""Inference speed and peak memory of a weights folder (default: the shipped model) on CPU or GPU.

    python bench/infer_speed.py                          # batch 1 and 32 on CPU, default weights
    python bench/infer_speed.py --batch-sizes 1 8 64 --device cuda --images 512

Each batch size runs in a fresh process, so that its peak resident memory (ru_maxrss) is its own. The
timing covers the whole scoring path of ``infer.py``: decoding, resizing and the ensemble's forward pass,
on real images from ``../shared/data`` when present (else the ``demo/`` images, repeated).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_images(n: int) -> list[str]:
    from data_prep.images import is_image_file

    shared = ROOT.parent / "shared" / "data" / "dfdc_faces" / "images"
    pool = sorted(p for p in (shared.iterdir() if shared.is_dir() else ROOT.joinpath("demo").iterdir())
                  if is_image_file(p))
    return [str(pool[i % len(pool)]) for i in range(n)]


def measure(weights: str, batch_size: int, n_images: int, device: str, queue: mp.Queue) -> None:
    import torch

    from evaluation.scoring import score_images
    from experts import load_ensemble

    ensemble = load_ensemble(weights, device)
    paths = sample_images(n_images)
    list(score_images(ensemble, paths[: 2 * batch_size], batch_size=batch_size, device=device, progress=False))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scores = list(score_images(ensemble, paths, batch_size=batch_size, device=device, progress=False))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    queue.put((len(scores) / seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu_mib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "weights"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--images", type=int, default=256, help="images scored per batch size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    print(f"weights: {args.weights}; device: {args.device}; torch threads: {torch.get_num_threads()}; "
          f"{args.images} images per run")
    print(f"{'batch':>6} {'images/s':>9} {'peak RSS MiB':>13} {'peak GPU MiB':>13}")
    ctx = mp.get_context("spawn")
    for batch_size in args.batch_sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args.weights, batch_size, args.images, args.device, queue))
        proc.start()
        rate, rss, gpu = queue.get()
        proc.join()
        print(f"{batch_size:>6} {rate:>9.1f} {rss:>13.0f} {gpu:>13.0f}")


if __name__ == "__main__":
    main()
