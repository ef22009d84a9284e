"""infer.py as users run it: single images, folders, CSV lists, bad files, and the default model."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import torch

import infer
from experts import create_expert, read_manifest, save_ensemble, sha256_file
from tests.conftest import ROOT, write_labelled_set


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    experts = {"eff": create_expert("test_efficientnet"), "clip": create_expert("test_clip")}
    return save_ensemble(experts, tmp_path / "weights")


@pytest.fixture
def image_folder(tmp_path):
    csv = write_labelled_set(tmp_path / "imgs", n=5)
    (csv.parent / "images" / "broken.jpg").write_text("not an image")
    return csv.parent


def test_folder_with_a_bad_file_writes_the_good_rows_and_fails(tiny_weights, image_folder, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    code = infer.main([str(image_folder / "images"), "--weights", str(tiny_weights), "--submission", str(out),
                       "--per-expert", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg: not an image file" in err and "1 of 6 images could not be scored" in err
    df = pd.read_csv(out)
    assert list(df.columns) == ["img_name", "y_pred", "eff", "clip"]
    assert list(df["img_name"]) == [f"{i:03d}.jpg" for i in range(5)] + ["broken.jpg"]
    assert df.iloc[-1, 1:].tolist() == [0.5, 0.5, 0.5]  # the unreadable image's row holds --fill
    assert df["y_pred"].between(0, 1).all()
    assert (df["y_pred"] - (df["eff"] + df["clip"]) / 2).abs().max() < 1e-5


def test_csv_list_keeps_its_order_and_names(tiny_weights, image_folder, tmp_path):
    csv = image_folder / "labels.csv"
    reordered = pd.read_csv(csv).iloc[::-1]
    reordered.to_csv(image_folder / "list.csv", index=False)
    out = tmp_path / "sub.csv"
    assert infer.main([str(image_folder / "list.csv"), "--weights", str(tiny_weights), "--submission", str(out),
                       "--quiet"]) == 0
    assert list(pd.read_csv(out)["img_name"]) == list(reordered["img_name"])


def test_existing_submission_is_not_overwritten_silently(tiny_weights, image_folder, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    out.write_text("keep me")
    args = [str(image_folder / "labels.csv"), "--weights", str(tiny_weights), "--submission", str(out), "--quiet"]
    assert infer.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert infer.main(args + ["--overwrite"]) == 0 and out.read_text().startswith("img_name,y_pred")


def test_missing_source_is_a_clear_error(tiny_weights, capsys):
    assert infer.main(["no/such/dir", "--weights", str(tiny_weights)]) == 2
    assert "no/such/dir: no such file or folder" in capsys.readouterr().err


def test_prints_one_line_per_image(tiny_weights, image_folder, capsys):
    images = sorted((image_folder / "images").glob("00*.jpg"))[:2]
    assert infer.main([str(p) for p in images] + ["--weights", str(tiny_weights), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == [str(p) for p in images]
    assert all(0.0 <= float(line.split("\t")[0]) <= 1.0 for line in lines)
    # no threshold in the folder: the verdict is the probability against 0.5
    assert all(line.split("\t")[1] == ("fake" if float(line.split("\t")[0]) >= 0.5 else "real") for line in lines)


# ------------------------------------------------------------------------------ the shipped default model
def test_default_weights_match_their_checksums():
    manifest = read_manifest(ROOT / "weights")
    for entry in manifest["experts"]:
        assert sha256_file(ROOT / "weights" / entry["file"]) == entry["sha256"]
        assert sha256_file(ROOT / "weights" / entry["config"]) == entry["config_sha256"]
        assert (ROOT / "weights" / entry["file"]).stat().st_size < 20 * 2**20


def test_default_model_reproduces_the_demo_scores():
    expected = pd.read_csv(ROOT / "demo" / "scores.csv")
    images = [f"demo/{name}" for name in expected["img_name"]]
    result = subprocess.run([sys.executable, "infer.py", *images, "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    got = {name: float(prob) for prob, _, name in rows}
    for name, score in zip(expected["img_name"], expected["y_pred"]):
        assert float(got[f"demo/{name}"]) == pytest.approx(score, abs=1e-4), name
    threshold = read_manifest(ROOT / "weights").get("threshold", {"value": 0.5})["value"]
    assert all(verdict == ("fake" if float(prob) >= threshold else "real") for prob, verdict, _ in rows)
    # every demo image, named by its label, gets the right verdict
    assert all(verdict == ("fake" if "_fake_" in name else "real") for _, verdict, name in rows)


def test_crop_faces_scores_the_face_crop(tiny_weights, tmp_path, capsys):
    pytest.importorskip("yuface")
    from PIL import Image

    # A face in a corner of a larger canvas: the crop differs from the whole image.
    canvas = Image.new("RGB", (2400, 1600), (90, 90, 90))
    canvas.paste(Image.open(ROOT / "demo" / "gan_real_1.jpg"), (1300, 500))
    image = str(tmp_path / "scene.jpg")
    canvas.save(image)
    assert infer.main([image, "--weights", str(tiny_weights), "--quiet"]) == 0
    whole = float(capsys.readouterr().out.split("\t")[0])
    assert infer.main([image, "--weights", str(tiny_weights), "--quiet", "--crop-faces"]) == 0
    cropped = float(capsys.readouterr().out.split("\t")[0])
    assert 0.0 <= cropped <= 1.0 and cropped != whole


def test_a_submission_is_readable_by_others_under_a_usual_umask(tiny_weights, image_folder, tmp_path):
    out = tmp_path / "sub.csv"
    old = os.umask(0o022)
    infer.main([str(image_folder / "images" / "000.jpg"), "--weights", str(tiny_weights), "--submission", str(out),
                "--quiet"])
    os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and len(pd.read_csv(out)) == 1


def test_threads_option_and_default_leave_a_core_to_each_loader_worker(tiny_weights, image_folder, monkeypatch):
    from core import device

    monkeypatch.setattr(device, "cpu_count", lambda: 4)
    monkeypatch.setattr(device, "busy_cpus", lambda: 0)
    assert [device.default_threads(w) for w in (0, 1, 3, 8)] == [4, 3, 1, 1]
    monkeypatch.setattr(device, "busy_cpus", lambda: 2)  # other work on two cores: leave them alone
    assert [device.default_threads(w) for w in (0, 1, 3)] == [2, 1, 1]
    monkeypatch.setattr(device, "busy_cpus", lambda: 0)
    assert device.default_workers(1, 32) == 0 and device.default_workers(33, 32) == 1  # a process only to overlap
    monkeypatch.setattr(device, "cpu_count", lambda: 2)
    assert device.default_workers(1000, 32) == 0  # on 2 CPUs both go to the model
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(device, "cpu_count", lambda: 4)
    assert device.default_workers(1000, 32) == 0 and device.default_threads(0) == 2  # torchrun: 2 CPUs each
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    before = torch.get_num_threads()
    try:
        assert infer.main([str(image_folder / "images" / "000.jpg"), "--weights", str(tiny_weights), "--quiet",
                           "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        infer.main([str(image_folder / "images" / "000.jpg"), "--weights", str(tiny_weights), "--quiet",
                    "--workers", "1"])
        assert torch.get_num_threads() == 3
        infer.main([str(image_folder / "images" / "000.jpg"), "--weights", str(tiny_weights), "--quiet"])
        assert torch.get_num_threads() == 4  # one image: no worker, every CPU to torch
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_take_the_smaller_of_the_load_average_and_a_sample_of_now(monkeypatch):
    """The load average remembers a job that ended a minute ago; the sample does not."""
    from core import device

    monkeypatch.setattr(device.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    monkeypatch.setattr(device, "_busy_now", lambda sample_s: 0.1)
    assert device.busy_cpus() == 0
    monkeypatch.setattr(device, "_busy_now", lambda sample_s: 1.9)
    assert device.busy_cpus() == 2
    monkeypatch.setattr(device, "_busy_now", lambda sample_s: None)  # no /proc/stat: the load average alone
    assert device.busy_cpus() == 2
    real = device._cpu_times()
    if real is not None:  # Linux: one entry per CPU this process may use, idle ticks within all ticks
        assert set(real) == set(os.sched_getaffinity(0)) and all(0 <= i <= t for i, t in real.values())
