import numpy as np
import pytest

from evaluation.metrics import detection_metrics


def test_perfect_and_inverted_scores():
    t = np.array([0, 0, 1, 1])
    good = detection_metrics(t, [0.1, 0.2, 0.8, 0.9])
    assert good["auc"] == 1.0 and good["tpr@fpr1e-3"] == 1.0 and good["eer"] == 0.0 and good["acc@0.5"] == 1.0
    bad = detection_metrics(t, [0.9, 0.8, 0.2, 0.1])
    assert bad["auc"] == 0.0 and bad["acc@0.5"] == 0.0


def test_known_auc_and_ap():
    m = detection_metrics([0, 1, 0, 1], [0.1, 0.4, 0.45, 0.8])
    assert m["auc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx(0.8333333)


def test_one_class_gives_nan_not_an_error():
    assert np.isnan(detection_metrics([1, 1], [0.2, 0.9])["auc"])


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics([0, 1], [0.1, float("nan")])
