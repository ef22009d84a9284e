"""The augmenters' shared jobs, seeds, resume and labels (data_prep/augment_jobs.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from core.labels import read_labels
from data_prep import augment_jobs as aj
from data_prep.augment_edits import augment
from tests.conftest import ROOT
from tests.test_edits import write_reals


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _save(out: aj.OutputFolder, name: str, seed: int = 0) -> dict:
    record = {"img_name": aj.image_name(name), "target": 1, "group": "g", "source": "test",
              "mask": aj.mask_name(name), "seed": seed}
    return out.save(name, record, _image(seed), np.full((16, 16), 255, np.uint8))


# ------------------------------------------------------------------------------------------------ seeds
def test_seeds_depend_on_the_run_seed_and_the_name_only():
    names = [f"img{i}_splice_0" for i in range(50)]
    forward = {n: aj.job_seed(7, n) for n in names}
    backward = {n: aj.job_seed(7, n) for n in reversed(names)}
    assert forward == backward and len(set(forward.values())) == len(names)
    assert all(0 <= s < 2 ** 63 for s in forward.values())
    assert forward != {n: aj.job_seed(8, n) for n in names}
    # the same in another process (no hash randomisation, no global state)
    code = "from data_prep.augment_jobs import job_seed; print(job_seed(7, 'img3_splice_0'))"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert int(other.stdout) == forward["img3_splice_0"]


def test_bad_seeds_and_clashing_names_are_refused():
    with pytest.raises(aj.AugmentError, match="--seed"):
        aj.job_seed(-1, "x")
    assert aj.check_seed(np.int64(3)) == 3
    jobs = [aj.Job("x", "a/x.jpg", "a/x.jpg", "g", 0), aj.Job("x", "a/x.png", "a/x.png", "g", 0)]
    with pytest.raises(aj.AugmentError, match="a/x.jpg and a/x.png"):
        aj.check_unique(jobs)


def test_sd_plan_gives_each_output_the_same_seed_whatever_the_source_order():
    from data_prep.sd_augment import AugmentConfig, plan_jobs

    sources = pd.DataFrame({"img_name": [f"real/{i}.jpg" for i in range(5)],
                            "path": [f"/d/real/{i}.jpg" for i in range(5)], "group": list("aabbc")})
    cfg = AugmentConfig(model="m", masks=("box",), seed=5)
    forward = {j.name: j.seed for j in plan_jobs(sources, cfg)}
    backward = {j.name: j.seed for j in plan_jobs(sources.iloc[::-1], cfg)}
    fewer = {j.name: j.seed for j in plan_jobs(sources.head(2), cfg)}
    assert forward == backward and len(forward) == 5 * 4
    assert all(forward[name] == seed for name, seed in fewer.items())


def test_edits_do_not_depend_on_how_the_run_is_split(tmp_path):
    """--limit 2 then --limit 4 into one folder makes the same files as --limit 4 at once."""
    csv = write_reals(tmp_path / "set")
    augment(csv, tmp_path / "once", per_image=2, seed=3, limit=4, progress=False)
    augment(csv, tmp_path / "twice", per_image=2, seed=3, limit=2, progress=False)
    augment(csv, tmp_path / "twice", per_image=2, seed=3, limit=4, progress=False)
    once, twice = (pd.read_csv(tmp_path / d / "labels.csv") for d in ("once", "twice"))
    assert len(once) == 8 and once.equals(twice)
    for name in once["img_name"]:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_skips_done_jobs_and_redoes_missing_or_half_written_ones(tmp_path):
    out = aj.OutputFolder(tmp_path)
    jobs = [aj.Job(f"j{i}", f"r{i}.jpg", f"/r{i}.jpg", "g", i) for i in range(6)]
    for job in jobs:
        _save(out, job.name, job.seed)
    todo, done = out.split_done(jobs)
    assert todo == [] and done == jobs
    assert set(json.loads(out.meta_path("j0").read_text())["files"]) == {"images/j0.png", "masks/j0.png"}

    (tmp_path / "images/j1.png").unlink()                            # image deleted since
    data = (tmp_path / "masks/j2.png").read_bytes()
    (tmp_path / "masks/j2.png").write_bytes(data[: len(data) // 2])  # a file cut short (copied half-way)
    out.meta_path("j3").unlink()                                     # killed before its metadata
    out.meta_path("j4").write_text('{"img_name": "images/j4.p')      # unreadable metadata
    (tmp_path / "meta/.j5.json.abc.tmp.json").write_text(json.dumps(out.record("j5")))  # a killed write's leftover
    todo, done = out.split_done(jobs)
    assert [j.name for j in todo] == ["j1", "j2", "j3", "j4"] and [j.name for j in done] == ["j0", "j5"]
    with pytest.warns(UserWarning, match="j4.json: unreadable metadata"):
        assert [r["img_name"] for r in out.records()] == ["images/j0.png", "images/j5.png"]

    # a job whose image must be another file (another --format) is not done either
    assert out.is_done("j0") and not out.is_done("j0", aj.image_name("j0", "jpg"))
    for job in todo:
        _save(out, job.name, job.seed)
    assert out.split_done(jobs) == ([], jobs)


def test_metadata_without_file_sizes_counts_when_its_files_exist(tmp_path):
    """Outputs written before sizes were recorded are still resumed."""
    out = aj.OutputFolder(tmp_path)
    record = _save(out, "old")
    del record["files"]
    out.meta_path("old").write_text(json.dumps(record))
    assert out.is_done("old")
    (tmp_path / "masks/old.png").unlink()
    assert not out.is_done("old")


def test_augment_edits_redoes_a_cut_image(tmp_path):
    csv = write_reals(tmp_path / "set", n=3)
    out = tmp_path / "edits"
    first = augment(csv, out, edits="copy_move,double_jpeg", seed=0, progress=False)
    labels = pd.read_csv(out / "labels.csv")
    victim = out / labels["img_name"][0]
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    again = augment(csv, out, edits="copy_move,double_jpeg", seed=0, progress=False)
    assert (first.written, again.written, again.skipped) == (3, 1, 2)
    assert victim.read_bytes() == good and pd.read_csv(out / "labels.csv").equals(labels)


# ------------------------------------------------------------------------------------------------ labels
def test_labels_have_the_competition_columns_first_sorted_and_no_file_sizes(tmp_path):
    out = aj.OutputFolder(tmp_path)
    _save(out, "b", 1)
    _save(out, "a", 2)
    path = out.write_labels(["img_name", "target", "group", "source", "mask"], extra_columns=True,
                            extra_rows=[{"img_name": "../reals/r.jpg", "target": 0, "group": "g", "source": "reals",
                                         "mask": None, "flag": True}])
    assert path == tmp_path / "labels.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "img_name,target,group,source,mask,flag,seed"  # the given columns, then the others
    assert lines[1:] == ["../reals/r.jpg,0,g,reals,,True,", "images/a.png,1,g,test,masks/a.png,,2",
                         "images/b.png,1,g,test,masks/b.png,,1"]
    labels = read_labels(path)
    assert list(labels["target"]) == [0, 1, 1] and labels["path"].iloc[1] == str(tmp_path / "images/a.png")
    fixed = out.write_labels(["img_name", "target", "group", "source"])
    assert fixed.read_text().splitlines()[0] == "img_name,target,group,source"


def test_labels_are_written_atomically(tmp_path, monkeypatch):
    out = aj.OutputFolder(tmp_path)
    _save(out, "a")
    path = out.write_labels(["img_name", "target"])
    before = path.read_bytes()
    _save(out, "b")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if interrupted between writing the new file and putting it in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        out.write_labels(["img_name", "target"])
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old labels, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "labels.csv", "masks", "meta"]  # no leftovers
    assert len(pd.read_csv(out.write_labels(["img_name", "target"]))) == 2


# ------------------------------------------------------------------------------------------------ --help
CHECK_HELP = """
import runpy, sys
sys.argv = ["x", "--help"]
try:
    runpy.run_path(%r, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
print("TORCH", "torch" in sys.modules, "CV2", "cv2" in sys.modules, "PANDAS", "pandas" in sys.modules)
"""


@pytest.mark.parametrize("script", ["data_prep/sd_augment.py", "data_prep/augment_edits.py"])
def test_help_imports_no_torch(script):
    code = CHECK_HELP % script
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "TORCH False CV2 False PANDAS False"
    help_text = r.stdout
    assert "--out" in help_text and "(default: None)" not in help_text
    options = help_text.split("options:")[1]
    for entry in options.split("\n  -")[1:]:  # one option's help, wrapped over lines
        assert entry.count("default:") <= 1, entry
