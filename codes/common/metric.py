"""The competition metric.

score = 0.5 * binary F1 (Target vs Non-Target) + 0.5 * macro F1 over 9 classes (the 8 target
gestures plus every non-target gesture collapsed into ``non_target``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

from codes.common.schema import GESTURES, NON_TARGET_CLASS, TARGET_GESTURES

_GESTURE_SET = frozenset(GESTURES)
_TARGET_SET = frozenset(TARGET_GESTURES)


def _check_gestures(values: Sequence[str], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=object)
    unknown = sorted({str(v) for v in array if v not in _GESTURE_SET})
    if unknown:
        raise ValueError(f"{name} holds values outside the 18 gestures: {unknown[:5]}")
    return array


def _checked_pair(y_true: Sequence[str], y_pred: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    true = _check_gestures(y_true, "y_true")
    pred = _check_gestures(y_pred, "y_pred")
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} entries but y_pred has {len(pred)}")
    if len(true) == 0:
        raise ValueError("competition_score needs at least one prediction")
    return true, pred


def binary_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """F1 of "is a target gesture" (sklearn ``average='binary'``, positive = Target)."""
    true, pred = _checked_pair(y_true, y_pred)
    is_target_true = np.array([g in _TARGET_SET for g in true])
    is_target_pred = np.array([g in _TARGET_SET for g in pred])
    return float(f1_score(is_target_true, is_target_pred, average="binary", zero_division=0))


def collapse_non_targets(gestures: np.ndarray) -> np.ndarray:
    """Map every non-target gesture to ``non_target``; targets keep their name."""
    return np.array([g if g in _TARGET_SET else NON_TARGET_CLASS for g in gestures], dtype=object)


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Macro F1 over the 9 classes (8 targets + ``non_target``), classes present in either list."""
    true, pred = _checked_pair(y_true, y_pred)
    return float(
        f1_score(collapse_non_targets(true), collapse_non_targets(pred), average="macro", zero_division=0)
    )


def competition_score(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Mean of :func:`binary_f1` and :func:`macro_f1`, as the official scorer computes it."""
    return 0.5 * binary_f1(y_true, y_pred) + 0.5 * macro_f1(y_true, y_pred)
