"""k-means on torch for ``data_prep/cluster.py``: torch_kmeans with distances that fit in memory.

Kept apart from the command so that ``python data_prep/cluster.py --help`` imports no torch.
"""
from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():  # torch_kmeans 0.2 uses torch.jit.script, which recent torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from torch_kmeans import KMeans

__all__ = ["ChunkedKMeans"]


class ChunkedKMeans(KMeans):
    """torch_kmeans' KMeans, with point-to-center distances from one matrix product per chunk of points.

    torch_kmeans 0.2 computes distances by expanding points and centers into ``[N * K, D]`` copies: for
    100k x 1280 features and k=8 that is 4 GB each, per restart. ``|x|^2 - 2 x.c + |c|^2`` needs only the
    ``[N, K]`` result, so memory stays at the feature matrix; it is also about 10x faster on a CPU than
    ``torch.cdist``, which does not take its matrix-product path for k <= 25. Everything else (k-means++ init,
    Lloyd iterations, tolerance, seeding) is torch_kmeans' own.
    """

    chunk_size = 32768

    def _pairwise_distance(self, x: torch.Tensor, centers: torch.Tensor, **kwargs) -> torch.Tensor:
        """``x`` [BS, N, D], ``centers`` [BS, M, K, D] -> Euclidean distances [BS, M, N, K]."""
        bs, n, _ = x.shape
        _, m, k, _ = centers.shape
        c_sq = torch.linalg.vector_norm(centers, dim=-1).square()[:, :, None, :]  # [BS, M, 1, K]
        out = x.new_empty(bs, m, n, k)
        for start in range(0, n, self.chunk_size):
            part = x[:, None, start:start + self.chunk_size]  # [BS, 1, C, D]
            x_sq = torch.linalg.vector_norm(part, dim=-1).square()[..., None]  # [BS, 1, C, 1]
            d2 = torch.matmul(part, centers.transpose(-1, -2)).mul_(-2).add_(x_sq).add_(c_sq)
            out[:, :, start:start + self.chunk_size] = d2.clamp_min_(0).sqrt_()
        return out

    def _calculate_inertia(self, x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of squared distances to the assigned centers, [BS, M], without an ``[M, N, D]`` copy."""
        dist = self._pairwise_distance(x, centers)
        return dist.gather(-1, labels[..., None]).squeeze(-1).pow(2).sum(-1)
