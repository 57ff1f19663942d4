"""Answering gestures: the competition's ``predict`` and batch mode, over one input path.

:class:`GestureAnswerer` holds what every predictor shares: the contract (``predict``,
``predict_probabilities``, ``predict_frame``, ``reset``), the fallback answer, the subject-aware
assignment, and one :class:`~codes.inference.input_path.InputPath` (the odd-input rules, in its
module docstring and docs/inference.md). A subclass says only how the heads' probabilities of
cleaned rows are computed: :class:`EnsemblePredictor`, the fold (and seed) models of one run,
averaged; ``codes.inference.blend.BlendPredictor``, several runs weighted and routed by the
sensors a sequence has.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from codes.common.batching import length_sorted_batches, rounded_length
from codes.common.features import FeatureSettings, feature_layout
from codes.common.schema import GESTURES, NUM_GESTURES
from codes.common.sequences import FeatureNormalizer, SequenceTable, pad_sequences
from codes.inference.input_path import (  # noqa: F401  (re-exported: the names callers import from here)
    LONGEST_TRAINING_SEQUENCE,
    ROWS_PER_CHECK,
    SHORTEST_TRAINING_SEQUENCE,
    CleanFrame,
    CleanSequence,
    InputColumnsError,
    InputPath,
    as_polars_frame,
    check_batch_size,
    refuse_duplicate_columns,
    refuse_rows_without_sequence_id,
)
from codes.inference.subject_assignment import SubjectAssignment

logger = logging.getLogger(__name__)

# Returned when no model output can be had (an empty sequence, a failure inside the model). A
# Target gesture: the metric's binary half rewards a correct "Target", and Target gestures are
# the larger part of the data.
FALLBACK_GESTURE = "Neck - scratch"
# the model outputs the predictor averages over the folds, by head name (a model gives the heads it has)
HEAD_OUTPUTS = {"gesture": "gesture_logits", "orientation": "orientation_logits", "pair": "pair_logits"}
# batch mode's extra columns (with_heads=True): prob_orientation_<k>, prob_pair_<k> (class k of the head)
HEAD_COLUMN_PREFIX = {"orientation": "prob_orientation_", "pair": "prob_pair_"}
Clean = CleanSequence | CleanFrame


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


class GestureAnswerer:
    """The competition's contract over :attr:`inputs`; a subclass gives :meth:`clean_heads` and
    :meth:`imu_only_of`.

    With ``strict=False`` (the default, what a submission wants) an unexpected failure while
    predicting one sequence is logged and answered with :data:`FALLBACK_GESTURE`; ``strict=True``
    lets it raise (tests). ``subject_assignment``: subject-aware answers
    (``codes/inference/subject_assignment.py``); None = each sequence alone.
    """

    def __init__(self, inputs: InputPath, subject_assignment: SubjectAssignment | None = None) -> None:
        self.inputs = inputs
        self.subject_assignment = subject_assignment
        self.n_fallbacks = 0  # sequences answered with FALLBACK_GESTURE

    @property
    def strict(self) -> bool:
        return self.inputs.strict

    @strict.setter
    def strict(self, value: bool) -> None:
        self.inputs.strict = bool(value)

    @property
    def sensor_columns(self) -> list[str]:
        return self.inputs.sensor_columns

    def clean_heads(
        self, clean: Clean, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> dict[str, np.ndarray]:
        """Per head, ``(N, C)`` probabilities of every sequence of ``clean`` (NaN rows: unanswered)."""
        raise NotImplementedError

    def imu_only_of(self, clean: Clean) -> np.ndarray:
        """``(N,)`` bool: the sequences of ``clean`` without any thermopile or ToF reading (builds
        the features, so that a frame whose features fail fails here)."""
        raise NotImplementedError

    def check_columns(self, columns: Sequence[str]) -> None:
        self.inputs.check_columns(columns)

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
            return GESTURES[self.subject_assignment.answer(self.inputs.subject(sequence), heads)]
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
    ) -> tuple[dict[str, np.ndarray] | None, CleanSequence | None]:
        """Per head, the ``(C,)`` probabilities of one sequence (None: the fallback), and its
        cleaned rows (None when they could not be had)."""
        sequence = as_polars_frame(sequence, "the sequence")
        self.check_columns(sequence.columns)
        sequence = self.inputs.first_sequence_only(sequence)
        sequence_id = self.inputs.sequence_id(sequence)
        if sequence.height == 0:
            logger.warning("sequence %s has no rows: answering %r", sequence_id, FALLBACK_GESTURE)
            return None, None
        if demographics is not None:
            demographics = as_polars_frame(demographics, "the demographics")
        clean = None
        try:
            clean = self.inputs.clean_sequence(sequence, demographics)
            heads = {h: p[0] for h, p in self.clean_heads(clean, pad_to_max_len=False).items()}
        except Exception:
            if self.strict:
                raise
            logger.exception("predicting sequence %s failed: answering %r", sequence_id, FALLBACK_GESTURE)
            return None, clean
        if not np.isfinite(heads["gesture"]).all():
            logger.warning("no fold gave finite probabilities for sequence %s", sequence_id)
            return None, clean
        return heads, clean

    # ------------------------------------------------------------ batch mode
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
            clean = self.inputs.clean_frame(frame, demographics)
            imu_only = self.imu_only_of(clean)
        except InputColumnsError:
            raise
        except Exception:
            if self.strict:
                raise
            logger.exception("building the features of the whole test frame failed: one sequence at a time")
            return self._predict_one_at_a_time(frame, demographics, with_heads)
        sequence_ids = clean.frame["sequence_id"].unique(maintain_order=True)
        try:
            heads = self.clean_heads(clean, batch_size=batch_size)
        except Exception:
            if self.strict:
                raise
            logger.exception("predicting the whole test frame failed: one sequence at a time")
            rows = []
            for sequence_id in sequence_ids:
                one = CleanFrame(clean.frame.filter(pl.col("sequence_id") == sequence_id), clean.demographics)
                try:
                    rows.append(self.clean_heads(one, batch_size=1))
                except Exception:
                    logger.exception("predicting sequence %s failed", sequence_id)
                    rows.append(None)
            heads = stack_heads([None if r is None else {h: p[0] for h, p in r.items()} for r in rows])
        return self._result_frame(sequence_ids.to_numpy().astype(str), imu_only, heads, with_heads)

    def _predict_one_at_a_time(
        self, frame: pl.DataFrame, demographics: pl.DataFrame, with_heads: bool = False
    ) -> pl.DataFrame:
        """:meth:`predict_frame` by :meth:`predict_probabilities` on each sequence of ``frame``."""
        sequence_ids, imu_only, rows = [], [], []
        by_subject = "subject" in demographics.columns
        subjects = demographics["subject"].cast(pl.String) if by_subject else None
        for sequence in frame.partition_by("sequence_id", maintain_order=True):
            subject = self.inputs.subject(sequence)
            rows_of_subject = demographics.filter(subjects == subject) if by_subject else demographics
            heads, clean = self._answer(sequence, rows_of_subject)
            sequence_ids.append(self.inputs.sequence_id(sequence))
            imu_only.append(self._imu_only_or_false(clean))
            rows.append(heads)
        return self._result_frame(
            np.array(sequence_ids, dtype=str), np.array(imu_only), stack_heads(rows), with_heads
        )

    def _imu_only_or_false(self, clean: CleanSequence | None) -> bool:
        """Whether one cleaned sequence is IMU-only (False when its features cannot be had)."""
        if clean is None:
            return False
        try:
            return bool(self.imu_only_of(clean)[0])
        except Exception:
            return False

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


class EnsemblePredictor(GestureAnswerer):
    """Averages the fold models' gesture probabilities; :meth:`predict` is the competition's contract.

    ``members`` share one architecture and input layout (``settings``). Models are moved to
    ``device`` and put in eval mode once, here; every call runs under ``torch.inference_mode``.

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
        pad_to_batch: bool = False,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one fold model")
        super().__init__(InputPath(settings.sensor_columns, max_len, strict), subject_assignment)
        self.members = list(members)
        self.settings = settings
        self.max_len = int(max_len)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.feature_names, self.feature_groups = feature_layout(settings)
        self.non_imu_columns = self.feature_groups.get("thm", []) + self.feature_groups.get("tof", [])
        self.fold_threads = max(1, int(fold_threads))
        self.pad_to_batch = bool(pad_to_batch)  # batches cut to their longest sequence
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
            self.pad_to_batch,
        )

    def clean_heads(
        self, clean: Clean, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> dict[str, np.ndarray]:
        return self.table_heads(clean.table(self.settings), batch_size, pad_to_max_len)

    def imu_only_of(self, clean: Clean) -> np.ndarray:
        return clean.table(self.settings).imu_only

    # ------------------------------------------------------------ tables (training's inputs)
    def sequence_table(self, sequence: pl.DataFrame, demographics: pl.DataFrame | None) -> SequenceTable:
        """The one-sequence :class:`SequenceTable` training would have built from these rows."""
        return self.inputs.clean_sequence(sequence, demographics).table(self.settings)

    def frame_table(self, frame: pl.DataFrame, demographics: pl.DataFrame) -> SequenceTable:
        """The :class:`SequenceTable` of a whole test-format frame, built as training builds it,
        with the odd-input rules of :meth:`predict`."""
        return self.inputs.clean_frame(frame, demographics).table(self.settings)

    def float32_sensors(self, frame: pl.DataFrame) -> list[pl.Expr]:
        return self.inputs.float32_sensors(frame)

    def sensor_values(self, sequence: pl.DataFrame) -> np.ndarray:
        return self.inputs.sensor_values(sequence)

    def demographics_vector(self, demographics: pl.DataFrame | None, subject: str | None) -> np.ndarray:
        return self.inputs.demographics_vector(demographics, subject)

    # ------------------------------------------------------------ the models
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
        models' outputs do not depend on padding; fewer steps are faster). With
        :attr:`pad_to_batch` (the run's ``data.pad_to_batch``) the sequences are batched in length
        order and each batch is cut to its longest sequence (``codes/common/batching.py``); the
        rows come back in the table's order. A fold whose output
        for a sequence is not finite in any head is left out of that sequence's mean in every
        head (with a warning); a sequence no fold answers gets NaN.
        """
        kept = np.minimum(table.lengths, self.max_len)
        length = self.max_len if pad_to_max_len and not self.pad_to_batch else int(kept.max())
        demographics = torch.from_numpy(table.demographics.astype(np.float32))
        if self.pad_to_batch:  # similar lengths together, each batch cut to its longest sequence
            batches = list(length_sorted_batches(kept, batch_size))
        else:
            batches = [slice(start, start + batch_size) for start in range(0, table.n_sequences, batch_size)]

        def member_heads(member: FoldMember) -> dict[str, np.ndarray]:
            """Per head, (N, C) probabilities of one fold (inference mode and autocast are per thread)."""
            features, mask = self._member_inputs(table, member.normalizer, length)
            heads: dict[str, np.ndarray] = {}
            with (
                torch.inference_mode(),
                torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ),
            ):
                for batch in batches:
                    steps = rounded_length(kept[batch].max(), length) if self.pad_to_batch else length
                    outputs = member.model(
                        features[batch, :steps].to(self.device),
                        mask[batch, :steps].to(self.device),
                        demographics[batch].to(self.device),
                    )
                    for head, key in HEAD_OUTPUTS.items():
                        if key in outputs:
                            probabilities = outputs[key].float().softmax(-1).cpu().numpy()
                            shape = (table.n_sequences, probabilities.shape[1])
                            heads.setdefault(head, np.full(shape, np.nan, dtype=np.float32))[batch] = (
                                probabilities
                            )
            return heads

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
