"""The input path: from the frames a caller passes to the :class:`SequenceTable` a model reads.

Every predictor (a run's fold ensemble, a blend of runs) answers through one :class:`InputPath`:
it coerces and checks the frames once (:meth:`InputPath.clean_sequence`,
:meth:`InputPath.clean_frame`), and each model family then builds the features of its own
settings from the cleaned rows (:meth:`CleanSequence.table`, :meth:`CleanFrame.table`).

Preprocessing is the training pipeline's, step for step (``codes.common``): sensor values as
float32, ``compute_step_features`` (the NaN rule; left-handed wearers mirrored, handedness read
from the demographics row), each fold's own ``FeatureNormalizer`` (absent sensors become 0),
the LAST ``max_len`` steps, demographics as the 7 ``DEMOGRAPHIC_FIELDS`` with NaN = missing.
A sequence whose thermopiles and ToF are all null is IMU-only: those inputs are 0, exactly what
training fed the model for the IMU-only path (``FoldTensors.imu_only`` / sensor drop-out).
The ensemble averages the folds' softmax probabilities.

Odd inputs never raise (documented rules in docs/inference.md, each with a warning in the log):
NaN/null, non-finite or physically impossible sensor values (``features.impossible_readings``)
are missing values; text, categorical and other non-numeric columns are parsed as numbers (what
is no number is missing); a pandas frame is converted; rows out of ``sequence_counter`` order
are sorted; a very short or very long sequence is used as it is (the last ``max_len`` steps);
demographics that are missing, out of range or another subject's are unknown (handedness
unknown = not mirrored); values that look recorded in another unit are used as they are, with
a warning given once (``codes.common.units``); an empty sequence, or a failure inside the model,
gives :data:`FALLBACK_GESTURE`. Only missing columns, and a pandas frame naming a column twice,
raise (:class:`InputColumnsError`, naming them). A frame holding several ``sequence_id`` values
is answered from the first one's rows (warned about; ``strict=True`` raises).
Batch mode answers every sequence by the same rules and never fails a whole file for one
sequence; rows without a ``sequence_id`` are an error naming their lines (their answer could
not be submitted), and an id whose counters repeat is named in a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from codes.common.data_files import CsvLayout, DataFileError
from codes.common.demographics import out_of_range_demographics
from codes.common.features import (
    FeatureSettings,
    compute_step_features,
    feature_layout,
    impossible_readings,
)
from codes.common.schema import (
    ACC_COLUMNS,
    DEMOGRAPHIC_FIELDS,
    IMU_COLUMNS,
    ROT_COLUMNS,
    SENSOR_COLUMNS,
    THM_COLUMNS,
)
from codes.common.sequences import SequenceTable, build_sequence_table
from codes.common.units import UnitFinding, demographic_unit_findings, sensor_unit_findings

logger = logging.getLogger(__name__)

SHORTEST_TRAINING_SEQUENCE = 29  # rows (competition train.csv)
LONGEST_TRAINING_SEQUENCE = 700  # rows (competition train.csv)
_HANDEDNESS = DEMOGRAPHIC_FIELDS.index("handedness")
_ACC = [IMU_COLUMNS.index(c) for c in ACC_COLUMNS]
_ROT = [IMU_COLUMNS.index(c) for c in ROT_COLUMNS]
ROWS_PER_CHECK = 65_536  # rows of a whole test frame checked for odd values at once (bounded memory)


class InputColumnsError(DataFileError):
    """The sequence frame lacks columns the model needs (the message lists them)."""


def as_polars_frame(frame: object, name: str) -> pl.DataFrame:
    """``frame`` as a polars DataFrame with no categorical columns.

    A pandas DataFrame is converted with ``pl.from_pandas`` (a column pyarrow cannot convert,
    e.g. an object column mixing numbers and text, is taken as text); Categorical and Enum
    columns become String (then the numeric rule of the sensor columns applies to them).
    A pandas frame naming a column twice raises :class:`InputColumnsError` (which of the two
    holds the values cannot be told); anything else than a DataFrame raises ``TypeError``.
    """
    if not isinstance(frame, pl.DataFrame):
        if type(frame).__module__.split(".")[0] != "pandas" or not hasattr(frame, "columns"):
            raise TypeError(f"{name} must be a polars (or pandas) DataFrame, got {type(frame).__name__}")
        refuse_duplicate_columns([str(c) for c in frame.columns], name)
        try:
            frame = pl.from_pandas(frame)
        except Exception:
            frame = pl.DataFrame([_pandas_column(frame[c], str(c)) for c in frame.columns])
    categorical = [c for c, t in frame.schema.items() if isinstance(t, pl.Categorical | pl.Enum)]
    if categorical:
        frame = frame.with_columns(pl.col(categorical).cast(pl.String))
    return frame


def refuse_duplicate_columns(columns: Sequence[str], name: str) -> None:
    """Raise :class:`InputColumnsError` naming every column name that ``columns`` holds twice."""
    seen, duplicated = set(), []
    for column in columns:
        if column in seen and column not in duplicated:
            duplicated.append(column)
        seen.add(column)
    if duplicated:
        raise InputColumnsError(
            f"{name} names these columns more than once: {', '.join(duplicated[:20])}; which one holds "
            "the values cannot be told. Pass a frame with each column once (e.g. the columns of test.csv)"
        )


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as a whole number >= 1, else a ``ValueError`` naming the setting."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size!r}: the sequences predicted at once must be a whole number >= 1 "
            "(e.g. batch_size=64, the default)"
        )
    return int(batch_size)


def refuse_rows_without_sequence_id(frame: pl.DataFrame, source: str) -> None:
    """A :class:`DataFileError` naming the lines of ``source`` (row + 2: the header is line 1)
    whose ``sequence_id`` is empty (null or blank): an answer without an id cannot be submitted,
    and two such sequences would be merged into one."""
    if "sequence_id" not in frame.columns:
        raise InputColumnsError(f"{source} lacks the column sequence_id")
    ids = frame["sequence_id"].cast(pl.String)
    rows = (ids.is_null() | (ids.str.strip_chars() == "")).arg_true().to_numpy()
    if len(rows):
        raise DataFileError(
            f"{source}: {len(rows)} row(s) have no sequence_id, on {CsvLayout(frame.height).lines(rows)} "
            "(line 1 is the header); an answer without a sequence_id cannot be submitted. Fill in the "
            "sequence_id of those rows (each recording's own id), or remove them"
        )


def _warn_about_repeated_counters(frame: pl.DataFrame) -> None:
    """Name each sequence of ``frame`` (Int64 ``sequence_counter``) in which a counter value repeats
    (two recordings under one ``sequence_id``?): its rows are answered as one sequence."""
    counters = pl.col("sequence_counter")
    repeated = (
        frame.select("sequence_id", counters)
        .filter(counters.is_not_null() & pl.struct("sequence_id", counters).is_duplicated())
        .group_by("sequence_id", maintain_order=True)
        .agg(counters.unique().sort())
    )
    if repeated.is_empty():
        return
    shown = [
        f"{sequence_id} (counters {', '.join(map(str, values[:8]))}{', ...' if len(values) > 8 else ''}"
        f"{f'; {len(values)} in all' if len(values) > 8 else ''})"
        for sequence_id, values in repeated.head(10).iter_rows()
    ]
    logger.warning(
        "%d sequence_id(s) repeat sequence_counter values, as if two recordings shared the id: %s%s. "
        "Their rows are merged in counter order and answered as one sequence (one answer per "
        "sequence_id); give each recording its own sequence_id",
        repeated.height,
        "; ".join(shown),
        "; ..." if repeated.height > 10 else "",
    )


def _pandas_column(column, name: str) -> pl.Series:
    """One pandas column as a polars Series; as text when pyarrow cannot convert it."""
    try:
        return pl.from_pandas(column).alias(name)
    except Exception:
        return pl.Series(name, [None if v is None else str(v) for v in column.tolist()], dtype=pl.String)


def _as_float(value: object) -> float:
    """A demographics cell as a finite float, or NaN (null, text that is no number, inf)."""
    if value is None or isinstance(value, bool):
        return float(value) if isinstance(value, bool) else math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def sensor_columns_of(settings: Sequence[FeatureSettings]) -> list[str]:
    """The raw sensor columns any of ``settings`` reads, in ``SENSOR_COLUMNS`` order."""
    wanted = {c for s in settings for c in s.sensor_columns}
    return [c for c in SENSOR_COLUMNS if c in wanted]


@dataclass
class CleanSequence:
    """One sequence's rows after the input rules (:meth:`InputPath.clean_sequence`): float32
    values of the input path's sensor columns in counter order, NaN = missing (non-finite and
    physically impossible values included), and the subject's demographics row (NaN = unknown)."""

    sequence_id: str
    subject: str | None
    columns: list[str]
    values: np.ndarray
    demographics: np.ndarray
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def n_sequences(self) -> int:
        return 1

    def table(self, settings: FeatureSettings) -> SequenceTable:
        """The one-sequence :class:`SequenceTable` training would have built with ``settings``."""
        if settings not in self._tables:
            index = [self.columns.index(c) for c in settings.sensor_columns]
            values = np.ascontiguousarray(self.values[:, index])
            offsets = np.array([0, len(values)], dtype=np.int64)
            left_handed = np.array([self.demographics[_HANDEDNESS] == 0])
            step = compute_step_features(values, offsets, left_handed, settings, n_threads=1)
            names, groups = feature_layout(settings)
            self._tables[settings] = SequenceTable(
                sequence_ids=np.array([self.sequence_id]),
                subjects=np.array([self.subject or ""]),
                offsets=offsets,
                features=step.features,
                step_valid=step.step_valid,
                feature_present=step.feature_present,
                demographics=self.demographics[None, :],
                labels=np.array([-1], dtype=np.int64),
                orientations=np.array([""]),
                feature_names=names,
                feature_groups=groups,
            )
        return self._tables[settings]


@dataclass
class CleanFrame:
    """A whole test-format frame after the input rules (:meth:`InputPath.clean_frame`): sensor
    columns float32 with non-finite values null, rows grouped by sequence in counter order, each
    sequence's subject its first row's, and one demographics row per subject."""

    frame: pl.DataFrame
    demographics: pl.DataFrame
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def n_sequences(self) -> int:
        return int(self.frame["sequence_id"].n_unique())

    def table(self, settings: FeatureSettings) -> SequenceTable:
        """The :class:`SequenceTable` of every sequence, built with ``settings`` as training builds it."""
        if settings not in self._tables:
            self._tables[settings] = build_sequence_table(
                self.frame, self.demographics, settings, "the demographics"
            )
        return self._tables[settings]


class InputPath:
    """The odd-input rules of the module docstring for one set of sensor columns.

    ``sensor_columns``: the raw columns the predictor's models read (:func:`sensor_columns_of`
    their feature settings); a frame lacking any of them is an :class:`InputColumnsError`.
    ``max_len``: the steps the models keep (named in a warning about long sequences).
    Warnings about units are given once per input path.
    """

    def __init__(self, sensor_columns: Sequence[str], max_len: int, strict: bool = False) -> None:
        self.sensor_columns = list(sensor_columns)
        self.max_len = int(max_len)
        self.strict = strict
        self._warned_once: set[str] = set()

    def clean_sequence(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> CleanSequence:
        """One sequence's :class:`CleanSequence` (rows of the first ``sequence_id`` only; the rules
        of the module docstring, each with its warning)."""
        sequence = as_polars_frame(sequence, "the sequence")
        sequence_id = self.sequence_id(sequence)
        sequence = self.ordered(sequence, sequence_id)
        subject = self.subject(sequence)
        values = self.sensor_values(sequence)
        self.warn_about_units(sensor_unit_findings(values, self.sensor_columns), f"sequence {sequence_id}")
        n_rows = len(values)
        n_infinite = int(np.isinf(values).sum())
        if n_infinite:
            logger.warning(
                "sequence %s: %d infinite sensor value(s) taken as missing", sequence_id, n_infinite
            )
            values[np.isinf(values)] = np.nan
        impossible = impossible_readings(values, self.sensor_columns)
        if impossible.any():
            columns = np.array(self.sensor_columns)[impossible.any(axis=0)]
            logger.warning(
                "sequence %s: %d sensor value(s) outside their physical range (%s) taken as missing",
                sequence_id,
                int(impossible.sum()),
                ", ".join(columns[:5]) + (", ..." if len(columns) > 5 else ""),
            )
            values[impossible] = np.nan
        self._warn_about_rows(sequence_id, np.isfinite(values), n_rows)
        return CleanSequence(
            sequence_id, subject, self.sensor_columns, values, self.demographics_vector(demographics, subject)
        )

    def check_columns(self, columns: Sequence[str]) -> None:
        present = set(columns)
        missing = [c for c in self.sensor_columns if c not in present]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise InputColumnsError(
                f"the sequence frame lacks {len(missing)} column(s) the model needs: {shown}. "
                "Pass the rows with the columns of test.csv."
            )

    def first_sequence_only(self, sequence: pl.DataFrame) -> pl.DataFrame:
        """The rows of the first row's ``sequence_id`` when the frame holds several ids (warned
        about; ``strict=True`` raises a :class:`DataFileError` instead): one answer is one sequence,
        and the rows of two sequences must not be interleaved into it."""
        if "sequence_id" not in sequence.columns or sequence.height < 2:
            return sequence
        ids = sequence["sequence_id"].cast(pl.String)
        distinct = ids.unique(maintain_order=True)
        if len(distinct) < 2:
            return sequence
        shown = ", ".join(str(i) for i in distinct.head(5).to_list()) + (", ..." if len(distinct) > 5 else "")
        message = (
            f"the sequence frame holds {len(distinct)} sequence_ids ({shown}); predict() answers one "
            "sequence: pass the rows of one sequence_id per call"
        )
        if self.strict:
            raise DataFileError(message)
        first = distinct[0]
        logger.warning("%s (answering %s from its own rows only)", message, first)
        return sequence.filter(ids.eq_missing(first))

    @staticmethod
    def sequence_id(sequence: pl.DataFrame) -> str:
        if "sequence_id" in sequence.columns and sequence.height:
            return str(sequence["sequence_id"][0])
        return "<unnamed>"

    @staticmethod
    def subject(sequence: pl.DataFrame) -> str | None:
        """The sequence's subject (its first row's): None without a subject column, "" when null
        (a subject no demographics row has, as in batch mode)."""
        if "subject" not in sequence.columns or sequence.height == 0:
            return None
        subject = sequence["subject"][0]
        return "" if subject is None else str(subject)

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            logger.warning(message, *args)

    def warn_about_units(self, findings: Sequence[UnitFinding], source: str) -> None:
        """Warn once per predictor and quantity about values that look recorded in another unit
        (``codes.common.units``): they are used as they are, never refused."""
        for finding in findings:
            self.warn_once(
                f"units of {finding.rule.quantity}",
                "%s: %s (the values are used as they are; warned once)",
                source,
                finding.message(),
            )

    def ordered(self, sequence: pl.DataFrame, sequence_id: str) -> pl.DataFrame:
        """Rows in ``sequence_counter`` order (the order training used)."""
        if "sequence_counter" not in sequence.columns or sequence.height < 2:
            return sequence
        counter = sequence["sequence_counter"].cast(pl.Int64, strict=False)
        if counter.null_count() == 0 and bool((counter.diff().drop_nulls() > 0).all()):
            return sequence
        logger.warning("sequence %s: rows are not in sequence_counter order; sorting them", sequence_id)
        if counter.is_duplicated().any():
            _warn_about_repeated_counters(
                pl.DataFrame({"sequence_id": sequence_id, "sequence_counter": counter})
            )
        return sequence.with_columns(counter.alias("sequence_counter")).sort(
            "sequence_counter", nulls_last=True, maintain_order=True
        )

    def float32_sensors(self, frame: pl.DataFrame) -> list[pl.Expr]:
        """Expressions giving the sensor columns of ``frame`` as float32: the numeric rule.

        Numeric and boolean columns are cast (as the CSV reader does in training); text columns
        (polars infers a column that is empty in its first rows as text; categorical columns
        arrive as text, see :func:`as_polars_frame`) are parsed, and what is no number is
        missing; a column of any other type (dates, lists, binary, objects) is missing as a
        whole. Each kind is warned about once.
        """
        schema = frame.schema
        textual = [c for c in self.sensor_columns if schema[c] == pl.String]
        unusable = [
            c
            for c in self.sensor_columns
            if not (schema[c].is_numeric() or schema[c] in (pl.Boolean, pl.Null, pl.String))
        ]
        if textual:
            self.warn_once(
                "textual",
                "sensor columns arrive as text (e.g. %s): parsing them as numbers, what is no number is "
                "taken as missing",
                ", ".join(textual[:3]),
            )
        if unusable:
            self.warn_once(
                f"unusable {schema[unusable[0]]}",
                "sensor columns arrive as %s (e.g. %s), which holds no numbers: taken as missing",
                schema[unusable[0]],
                ", ".join(unusable[:3]),
            )
        return [
            pl.col(c).str.strip_chars().cast(pl.Float32, strict=False)
            if c in textual
            else pl.lit(None, pl.Float32).alias(c)
            if c in unusable
            else pl.col(c).cast(pl.Float32, strict=False)
            for c in self.sensor_columns
        ]

    def sensor_values(self, sequence: pl.DataFrame) -> np.ndarray:
        """``(n, C)`` float32 values of the feature settings' sensor columns; missing = NaN
        (:meth:`float32_sensors`; non-finite and impossible values are still in)."""
        values = sequence.select(self.float32_sensors(sequence)).to_numpy()
        if values.dtype != np.float32 or not values.flags.writeable:
            values = values.astype(np.float32)
        return values

    def demographics_vector(self, demographics: pl.DataFrame | None, subject: str | None) -> np.ndarray:
        """``(7,)`` float32 in DEMOGRAPHIC_FIELDS order, NaN = missing (warned about).

        The row used is the one of ``subject``; rows of other subjects are not used (all fields
        unknown; a null subject matches no row). When the demographics or the sequence have no
        ``subject`` column (``subject`` None), the first row is used. Fields that are no numbers
        or lie outside their range (``codes.common.demographics``) are unknown.
        """
        vector = np.full(len(DEMOGRAPHIC_FIELDS), np.nan, dtype=np.float32)
        if demographics is not None:
            demographics = as_polars_frame(demographics, "the demographics")
        if demographics is None or demographics.height == 0:
            logger.warning(
                "no demographics row for subject %s: every field unknown (handedness unknown: not mirrored)",
                subject,
            )
            return vector
        row_index = 0
        if subject is not None and "subject" in demographics.columns:
            matches = np.flatnonzero(demographics["subject"].cast(pl.String).to_numpy() == subject)
            if len(matches) == 0:
                logger.warning(
                    "the demographics given are for subject(s) %s, not for the sequence's subject %s: "
                    "every field unknown (handedness unknown: not mirrored)",
                    ", ".join(map(str, demographics["subject"].head(5).to_list())),
                    subject,
                )
                return vector
            row_index = int(matches[0])
        if demographics.height > 1:
            logger.warning(
                "%d demographics rows given for subject %s: using row %d",
                demographics.height,
                subject,
                row_index,
            )
        row = demographics.row(row_index, named=True)
        values = np.array([_as_float(row.get(field)) for field in DEMOGRAPHIC_FIELDS])  # float64
        self.warn_about_units(demographic_unit_findings(values[None, :]), f"subject {subject}")
        out_of_range = out_of_range_demographics(values[None, :])[0]
        vector = np.where(out_of_range, np.nan, values).astype(np.float32)
        unknown = [f for f, v in zip(DEMOGRAPHIC_FIELDS, values, strict=True) if np.isnan(v)]
        if unknown:
            logger.warning(
                "subject %s: demographics field(s) %s missing or not numbers: taken as unknown%s",
                subject,
                ", ".join(unknown),
                " (handedness unknown: not mirrored)" if "handedness" in unknown else "",
            )
        if out_of_range.any():
            fields = [DEMOGRAPHIC_FIELDS[i] for i in np.flatnonzero(out_of_range)]
            logger.warning(
                "subject %s: demographics field(s) %s out of range: taken as unknown%s",
                subject,
                ", ".join(f"{f}={values[DEMOGRAPHIC_FIELDS.index(f)]:g}" for f in fields),
                " (handedness unknown: not mirrored)" if "handedness" in fields else "",
            )
        return vector

    def _warn_about_rows(self, sequence_id: str, finite: np.ndarray, n_rows: int) -> None:
        if n_rows < SHORTEST_TRAINING_SEQUENCE:
            logger.warning(
                "sequence %s has %d row(s), fewer than any training sequence (%d): predicting from them",
                sequence_id,
                n_rows,
                SHORTEST_TRAINING_SEQUENCE,
            )
        elif n_rows > LONGEST_TRAINING_SEQUENCE:
            logger.warning(
                "sequence %s has %d rows, more than any training sequence (%d): the last %d are used",
                sequence_id,
                n_rows,
                LONGEST_TRAINING_SEQUENCE,
                self.max_len,
            )
        acc_read = finite[:, _ACC].all(axis=1)
        rot_read = finite[:, _ROT].all(axis=1)
        if not rot_read.any():
            logger.warning(
                "sequence %s has no rotation reading: the identity quaternion is used", sequence_id
            )
        if not acc_read.any():
            logger.warning("sequence %s has no acceleration reading: zeros are used", sequence_id)
        n_gaps = int((~(acc_read & rot_read)).sum())
        if n_gaps and acc_read.any() and rot_read.any():
            logger.warning(
                "sequence %s: %d of %d row(s) lack an acc or rot reading: filled from neighbouring rows",
                sequence_id,
                n_gaps,
                n_rows,
            )

    def clean_frame(self, frame: pl.DataFrame, demographics: pl.DataFrame) -> CleanFrame:
        """The :class:`CleanFrame` of a whole test-format frame, with the odd-input rules of the
        module docstring (numeric rule, non-finite values missing, impossible ones warned about and
        missing in the features, rows in counter order, demographics checked)."""
        frame = as_polars_frame(frame, "the test frame")
        self.check_columns(frame.columns)
        for column in ("sequence_id", "sequence_counter", "subject"):
            if column not in frame.columns:
                raise InputColumnsError(f"the test frame lacks the column {column}")
        refuse_rows_without_sequence_id(frame, "the test frame")
        frame = frame.with_columns(
            *self.float32_sensors(frame),
            pl.col("sequence_id").cast(pl.String),
            pl.col("subject").cast(pl.String).fill_null(""),
        )
        self.warn_about_frame_values(frame)
        checked = [c for c in self.sensor_columns if c in (*ACC_COLUMNS, *THM_COLUMNS)]  # float32 now
        self.warn_about_units(
            sensor_unit_findings(frame.select(checked).to_numpy(), checked), "the test frame"
        )
        frame = frame.with_columns(
            [pl.when(pl.col(c).is_finite()).then(pl.col(c)).alias(c) for c in self.sensor_columns]
        )
        # each sequence's subject is its first row's (in counter order), as predict() takes it
        frame = self.frame_in_counter_order(frame).with_columns(pl.col("subject").first().over("sequence_id"))
        _warn_about_repeated_counters(frame)
        demographics = self.frame_demographics(demographics, frame["subject"])
        return CleanFrame(frame, demographics)

    @staticmethod
    def frame_in_counter_order(frame: pl.DataFrame) -> pl.DataFrame:
        """Each sequence's rows together, in ``sequence_counter`` order (nulls and what is no
        number last, ties in file order: :meth:`_ordered`'s rule), sequences in file order."""
        frame = frame.with_columns(pl.col("sequence_counter").cast(pl.Int64, strict=False))
        run = frame["sequence_id"].rle_id()
        grouped = frame["sequence_id"].n_unique() == (int(run[-1]) + 1 if len(run) else 0)
        counter_up = frame["sequence_counter"].diff() > 0
        if (
            grouped
            and frame["sequence_counter"].null_count() == 0
            and bool((counter_up | (run.diff() != 0)).all())
        ):
            return frame
        logger.warning("rows are not grouped by sequence in sequence_counter order: sorting them")
        first_row = pl.col("__row_in_file").min().over("sequence_id")  # sequences in file order
        return (
            frame.with_row_index("__row_in_file")
            .sort(first_row, "sequence_counter", nulls_last=True, maintain_order=True)
            .drop("__row_in_file")
        )

    def warn_about_frame_values(self, frame: pl.DataFrame) -> None:
        """Name the sequences of a frame (float32 sensor columns) holding infinite or physically
        impossible values (they are taken as missing, as :meth:`sequence_table` does)."""
        counts = []
        for start in range(0, frame.height, ROWS_PER_CHECK):
            values = frame.slice(start, ROWS_PER_CHECK).select(self.sensor_columns).to_numpy()
            values = values if values.flags.writeable else values.copy()
            infinite = np.isinf(values)
            values[infinite] = np.nan
            counts.append(
                np.stack([infinite.sum(1), impossible_readings(values, self.sensor_columns).sum(1)], axis=1)
            )
        if not counts:
            return
        per_row = np.concatenate(counts)
        per_sequence = (
            pl.DataFrame({"sequence_id": frame["sequence_id"], "inf": per_row[:, 0], "impossible": per_row[:, 1]})
            .group_by("sequence_id", maintain_order=True)
            .sum()
        )  # fmt: skip
        for kind, what in (("inf", "infinite"), ("impossible", "physically impossible")):
            odd = per_sequence.filter(pl.col(kind) > 0)
            if odd.height:
                logger.warning(
                    "%d sequence(s) hold %s sensor value(s), taken as missing: %s%s",
                    odd.height,
                    what,
                    ", ".join(f"{s} ({n})" for s, n in odd.head(10).select("sequence_id", kind).iter_rows()),
                    ", ..." if odd.height > 10 else "",
                )

    def frame_demographics(self, demographics: pl.DataFrame, subjects: pl.Series) -> pl.DataFrame:
        """One row per subject of ``subjects``: DEMOGRAPHIC_FIELDS as float64 by :meth:`demographics_vector`'s
        rules (not numbers: null; a subject without a row: every field null; out of range: unknown,
        by ``build_sequence_table``, which applies the shared rule)."""
        demographics = as_polars_frame(demographics, "the demographics")
        if "subject" not in demographics.columns:
            raise InputColumnsError("the demographics frame lacks the column subject")
        demographics = demographics.select(
            pl.col("subject").cast(pl.String),
            *[
                pl.col(f).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
                if f in demographics.columns and demographics.schema[f] == pl.String
                else pl.col(f).cast(pl.Float64, strict=False)
                if f in demographics.columns
                else pl.lit(None, pl.Float64).alias(f)
                for f in DEMOGRAPHIC_FIELDS
            ],
        ).unique("subject", keep="first", maintain_order=True)
        values = demographics.select(DEMOGRAPHIC_FIELDS).to_numpy().astype(np.float64)
        values[~np.isfinite(values)] = np.nan
        self.warn_about_units(demographic_unit_findings(values), "the demographics")
        demographics = demographics.with_columns(
            [pl.Series(f, values[:, i]) for i, f in enumerate(DEMOGRAPHIC_FIELDS)]
        )
        known = set(demographics["subject"].drop_nulls().to_list())
        uncovered = sorted(set(subjects.unique().to_list()) - known)
        if uncovered:
            logger.warning(
                "%d subject(s) have no demographics row (%s): their fields are taken as unknown",
                len(uncovered),
                ", ".join(uncovered[:5]),
            )
            demographics = pl.concat(
                [demographics, pl.DataFrame({"subject": uncovered}).with_columns(
                    [pl.lit(None, pl.Float64).alias(f) for f in DEMOGRAPHIC_FIELDS]
                )]
            )  # fmt: skip
        return demographics
