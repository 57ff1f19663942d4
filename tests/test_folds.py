"""Subject-grouped folds."""

import numpy as np
import pytest

from codes.common.folds import FOLD_FILE, assign_folds, data_folds, read_fold_file
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


# ---------------------------------------------------------------- folds from a file
def _write(path, text: str):
    path.write_text(text)
    return path


def test_fold_file_gives_every_sequence_its_subjects_fold(tmp_path):
    path = _write(tmp_path / "folds.csv", "subject,fold\nA,1\nB,0\nC,1\nUNUSED,7\n")
    folds = read_fold_file(path, ["A", "A", "B", "C", "B"])
    assert folds.dtype == np.int64
    np.testing.assert_array_equal(folds, [1, 1, 0, 1, 0])


def test_absent_fold_file_is_none(tmp_path):
    assert read_fold_file(tmp_path / "folds.csv", ["A"]) is None


def test_fold_file_errors_name_the_file(tmp_path):
    path = _write(tmp_path / "folds.csv", "subject,fold\nA,0\nB,1\n")
    with pytest.raises(ValueError, match=r"folds\.csv has no fold for these subjects of the data: C, D"):
        read_fold_file(path, ["A", "B", "C", "D"])
    gap = _write(tmp_path / "gap.csv", "subject,fold\nA,0\nB,2\n")
    with pytest.raises(ValueError, match=r"gap\.csv: the folds .* exactly 0\.\.k-1.*\[0, 2\]"):
        read_fold_file(gap, ["A", "B"])
    one_based = _write(tmp_path / "one.csv", "subject,fold\nA,1\nB,2\n")
    with pytest.raises(ValueError, match=r"one\.csv"):
        read_fold_file(one_based, ["A", "B"])
    twice = _write(tmp_path / "twice.csv", "subject,fold\nA,0\nA,1\n")
    with pytest.raises(ValueError, match=r"twice\.csv, line 3: subject 'A' is listed more than once"):
        read_fold_file(twice, ["A"])
    text = _write(tmp_path / "text.csv", "subject,fold\nA,first\n")
    with pytest.raises(ValueError, match=r"text\.csv, line 2: fold 'first' of 'A' is not an integer"):
        read_fold_file(text, ["A"])
    header = _write(tmp_path / "header.csv", "subj,f\nA,0\n")
    with pytest.raises(ValueError, match=r"header\.csv: expected the header 'subject,fold'"):
        read_fold_file(header, ["A"])


def test_data_folds_without_a_fold_file_are_the_assigned_folds(tmp_path):
    gestures, subjects = _toy_labels()
    (tmp_path / "other.csv").write_text("subject,fold\n")  # only folds.csv counts
    folds, from_file = data_folds(tmp_path, gestures, subjects, n_folds=4, seed=1)
    assert from_file is False
    np.testing.assert_array_equal(folds, assign_folds(gestures, subjects, n_folds=4, seed=1))
    default, _ = data_folds(str(tmp_path), gestures, subjects)
    np.testing.assert_array_equal(default, assign_folds(gestures, subjects))  # 5 folds, seed 42


def test_data_folds_take_the_folders_fold_file(tmp_path):
    gestures, subjects = _toy_labels(n_subjects=6, per_subject=3)
    names = np.unique(subjects)
    fold_of = {name: i % 2 for i, name in enumerate(names)}  # 2 folds, unlike anything assign_folds gives
    _write(tmp_path / FOLD_FILE, "subject,fold\n" + "".join(f"{s},{f}\n" for s, f in fold_of.items()))
    folds, from_file = data_folds(tmp_path, gestures, subjects, n_folds=5, seed=0)
    assert from_file is True
    np.testing.assert_array_equal(folds, [fold_of[s] for s in subjects])
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / FOLD_FILE, "subject,fold\nSUBJ_000000,0\n")
    with pytest.raises(ValueError, match="has no fold for these subjects"):
        data_folds(bad, gestures, subjects)  # a broken file is an error, not a fallback
