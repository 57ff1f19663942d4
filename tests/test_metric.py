"""The competition metric against hand-computed cases."""

import pytest

from codes.common.metric import binary_f1, competition_score, macro_f1

CHEEK, NECK = "Cheek - pinch skin", "Neck - scratch"
WAVE, TEXT, DRINK = "Wave hello", "Text on phone", "Drink from bottle/cup"


def test_perfect_prediction_scores_one():
    y = [CHEEK, NECK, WAVE, TEXT]
    assert competition_score(y, y) == 1.0


def test_non_targets_confused_with_each_other_cost_nothing():
    # every non-target collapses into one class, so WAVE <-> TEXT is not an error
    assert competition_score([CHEEK, WAVE, TEXT], [CHEEK, TEXT, DRINK]) == 1.0


def test_hand_computed_case():
    y_true = [CHEEK, CHEEK, NECK, WAVE]
    y_pred = [CHEEK, NECK, NECK, CHEEK]
    # binary (target positive): TP = 3, FP = 1, FN = 0 -> F1 = 2*3 / (2*3 + 1) = 6/7
    assert binary_f1(y_true, y_pred) == pytest.approx(6 / 7)
    # 9-class macro over classes present: cheek P=1/2 R=1/2 F=1/2; neck P=1/2 R=1 F=2/3;
    # non_target P=0 (no prediction) R=0 F=0 -> (1/2 + 2/3 + 0) / 3 = 7/18
    assert macro_f1(y_true, y_pred) == pytest.approx(7 / 18)
    assert competition_score(y_true, y_pred) == pytest.approx(0.5 * 6 / 7 + 0.5 * 7 / 18)


def test_all_non_target_prediction_has_zero_binary_f1():
    y_true = [CHEEK, WAVE]
    y_pred = [WAVE, WAVE]
    assert binary_f1(y_true, y_pred) == 0.0
    # cheek F1 = 0, non_target P = 1/2 R = 1 F = 2/3 -> macro 1/3
    assert macro_f1(y_true, y_pred) == pytest.approx(1 / 3)


def test_prediction_outside_gestures_raises():
    with pytest.raises(ValueError, match="outside the 18 gestures"):
        competition_score([CHEEK], ["non_target"])
    with pytest.raises(ValueError, match="entries"):
        competition_score([CHEEK, WAVE], [CHEEK])
