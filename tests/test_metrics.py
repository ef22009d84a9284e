import numpy as np
import pytest

from scoring.metrics import detection_metrics, tpr_at_fpr


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


def test_tpr_at_fpr_uses_every_roc_point_with_tied_scores():
    # 1000 reals and 1000 fakes: 500 fakes alone on top; then two scores each shared by one real and
    # 100 fakes; the rest below. At the cut 0.8 exactly one real is flagged (FPR 1e-3) and 600 fakes are
    # (TPR 0.6). The ROC points (0, 0.5), (1e-3, 0.6), (2e-3, 0.7) lie on one line, so roc_curve's
    # default drop_intermediate removes the middle one, the very point the metric asks for.
    targets = np.array([1] * 500 + [0] + [1] * 100 + [0] + [1] * 100 + [0] * 998 + [1] * 300)
    scores = np.array([0.9] * 500 + [0.8] * 101 + [0.7] * 101 + [0.1] * 1298)
    m = detection_metrics(targets, scores)
    assert m["tpr@fpr1e-3"] == 0.6
    assert tpr_at_fpr(targets, scores, max_fpr=2e-3) == 0.7


def test_verdict_metrics_call_a_score_at_the_threshold_fake():
    from scoring.metrics import verdict_metrics

    m = verdict_metrics([0, 0, 1, 1], [0.2, 0.8, 0.8, 0.9], threshold=0.8)
    assert (m["acc"], m["tpr"], m["fpr"], m["bacc"]) == (0.75, 1.0, 0.5, 0.75)
    assert np.isnan(verdict_metrics([1, 1], [0.2, 0.9], 0.5)["fpr"])
