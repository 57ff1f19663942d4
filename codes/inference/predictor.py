"""A fold ensemble that names the gesture of one sequence, or of a whole test file.

Preprocessing is the training pipeline's, step for step (``codes.common``): sensor values as
float32, ``compute_step_features`` (the NaN rule; left-handed wearers mirrored, handedness read
from the demographics row), each fold's own ``FeatureNormalizer`` (absent sensors become 0),
the LAST ``max_len`` steps, demographics as the 7 ``DEMOGRAPHIC_FIELDS`` with NaN = missing.
A sequence whose thermopiles and ToF are all null is IMU-only: those inputs are 0, exactly what
training fed the model for the IMU-only path (``FoldTensors.imu_only`` / sensor drop-out).
The ensemble averages the folds' softmax probabilities.

Odd inputs never raise (documented rules, each with a warning in the log): NaN/null or
non-finite sensor values are missing values; rows out of ``sequence_counter`` order are
sorted; a very short or very long sequence is used as it is (the last ``max_len`` steps);
missing demographics fields are unknown (handedness unknown = not mirrored); an empty sequence,
or a failure inside the model, gives :data:`FALLBACK_GESTURE`. Only missing columns raise
(:class:`InputColumnsError`, naming them).
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

from codes.common.data_files import DataFileError
from codes.common.features import FeatureSettings, compute_step_features, feature_layout
from codes.common.schema import (
    ACC_COLUMNS,
    DEMOGRAPHIC_FIELDS,
    GESTURES,
    IMU_COLUMNS,
    NUM_GESTURES,
    ROT_COLUMNS,
)
from codes.common.sequences import FeatureNormalizer, SequenceTable, build_sequence_table, pad_sequences

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
        )

    # ------------------------------------------------------------ the competition's contract
    def predict(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> str:
        """The gesture of one sequence (test.csv columns) given its subject's demographics row."""
        probabilities = self.predict_probabilities(sequence, demographics)
        if probabilities is None:
            self.n_fallbacks += 1
            return FALLBACK_GESTURE
        return GESTURES[int(np.argmax(probabilities))]

    def predict_probabilities(
        self, sequence: pl.DataFrame, demographics: pl.DataFrame | None
    ) -> np.ndarray | None:
        """``(18,)`` ensemble probabilities of one sequence, or None when only the fallback is left."""
        self.check_columns(sequence.columns)
        sequence_id = self._sequence_id(sequence)
        if sequence.height == 0:
            logger.warning("sequence %s has no rows: answering %r", sequence_id, FALLBACK_GESTURE)
            return None
        try:
            table = self.sequence_table(sequence, demographics)
            probabilities = self.table_probabilities(table, pad_to_max_len=False)[0]
        except Exception:
            if self.strict:
                raise
            logger.exception("predicting sequence %s failed: answering %r", sequence_id, FALLBACK_GESTURE)
            return None
        if not np.isfinite(probabilities).all():
            logger.warning("no fold gave finite probabilities for sequence %s", sequence_id)
            return None
        return probabilities

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

    @staticmethod
    def _sequence_id(sequence: pl.DataFrame) -> str:
        if "sequence_id" in sequence.columns and sequence.height:
            return str(sequence["sequence_id"][0])
        return "<unnamed>"

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            logger.warning(message, *args)

    def _ordered(self, sequence: pl.DataFrame, sequence_id: str) -> pl.DataFrame:
        """Rows in ``sequence_counter`` order (the order training used)."""
        if "sequence_counter" not in sequence.columns or sequence.height < 2:
            return sequence
        counter = sequence["sequence_counter"].cast(pl.Int64, strict=False)
        if counter.null_count() == 0 and bool((counter.diff().drop_nulls() > 0).all()):
            return sequence
        logger.warning("sequence %s: rows are not in sequence_counter order; sorting them", sequence_id)
        return sequence.with_columns(counter.alias("sequence_counter")).sort(
            "sequence_counter", nulls_last=True, maintain_order=True
        )

    def sensor_values(self, sequence: pl.DataFrame) -> np.ndarray:
        """``(n, C)`` float32 values of the feature settings' sensor columns; missing = NaN.

        Numeric columns are cast to float32 (as the CSV reader does in training); text columns
        (polars infers a column that is empty in its first rows as text) are parsed, and what is no
        number becomes missing; non-finite values become missing.
        """
        schema = sequence.schema
        textual = [c for c in self.sensor_columns if not schema[c].is_numeric()]
        if textual:
            self._warn_once(
                "textual",
                "sensor columns arrive as %s (e.g. %s): parsing them as numbers, what is no number is "
                "taken as missing",
                schema[textual[0]],
                ", ".join(textual[:3]),
            )
        values = sequence.select(pl.col(self.sensor_columns).cast(pl.Float32, strict=not textual)).to_numpy()
        if values.dtype != np.float32 or not values.flags.writeable:
            values = values.astype(np.float32)
        return values

    def demographics_vector(self, demographics: pl.DataFrame | None, subject: str | None) -> np.ndarray:
        """``(7,)`` float32 in DEMOGRAPHIC_FIELDS order, NaN = missing (warned about)."""
        vector = np.full(len(DEMOGRAPHIC_FIELDS), np.nan, dtype=np.float32)
        if demographics is None or demographics.height == 0:
            logger.warning(
                "no demographics row for subject %s: every field unknown (handedness unknown: not mirrored)",
                subject,
            )
            return vector
        row_index = 0
        if demographics.height > 1:
            if subject is not None and "subject" in demographics.columns:
                matches = np.flatnonzero(demographics["subject"].cast(pl.String).to_numpy() == subject)
                row_index = int(matches[0]) if len(matches) else 0
            logger.warning(
                "%d demographics rows given for subject %s: using row %d",
                demographics.height,
                subject,
                row_index,
            )
        row = demographics.row(row_index, named=True)
        for i, field in enumerate(DEMOGRAPHIC_FIELDS):
            vector[i] = _as_float(row.get(field))
        unknown = [f for f, v in zip(DEMOGRAPHIC_FIELDS, vector, strict=True) if np.isnan(v)]
        if unknown:
            logger.warning(
                "subject %s: demographics field(s) %s missing or not numbers: taken as unknown%s",
                subject,
                ", ".join(unknown),
                " (handedness unknown: not mirrored)" if "handedness" in unknown else "",
            )
        return vector

    def sequence_table(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> SequenceTable:
        """The one-sequence :class:`SequenceTable` training would have built from these rows."""
        sequence_id = self._sequence_id(sequence)
        sequence = self._ordered(sequence, sequence_id)
        subject = str(sequence["subject"][0]) if "subject" in sequence.columns else None
        values = self.sensor_values(sequence)
        finite = np.isfinite(values)
        n_rows = len(values)
        n_infinite = int((~finite & ~np.isnan(values)).sum())
        if n_infinite:
            logger.warning(
                "sequence %s: %d infinite sensor value(s) taken as missing", sequence_id, n_infinite
            )
            values[~finite] = np.nan
        self._warn_about_rows(sequence_id, finite, n_rows)
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
        """``(N, 18)`` ensemble probabilities of every sequence of ``table``.

        ``pad_to_max_len=False`` pads to the longest kept sequence instead of ``max_len`` (the
        models' outputs do not depend on padding; fewer steps are faster). A fold whose output
        for a sequence is not finite is left out of that sequence's mean (with a warning); a
        sequence no fold answers gets NaN.
        """
        kept = np.minimum(table.lengths, self.max_len)
        length = self.max_len if pad_to_max_len else int(kept.max())
        demographics = torch.from_numpy(table.demographics.astype(np.float32))

        def member_probabilities(member: FoldMember) -> np.ndarray:
            """(N, 18) probabilities of one fold (inference mode and autocast are per thread)."""
            features, mask = self._member_inputs(table, member.normalizer, length)
            parts = []
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
                    parts.append(outputs["gesture_logits"].float().softmax(-1).cpu().numpy())
            return np.concatenate(parts)

        if self._pool is not None and len(self.members) > 1:
            per_fold = list(self._pool.map(member_probabilities, self.members))
        else:
            per_fold = [member_probabilities(member) for member in self.members]
        total = np.zeros((table.n_sequences, NUM_GESTURES), dtype=np.float64)
        counts = np.zeros(table.n_sequences, dtype=np.int64)
        for member, probabilities in zip(self.members, per_fold, strict=True):
            good = np.isfinite(probabilities).all(axis=1)
            if not good.all():
                bad_ids = table.sequence_ids[~good]
                logger.warning(
                    "fold %d gave non-finite probabilities for %d sequence(s) (%s): left out of their mean",
                    member.fold,
                    len(bad_ids),
                    ", ".join(map(str, bad_ids[:5])),
                )
            total[good] += probabilities[good]
            counts += good
        with np.errstate(invalid="ignore", divide="ignore"):
            return (total / counts[:, None]).astype(np.float32)

    # ------------------------------------------------------------ batch mode
    def frame_table(self, frame: pl.DataFrame, demographics: pl.DataFrame) -> SequenceTable:
        """The :class:`SequenceTable` of a whole test-format frame, built as training builds it."""
        self.check_columns(frame.columns)
        for column in ("sequence_id", "sequence_counter", "subject"):
            if column not in frame.columns:
                raise InputColumnsError(f"the test frame lacks the column {column}")
        sensors = [
            pl.col(c).cast(pl.Float32, strict=frame.schema[c].is_numeric()) for c in self.sensor_columns
        ]
        frame = frame.with_columns(sensors).with_columns(
            [pl.when(pl.col(c).is_finite()).then(pl.col(c)).alias(c) for c in self.sensor_columns]
        )
        demographics = demographics.select(
            pl.col("subject").cast(pl.String),
            *[
                pl.col(f).cast(pl.Float64, strict=False)
                if f in demographics.columns
                else pl.lit(None, pl.Float64).alias(f)
                for f in DEMOGRAPHIC_FIELDS
            ],
        )
        uncovered = sorted(set(frame["subject"].unique().to_list()) - set(demographics["subject"].to_list()))
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
        return build_sequence_table(frame, demographics, self.settings, "the demographics")

    def predict_frame(
        self, frame: pl.DataFrame, demographics: pl.DataFrame, batch_size: int = 64
    ) -> pl.DataFrame:
        """Every sequence of a test-format frame: ``sequence_id``, ``gesture``, ``imu_only`` and the
        18 ``prob_<gesture>`` columns, in the frame's sequence order."""
        table = self.frame_table(frame, demographics)
        probabilities = self.table_probabilities(table, batch_size=batch_size)
        answered = np.isfinite(probabilities).all(axis=1)
        if not answered.all():
            logger.warning(
                "%d sequence(s) got no finite probabilities: answering %r",
                int((~answered).sum()),
                FALLBACK_GESTURE,
            )
        names = np.array(GESTURES, dtype=object)
        gestures = np.where(
            answered, names[np.nan_to_num(probabilities, nan=-1.0).argmax(1)], FALLBACK_GESTURE
        )
        result = pl.DataFrame(
            {
                "sequence_id": table.sequence_ids.astype(str),
                "gesture": gestures.astype(str),
                "imu_only": table.imu_only,
            }
        )
        return pl.concat(
            [result, pl.DataFrame(probabilities, schema=[f"prob_{g}" for g in GESTURES])], how="horizontal"
        )
