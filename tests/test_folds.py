"""Subject-grouped folds."""

import numpy as np

from codes.common.folds import assign_folds
from codes.common.schema import GESTURES


def _toy_labels(n_subjects: int = 12, per_subject: int = 36):
    rng = np.random.default_rng(3)
    subjects = np.repeat([f"SUBJ_{i:06d}" for i in range(n_subjects)], per_subject)
    gestures = rng.choice(GESTURES, size=len(subjects))
    return gestures, subjects


def test_no_subject_in_two_folds_and_every_sequence_assigned():
    gestures, subjects = _toy_labels()
    folds = assign_folds(gestures, subjects, n_folds=4, seed=0)
    assert set(folds.tolist()) == {0, 1, 2, 3}
    for subject in np.unique(subjects):
        assert len(np.unique(folds[subjects == subject])) == 1


def test_folds_are_deterministic_for_a_seed_and_change_with_it():
    gestures, subjects = _toy_labels()
    a = assign_folds(gestures, subjects, n_folds=4, seed=0)
    assert np.array_equal(a, assign_folds(gestures, subjects, n_folds=4, seed=0))
    assert any(not np.array_equal(a, assign_folds(gestures, subjects, n_folds=4, seed=s)) for s in (1, 2, 3))


def test_too_few_subjects_is_an_error():
    gestures, subjects = _toy_labels(n_subjects=3)
    try:
        assign_folds(gestures, subjects, n_folds=5)
    except ValueError as error:
        assert "at least 5 subjects" in str(error)
    else:
        raise AssertionError("expected a ValueError")
