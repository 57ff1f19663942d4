"""Subject-grouped, gesture-stratified cross-validation folds, or folds given by a file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

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


FOLD_FILE = "folds.csv"  # an optional file of the data folder: columns subject,fold


def read_fold_file(path: Path | str, subjects: Sequence[str]) -> np.ndarray | None:
    """The fold of every sequence from a ``subject,fold`` CSV, or None when ``path`` does not exist.

    ``subjects`` holds the subject of every sequence; the answer is aligned with it. Every subject
    of ``subjects`` must have exactly one row in the file (subjects of the file without sequences
    are ignored), and the folds the sequences get must be exactly 0..k-1 (each used at least once).
    Anything else raises a ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header[:2] != ["subject", "fold"] or len(header) != 2:
            raise ValueError(f"{path}: expected the header 'subject,fold', got {','.join(header)!r}")
        fold_of: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if not row or all(not field.strip() for field in row):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}, line {line}: expected 2 fields (subject,fold), got {len(row)}")
            subject, fold = row[0].strip(), row[1].strip()
            try:
                fold_of_subject = int(fold)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: fold {fold!r} of {subject!r} is not an integer"
                ) from None
            if subject in fold_of:
                raise ValueError(f"{path}, line {line}: subject {subject!r} is listed more than once")
            fold_of[subject] = fold_of_subject
    subjects = np.asarray(subjects).astype(str)
    missing = sorted(set(subjects.tolist()) - set(fold_of))
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"{path} has no fold for these subjects of the data: {shown}")
    folds = np.array([fold_of[s] for s in subjects], dtype=np.int64)
    used = sorted(set(folds.tolist()))
    if used != list(range(len(used))):
        raise ValueError(
            f"{path}: the folds of the data's subjects must be exactly 0..k-1, each used; got {used}"
        )
    return folds


def data_folds(
    data_dir: Path | str, gestures: Sequence[str], subjects: Sequence[str], n_folds: int = 5, seed: int = 42
) -> tuple[np.ndarray, bool]:
    """The folds an experiment trains on: the data folder's ``folds.csv`` when it has one, else
    :func:`assign_folds` with ``n_folds`` and ``seed``. Returns (fold of every sequence, whether
    they came from the file)."""
    folds = read_fold_file(Path(data_dir) / FOLD_FILE, subjects)
    if folds is not None:
        return folds, True
    return assign_folds(gestures, subjects, n_folds, seed), False
