"""The decision threshold: chosen on labelled data, recorded in the manifest, used for infer.py's verdict."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import infer
from evaluation import threshold
from evaluation.threshold import ThresholdError, choose_threshold
from evaluation.threshold import main as threshold_main
from experts import (Ensemble, WeightsError, create_expert, load_ensemble, read_manifest, save_ensemble,
                     scores_fingerprint)
from experts.weights import set_threshold
from tests.conftest import ROOT, write_labelled_set

# Six images: by descending score F F R R F R (F = fake, 1).
TARGETS = [0, 0, 0, 1, 1, 1]
PROBS = [0.1, 0.4, 0.35, 0.8, 0.3, 0.9]


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    return save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "weights")


# ------------------------------------------------------------------------------------ choose_threshold
def test_balanced_rule_maximises_balanced_accuracy():
    # thresholds 0.9, 0.8, 0.4, 0.35, 0.3, 0.1 give balanced accuracies 4/6, 5/6, 4/6, 3/6, 4/6, 3/6
    chosen = choose_threshold(TARGETS, PROBS)
    assert chosen == {"value": 0.8, "rule": "balanced", "target_fpr": None, "tpr": pytest.approx(2 / 3),
                      "fpr": 0.0, "balanced_accuracy": pytest.approx(5 / 6), "n": 6, "n_fake": 3, "n_real": 3}


def test_balanced_rule_is_not_pulled_by_the_majority_class():
    # Nine fakes at 0.6..0.9 and one real at 0.7: plain accuracy would call everything fake (0.9);
    # balanced accuracy cuts above the real image.
    targets = [1] * 9 + [0]
    probs = [0.6, 0.61, 0.62, 0.63, 0.64, 0.75, 0.8, 0.85, 0.9, 0.7]
    chosen = choose_threshold(targets, probs)
    assert chosen["value"] == 0.75 and chosen["fpr"] == 0.0 and chosen["tpr"] == pytest.approx(4 / 9)


def test_fpr_rule_takes_the_lowest_threshold_within_the_target():
    loose = choose_threshold(TARGETS, PROBS, rule="fpr", target_fpr=0.34)
    assert (loose["value"], loose["tpr"], loose["fpr"]) == (0.4, pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert loose["rule"] == "fpr" and loose["target_fpr"] == 0.34
    assert choose_threshold(TARGETS, PROBS, rule="fpr", target_fpr=0.1)["value"] == 0.8
    looser = choose_threshold(TARGETS, PROBS, rule="fpr", target_fpr=0.7)
    assert (looser["value"], looser["tpr"], looser["fpr"]) == (0.3, 1.0, pytest.approx(2 / 3))
    # exactly on the target counts as within it
    assert choose_threshold(TARGETS, PROBS, rule="fpr", target_fpr=1 / 3)["value"] == 0.4


def test_a_score_equal_to_the_threshold_is_fake():
    chosen = choose_threshold([0, 1, 1], [0.2, 0.5, 0.5])
    assert chosen["value"] == 0.5 and chosen["tpr"] == 1.0 and chosen["fpr"] == 0.0


def test_impossible_choices_are_explained():
    with pytest.raises(ThresholdError, match="needs both classes; got 0 real and 3 fake"):
        choose_threshold([1, 1, 1], [0.1, 0.5, 0.9])
    with pytest.raises(ThresholdError, match="needs both classes"):
        choose_threshold([0, 0], [0.1, 0.5], rule="fpr", target_fpr=0.1)
    for bad in (None, 0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ThresholdError, match=r"in \(0, 1\)"):
            choose_threshold(TARGETS, PROBS, rule="fpr", target_fpr=bad)
    with pytest.raises(ThresholdError, match="fpr rule only"):
        choose_threshold(TARGETS, PROBS, rule="balanced", target_fpr=0.1)
    with pytest.raises(ThresholdError, match="unknown rule"):
        choose_threshold(TARGETS, PROBS, rule="accuracy")
    with pytest.raises(ThresholdError, match="top score"):  # the best-scored image is real
        choose_threshold([0, 1], [0.9, 0.5], rule="fpr", target_fpr=0.01)
    with pytest.raises(ThresholdError, match=r"finite numbers in \[0, 1\]"):
        choose_threshold([0, 1], [np.nan, 0.5])
    with pytest.raises(ThresholdError, match="one length"):
        choose_threshold([0, 1, 1], [0.1, 0.5])


# ------------------------------------------------------------------------- the manifest and the ensemble
def test_set_threshold_round_trips_through_load_ensemble(tiny_weights):
    before = read_manifest(tiny_weights)
    mode = (tiny_weights / "manifest.json").stat().st_mode
    assert load_ensemble(tiny_weights).threshold == 0.5  # folders without one keep working
    set_threshold(tiny_weights, {"value": 0.3, "rule": "balanced", "target_fpr": None, "set": "x", "n": 6})
    ensemble = load_ensemble(tiny_weights)
    assert ensemble.threshold == 0.3
    assert ensemble.verdict(0.3) == "fake" and ensemble.verdict(0.2999) == "real"
    after = read_manifest(tiny_weights)
    assert after.pop("threshold")["set"] == "x" and after == before  # sha256 entries and the rest untouched
    assert (tiny_weights / "manifest.json").stat().st_mode == mode
    set_threshold(tiny_weights, {"value": 0.75, "rule": "fpr", "target_fpr": 0.01, "set": "y", "n": 9})
    assert load_ensemble(tiny_weights).threshold == 0.75 and read_manifest(tiny_weights)["threshold"]["n"] == 9
    assert sorted(p.name for p in tiny_weights.iterdir()) == ["eff", "manifest.json"]  # no temp file left


def test_a_new_threshold_keeps_the_scores_fingerprint_that_resume_checks(tiny_weights):
    before = scores_fingerprint(read_manifest(tiny_weights))
    set_threshold(tiny_weights, {"value": 0.3, "rule": "balanced"})
    assert scores_fingerprint(read_manifest(tiny_weights)) == before
    manifest = read_manifest(tiny_weights)
    manifest["experts"][0]["weight"] = 2.0
    assert scores_fingerprint(manifest) != before


def test_bad_thresholds_are_refused_naming_the_manifest(tiny_weights):
    manifest = tiny_weights / "manifest.json"
    original = manifest.read_text()
    with pytest.raises(WeightsError, match=r"manifest.json: \"threshold\": .*finite number in \[0, 1\]"):
        set_threshold(tiny_weights, {"value": 1.5})
    assert manifest.read_text() == original  # refused before writing
    for bad in ('{"value": -0.1}', '{"value": NaN}', '{"value": "high"}', '{"value": true}', '{"rule": "fpr"}',
                '0.3'):
        data = json.loads(original)
        data["threshold"] = json.loads(bad)
        manifest.write_text(json.dumps(data))
        with pytest.raises(WeightsError, match=r"manifest.json: \"threshold\""):
            load_ensemble(tiny_weights)
    with pytest.raises(ValueError, match=r"threshold must be a finite number in \[0, 1\]"):
        Ensemble({"eff": create_expert("test_efficientnet")}, threshold=float("inf"))


# ---------------------------------------------------------------------------------------------- infer.py
def test_infer_prints_the_verdict_of_the_stored_threshold(tiny_weights, tmp_path, capsys):
    images = write_labelled_set(tmp_path / "imgs", n=3).parent / "images"
    args = [str(images), "--weights", str(tiny_weights), "--quiet", "--per-expert"]
    set_threshold(tiny_weights, {"value": 0.0, "rule": "balanced"})
    assert infer.main(args) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[1:3] for r in rows] == [["fake", f"{i:03d}.jpg"] for i in range(3)]
    assert all(len(r) == 4 and r[0] == r[3] for r in rows)  # the expert's column stays after the name
    set_threshold(tiny_weights, {"value": 1.0, "rule": "balanced"})
    assert infer.main(args) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[1] for r in rows] == ["real" if float(r[0]) < 1.0 else "fake" for r in rows] == ["real"] * 3
    out = tmp_path / "sub.csv"  # the submission holds no verdict
    assert infer.main([str(images), "--weights", str(tiny_weights), "--quiet", "--submission", str(out)]) == 0
    assert list(pd.read_csv(out).columns) == ["img_name", "y_pred"]


# ------------------------------------------------------------------------------------------ the command
def test_command_prints_by_default_and_records_only_with_write(tiny_weights, labelled_csv, capsys):
    manifest = tiny_weights / "manifest.json"
    before = manifest.read_bytes()
    # the default: choose, print, write nothing (this used to rewrite the manifest silently)
    result = subprocess.run([sys.executable, "evaluation/threshold.py", str(labelled_csv), "--whole", "--rule",
                             "balanced", "--weights", str(tiny_weights)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "threshold " in result.stdout and "not written" in result.stdout and "--write" in result.stdout
    assert manifest.read_bytes() == before
    assert threshold_main([str(labelled_csv), "--whole", "--weights", str(tiny_weights), "--rule", "fpr",
                           "--fpr", "0.25"]) == 0
    assert "(rule fpr, target FPR 0.25) on 16 images" in capsys.readouterr().out
    assert manifest.read_bytes() == before

    # --write records it
    result = subprocess.run([sys.executable, "evaluation/threshold.py", str(labelled_csv), "--whole", "--rule",
                             "balanced", "--weights", str(tiny_weights), "--write"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    entry = read_manifest(tiny_weights)["threshold"]
    assert entry["rule"] == "balanced" and entry["target_fpr"] is None and entry["n"] == 16
    assert entry["n_fake"] == 8 and entry["n_real"] == 8 and entry["jpeg_quality"] == 75
    assert entry["set"] == f"{labelled_csv} (all rows)"
    assert entry["command"] == (f"python evaluation/threshold.py {labelled_csv} --whole --rule balanced "
                                f"--weights {tiny_weights} --write")
    assert f"threshold {entry['value']:.6f} (rule balanced) on 16 images (8 fake, 8 real)" in result.stdout
    assert f"balanced accuracy {entry['balanced_accuracy']:.4f}" in result.stdout
    assert f"recorded in {manifest}" in result.stdout
    assert load_ensemble(tiny_weights).threshold == entry["value"]


def test_a_small_set_is_warned_about(tiny_weights, labelled_csv, capsys):
    """16 images, 8 of them real: far too few for any FPR target (the FPR moves in steps of 1/8)."""
    assert threshold_main([str(labelled_csv), "--whole", "--weights", str(tiny_weights), "--fpr", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "warning: only 8 real images" in err and "1/8 = 0.12" in err and "at least 100 reals" in err
    assert threshold_main([str(labelled_csv), "--whole", "--weights", str(tiny_weights), "--rule", "balanced"]) == 0
    assert "warning: only 8 real and 8 fake images" in capsys.readouterr().err
    # the rule: max(100, 10 / FPR) reals for --rule fpr, 100 of each class for balanced
    assert threshold.small_set_warning(200, 5, "fpr", 0.05) is None
    assert "at least 200 reals" in threshold.small_set_warning(199, 500, "fpr", 0.05)
    assert "at least 100 reals" in threshold.small_set_warning(99, 500, "fpr", 0.2)
    assert "at least 10000 reals" in threshold.small_set_warning(9999, 500, "fpr", 1e-3)
    assert threshold.small_set_warning(100, 100, "balanced", None) is None
    assert threshold.small_set_warning(100, 99, "balanced", None) is not None


def test_command_errors_are_clear(tiny_weights, tmp_path, capsys):
    csv = write_labelled_set(tmp_path / "set", n=4)
    fakes_only = tmp_path / "set" / "fakes.csv"
    pd.read_csv(csv).query("target == 1").to_csv(fakes_only, index=False)
    before = (tiny_weights / "manifest.json").read_text()
    assert threshold_main([str(fakes_only), "--whole", "--weights", str(tiny_weights)]) == 2
    err = capsys.readouterr().err
    assert "needs both classes; got 0 real and 2 fake images" in err and "fakes.csv (all rows)" in err
    for bad in (["--rule", "fpr", "--fpr", "1.5"], ["--rule", "fpr", "--fpr", "0"]):
        assert threshold_main([str(csv), "--whole", "--weights", str(tiny_weights), *bad]) == 2
        assert "--fpr must lie strictly between 0 and 1" in capsys.readouterr().err
    assert threshold_main([str(csv), "--whole", "--weights", str(tiny_weights), "--rule", "balanced",
                           "--fpr", "0.1"]) == 2
    assert "leave out --rule balanced" in capsys.readouterr().err
    assert (tiny_weights / "manifest.json").read_text() == before


# ------------------------------------------------------------------ choosing on validation folds only
def test_the_threshold_is_chosen_on_the_validation_folds_and_the_test_cluster_only_reported(tmp_path,
                                                                                            monkeypatch, capsys):
    from evaluation import validate
    from tests.test_validate import designed_scores, fold_trained_weights

    for module in (validate, threshold):
        monkeypatch.setattr(module, "score_labelled", designed_scores)
    weights = fold_trained_weights(tmp_path, write_labelled_set(tmp_path / "set", n=24))
    assert threshold_main(["--folds", "--weights", str(weights), "--write"]) == 0
    entry = read_manifest(weights)["threshold"]
    # Out of fold: fold 0 by a (reals 0.25, fakes 0.75), fold 1 by b and c (0.5 for all). At most 5% of
    # the validation reals flagged: 0.75. On the test cluster all three score reals 5/12, fakes 7/12, where
    # the same rule would cut at 7/12: the choice does not look there.
    assert entry["value"] == pytest.approx(0.75) and (entry["rule"], entry["target_fpr"]) == ("fpr", 0.05)
    assert [s["name"] for s in entry["sets"]] == ["fold_0", "fold_1"]
    assert [r["name"] for r in entry["report"]] == ["cluster_2 (set)"]
    assert entry["report"][0]["tpr"] == 0.0 and entry["report"][0]["fpr"] == 0.0
    out = capsys.readouterr().out
    assert "cluster_2 (set) (held-out cluster, report only, not used for the choice)" in out
