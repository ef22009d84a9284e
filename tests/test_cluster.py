"""Feature embedding and its cache, k-means, leave-one-cluster-out folds and the cluster CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from data_prep.cluster import assign_folds, cluster_features, cluster_table, load_rows, main, write_splits
from data_prep.features import embed_images
from core.labels import LabelsError
from experts import create_expert
from tests.conftest import ROOT, write_labelled_set
from tests.distributed_utils import output_tail, run_torchrun


@pytest.fixture
def expert():
    torch.manual_seed(0)
    return create_expert("test_efficientnet")


@pytest.fixture
def two_sets(tmp_path):
    return [write_labelled_set(tmp_path / "a", n=12, seed=1), write_labelled_set(tmp_path / "b", n=12, seed=2)]


def count_forward(expert, monkeypatch) -> list[int]:
    """Record the batch size of every backbone call, to see what was (not) embedded."""
    calls: list[int] = []
    original = expert.forward_features

    def counted(images):
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(expert, "forward_features", counted)
    return calls


# ---------------------------------------------------------------------------------------------- features
def test_features_are_l2_normalised_and_in_input_order(expert, labelled_csv):
    paths = list(load_rows([labelled_csv])["path"])
    emb = embed_images(paths, expert, cache_dir=None, batch_size=5, device="cpu", progress=False)
    assert emb.features.shape == (len(paths), expert.num_features)
    assert emb.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.features, axis=1), 1.0, atol=1e-5)
    alone = embed_images(paths[3:4], expert, cache_dir=None, device="cpu", progress=False)
    np.testing.assert_allclose(alone.features[0], emb.features[3], atol=1e-5)


def test_cache_means_a_second_run_embeds_nothing(expert, labelled_csv, tmp_path, monkeypatch):
    paths = list(load_rows([labelled_csv])["path"])
    cache = tmp_path / "cache"
    first = embed_images(paths, expert, cache, batch_size=4, device="cpu", progress=False, shard_size=5)
    assert (first.n_embedded, first.n_cached) == (len(paths), 0)
    assert len(list(cache.glob("*/shard-*.safetensors"))) == 4  # 5 + 5 + 5 + 1 images

    calls = count_forward(expert, monkeypatch)
    second = embed_images(paths, expert, cache, batch_size=4, device="cpu", progress=False)
    assert calls == [] and (second.n_embedded, second.n_cached) == (0, len(paths))
    np.testing.assert_array_equal(second.features, first.features)

    Image.new("RGB", (40, 40), (200, 10, 10)).save(paths[0])  # edited content: embedded again, alone
    third = embed_images(paths, expert, cache, batch_size=4, device="cpu", progress=False)
    assert calls == [1] and (third.n_embedded, third.n_cached) == (1, len(paths) - 1)


def test_cache_is_per_backbone_weights(expert, labelled_csv, tmp_path):
    paths = list(load_rows([labelled_csv])["path"])
    cache = tmp_path / "cache"
    embed_images(paths, expert, cache, device="cpu", progress=False)
    torch.manual_seed(1)
    other = create_expert("test_efficientnet")  # same name, other weights: must not reuse the features
    assert embed_images(paths, other, cache, device="cpu", progress=False).n_embedded == len(paths)
    assert len(list(cache.iterdir())) == 2


def test_identical_files_are_embedded_once(expert, labelled_csv, tmp_path, monkeypatch):
    paths = list(load_rows([labelled_csv])["path"])[:3]
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(open(paths[0], "rb").read())
    calls = count_forward(expert, monkeypatch)
    emb = embed_images([*paths, str(copy)], expert, None, device="cpu", progress=False)
    assert sum(calls) == 3
    np.testing.assert_array_equal(emb.features[3], emb.features[0])
    assert emb.sha1[3] == emb.sha1[0] and len(set(emb.sha1)) == 3


def test_unreadable_images_are_reported_and_skipped(expert, labelled_csv, tmp_path, capsys):
    paths = list(load_rows([labelled_csv])["path"])[:4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    missing = tmp_path / "missing.jpg"
    emb = embed_images([paths[0], str(broken), paths[1], str(missing), *paths[2:]], expert, tmp_path / "cache",
                       device="cpu", progress=False)
    assert emb.ok.tolist() == [True, False, True, False, True, True]
    assert emb.features.shape[0] == 4
    assert len(emb.errors) == 2 and "broken.jpg" in emb.errors[0] and "missing.jpg" in emb.errors[1]
    err = capsys.readouterr().err.splitlines()
    assert sum("broken.jpg" in line for line in err) == 1 and sum("missing.jpg" in line for line in err) == 1
    good = embed_images(paths, expert, None, device="cpu", progress=False)
    np.testing.assert_allclose(emb.features, good.features, atol=1e-5)


# ------------------------------------------------------------------------------------------------ k-means
def test_kmeans_recovers_well_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32)) * 8
    sizes = [60, 50, 40, 30, 20]
    x = np.concatenate([c + rng.normal(size=(n, 32)) for c, n in zip(centres, sizes)]).astype(np.float32)
    truth = np.repeat(np.arange(5), sizes)
    labels = cluster_features(x, k=5, seed=0, device="cpu")
    assert adjusted_rand_score(truth, labels) == 1.0
    assert np.bincount(labels).tolist() == sizes  # numbered by decreasing size
    np.testing.assert_array_equal(cluster_features(x, k=5, seed=0, device="cpu"), labels)  # seeded


def test_kmeans_refuses_a_k_it_cannot_fit():
    with pytest.raises(ValueError, match="k must be"):
        cluster_features(np.zeros((4, 3), dtype=np.float32), k=4)


# -------------------------------------------------------------------------------------------------- folds
def test_folds_keep_groups_whole_and_validate_on_one_cluster():
    rows = pd.DataFrame({
        "img_name": [f"{i}.jpg" for i in range(9)],
        "target": [0, 1, 1, 0, 1, 0, 1, 0, 1],
        "group": ["a", "a", "a", "b", "b", "c", "c", "d", "e"],
        "source": "s",
        "path": [f"/x/{i}.jpg" for i in range(9)],
    })
    kmeans = np.array([0, 1, 1, 2, 0, 1, 2, 2, 0])  # a: majority 1; b and c: ties, to the lower cluster
    splits = assign_folds(rows, kmeans, k=3)
    assert splits["cluster"].tolist() == [1, 1, 1, 0, 0, 1, 1, 2, 0]
    assert splits["kmeans_cluster"].tolist() == kmeans.tolist()
    assert (splits.groupby("group")["cluster"].nunique() == 1).all()
    for i in range(3):
        assert set(splits[f"fold_{i}"]) <= {"train", "val"}
        assert ((splits[f"fold_{i}"] == "val") == (splits["cluster"] == i)).all()
        sides = splits.groupby("group")[f"fold_{i}"].nunique()
        assert (sides == 1).all()


def test_same_group_name_in_two_sets_is_two_groups():
    rows = pd.DataFrame({"img_name": ["x", "x"], "target": [0, 1], "group": ["g", "g"], "source": "s",
                         "path": ["/a/x", "/b/x"], "labels_csv": ["/a/labels.csv", "/b/labels.csv"]})
    assert assign_folds(rows, np.array([0, 1]), k=2)["cluster"].tolist() == [0, 1]


def test_splits_csv_columns_and_atomic_write(labelled_csv, tmp_path):
    rows = load_rows([labelled_csv])
    splits = assign_folds(rows, (np.arange(len(rows)) // 2) % 3, k=3)  # pairs share a group
    path = write_splits(splits, tmp_path / "out" / "splits.csv")
    written = pd.read_csv(path)
    assert list(written.columns) == ["img_name", "target", "group", "source", "path", "labels_csv", "cluster",
                                     "kmeans_cluster", "fold_0", "fold_1", "fold_2"]
    assert len(written) == len(rows)
    assert [p.name for p in path.parent.iterdir()] == ["splits.csv"]  # no temporary file left behind
    table = cluster_table(splits)
    assert table["images"].tolist() == [6, 6, 4, 16]  # three clusters, then "all"


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end_and_rerun_uses_the_cache(two_sets, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*map(str, two_sets), "--out", str(out), "--k", "3", "--backbone", "test_efficientnet",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "24 embedded, 0 from the cache" in printed and "fake %" in printed
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 24 and {f"fold_{i}" for i in range(3)} <= set(splits.columns)
    assert pd.read_csv(out / "clusters.csv")["cluster"].astype(str).tolist() == ["0", "1", "2", "all"]
    assert (out / "clusters_pca.png").stat().st_size > 1000
    assert main(argv) == 0
    assert "0 embedded, 24 from the cache" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "splits.csv"), splits)


def test_cli_skips_an_unreadable_image_and_exits_1(two_sets, tmp_path, capsys):
    bad = two_sets[0].parent / "images" / "003.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    rc = main([*map(str, two_sets), "--out", str(out), "--k", "2", "--backbone", "test_efficientnet",
               "--workers", "0", "--device", "cpu", "--quiet", "--no-cache"])
    assert rc == 1
    assert sum("003.jpg" in line for line in capsys.readouterr().err.splitlines()) == 1
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 23 and not splits["path"].str.endswith("a/images/003.jpg").any()
    assert not (out / "feature_cache").exists()


def test_cli_skips_bad_rows_and_stops_on_them_with_strict(two_sets, tmp_path, capsys):
    text = two_sets[0].read_text().replace("images/005.jpg,1,", "images/005.jpg,2,")
    two_sets[0].write_text(text + "missing.jpg,0,gm\n")
    with open(two_sets[1], "a") as f:  # an image of the first set listed again by the second
        f.write(f"{two_sets[0].parent / 'images' / '000.jpg'},0,gx\n")
    out = tmp_path / "out"
    argv = [*map(str, two_sets), "--out", str(out), "--k", "2", "--backbone", "test_efficientnet",
            "--workers", "0", "--device", "cpu", "--quiet", "--no-cache"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "row 7: images/005.jpg: target '2'" in err and "missing.jpg: file not found" in err
    assert "000.jpg: image already listed in" in err
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 23 and str(two_sets[0].parent / "images" / "005.jpg") not in set(splits["path"])
    assert main([*argv, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "target '2'" in capsys.readouterr().err and not (tmp_path / "strict").exists()
    with pytest.raises(LabelsError, match="row 7"):  # the library default: a bad row is an error
        load_rows([two_sets[0]])
    two_sets[0].write_text(two_sets[0].read_text().replace("images/005.jpg,2,", "images/005.jpg,1,"))
    assert main([argv[0], *argv[2:], "--out", str(tmp_path / "strict"), "--strict"]) == 2  # set a: now only missing.jpg
    assert "1 unreadable image(s) (--strict): nothing written" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()


def test_cli_runs_as_a_script_from_the_repo_root(labelled_csv, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "data_prep/cluster.py", str(labelled_csv), "--out", str(tmp_path / "o"),
                             "--k", "2", "--backbone", "test_efficientnet", "--workers", "0", "--threads", "1",
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "Results saved to" in result.stdout
    assert (tmp_path / "o" / "splits.csv").is_file()


def test_byte_identical_images_share_a_side():
    rows = pd.DataFrame({"img_name": list("abcde"), "target": 0, "group": list("abcde"), "source": "s",
                         "path": list("abcde")})
    kmeans = np.array([0, 1, 1, 0, 2])  # a and c are the same picture: they vote together, for cluster 0 on a tie
    splits = assign_folds(rows, kmeans, k=3, same_content=["h1", "h2", "h1", "h3", "h4"])
    assert splits["cluster"].tolist() == [0, 1, 0, 0, 2]
    assert assign_folds(rows, kmeans, k=3)["cluster"].tolist() == kmeans.tolist()


# ----------------------------------------------------------------------------------------------- torchrun
def _cache_features(cache) -> dict[str, np.ndarray]:
    """Every feature of a feature cache folder, by file hash."""
    from safetensors import safe_open

    found = {}
    for shard in cache.glob("*/shard-*.safetensors"):
        with safe_open(str(shard), framework="np") as f:
            found.update(zip(f.metadata()["sha1"].split(","), f.get_tensor("features")))
    return found


def _cluster_argv(two_sets) -> list[str]:
    return [*map(str, two_sets), "--k", "3", "--backbone", "test_efficientnet", "--batch-size", "4", "--workers",
            "0", "--threads", "1", "--device", "cpu", "--quiet"]


def test_torchrun_two_processes_embed_a_share_each_and_match_one_process(two_sets, tmp_path, capsys):
    argv = _cluster_argv(two_sets)
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = run_torchrun(["data_prep/cluster.py", *argv, "--out", tmp_path / "two"])
    assert proc.returncode == 0, output_tail(proc)
    assert "features: 24 embedded (12 + 12 by 2 processes), 0 from the cache" in proc.stdout
    assert proc.stdout.count("Results saved to") == 1  # rank 0 alone clusters and writes
    shards = [p.name for p in (tmp_path / "two" / "feature_cache").glob("*/shard-*.safetensors")]
    assert sorted(name.split("-")[1] for name in shards) == ["rank0", "rank1"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / "splits.csv"),
                                  pd.read_csv(tmp_path / "one" / "splits.csv"))
    one, two = _cache_features(tmp_path / "one" / "feature_cache"), _cache_features(tmp_path / "two" / "feature_cache")
    assert one.keys() == two.keys() and len(one) == 24
    for h in one:
        np.testing.assert_allclose(two[h], one[h], atol=1e-5)


def test_torchrun_resumes_a_cache_half_made_by_one_process(two_sets, expert, tmp_path, capsys):
    argv = [*_cluster_argv(two_sets), "--out", str(tmp_path / "out")]
    assert main(argv) == 0  # the reference, and the backbone's cache folder
    whole = pd.read_csv(tmp_path / "out" / "splits.csv")
    cache = tmp_path / "out" / "feature_cache"
    shutil.rmtree(cache)
    embed_images(load_rows(two_sets)["path"], expert, cache, device="cpu", progress=False, shard_size=6)
    shards = sorted(cache.glob("*/shard-*.safetensors"))
    assert len(shards) == 4  # a run killed after 2 of its 4 shards:
    for shard in shards[:2]:
        shard.unlink()
    proc = run_torchrun(["data_prep/cluster.py", *argv])
    assert proc.returncode == 0, output_tail(proc)
    assert "features: 12 embedded (6 + 6 by 2 processes), 12 from the cache" in proc.stdout
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "splits.csv"), whole)
    assert len(_cache_features(cache)) == 24


def test_torchrun_without_cache_gathers_features_and_reports_a_bad_image_once(two_sets, tmp_path, capsys):
    (two_sets[1].parent / "images" / "004.jpg").write_bytes(b"\xff\xd8 truncated")  # in the second share
    argv = [*_cluster_argv(two_sets), "--no-cache"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 1
    capsys.readouterr()
    proc = run_torchrun(["data_prep/cluster.py", *argv, "--out", tmp_path / "two"])
    assert proc.returncode != 0, output_tail(proc)  # rank 0's status 1: torchrun fails the job
    assert "features: 23 embedded (12 + 11 by 2 processes), 0 from the cache, 1 unreadable" in proc.stdout
    assert sum("004.jpg" in line and line.startswith("error:") for line in proc.stderr.splitlines()) == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / "splits.csv"),
                                  pd.read_csv(tmp_path / "one" / "splits.csv"))
    assert not (tmp_path / "two" / "feature_cache").exists()
