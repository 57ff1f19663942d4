"""Reading the competition CSVs with polars, with errors a user can act on.

Every reader checks that the file exists (the error names the path and the Kaggle download
command), that the expected columns are present (the error lists the missing ones), and the
label/demographics values that later code relies on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from codes.common.schema import (
    DEMOGRAPHICS_COLUMNS,
    GESTURES,
    IMU_COLUMNS,
    KAGGLE_DOWNLOAD_COMMAND,
    SENSOR_COLUMNS,
    TEST_COLUMNS,
    TEST_LABEL_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TRAIN_COLUMNS,
)

TRAIN_FILE = "train.csv"
TEST_FILE = "test.csv"
TRAIN_DEMOGRAPHICS_FILE = "train_demographics.csv"
TEST_DEMOGRAPHICS_FILE = "test_demographics.csv"
TEST_LABELS_FILE = "test_labels.csv"  # written by the synthetic generator only

logger = logging.getLogger(__name__)

# IMU and thermopile values are read as float32 (what the models consume). ToF values are read
# as int16 when the file writes them as integers (-1..254, as the synthetic files do): parsing
# integers is much cheaper than parsing floats, and int16 holds them exactly in a quarter of the
# memory of float64; a file with decimal ToF values is read as float32. Empty fields are nulls.
_SENSOR_DTYPES = dict.fromkeys(SENSOR_COLUMNS, pl.Float32)
_INTEGER_FIELD = re.compile(rb"-?[0-9]*")  # empty = null
_SNIFFED_BYTES = 1 << 16
_DEMOGRAPHICS_DTYPES = {
    "subject": pl.String,
    "adult_child": pl.Float64,
    "age": pl.Float64,
    "sex": pl.Float64,
    "handedness": pl.Float64,
    "height_cm": pl.Float64,
    "shoulder_to_wrist_cm": pl.Float64,
    "elbow_to_wrist_cm": pl.Float64,
}


class DataFileError(ValueError):
    """A competition file is missing or does not hold what the competition's files hold."""


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise an error that says how to get the data."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(
            f"missing data file: {path}\n"
            f"Download the competition data with the Kaggle CLI:\n  {KAGGLE_DOWNLOAD_COMMAND}\n"
            "or generate the synthetic stand-in: python -m codes.common.synthetic --out data/synthetic"
        )
    return path


def read_header(path: Path) -> list[str]:
    """Column names of a CSV file (reads only the first line)."""
    with open(require_file(path), encoding="utf-8") as handle:
        first = handle.readline().rstrip("\r\n")
    return [name.strip().strip('"') for name in first.split(",")] if first else []


def check_columns(path: Path, present: Sequence[str], required: Sequence[str]) -> None:
    """Raise a :class:`DataFileError` listing every required column missing from ``present``."""
    present_set = set(present)
    missing = [c for c in required if c not in present_set]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise DataFileError(f"{path} lacks required columns: {shown}")


def integer_tof_fields(path: Path, header: Sequence[str]) -> bool:
    """Whether the ToF fields of the first lines of ``path`` are written as integers (or empty)."""
    positions = [i for i, name in enumerate(header) if name.startswith("tof_")]
    with open(path, "rb") as handle:
        lines = handle.read(_SNIFFED_BYTES).split(b"\n")[1:-1]  # whole data lines only
    if not positions or not lines:
        return False
    for line in lines:
        fields = line.rstrip(b"\r").split(b",")
        if len(fields) != len(header) or not all(_INTEGER_FIELD.fullmatch(fields[i]) for i in positions):
            return False
    return True


def read_sensor_csv(
    path: Path, required: Sequence[str], columns: Sequence[str] | None = None
) -> pl.DataFrame:
    """Read ``columns`` (default: ``required``) of a train/test CSV after checking the header.

    Sensor columns are float32, except ToF columns written as integers: int16 (see
    ``integer_tof_fields``; if a later line holds a decimal or out-of-range ToF value, the file
    is read again with float32 ToF).
    """
    path = require_file(path)
    header = read_header(path)
    check_columns(path, header, required)
    wanted = list(columns if columns is not None else required)
    dtypes = {c: t for c, t in _SENSOR_DTYPES.items() if c in wanted}
    dtypes["sequence_counter"] = pl.Int32
    dtypes.update({c: pl.String for c in ("row_id", "sequence_id", "subject") if c in wanted})
    tof = [c for c in wanted if c.startswith("tof_")]
    if tof and integer_tof_fields(path, header):
        try:
            return pl.read_csv(path, columns=wanted, schema_overrides=dtypes | dict.fromkeys(tof, pl.Int16))
        except pl.exceptions.ComputeError as error:
            logger.info(
                "%s: ToF values are not all int16 (%s); reading them as float32", path, str(error)[:200]
            )
    return pl.read_csv(path, columns=wanted, schema_overrides=dtypes)


def sensor_columns_to_read(include_thm: bool = True, include_tof: bool = True) -> list[str]:
    """The sensor columns a feature configuration needs (skipping ToF saves most of the read)."""
    return IMU_COLUMNS + (THM_COLUMNS if include_thm else []) + (TOF_COLUMNS if include_tof else [])


def _meta_columns_to_read(
    columns: Sequence[str], wanted: Sequence[str] | None, always: Sequence[str] = ()
) -> list[str]:
    """The non-sensor columns of a file to read: all of them, or those ``wanted`` plus ``always``."""
    meta = [c for c in columns if c not in SENSOR_COLUMNS]
    return meta if wanted is None else [c for c in meta if c in wanted or c in always]


def read_train(
    data_dir: Path,
    include_thm: bool = True,
    include_tof: bool = True,
    meta_columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """train.csv: metadata and labels plus the sensor columns asked for; gestures are checked.

    ``meta_columns`` narrows the non-sensor columns read (default: all; gesture is always read).
    """
    path = Path(data_dir) / TRAIN_FILE
    meta = _meta_columns_to_read(TRAIN_COLUMNS, meta_columns, always=("gesture",))
    frame = read_sensor_csv(path, TRAIN_COLUMNS, meta + sensor_columns_to_read(include_thm, include_tof))
    check_gestures(frame["gesture"], path)
    return frame


def read_test(
    data_dir: Path,
    include_thm: bool = True,
    include_tof: bool = True,
    meta_columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """test.csv with the sensor columns asked for (``meta_columns`` as in :func:`read_train`)."""
    path = Path(data_dir) / TEST_FILE
    meta = _meta_columns_to_read(TEST_COLUMNS, meta_columns)
    return read_sensor_csv(path, TEST_COLUMNS, meta + sensor_columns_to_read(include_thm, include_tof))


def check_gestures(gestures: pl.Series, path: Path | str) -> None:
    """Raise naming every gesture string that is not one of the 18 competition gestures."""
    unknown = sorted(set(gestures.drop_nulls().unique().to_list()) - set(GESTURES))
    if gestures.null_count():
        unknown = ["<empty>", *unknown]
    if unknown:
        raise DataFileError(
            f"{path} holds gesture strings outside the 18 competition gestures: {unknown}; "
            f"known gestures: {GESTURES}"
        )


def read_demographics(path: Path) -> pl.DataFrame:
    """A demographics CSV (one row per subject); numeric fields as float64, nulls kept."""
    path = require_file(path)
    check_columns(path, read_header(path), DEMOGRAPHICS_COLUMNS)
    frame = pl.read_csv(path, columns=DEMOGRAPHICS_COLUMNS, schema_overrides=_DEMOGRAPHICS_DTYPES)
    duplicated = frame.filter(pl.col("subject").is_duplicated())["subject"].unique().sort().to_list()
    if duplicated:
        raise DataFileError(f"{path} lists these subjects more than once: {duplicated}")
    return frame


def check_demographics_cover(subjects: pl.Series, demographics: pl.DataFrame, path: Path | str) -> None:
    """Raise naming every subject of the sensor file that has no demographics row."""
    missing = sorted(set(subjects.unique().to_list()) - set(demographics["subject"].to_list()))
    if missing:
        raise DataFileError(
            f"{len(missing)} subject(s) have no row in {path}: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
        )


def read_test_labels(data_dir: Path) -> pl.DataFrame | None:
    """The synthetic data's test labels (sequence_id -> gesture), or None for the real data."""
    path = Path(data_dir) / TEST_LABELS_FILE
    if not path.is_file():
        return None
    check_columns(path, read_header(path), TEST_LABEL_COLUMNS)
    frame = pl.read_csv(path, columns=TEST_LABEL_COLUMNS)
    check_gestures(frame["gesture"], path)
    return frame
