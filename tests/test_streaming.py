"""Long jobs: a submission streams into ``OUT.csv.partial``, survives a kill, and ``--resume`` scores only
what is missing; a crash in a loader worker is raised, never swallowed or hung on."""
from __future__ import annotations

import faulthandler
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from scoring.pipeline import score_batches
from experts import create_expert, load_ensemble, save_ensemble
from tests.conftest import ROOT

N_IMAGES, BATCH = 200, 8
MAIN_PID = os.getpid()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """200 tiny JPEGs listed in a shuffled CSV, and a tiny random weights folder."""
    root = tmp_path_factory.mktemp("job")
    torch.manual_seed(0)
    save_ensemble({"eff": create_expert("test_efficientnet")}, root / "weights")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
    order = rng.permutation(N_IMAGES)
    (root / "list.csv").write_text("img_name\n" + "".join(f"images/{i:03d}.jpg\n" for i in order))
    return root


def args(job: Path, out: Path, *extra: str) -> list[str]:
    return [str(job / "list.csv"), "--weights", str(job / "weights"), "--batch-size", str(BATCH), "--quiet",
            "--submission", str(out), *extra]


def complete_rows(partial: Path) -> int:
    """Data rows in a partial file that a kill cannot have torn (after the stamp and header lines)."""
    return max(partial.read_bytes().count(b"\n") - 2, 0) if partial.exists() else 0


def test_killed_run_resumes_without_rescoring(job, tmp_path, capsys):
    expected = tmp_path / "expected.csv"
    assert infer.main(args(job, expected)) == 0
    out, partial = tmp_path / "sub.csv", tmp_path / "sub.csv.partial"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "infer.py", *args(job, out)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while complete_rows(partial) < BATCH and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    kept = complete_rows(partial)
    assert not out.exists() and 0 < kept < N_IMAGES and kept % BATCH == 0  # flushed batch by batch
    with open(partial, "a") as f:
        f.write("images/0")  # a row torn by a kill mid-write: cut off and scored again

    capsys.readouterr()
    assert infer.main(args(job, out, "--resume")) == 0
    summary = re.search(r"scored (\d+) images .*, (\d+) were already in", capsys.readouterr().err)
    assert summary, "no summary line"
    assert (int(summary[1]), int(summary[2])) == (N_IMAGES - kept, kept)  # nothing scored twice
    assert out.read_bytes() == expected.read_bytes()  # every row, in input order, same values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.csv", "stderr.txt", "sub.csv"]


def test_partial_file_is_never_silently_reused_or_mixed(job, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    partial = tmp_path / "sub.csv.partial"
    partial.write_text("# partial results of infer.py: weights 0123456789abcdef, crop_faces False\n"
                       "img_name,y_pred\nimages/000.jpg,0.5\n")
    assert infer.main(args(job, out)) == 2
    assert "sub.csv.partial: holds the results of an interrupted run; pass --resume" in capsys.readouterr().err
    assert infer.main(args(job, out, "--resume")) == 2  # scored by other weights
    assert "sub.csv.partial: written by a run with other settings" in capsys.readouterr().err
    assert infer.main([str(job / "list.csv"), "--weights", str(job / "weights"), "--resume"]) == 2
    assert "--resume continues a --submission run" in capsys.readouterr().err
    assert not out.exists() and partial.exists()


# ------------------------------------------------------------------------------------------ loader workers
class Explode:
    """A transform with a bug: it raises in the loader worker (not an unreadable image)."""

    def __init__(self, size: int):
        pass

    def __call__(self, image: np.ndarray) -> dict:
        raise RuntimeError("boom in the transform")


class KillWorker(Explode):
    """A worker that dies as if killed by the out-of-memory killer."""

    def __call__(self, image: np.ndarray) -> dict:
        if os.getpid() != MAIN_PID:
            os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("ran in the test process, not in a worker")


def test_exception_in_a_loader_worker_is_raised(job):
    ensemble = load_ensemble(job / "weights")
    paths = sorted(str(p) for p in (job / "images").glob("*.jpg"))[:4]
    with pytest.raises(RuntimeError, match=r"(?s)DataLoader worker process 0.*boom in the transform"):
        list(score_batches(ensemble, paths, batch_size=2, workers=1, progress=False, transform=Explode))


def test_killed_loader_worker_is_reported_not_hung_on(job):
    ensemble = load_ensemble(job / "weights")
    paths = sorted(str(p) for p in (job / "images").glob("*.jpg"))[:4]
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run instead of blocking it
    try:
        with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*(exited unexpectedly|killed by signal)"):
            list(score_batches(ensemble, paths, batch_size=2, workers=1, progress=False, transform=KillWorker))
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_infer_reports_a_worker_crash_and_keeps_the_partial_file(job, tmp_path, capsys, monkeypatch):
    import scoring.pipeline

    monkeypatch.setattr(scoring.pipeline, "score_batches", functools.partial(score_batches, transform=Explode))
    out = tmp_path / "sub.csv"
    with pytest.raises(RuntimeError, match="boom in the transform"):
        infer.main(args(job, out, "--workers", "1"))
    assert "sub.csv.partial; rerun with --resume to continue" in capsys.readouterr().err
    assert (tmp_path / "sub.csv.partial").exists() and not out.exists()
