"""Subject-grouped, gesture-stratified cross-validation folds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def assign_folds(
    gestures: Sequence[str], subjects: Sequence[str], n_folds: int = 5, seed: int = 42
) -> np.ndarray:
    """Fold index (0..n_folds-1) of every sequence; a subject's sequences share one fold.

    Deterministic for a seed: ``StratifiedGroupKFold(shuffle=True, random_state=seed)``.
    """
    gestures = np.asarray(gestures)
    subjects = np.asarray(subjects)
    if len(gestures) != len(subjects):
        raise ValueError(f"{len(gestures)} gestures but {len(subjects)} subjects")
    n_subjects = len(np.unique(subjects))
    if n_subjects < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} subjects, got {n_subjects}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(gestures), -1, dtype=np.int64)
    for fold, (_, valid_index) in enumerate(splitter.split(np.zeros(len(gestures)), gestures, subjects)):
        folds[valid_index] = fold
    return folds
