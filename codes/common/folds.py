"""Subject-grouped, gesture-stratified cross-validation folds, or folds given by a file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from codes.common.data_files import DataFileError


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
    if n_folds < 2:
        raise ValueError(
            f"n_folds={n_folds} (data.n_folds): cross-validation needs at least 2 folds, one to validate "
            "on and the others to train on; set data.n_folds=2 or more"
        )
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
    are ignored), and the folds the sequences get must be exactly 0..k-1, k >= 2 (each used at least
    once). Anything else raises a ``ValueError`` naming the file and what to do.
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
    _check_file_folds(path, sorted(set(folds.tolist())))
    return folds


def _check_file_folds(path: Path, used: list[int]) -> None:
    """The folds the data's subjects get from ``path`` are 0..k-1, k >= 2, none without a subject."""
    rule = f"{path}: the folds of the data's subjects must be exactly 0..k-1, each used; got {used}"
    if used[0] < 0:
        raise DataFileError(f"{rule}: fold {used[0]} is not a fold number. Number the folds from 0")
    empty = sorted(set(range(used[-1] + 1)) - set(used))
    if empty:
        raise DataFileError(
            f"{rule}: fold {empty[0]} holds none of the data's subjects, so it would have nothing to "
            f"validate on. Give fold {empty[0]} some subjects, or number the folds 0..{len(used) - 1}"
        )
    if len(used) < 2:
        raise DataFileError(
            f"{path} puts every subject of the data in fold {used[0]}, which leaves no sequence to train "
            "on when it is validated; give the subjects at least 2 folds (0..k-1)"
        )


def check_folds_setting(selected: Sequence[int] | None) -> None:
    """``data.folds`` as a setting, before any data is read: None (every fold) or a non-empty list;
    else a ``ValueError`` saying what to do."""
    if selected is not None and len(selected) == 0:
        raise ValueError(
            "data.folds=[] names no fold to train; leave data.folds null to train every fold, or name "
            "the folds (e.g. data.folds=[0])"
        )


def check_selected_folds(folds: np.ndarray, selected: Sequence[int] | None, source: str) -> list[int]:
    """The folds to train: ``selected`` (``data.folds``; None = every fold 0..k-1), each checked to be
    a fold of ``folds`` (the fold of every sequence, from ``source``: the fold file or the settings)
    with sequences both to validate and to train on; else a ``ValueError`` naming the fold, the
    setting and what to do."""
    check_folds_setting(selected)
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    counts = np.bincount(folds, minlength=n_folds)
    wanted = list(range(n_folds)) if selected is None else [int(fold) for fold in selected]
    for fold in wanted:
        if not 0 <= fold < n_folds:
            raise ValueError(
                f"data.folds={wanted} names fold {fold}, but the folds from {source} are 0..{n_folds - 1}; "
                "choose among them, or leave data.folds unset (null) to train every fold"
            )
        if wanted.count(fold) > 1:
            raise ValueError(f"data.folds={wanted} names fold {fold} twice; name each fold once")
        if counts[fold] == 0:
            raise ValueError(
                f"fold {fold} of {source} holds no sequence, so it has nothing to validate on; "
                "leave it out of data.folds, or choose other folds (fewer data.n_folds)"
            )
        if counts[fold] == len(folds):
            raise ValueError(
                f"fold {fold} of {source} holds every sequence, which leaves none to train on; give at least "
                "2 folds"
            )
    return wanted


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
