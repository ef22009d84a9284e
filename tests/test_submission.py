"""Submission checking and scoring: evaluation/submission.py."""
from __future__ import annotations

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
    assert S.main([str(sub), "--labels", str(labels), "--by", "source", "--roc", str(roc), "--hist", str(hist)]) == 0
    out = capsys.readouterr().out
    assert "| all" in out and "source=x" in out and "source=y" in out
    assert roc.stat().st_size > 1000 and hist.stat().st_size > 1000
    scored = S.match_labels(S.read_submission(sub), pd.read_csv(labels), sub)
    table = S.score_submission(scored, "source")
    assert table.loc["all", "auc"] == 1.0 and table.loc["all", "acc@0.5"] == 1.0


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
    assert S.main([str(sub), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(sub) in err and err.count("\n") == 1


def test_crlf_and_extra_columns_are_fine(tmp_path, labels, capsys):
    sub = write(tmp_path, "img_name,y_pred,expert_a\r\na.jpg,0.1,0\r\nb.jpg,0.9,0\r\nc.jpg,0.2,0\r\nd.jpg,0.8,0\r\n")
    assert S.main([str(sub), "--labels", str(labels)]) == 0
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
    assert np.isfinite(S.score_submission(S.match_labels(S.read_submission(sub), pd.read_csv(labels), sub))
                       .loc["all", "auc"])
