"""Scoring sharded over processes with torchrun (gloo on CPU): the same submission as one process, bad images
reported, per-shard resume, and a crashed process that fails the job without losing finished shards."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import infer
from core.distributed import shard_bounds
from experts import create_expert, save_ensemble
from scoring.submission import partial_files, partial_path
from tests.conftest import ROOT
from tests.distributed_utils import run_torchrun

N_IMAGES, BATCH, BAD = 12, 3, 4  # two shards of 6, each two batches; the image at BAD (rank 0's shard) is corrupt
TOLERANCE = 1e-5  # scores are written with 6 decimals; one process and two may round the last one differently

# Runs infer.py, but process 1 raises at its second batch, once process 0 has written its whole shard.
CRASHING_INFER = r"""
import os, runpy, sys, time
import pandas as pd
import scoring.pipeline
INFER, SHARD0 = sys.argv[1], int(sys.argv[2])
real = scoring.pipeline.score_batches
def crashing(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
        if i == 1 and os.environ.get("RANK") == "1":
            out = sys.argv[sys.argv.index("--submission") + 1]
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if len(pd.read_csv(out + ".partial.0", skiprows=1)) == SHARD0:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.2)
            raise RuntimeError("simulated crash of process 1")
        yield batch
scoring.pipeline.score_batches = crashing
sys.argv = [INFER, *sys.argv[3:]]
runpy.run_path(INFER, run_name="__main__")
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """12 tiny JPEGs (one of them corrupt) listed in a CSV, a tiny random weights folder, and the submission
    one process writes from them."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    save_ensemble({"eff": create_expert("test_efficientnet")}, root / "weights")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        path = root / "images" / f"{i:02d}.jpg"
        if i == BAD:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    (root / "list.csv").write_text("img_name\n" + "".join(f"images/{i:02d}.jpg\n" for i in range(N_IMAGES)))
    status = infer.main([str(root / "list.csv"), "--weights", str(root / "weights"), "--submission",
                         str(root / "one.csv"), "--batch-size", str(BATCH), "--workers", "0", "--quiet"])
    assert status == 1  # the corrupt image
    return root


def _torchrun(job: Path, out: str, *extra: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """infer.py (or ``script``) on the job's list, as 2 processes under torchrun (gloo: the CPU)."""
    command = script or [str(ROOT / "infer.py")]
    return run_torchrun([*command, job / "list.csv", "--weights", job / "weights", "--submission", job / out,
                         "--batch-size", str(BATCH), "--workers", "0", "--quiet", *extra],
                        timeout=300, env={"PYTHONPATH": str(ROOT)})  # the crashing script imports the tree


def _assert_same_scores(a: Path, b: Path) -> None:
    one, two = pd.read_csv(a), pd.read_csv(b)
    assert one["img_name"].tolist() == two["img_name"].tolist()
    np.testing.assert_allclose(two["y_pred"], one["y_pred"], atol=TOLERANCE, rtol=0)


def test_two_processes_write_the_submission_one_process_writes(job):
    result = _torchrun(job, "two.csv")
    assert result.returncode != 0  # the corrupt image: rank 0 exits 1, and torchrun reports it
    assert "images/04.jpg: not an image file" in result.stderr
    assert f"scored {N_IMAGES - 1} images" in result.stderr and "by 2 processes" in result.stderr
    assert "(1 filled with 0.5)" in result.stderr
    _assert_same_scores(job / "one.csv", job / "two.csv")
    assert not partial_files(job / "two.csv")


def test_a_crashed_process_fails_the_job_keeps_finished_shards_and_resumes(job, tmp_path, capsys):
    script = tmp_path / "crashing_infer.py"
    script.write_text(CRASHING_INFER)
    shard0 = shard_bounds(N_IMAGES, 0, 2)[1] - 1  # rows process 0 writes: its shard but the corrupt image
    crashed = _torchrun(job, "crash.csv", script=[str(script), str(ROOT / "infer.py"), str(shard0)])
    assert crashed.returncode != 0
    assert "simulated crash of process 1" in crashed.stderr
    assert "note: process 1 of 2: 3 images scored by this run are kept in" in crashed.stderr
    assert not (job / "crash.csv").exists()
    kept = {p.name: pd.read_csv(p, skiprows=1) for p in partial_files(job / "crash.csv")}
    assert sorted(kept) == ["crash.csv.partial.0", "crash.csv.partial.1"]
    assert len(kept["crash.csv.partial.0"]) == shard0 and len(kept["crash.csv.partial.1"]) == BATCH

    assert infer.main([str(job / "list.csv"), "--weights", str(job / "weights"), "--submission",
                       str(job / "crash.csv")]) == 2  # without --resume, the shards are not overwritten
    assert "crash.csv.partial.0 (and 1 more partial files): holds the results" in capsys.readouterr().err

    # A row a finished shard holds is not scored again: mark one, and find it in the submission.
    first = partial_path(job / "crash.csv", 0)
    lines = first.read_text().splitlines()
    name = lines[2].split(",")[0]
    first.write_text("\n".join([*lines[:2], f"{name},0.123456", *lines[3:]]) + "\n")
    resumed = _torchrun(job, "crash.csv", "--resume")
    assert f"{shard0 + BATCH} were already in partial files (resumed)" in resumed.stderr, resumed.stderr
    submission = pd.read_csv(job / "crash.csv").set_index("img_name")
    assert submission.loc[name, "y_pred"] == pytest.approx(0.123456)
    reference = pd.read_csv(job / "one.csv").set_index("img_name")
    others = reference.index != name
    np.testing.assert_allclose(submission["y_pred"][others], reference["y_pred"][others], atol=TOLERANCE, rtol=0)
    assert not partial_files(job / "crash.csv")


def test_one_process_resumes_what_several_left(job):
    """Partial files of a sharded run are continued by a run with another number of processes."""
    columns = "img_name,y_pred\n"
    stamp = infer._stamp(infer.Run(weights=str(job / "weights")), [str(job / "images" / "00.jpg")])
    (job / "mixed.csv.partial.0").write_text(f"{stamp}\n{columns}images/00.jpg,0.250000\n")
    (job / "mixed.csv.partial.3").write_text(f"{stamp}\n{columns}images/11.jpg,0.750000\n")
    status = infer.main([str(job / "list.csv"), "--weights", str(job / "weights"), "--submission",
                         str(job / "mixed.csv"), "--batch-size", str(BATCH), "--workers", "0", "--quiet", "--resume"])
    assert status == 1
    submission = pd.read_csv(job / "mixed.csv").set_index("img_name")["y_pred"]
    assert submission["images/00.jpg"] == 0.25 and submission["images/11.jpg"] == 0.75
    assert len(submission) == N_IMAGES and not partial_files(job / "mixed.csv")


@pytest.mark.parametrize("options, message", [
    ([], "pass --submission OUT.csv"),
    (["--submission", "x.csv", "--heatmap", "maps"], "--heatmap is not available under torchrun"),
])
def test_what_a_sharded_run_cannot_do_is_refused_before_anything_starts(job, monkeypatch, capsys, options, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(job)
    assert infer.main([str(job / "list.csv"), "--weights", str(job / "weights"), *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("n, world", [(0, 2), (1, 3), (7, 2), (12, 5), (100, 8)])
def test_shards_are_contiguous_cover_every_item_and_differ_by_at_most_one(n, world):
    bounds = [shard_bounds(n, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_partial_files_are_found_in_rank_order(tmp_path):
    out = tmp_path / "s[1].csv"  # glob characters in the name are taken literally
    for suffix in ["", ".10", ".2", ".tmp", "x"]:
        Path(f"{out}.partial{suffix}").write_text("")
    assert [p.name for p in partial_files(out)] == ["s[1].csv.partial", "s[1].csv.partial.2", "s[1].csv.partial.10"]


def test_the_sharded_bench_times_the_commands_users_run_and_compares_their_submissions(job, capsys):
    from bench import sharded_infer

    assert sharded_infer.main(["--weights", str(job / "weights"), "--images", "6", "--image-dir", str(ROOT / "demo"),
                               "--processes", "1", "2", "--batch-size", "2", "--threads", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|") and line.split("|")[1].strip() in ("1", "2")]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]  # processes, threads, workers, images, ...
    assert [c[0] for c in cells] == ["1", "2"] and all(c[3] == "6" and float(c[-1]) > 0 for c in cells)
    assert float(re.search(r"max \|diff\| of a probability between runs (\S+)", out)[1]) < TOLERANCE


def test_sharded_work_waits_for_the_slowest_shard_past_torchs_default_timeout(monkeypatch):
    """Equal shards can take unequal times; NCCL's default 10 minutes would fail a healthy run at the end."""
    from core import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    d = distributed.init_distributed(torch.device("cpu"), timeout=distributed.SHARD_WAIT)
    assert (d.rank, d.world) == (1, 2) and calls == [{"backend": "gloo", "timeout": distributed.SHARD_WAIT}]
    assert distributed.SHARD_WAIT.total_seconds() >= 6 * 3600
