"""Batch mode: every sequence of test.csv at once -> submission.csv, scored when labels exist.

The synthetic data ships ``test_labels.csv``; with it the competition score is printed (overall,
and on the IMU-only and the full-sensor sequences). The competition's own test.csv has no labels.
Every sequence is answered by ``predict``'s rules; one odd sequence never fails the file
(``EnsemblePredictor.predict_frame``). The labels file is checked before anything is written, and
the output never replaces an input (:func:`check_output_path`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from codes.common.data_files import (
    TEST_DEMOGRAPHICS_FILE,
    TEST_FILE,
    TEST_LABELS_FILE,
    TRAIN_DEMOGRAPHICS_FILE,
    TRAIN_FILE,
    DataFileError,
    check_columns,
    check_gestures,
    read_demographics,
    read_header,
    read_test,
)
from codes.common.data_source import DATA_SOURCES, resolve_data_dir
from codes.common.folds import FOLD_FILE
from codes.common.metric import competition_score
from codes.common.schema import GESTURES, THM_COLUMNS, TOF_COLUMNS
from codes.inference.predictor import GestureAnswerer, check_batch_size, heads_of_frame
from codes.inference.subject_assignment import SubjectAssignment, as_heads

logger = logging.getLogger(__name__)

SUBMISSION_FILE = "submission.csv"
SUBMISSION_COLUMNS = ["sequence_id", "gesture"]
LABEL_COLUMNS_SCORED = ["sequence_id", "gesture"]  # what scoring reads of test_labels.csv


def resolve_test_dir(data: str, run_cfg, repo_root: Path) -> Path:
    """The folder holding test.csv: a data source (``auto`` / ``competition`` / ``synthetic``,
    resolved with the run's ``paths`` and ``data`` settings as training did) or a folder path."""
    if data in DATA_SOURCES:

        def from_repo(path: str) -> Path:
            return Path(path) if Path(path).is_absolute() else repo_root / path

        return resolve_data_dir(
            data,
            competition_dir=from_repo(run_cfg.paths.data_dir),
            synthetic_dir=from_repo(run_cfg.paths.synthetic_dir),
            synthetic_subjects=run_cfg.data.synthetic_subjects,
            synthetic_seed=run_cfg.data.synthetic_seed,
        )
    directory = Path(data)
    missing = [n for n in (TEST_FILE, TEST_DEMOGRAPHICS_FILE) if not (directory / n).is_file()]
    if missing:
        raise DataFileError(
            f"data={data!r} is neither a data source {DATA_SOURCES} nor a folder holding "
            f"{TEST_FILE} and {TEST_DEMOGRAPHICS_FILE} (missing: {missing})"
        )
    return directory


DATA_FOLDER_FILES = (
    TEST_FILE,
    TEST_DEMOGRAPHICS_FILE,
    TEST_LABELS_FILE,
    TRAIN_FILE,
    TRAIN_DEMOGRAPHICS_FILE,
    FOLD_FILE,
)


def protected_files(data_dir: Path, run_dir: Path | None = None) -> list[Path]:
    """The existing files an output may not replace: the data folder's competition files and every
    file of the run folder but the CSV files directly in it (batch mode's submissions; training
    writes no CSV there)."""
    files = [Path(data_dir) / name for name in DATA_FOLDER_FILES]
    if run_dir is not None:
        run_dir = Path(run_dir)
        files += [p for p in run_dir.rglob("*") if not (p.parent == run_dir and p.suffix.lower() == ".csv")]
    return [p for p in files if p.is_file()]


def check_output_path(output: Path, data_dir: Path, run_dir: Path | None = None) -> None:
    """A :class:`DataFileError` when writing ``output`` would replace an input (:func:`protected_files`,
    compared as files: links and other spellings of a path included) or cannot give a file (an
    existing folder, or a file where a parent folder should be)."""
    output = Path(output)
    if output.is_dir():
        raise DataFileError(
            f"the output {output} is an existing folder; name the file to write, e.g. {output / SUBMISSION_FILE}"
        )
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise DataFileError(f"the output {output} cannot be written: {parent} is a file, not a folder")
    if not output.exists():
        return
    for protected in protected_files(data_dir, run_dir):
        if os.path.samefile(output, protected):
            raise DataFileError(
                f"the output {output} is {protected}, an input of this prediction; writing it would "
                f"replace that file. Choose another output path (e.g. {SUBMISSION_FILE} in another folder)"
            )


def write_csv_atomically(frame: pl.DataFrame, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        frame.write_csv(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def score_predictions(predictions: pl.DataFrame, labels: pl.DataFrame) -> dict[str, float]:
    """Competition score of ``predictions`` (sequence_id, gesture[, imu_only]) against ``labels``."""
    joined = predictions.join(
        labels.select("sequence_id", pl.col("gesture").alias("true_gesture")), on="sequence_id", how="inner"
    )
    if joined.height != predictions.height:
        raise DataFileError(
            f"the labels cover {joined.height} of the {predictions.height} predicted sequences"
        )
    scores = {"score": competition_score(joined["true_gesture"], joined["gesture"]), "n": joined.height}
    if "imu_only" in joined.columns:
        for name, part in (
            ("imu_only", joined.filter(pl.col("imu_only"))),
            ("all_sensors", joined.filter(~pl.col("imu_only"))),
        ):
            if part.height:
                scores[f"score_{name}"] = competition_score(part["true_gesture"], part["gesture"])
                scores[f"n_{name}"] = part.height
    return scores


def read_labels(data_dir: Path, sequence_ids: pl.Series | None = None) -> pl.DataFrame | None:
    """``sequence_id, gesture`` of ``test_labels.csv`` in ``data_dir`` (the synthetic data's), or
    None when there is none (the competition's data).

    Checked before anything is predicted or written: the two columns (other columns are not
    needed), the 18 gesture strings, no sequence listed twice and, given ``sequence_ids``, a
    label for every one of them; a :class:`DataFileError` names what is wrong.
    """
    path = Path(data_dir) / TEST_LABELS_FILE
    if not path.is_file():
        return None
    check_columns(path, read_header(path), LABEL_COLUMNS_SCORED)
    labels = pl.read_csv(
        path, columns=LABEL_COLUMNS_SCORED, schema_overrides=dict.fromkeys(LABEL_COLUMNS_SCORED, pl.String)
    )
    check_gestures(labels["gesture"], path)
    twice = labels.filter(pl.col("sequence_id").is_duplicated())["sequence_id"].unique().sort().to_list()
    if twice:
        raise DataFileError(f"{path} lists these sequences more than once: {twice[:10]}")
    if sequence_ids is not None:
        unlabelled = sorted(
            set(sequence_ids.cast(pl.String).unique().to_list()) - set(labels["sequence_id"].to_list())
        )
        if unlabelled:
            raise DataFileError(
                f"{path} has no label for {len(unlabelled)} sequence(s) of {TEST_FILE}: {unlabelled[:10]}; "
                f"give every sequence a label or remove {path.name} (no score is printed then)"
            )
    return labels


def serving_order(n_sequences: int, seed: int) -> np.ndarray:
    """The shuffled order the sequences are served in (the gateway serves them shuffled)."""
    return np.random.default_rng(seed).permutation(n_sequences)


def subject_aware_answers(
    assignment: SubjectAssignment,
    subjects: np.ndarray,
    heads: dict[str, np.ndarray] | np.ndarray,
    order: np.ndarray,
) -> np.ndarray:
    """Gesture indices as :meth:`EnsemblePredictor.predict` answers them when the sequences come in
    ``order`` (causal: each one assigned with its subject's earlier ones); ``heads``: per head
    ``(N, C)`` probabilities (a bare array: the gesture head's); unanswerable rows (non-finite
    gesture probabilities) get -1."""
    assignment = assignment.fresh()
    heads = as_heads(heads)
    labels = np.full(len(heads["gesture"]), -1, dtype=np.int64)
    for i in order:
        if np.isfinite(heads["gesture"][i]).all():
            labels[i] = assignment.answer(subjects[i], {h: p[i] for h, p in heads.items()})
    return labels


def run_batch(
    predictor: GestureAnswerer,
    data_dir: Path,
    output: Path,
    batch_size: int = 64,
    order_seed: int = 0,
    run_dir: Path | None = None,
) -> dict[str, float] | None:
    """Predict test.csv of ``data_dir``, write ``output`` (sequence_id, gesture); return the
    scores when ``data_dir`` has labels (synthetic data), else None.

    ``output`` must not be one of the inputs (the data folder's files, ``run_dir``'s files):
    :func:`check_output_path`, before anything is read.

    With the predictor's subject assignment, the sequences are answered in a shuffled order
    (``order_seed``), each with its subject's earlier ones, as :meth:`~EnsemblePredictor.predict`
    answers them through the gateway; the scores then hold ``plain`` (each sequence alone),
    ``causal`` (what is written) and ``offline`` (each subject's whole test set at once, which
    the gateway cannot do).
    """
    check_batch_size(batch_size)
    data_dir = Path(data_dir)
    check_output_path(output, data_dir, run_dir)
    read = set(predictor.sensor_columns)  # the columns some model reads (a blend: any member)
    frame = read_test(
        data_dir, include_thm=bool(read & set(THM_COLUMNS)), include_tof=bool(read & set(TOF_COLUMNS))
    )
    demographics = read_demographics(data_dir / TEST_DEMOGRAPHICS_FILE)
    labels = read_labels(data_dir, frame["sequence_id"])  # checked before anything is written
    aware = predictor.subject_assignment is not None
    predictions = predictor.predict_frame(
        frame, demographics, batch_size=batch_size, source=str(data_dir / TEST_FILE), with_heads=aware
    )
    variants = {"plain": predictions}
    if predictor.subject_assignment is not None:
        subject_of = dict(
            frame.select("sequence_id", pl.col("subject").cast(pl.String)).unique("sequence_id").iter_rows()
        )
        subjects = np.array([subject_of.get(s) for s in predictions["sequence_id"]], dtype=object)
        heads = heads_of_frame(predictions)
        order = serving_order(len(subjects), order_seed)
        answered = np.isfinite(heads["gesture"]).all(axis=1)
        names = np.array(GESTURES, dtype=object)
        causal = subject_aware_answers(predictor.subject_assignment, subjects, heads, order)
        offline = np.full(len(subjects), -1, dtype=np.int64)
        offline[answered] = predictor.subject_assignment.fresh().offline(
            subjects[answered], {h: p[answered] for h, p in heads.items()}
        )
        for name, chosen in (("causal", causal), ("offline", offline)):
            gestures = np.where(answered, names[np.maximum(chosen, 0)], predictions["gesture"].to_numpy())
            variants[name] = predictions.with_columns(pl.Series("gesture", gestures, dtype=pl.String))
        predictions = variants["causal"]
    write_csv_atomically(predictions.select(SUBMISSION_COLUMNS), output)
    logger.info("wrote %d predictions to %s", predictions.height, output)
    if labels is None:
        logger.info("%s has no test labels: no score", data_dir)
        return None
    scores = score_predictions(predictions, labels)
    for name, variant in variants.items():
        if len(variants) > 1:
            scores |= {f"{name}_{k}": v for k, v in score_predictions(variant, labels).items()}
    parts = [f"score {scores['score']:.4f} on {scores['n']} sequences"]
    for name in ("imu_only", "all_sensors"):
        if f"score_{name}" in scores:
            parts.append(f"{name} {scores[f'score_{name}']:.4f} ({scores[f'n_{name}']})")
    if len(variants) > 1:
        parts.append(
            "subject-aware: plain {:.4f}, causal {:.4f} (order seed {}), offline {:.4f}".format(
                scores["plain_score"], scores["causal_score"], order_seed, scores["offline_score"]
            )
        )
    print("competition score: " + ", ".join(parts))
    return scores


if __name__ == "__main__":
    import sys

    from codes.inference.experiment import batch_usage

    asked = bool({"-h", "--help"} & set(sys.argv[1:]))
    print(
        "batch mode runs through an experiment's inference.py (it builds that experiment's model):\n"
        + batch_usage("<exp>"),
        file=sys.stdout if asked else sys.stderr,
    )
    raise SystemExit(0 if asked else 2)
