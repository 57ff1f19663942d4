"""A fold ensemble that names the gesture of one sequence, or of a whole test file.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

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
    GESTURES,
    IMU_COLUMNS,
    NUM_GESTURES,
    ROT_COLUMNS,
    THM_COLUMNS,
)
from codes.common.sequences import FeatureNormalizer, SequenceTable, build_sequence_table, pad_sequences
from codes.common.units import UnitFinding, demographic_unit_findings, sensor_unit_findings
from codes.inference.subject_assignment import SubjectAssignment

logger = logging.getLogger(__name__)

# Returned when no model output can be had (an empty sequence, a failure inside the model). A
# Target gesture: the metric's binary half rewards a correct "Target", and Target gestures are
# the larger part of the data.
FALLBACK_GESTURE = "Neck - scratch"
SHORTEST_TRAINING_SEQUENCE = 29  # rows (competition train.csv)
LONGEST_TRAINING_SEQUENCE = 700  # rows (competition train.csv)
_HANDEDNESS = DEMOGRAPHIC_FIELDS.index("handedness")
_ACC = [IMU_COLUMNS.index(c) for c in ACC_COLUMNS]
_ROT = [IMU_COLUMNS.index(c) for c in ROT_COLUMNS]
# the model outputs the predictor averages over the folds, by head name (a model gives the heads it has)
HEAD_OUTPUTS = {"gesture": "gesture_logits", "orientation": "orientation_logits", "pair": "pair_logits"}
# batch mode's extra columns (with_heads=True): prob_orientation_<k>, prob_pair_<k> (class k of the head)
HEAD_COLUMN_PREFIX = {"orientation": "prob_orientation_", "pair": "prob_pair_"}
ROWS_PER_CHECK = 65_536  # rows of a whole test frame checked for odd values at once (bounded memory)


class InputColumnsError(DataFileError):
    """The sequence frame lacks columns the model needs (the message lists them)."""


def quantize_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its ``nn.Linear`` layers as dynamically quantised int8 (CPU only).

    ``torch.ao.quantization.quantize_dynamic``: weights stored as int8, activations quantised per
    call. Roughly halves the CPU time of the matrix products that dominate these models, at the
    cost of small differences in the probabilities (an opt-in speed setting, not training's
    numerics). The API is deprecated in recent PyTorch releases; its warnings are silenced here.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model.cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8
        )


@dataclass
class FoldMember:
    """One fold of the ensemble: its model (evaluated weights loaded) and its normaliser."""

    fold: int
    model: torch.nn.Module
    normalizer: FeatureNormalizer


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


class EnsemblePredictor:
    """Averages the fold models' gesture probabilities; :meth:`predict` is the competition's contract.

    ``members`` share one architecture and input layout (``settings``). Models are moved to
    ``device`` and put in eval mode once, here; every call runs under ``torch.inference_mode``.
    With ``strict=False`` (the default, what a submission wants) an unexpected failure while
    predicting one sequence is logged and answered with :data:`FALLBACK_GESTURE`; ``strict=True``
    lets it raise (tests).

    ``fold_threads > 1`` runs the fold models in that many Python threads at once (torch ops
    release the GIL). On a CPU, pair it with ``torch.set_num_threads(1)``: a single sequence's
    matrices are too small for torch's intra-op threads to pay off, whole models in parallel do.
    """

    def __init__(
        self,
        members: Sequence[FoldMember],
        settings: FeatureSettings,
        max_len: int,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        strict: bool = False,
        fold_threads: int = 1,
        subject_assignment: SubjectAssignment | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one fold model")
        self.members = list(members)
        self.settings = settings
        self.max_len = int(max_len)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.strict = strict
        self.feature_names, self.feature_groups = feature_layout(settings)
        self.non_imu_columns = self.feature_groups.get("thm", []) + self.feature_groups.get("tof", [])
        self.sensor_columns = settings.sensor_columns
        self.n_fallbacks = 0  # sequences answered with FALLBACK_GESTURE
        self._warned_once: set[str] = set()
        # subject-aware answers (codes/inference/subject_assignment.py); None = each sequence alone
        self.subject_assignment = subject_assignment
        self.fold_threads = max(1, int(fold_threads))
        self._pool = ThreadPoolExecutor(self.fold_threads) if self.fold_threads > 1 else None
        for member in self.members:
            member.model.to(self.device).eval()
            n_features = len(member.normalizer.scaler.mean_)
            if n_features != len(self.feature_names):
                raise ValueError(
                    f"fold {member.fold}: the normaliser has {n_features} features but the feature "
                    f"settings give {len(self.feature_names)}"
                )

    @property
    def folds(self) -> list[int]:
        return [m.fold for m in self.members]

    def restricted_to(self, folds: Sequence[int]) -> EnsemblePredictor:
        """The same predictor with only the given folds' models."""
        chosen = [m for m in self.members if m.fold in set(folds)]
        missing = sorted(set(folds) - {m.fold for m in chosen})
        if missing:
            raise ValueError(f"the ensemble has no fold {missing}; it holds folds {self.folds}")
        return EnsemblePredictor(
            chosen,
            self.settings,
            self.max_len,
            self.device,
            self.autocast_dtype,
            self.strict,
            self.fold_threads,
            self.subject_assignment.fresh() if self.subject_assignment is not None else None,
        )

    # ------------------------------------------------------------ the competition's contract
    def predict(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> str:
        """The gesture of one sequence (test.csv columns) given its subject's demographics row.

        With a :attr:`subject_assignment`, the answer is the sequence's label in the joint
        assignment over its subject's sequences answered so far (by this predictor object).
        """
        sequence = as_polars_frame(sequence, "the sequence")
        heads = self._answer(sequence, demographics)[0]
        if heads is None:
            self.n_fallbacks += 1
            return FALLBACK_GESTURE
        if self.subject_assignment is not None:
            return GESTURES[self.subject_assignment.answer(self._subject(sequence), heads)]
        return GESTURES[int(np.argmax(heads["gesture"]))]

    def reset(self) -> None:
        """Forget the subjects' histories (a new test set)."""
        if self.subject_assignment is not None:
            self.subject_assignment.reset()

    def predict_probabilities(
        self, sequence: pl.DataFrame, demographics: pl.DataFrame | None
    ) -> np.ndarray | None:
        """``(18,)`` ensemble probabilities of one sequence, or None when only the fallback is left."""
        heads = self._answer(sequence, demographics)[0]
        return None if heads is None else heads["gesture"]

    def _answer(
        self, sequence: pl.DataFrame, demographics: pl.DataFrame | None
    ) -> tuple[dict[str, np.ndarray] | None, SequenceTable | None]:
        """Per head, the ``(C,)`` probabilities of one sequence (None: the fallback), and its table
        (None when none was built)."""
        sequence = as_polars_frame(sequence, "the sequence")
        self.check_columns(sequence.columns)
        sequence = self._first_sequence_only(sequence)
        sequence_id = self._sequence_id(sequence)
        if sequence.height == 0:
            logger.warning("sequence %s has no rows: answering %r", sequence_id, FALLBACK_GESTURE)
            return None, None
        if demographics is not None:
            demographics = as_polars_frame(demographics, "the demographics")
        table = None
        try:
            table = self.sequence_table(sequence, demographics)
            heads = {h: p[0] for h, p in self.table_heads(table, pad_to_max_len=False).items()}
        except Exception:
            if self.strict:
                raise
            logger.exception("predicting sequence %s failed: answering %r", sequence_id, FALLBACK_GESTURE)
            return None, table
        if not np.isfinite(heads["gesture"]).all():
            logger.warning("no fold gave finite probabilities for sequence %s", sequence_id)
            return None, table
        return heads, table

    # ------------------------------------------------------------ input checks and conversion
    def check_columns(self, columns: Sequence[str]) -> None:
        present = set(columns)
        missing = [c for c in self.sensor_columns if c not in present]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise InputColumnsError(
                f"the sequence frame lacks {len(missing)} column(s) the model needs: {shown}. "
                "Pass the rows with the columns of test.csv."
            )

    def _first_sequence_only(self, sequence: pl.DataFrame) -> pl.DataFrame:
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
    def _sequence_id(sequence: pl.DataFrame) -> str:
        if "sequence_id" in sequence.columns and sequence.height:
            return str(sequence["sequence_id"][0])
        return "<unnamed>"

    @staticmethod
    def _subject(sequence: pl.DataFrame) -> str | None:
        """The sequence's subject (its first row's): None without a subject column, "" when null
        (a subject no demographics row has, as in batch mode)."""
        if "subject" not in sequence.columns or sequence.height == 0:
            return None
        subject = sequence["subject"][0]
        return "" if subject is None else str(subject)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            logger.warning(message, *args)

    def _warn_about_units(self, findings: Sequence[UnitFinding], source: str) -> None:
        """Warn once per predictor and quantity about values that look recorded in another unit
        (``codes.common.units``): they are used as they are, never refused."""
        for finding in findings:
            self._warn_once(
                f"units of {finding.rule.quantity}",
                "%s: %s (the values are used as they are; warned once)",
                source,
                finding.message(),
            )

    def _ordered(self, sequence: pl.DataFrame, sequence_id: str) -> pl.DataFrame:
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
            self._warn_once(
                "textual",
                "sensor columns arrive as text (e.g. %s): parsing them as numbers, what is no number is "
                "taken as missing",
                ", ".join(textual[:3]),
            )
        if unusable:
            self._warn_once(
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
        self._warn_about_units(demographic_unit_findings(values[None, :]), f"subject {subject}")
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

    def sequence_table(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> SequenceTable:
        """The one-sequence :class:`SequenceTable` training would have built from these rows."""
        sequence = as_polars_frame(sequence, "the sequence")
        sequence_id = self._sequence_id(sequence)
        sequence = self._ordered(sequence, sequence_id)
        subject = self._subject(sequence)
        values = self.sensor_values(sequence)
        self._warn_about_units(sensor_unit_findings(values, self.sensor_columns), f"sequence {sequence_id}")
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
        demographics_row = self.demographics_vector(demographics, subject)
        offsets = np.array([0, n_rows], dtype=np.int64)
        left_handed = np.array([demographics_row[_HANDEDNESS] == 0])
        step = compute_step_features(values, offsets, left_handed, self.settings, n_threads=1)
        return SequenceTable(
            sequence_ids=np.array([sequence_id]),
            subjects=np.array([subject or ""]),
            offsets=offsets,
            features=step.features,
            step_valid=step.step_valid,
            feature_present=step.feature_present,
            demographics=demographics_row[None, :],
            labels=np.array([-1], dtype=np.int64),
            orientations=np.array([""]),
            feature_names=self.feature_names,
            feature_groups=self.feature_groups,
        )

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

    # ------------------------------------------------------------ the models
    def _member_inputs(
        self, table: SequenceTable, normalizer: FeatureNormalizer, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, padded ``(N, length, F)`` features and ``(N, length)`` mask (training's make_tensors)."""
        padded = pad_sequences(table, length, normalizer.transform(table))
        features = padded.features
        imu_only = table.imu_only
        if imu_only.any() and self.non_imu_columns:
            # already 0 after normalisation (absent features); stated here as the IMU-only path
            features[np.ix_(imu_only, np.arange(length), self.non_imu_columns)] = 0.0
        return torch.from_numpy(features), torch.from_numpy(padded.mask)

    def table_probabilities(
        self, table: SequenceTable, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> np.ndarray:
        """``(N, 18)`` ensemble gesture probabilities of every sequence of ``table`` (see
        :meth:`table_heads`)."""
        return self.table_heads(table, batch_size, pad_to_max_len)["gesture"]

    def table_heads(
        self, table: SequenceTable, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> dict[str, np.ndarray]:
        """Per head of :data:`HEAD_OUTPUTS` the models have, ``(N, C)`` ensemble probabilities of
        every sequence of ``table``: ``gesture`` (18), and ``orientation`` (4) and ``pair`` (51)
        where every fold model has that head.

        ``pad_to_max_len=False`` pads to the longest kept sequence instead of ``max_len`` (the
        models' outputs do not depend on padding; fewer steps are faster). A fold whose output
        for a sequence is not finite in any head is left out of that sequence's mean in every
        head (with a warning); a sequence no fold answers gets NaN.
        """
        kept = np.minimum(table.lengths, self.max_len)
        length = self.max_len if pad_to_max_len else int(kept.max())
        demographics = torch.from_numpy(table.demographics.astype(np.float32))

        def member_heads(member: FoldMember) -> dict[str, np.ndarray]:
            """Per head, (N, C) probabilities of one fold (inference mode and autocast are per thread)."""
            features, mask = self._member_inputs(table, member.normalizer, length)
            parts: dict[str, list[np.ndarray]] = {}
            with (
                torch.inference_mode(),
                torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ),
            ):
                for start in range(0, table.n_sequences, batch_size):
                    batch = slice(start, start + batch_size)
                    outputs = member.model(
                        features[batch].to(self.device),
                        mask[batch].to(self.device),
                        demographics[batch].to(self.device),
                    )
                    for head, key in HEAD_OUTPUTS.items():
                        if key in outputs:
                            parts.setdefault(head, []).append(outputs[key].float().softmax(-1).cpu().numpy())
            return {head: np.concatenate(chunks) for head, chunks in parts.items()}

        if self._pool is not None and len(self.members) > 1:
            per_fold = list(self._pool.map(member_heads, self.members))
        else:
            per_fold = [member_heads(member) for member in self.members]
        shared = [h for h in HEAD_OUTPUTS if all(h in heads for heads in per_fold)]
        totals = {h: np.zeros((table.n_sequences, per_fold[0][h].shape[1]), dtype=np.float64) for h in shared}
        counts = np.zeros(table.n_sequences, dtype=np.int64)
        for member, heads in zip(self.members, per_fold, strict=True):
            good = np.logical_and.reduce([np.isfinite(heads[head]).all(axis=1) for head in shared])
            if not good.all():
                bad_ids = table.sequence_ids[~good]
                logger.warning(
                    "fold %d gave non-finite probabilities for %d sequence(s) (%s): left out of their mean",
                    member.fold,
                    len(bad_ids),
                    ", ".join(map(str, bad_ids[:5])),
                )
            for head in shared:
                totals[head][good] += heads[head][good]
            counts += good
        with np.errstate(invalid="ignore", divide="ignore"):
            return {head: (total / counts[:, None]).astype(np.float32) for head, total in totals.items()}

    # ------------------------------------------------------------ batch mode
    def frame_table(self, frame: pl.DataFrame, demographics: pl.DataFrame) -> SequenceTable:
        """The :class:`SequenceTable` of a whole test-format frame, built as training builds it,
        with the odd-input rules of :meth:`predict` (numeric rule, non-finite and impossible
        values missing, rows in counter order, demographics checked)."""
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
        self._warn_about_frame_values(frame)
        checked = [c for c in self.sensor_columns if c in (*ACC_COLUMNS, *THM_COLUMNS)]  # float32 now
        self._warn_about_units(
            sensor_unit_findings(frame.select(checked).to_numpy(), checked), "the test frame"
        )
        frame = frame.with_columns(
            [pl.when(pl.col(c).is_finite()).then(pl.col(c)).alias(c) for c in self.sensor_columns]
        )
        # each sequence's subject is its first row's (in counter order), as predict() takes it
        frame = self._frame_in_counter_order(frame).with_columns(
            pl.col("subject").first().over("sequence_id")
        )
        _warn_about_repeated_counters(frame)
        demographics = self._frame_demographics(demographics, frame["subject"])
        return build_sequence_table(frame, demographics, self.settings, "the demographics")

    @staticmethod
    def _frame_in_counter_order(frame: pl.DataFrame) -> pl.DataFrame:
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

    def _warn_about_frame_values(self, frame: pl.DataFrame) -> None:
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

    def _frame_demographics(self, demographics: pl.DataFrame, subjects: pl.Series) -> pl.DataFrame:
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
        self._warn_about_units(demographic_unit_findings(values), "the demographics")
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

    def predict_frame(
        self,
        frame: pl.DataFrame,
        demographics: pl.DataFrame | None,
        batch_size: int = 64,
        source: str = "the test frame",
        with_heads: bool = False,
    ) -> pl.DataFrame:
        """Every sequence of a test-format frame: ``sequence_id``, ``gesture``, ``imu_only`` and the
        18 ``prob_<gesture>`` columns, in the frame's sequence order; ``with_heads=True`` adds the
        other heads' probabilities (:data:`HEAD_COLUMN_PREFIX`: ``prob_orientation_<k>`` in
        ``ORIENTATIONS`` order, ``prob_pair_<k>`` in ``GESTURE_ORIENTATION_PAIRS`` order).

        The rules of :meth:`predict`; a sequence that cannot be answered gets
        :data:`FALLBACK_GESTURE` (NaN probabilities) with a warning naming it, never a failure
        of the whole frame: when the whole frame's features or models fail, its sequences are
        answered one at a time (with ``strict=True`` the failure raises instead). Rows without a
        ``sequence_id`` are a :class:`DataFileError` naming their lines of ``source`` (the file
        the frame was read from): their answer could not be submitted.
        """
        check_batch_size(batch_size)
        frame = as_polars_frame(frame, "the test frame")
        if demographics is None:
            demographics = pl.DataFrame(schema={"subject": pl.String})  # every subject unknown
        demographics = as_polars_frame(demographics, "the demographics")
        self.check_columns(frame.columns)
        refuse_rows_without_sequence_id(frame, source)
        if frame.height == 0:
            logger.warning("the test frame holds no rows: no predictions")
            return self._result_frame(
                np.array([], dtype=str), np.zeros(0, dtype=bool), np.zeros((0, NUM_GESTURES), np.float32)
            )
        try:
            table = self.frame_table(frame, demographics)
        except InputColumnsError:
            raise
        except Exception:
            if self.strict:
                raise
            logger.exception("building the features of the whole test frame failed: one sequence at a time")
            return self._predict_one_at_a_time(frame, demographics, with_heads)
        try:
            heads = self.table_heads(table, batch_size=batch_size)
        except Exception:
            if self.strict:
                raise
            logger.exception("predicting the whole test frame failed: one sequence at a time")
            rows = []
            for i in range(table.n_sequences):
                try:
                    rows.append(self.table_heads(table.subset(np.array([i])), batch_size=1))
                except Exception:
                    logger.exception("predicting sequence %s failed", table.sequence_ids[i])
                    rows.append(None)
            heads = stack_heads([None if r is None else {h: p[0] for h, p in r.items()} for r in rows])
        return self._result_frame(table.sequence_ids.astype(str), table.imu_only, heads, with_heads)

    def _predict_one_at_a_time(
        self, frame: pl.DataFrame, demographics: pl.DataFrame, with_heads: bool = False
    ) -> pl.DataFrame:
        """:meth:`predict_frame` by :meth:`predict_probabilities` on each sequence of ``frame``."""
        sequence_ids, imu_only, rows = [], [], []
        by_subject = "subject" in demographics.columns
        subjects = demographics["subject"].cast(pl.String) if by_subject else None
        for sequence in frame.partition_by("sequence_id", maintain_order=True):
            subject = self._subject(sequence)
            rows_of_subject = demographics.filter(subjects == subject) if by_subject else demographics
            heads, table = self._answer(sequence, rows_of_subject)
            sequence_ids.append(self._sequence_id(sequence))
            imu_only.append(bool(table.imu_only[0]) if table is not None else False)
            rows.append(heads)
        return self._result_frame(
            np.array(sequence_ids, dtype=str), np.array(imu_only), stack_heads(rows), with_heads
        )

    @staticmethod
    def _result_frame(
        sequence_ids: np.ndarray,
        imu_only: np.ndarray,
        heads: dict[str, np.ndarray] | np.ndarray,
        with_heads: bool = False,
    ) -> pl.DataFrame:
        """sequence_id, gesture (FALLBACK_GESTURE where a row is not finite, warned about), imu_only,
        prob_<gesture> (and with ``with_heads`` the other heads' columns)."""
        heads = heads if isinstance(heads, dict) else {"gesture": heads}
        probabilities = heads["gesture"]
        answered = np.isfinite(probabilities).all(axis=1)
        if not answered.all():
            unanswered = sequence_ids[~answered]
            logger.warning(
                "%d sequence(s) got no finite probabilities, answered %r: %s%s",
                len(unanswered),
                FALLBACK_GESTURE,
                ", ".join(unanswered[:10]),
                ", ..." if len(unanswered) > 10 else "",
            )
        names = np.array(GESTURES, dtype=object)
        gestures = np.where(
            answered, names[np.nan_to_num(probabilities, nan=-1.0).argmax(1)], FALLBACK_GESTURE
        )
        result = pl.DataFrame(
            {
                "sequence_id": pl.Series(sequence_ids.astype(str), dtype=pl.String),
                "gesture": pl.Series(gestures.astype(str), dtype=pl.String),
                "imu_only": pl.Series(imu_only, dtype=pl.Boolean),
            }
        )
        parts = [result, pl.DataFrame(probabilities, schema=[f"prob_{g}" for g in GESTURES])]
        if with_heads:
            for head, prefix in HEAD_COLUMN_PREFIX.items():
                if head in heads:
                    width = heads[head].shape[1]
                    parts.append(pl.DataFrame(heads[head], schema=[f"{prefix}{k}" for k in range(width)]))
        return pl.concat(parts, how="horizontal")


def stack_heads(rows: Sequence[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray]:
    """Per-sequence heads (None: unanswered) -> per head ``(N, C)`` float32, NaN rows where a
    sequence has no answer; a head is kept when every answered sequence has it."""
    answered = [r for r in rows if r is not None]
    names = [h for h in HEAD_OUTPUTS if answered and all(h in r for r in answered)]
    widths = {h: len(answered[0][h]) for h in names} | {"gesture": NUM_GESTURES}
    return {
        head: np.stack([r[head] if r is not None else np.full(widths[head], np.nan) for r in rows])
        .astype(np.float32)
        .reshape(len(rows), widths[head])
        for head in dict.fromkeys(["gesture", *names])
    }


def heads_of_frame(predictions: pl.DataFrame) -> dict[str, np.ndarray]:
    """The heads' ``(N, C)`` probabilities held by :meth:`EnsemblePredictor.predict_frame`'s
    result (``with_heads=True`` for heads other than the gesture's)."""
    heads = {"gesture": predictions.select([f"prob_{g}" for g in GESTURES]).to_numpy()}
    for head, prefix in HEAD_COLUMN_PREFIX.items():
        columns = [c for c in predictions.columns if c.startswith(prefix)]
        if columns:
            heads[head] = predictions.select(sorted(columns, key=lambda c: int(c[len(prefix) :]))).to_numpy()
    return heads
