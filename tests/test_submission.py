"""Submission checking and scoring: evaluation/submission.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from evaluation import submission as S
from tests.conftest import ROOT

LABELS = "img_name,target,source\na.jpg,0,x\nb.jpg,1,x\nc.jpg,0,y\nd.jpg,1,y\n"


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(LABELS)
    return path


def write(tmp_path, text, name="sub.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_scores_a_good_submission_with_a_table_per_source_and_plots(tmp_path, labels, capsys):
    sub = write(tmp_path, "img_name,y_pred\nd.jpg,0.9\nc.jpg,0.2\nb.jpg,0.6\na.jpg,0.4\n")
    roc, hist = tmp_path / "roc.png", tmp_path / "hist.png"
    assert S.main([str(sub), "--labels", str(labels), "--by", "source", "--roc", str(roc), "--hist", str(hist),
                   "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| all" in out and "source=x" in out and "source=y" in out
    assert roc.stat().st_size > 1000 and hist.stat().st_size > 1000
    scored = S.match_labels(S.read_submission(sub), pd.read_csv(labels), sub)
    table = S.score_submission(scored, 0.5, "source")
    assert table.loc["all", "auc"] == 1.0 and table.loc["all", "acc@thr"] == 1.0


@pytest.mark.parametrize("text, message", [
    ("img_name,score\na.jpg,0.1\n", "missing column(s) ['y_pred']"),
    ("img_name,y_pred\na.jpg,0.1\nb.jpg,1.5\nc.jpg,0.1\nd.jpg,0.1\n", "row 3 ('1.5')"),
    ("img_name,y_pred\na.jpg,0.1\nb.jpg,nan\nc.jpg,0.1\nd.jpg,0.1\n", "row 3"),
    ("img_name,y_pred\na.jpg,0.1\nb.jpg,abc\nc.jpg,0.1\nd.jpg,0.1\n", "row 3 ('abc')"),
    ("img_name,y_pred\na.jpg,0.1\na.jpg,0.2\nc.jpg,0.1\nd.jpg,0.1\n", "listed more than once"),
    ("img_name,y_pred\na.jpg,0.1\nb.jpg,0.2\nc.jpg,0.1\n", "1 labelled image(s) have no score: ['d.jpg']"),
    ("img_name,y_pred\na.jpg,0.1\nb.jpg,0.2\nc.jpg,0.1\nd.jpg,0.3\ne.jpg,0.3\n", "row 6 ('e.jpg')"),
    ("", "file is empty"),
])
def test_malformed_submissions_are_refused_naming_the_row(tmp_path, labels, capsys, text, message):
    sub = write(tmp_path, text)
    assert S.main([str(sub), "--labels", str(labels), "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(sub) in err and err.count("\n") == 1


def test_crlf_and_extra_columns_are_fine(tmp_path, labels, capsys):
    sub = write(tmp_path, "img_name,y_pred,expert_a\r\na.jpg,0.1,0\r\nb.jpg,0.9,0\r\nc.jpg,0.2,0\r\nd.jpg,0.8,0\r\n")
    assert S.main([str(sub), "--labels", str(labels), "--threshold", "0.5"]) == 0
    assert "1.0000" in capsys.readouterr().out


def test_scores_what_infer_writes(tmp_path):
    """End to end from the repo root: infer.py writes a submission for the demo images, this scores it."""
    labels = tmp_path / "labels.csv"
    demo = pd.read_csv(ROOT / "demo" / "scores.csv")
    pd.DataFrame({"img_name": [str(ROOT / "demo" / n) for n in demo["img_name"]],
                  "target": [int("fake" in n) for n in demo["img_name"]]}).to_csv(labels, index=False)
    sub = tmp_path / "sub.csv"
    subprocess.run([sys.executable, "infer.py", str(labels), "--submission", str(sub), "--quiet"], cwd=ROOT, check=True)
    result = subprocess.run([sys.executable, "evaluation/submission.py", str(sub), "--labels", str(labels)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert np.isfinite(S.score_submission(S.match_labels(S.read_submission(sub), pd.read_csv(labels), sub), 0.5)
                       .loc["all", "auc"])
    # the verdicts are those of the shipped weights' stored threshold, the one infer.py used
    from experts import read_manifest

    stored = read_manifest(ROOT / "weights")["threshold"]["value"]
    assert f"at threshold {stored:.6f}, stored in {ROOT / 'weights' / 'manifest.json'}" in result.stdout


def fake_weights(folder, threshold=None):
    """A weights folder's manifest only (its experts are never loaded here), with a stored threshold."""
    folder.mkdir()
    manifest = {"format_version": 1, "experts": [{"key": "a", "file": "a/model.safetensors", "sha256": "0",
                                                  "config": "a/config.json", "config_sha256": "0"}]}
    if threshold is not None:
        manifest["threshold"] = {"value": threshold, "rule": "fpr"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_verdicts_are_scored_at_the_stored_threshold_not_at_one_half(tmp_path, labels, capsys):
    # fakes d 0.9, b 0.6; reals a 0.4, c 0.2: at 0.5 every verdict is right, at 0.8 fake b is missed
    sub = write(tmp_path, "img_name,y_pred\nd.jpg,0.9\nc.jpg,0.2\nb.jpg,0.6\na.jpg,0.4\n")
    weights = fake_weights(tmp_path / "w", threshold=0.8)
    assert S.main([str(sub), "--labels", str(labels), "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert f"at threshold 0.800000, stored in {weights / 'manifest.json'}" in out
    assert "acc@0.5" not in out and "acc@thr" in out and "tpr@fpr1e-3" in out and "auc" in out
    row = next(line for line in out.splitlines() if line.startswith("| all"))
    assert [float(v) for v in row.split("|")[2:-1]] == [4, 1, 1, 0, 1, 0.75, 0.5, 0]
    # --threshold instead of a folder's; a folder without one gets 0.5, as infer.py does
    assert S.main([str(sub), "--labels", str(labels), "--threshold", "0.3"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| all"))
    assert [float(v) for v in row.split("|")[-4:-1]] == [0.75, 1, 0.5]
    assert S.main([str(sub), "--labels", str(labels), "--weights", str(fake_weights(tmp_path / "w0"))]) == 0
    assert "at threshold 0.500000" in capsys.readouterr().out
    # a folder that is not one, or a threshold out of range: one error line
    for bad in (["--weights", str(tmp_path)], ["--threshold", "1.5"]):
        assert S.main([str(sub), "--labels", str(labels), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_a_submission_with_filled_rows_for_unreadable_images_is_scored(tmp_path, capsys):
    """infer.py writes a row for every input, the --fill value (0.5) for images it cannot read."""
    import torch

    from experts import create_expert, save_ensemble
    from tests.conftest import write_labelled_set

    labels = write_labelled_set(tmp_path / "set", n=6)
    (labels.parent / "images" / "broken.jpg").write_bytes(b"not an image")
    with open(labels, "a") as f:
        f.write("images/broken.jpg,1,gb\n")
    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "weights")
    sub = tmp_path / "sub.csv"
    result = subprocess.run([sys.executable, "infer.py", str(labels), "--submission", str(sub), "--weights",
                             str(weights), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "broken.jpg" in result.stderr  # the image is reported, its row filled
    assert pd.read_csv(sub).set_index("img_name").loc["images/broken.jpg", "y_pred"] == 0.5
    assert S.main([str(sub), "--labels", str(labels), "--weights", str(weights)]) == 0
    out, err = capsys.readouterr()
    assert "7 images (4 fake)" in out
    assert "1 row(s) hold 0.5, the score infer.py --fill gives images it could not read" in err
