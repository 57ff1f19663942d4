"""Subject-aware answers: assign labels jointly over a subject's sequences, causally.

A subject performs each class at most a known number of times (``codes/common/protocol.py``,
stored in the run folder at training time). The classes are the 18 gestures (gesture level) or
the gesture x orientation pairs of the protocol (pair level: 51 pairs, at most 2 sequences each
per competition subject, a constraint that binds far more than a gesture's 2 to 8). For each new
sequence, :class:`SubjectAssignment` solves an assignment over that subject's sequences so far
(the new one included) that maximises the summed log-probability under those capacities, and
answers the gesture of the new sequence's class. It never needs future sequences, and an answer
already returned is never revised; subjects never interfere. The solver is
``scipy.optimize.linear_sum_assignment`` on a capacity-expanded cost matrix: one column per
allowed occurrence of each class.

At pair level the class probabilities come from the model's heads (:class:`AssignmentClasses`,
``joint``): the product of the gesture and orientation heads, a pair head, or both pooled.

``overflow_penalty`` is the strength: going beyond a class's capacity costs that many nats
(``inf``: never, when the sequences fit; ``0``: capacities ignored, the plain argmax). A class
of capacity 0 is never assigned.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from codes.common.protocol import Protocol
from codes.common.schema import GESTURE_ORIENTATION_PAIRS, GESTURES, NUM_GESTURES, ORIENTATIONS

logger = logging.getLogger(__name__)

LOG_FLOOR = 1e-12  # probabilities are floored here before the log
HARD_OVERFLOW = 1e6  # nats: the cost of a slot beyond capacity when the penalty is infinite
# how the pair classes' probabilities are formed from the heads (AssignmentClasses.joint)
JOINTS = ("product", "pair", "pair_product")
# the heads each joint needs, besides the gesture head
JOINT_HEADS = {
    "gesture": (),
    "product": ("orientation",),
    "pair": ("pair",),
    "pair_product": ("orientation", "pair"),
}
# joint="auto": the first of these whose heads the model gives (the order: docs/results.md)
AUTO_JOINTS = ("pair_product", "pair", "product")
PAIR_COLUMN = {pair: k for k, pair in enumerate(GESTURE_ORIENTATION_PAIRS)}

_WARNED: set[str] = set()
Heads = Mapping[str, np.ndarray]  # head name (gesture, orientation, pair) -> probabilities (..., C)


def assign_labels(
    log_probabilities: np.ndarray,
    capacities: np.ndarray,
    overflow_penalty: float = math.inf,
    last_row_cost: np.ndarray | None = None,
) -> np.ndarray:
    """``(n, K)`` log-probabilities -> ``(n,)`` class indices maximising their sum under ``capacities``.

    Each class ``k`` has ``capacities[k]`` slots at cost ``-log p``, and (when ``capacities[k]
    > 0``) overflow slots at ``-log p + overflow_penalty``: as many as could ever be used (an
    infinite penalty is a very large one: its overflow slots exist only when more sequences than
    slots must be placed). ``last_row_cost`` ``(K,)`` is added to the last row's cost of each class.
    """
    log_probabilities = np.asarray(log_probabilities, dtype=np.float64)
    n, n_classes = log_probabilities.shape
    capacities = np.asarray(capacities, dtype=np.int64)
    if (capacities <= 0).all():
        return log_probabilities.argmax(1)
    regular = np.minimum(capacities, n)
    if math.isinf(overflow_penalty):
        penalty = HARD_OVERFLOW
        overflow = np.where(capacities > 0, max(0, n - int(regular.sum())), 0)
    else:
        penalty = float(overflow_penalty)
        overflow = np.where(capacities > 0, n - regular, 0)
    slot_class = np.concatenate(
        [np.repeat(np.arange(n_classes), regular), np.repeat(np.arange(n_classes), overflow)]
    )
    slot_extra = np.concatenate([np.zeros(int(regular.sum())), np.full(int(overflow.sum()), penalty)])
    cost = -log_probabilities[:, slot_class] + slot_extra[None, :]  # (n, slots)
    if last_row_cost is not None:
        cost[-1] += np.asarray(last_row_cost, dtype=np.float64)[slot_class]
    rows, columns = linear_sum_assignment(cost)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = slot_class[columns]
    return labels


def floored_log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR))


def as_heads(heads: Heads | np.ndarray) -> Heads:
    """A bare array is the gesture head's probabilities."""
    return {"gesture": heads} if isinstance(heads, np.ndarray) else heads


@dataclass(frozen=True)
class AssignmentClasses:
    """What the assignment places a subject's sequences in: ``K`` classes with their capacities,
    each class's gesture (the answer) and orientation (-1 at gesture level), and ``joint``, how
    the classes' log-probabilities come from the heads (``gesture``: the gesture head alone;
    pair level: one of :data:`JOINTS`)."""

    capacities: np.ndarray  # (K,) int
    gestures: np.ndarray  # (K,) gesture index of each class
    orientations: np.ndarray  # (K,) orientation index of each class, -1 at gesture level
    joint: str = "gesture"

    def __post_init__(self) -> None:
        if self.joint not in ("gesture", "auto", *JOINTS):
            raise ValueError(f"joint must be 'gesture', 'auto' or one of {JOINTS}, got {self.joint!r}")
        if np.ndim(self.capacities) != 1 or (np.asarray(self.capacities) < 0).any():
            raise ValueError("capacities must be one non-negative count per class")

    @property
    def level(self) -> str:
        return "gesture" if self.joint == "gesture" else "pair"

    @classmethod
    def gesture_level(cls, capacities: np.ndarray) -> AssignmentClasses:
        capacities = np.asarray(capacities, dtype=np.int64)
        return cls(capacities, np.arange(len(capacities)), np.full(len(capacities), -1), "gesture")

    @classmethod
    def pair_level(cls, pair_capacities: np.ndarray, joint: str = "product") -> AssignmentClasses:
        """The pairs of ``(18, 4)`` capacities that a training subject performed."""
        gestures, orientations = np.nonzero(np.asarray(pair_capacities) > 0)
        capacities = np.asarray(pair_capacities, dtype=np.int64)[gestures, orientations]
        return cls(capacities, gestures, orientations, joint)

    @classmethod
    def from_protocol(cls, protocol: Protocol, joint: str = "product") -> AssignmentClasses:
        """Pair level when the protocol counts pairs (version 2), else gesture level."""
        if joint == "gesture" or not protocol.has_pairs:
            return cls.gesture_level(protocol.gestures)
        return cls.pair_level(protocol.pairs, joint)

    @property
    def needed_heads(self) -> tuple[str, ...]:
        if self.joint == "auto":
            return ("gesture", "orientation")  # the least an automatic pair-level joint needs
        return ("gesture", *JOINT_HEADS[self.joint])

    def resolved(self, heads: Heads) -> AssignmentClasses:
        """``joint="auto"``: the first of :data:`AUTO_JOINTS` whose heads are in ``heads``
        (itself when none is: :meth:`SubjectAssignment.answer` then falls back)."""
        if self.joint != "auto":
            return self
        for joint in AUTO_JOINTS:
            if all(name in heads for name in JOINT_HEADS[joint]):
                return AssignmentClasses(self.capacities, self.gestures, self.orientations, joint)
        return self

    def log_probabilities(self, heads: Heads | np.ndarray) -> np.ndarray:
        """``(..., K)`` log-probabilities of the classes (normalised over them) from the heads'
        probabilities ``(..., C)``; floored at :data:`LOG_FLOOR` before the log."""
        heads = as_heads(heads)
        if self.joint == "gesture":
            return floored_log(heads["gesture"])[..., self.gestures]
        parts = []
        if self.joint in ("product", "pair_product"):
            parts.append(
                floored_log(heads["gesture"])[..., self.gestures]
                + floored_log(heads["orientation"])[..., self.orientations]
            )
        if self.joint in ("pair", "pair_product"):
            columns = self._pair_columns
            pair_log = floored_log(heads["pair"])[..., np.maximum(columns, 0)]
            parts.append(np.where(columns >= 0, pair_log, math.log(LOG_FLOOR)))
        pooled = np.mean(parts, axis=0)  # a log-linear pool when both
        return pooled - logsumexp(pooled, axis=-1, keepdims=True)

    @cached_property
    def _pair_columns(self) -> np.ndarray:
        """``(K,)`` each class's column of the pair head (``GESTURE_ORIENTATION_PAIRS``), -1 for none."""
        return np.array(
            [
                PAIR_COLUMN.get((GESTURES[g], ORIENTATIONS[o]), -1)
                for g, o in zip(self.gestures, self.orientations, strict=True)
            ],
            dtype=np.int64,
        )

    @cached_property
    def _class_gesture(self) -> np.ndarray:
        """``(K, 18)`` one-hot: the gesture of each class."""
        return np.eye(NUM_GESTURES)[self.gestures]

    def plain_gestures(self, log_probabilities: np.ndarray) -> np.ndarray:
        """The gesture with the largest marginal over its classes, per row of ``(..., K)``."""
        shifted = log_probabilities - log_probabilities.max(-1, keepdims=True)
        return (np.exp(shifted) @ self._class_gesture).argmax(-1)


class SubjectAssignment:
    """Per-subject history of answered sequences' class log-probabilities, bounded in memory.

    ``answer(subject, heads)`` returns the gesture index of the new sequence (``heads``: the
    model's probabilities per head, or a bare array of gesture probabilities); a missing or
    empty subject is answered without history (the argmax). The capacities bind each step's
    joint solution, in which the earlier sequences are free: an earlier answer may later look
    wrong, and the returned answers may then exceed a capacity. ``respect_answers=True`` makes
    the answers already returned use up their classes instead; on simulated subjects with
    biased priors that lost accuracy (0.349 against 0.512 for the default, plain argmax 0.388;
    docs/inference.md), since one early mistake then forces others. At most ``max_subjects`` subjects
    are kept (the least recently seen is dropped) and the last ``max_sequences_per_subject``
    sequences of each.

    Variants measured by ``benchmarks/subject_assignment.py`` (docs/results.md), all off by
    default: ``plain_until``: a subject's first ``plain_until - 1`` sequences are answered plain
    (their rows still join the history); ``penalty_ramp``: a finite ``overflow_penalty`` grows
    with the history, ``overflow_penalty x min(1, n / penalty_ramp)`` at the subject's ``n``-th
    sequence; ``prior_weight``: instead of the joint solution's label, the new sequence gets
    ``argmax log p + prior_weight x log((free slots + 0.5) / (capacity + 0.5))``, the free slots
    being those the earlier sequences' own assignment leaves. A pair-level assignment given heads that lack what its joint
    needs (a model without an orientation or pair head) falls back to ``fallback`` (gesture
    level), once, with a warning.
    """

    def __init__(
        self,
        capacities: np.ndarray | AssignmentClasses,
        overflow_penalty: float = math.inf,
        max_subjects: int = 10_000,
        max_sequences_per_subject: int = 512,
        respect_answers: bool = False,
        plain_until: int = 0,
        fallback: AssignmentClasses | None = None,
        penalty_ramp: int = 0,
        prior_weight: float | None = None,
    ) -> None:
        self.classes = (
            capacities
            if isinstance(capacities, AssignmentClasses)
            else AssignmentClasses.gesture_level(np.asarray(capacities))
        )
        if overflow_penalty < 0:
            raise ValueError(f"overflow_penalty must be >= 0, got {overflow_penalty}")
        self.overflow_penalty = float(overflow_penalty)
        self.max_subjects, self.max_sequences_per_subject = int(max_subjects), int(max_sequences_per_subject)
        self.respect_answers = respect_answers
        self.plain_until = int(plain_until)
        self.fallback = fallback
        if penalty_ramp < 0 or (penalty_ramp and math.isinf(overflow_penalty)):
            raise ValueError("penalty_ramp must be >= 0, and needs a finite overflow_penalty")
        self.penalty_ramp = int(penalty_ramp)
        self.prior_weight = prior_weight
        # per subject: its sequences' log-probabilities and the count of each answered class
        self._history: OrderedDict[str, tuple[list[np.ndarray], np.ndarray]] = OrderedDict()

    @property
    def capacities(self) -> np.ndarray:
        return self.classes.capacities

    def _check_heads(self, heads: Heads) -> None:
        self.classes = self.classes.resolved(heads)
        missing = [name for name in self.classes.needed_heads if name not in heads]
        if not missing:
            return
        if self.fallback is None or any(name not in heads for name in self.fallback.needed_heads):
            raise ValueError(f"the model gives no {', '.join(missing)} head(s), which the assignment needs")
        to = "plain answers" if (self.fallback.capacities <= 0).all() else f"{self.fallback.level} level"
        message = (
            f"the model has no {' or '.join(missing)} head: subject-aware answers fall back from "
            f"{self.classes.level} level ({self.classes.joint}) to {to}"
        )
        if message not in _WARNED:  # once per process, however many copies (fresh()) meet it
            _WARNED.add(message)
            logger.warning(message)
        self.classes, self.fallback = self.fallback, None
        self._history.clear()

    def answer(self, subject: str | None, heads: Heads | np.ndarray) -> int:
        heads = as_heads(heads)
        self._check_heads(heads)
        log_probabilities = self.classes.log_probabilities(heads)
        if not np.isfinite(log_probabilities).all():  # a head without an answer: the gesture head alone
            logger.warning(
                "subject %s: a head gave non-finite probabilities: answered plain, not remembered", subject
            )
            return int(np.nanargmax(np.nan_to_num(np.asarray(heads["gesture"], dtype=np.float64), nan=-1.0)))
        if not subject:
            return int(self.classes.plain_gestures(log_probabilities))
        rows, answered = self._history.setdefault(subject, ([], np.zeros(len(self.capacities), np.int64)))
        self._history.move_to_end(subject)
        rows.append(log_probabilities)
        del rows[: max(0, len(rows) - self.max_sequences_per_subject)]
        while len(self._history) > self.max_subjects:
            self._history.popitem(last=False)
        if len(rows) < self.plain_until:
            return int(self.classes.plain_gestures(log_probabilities))
        penalty = self.overflow_penalty
        if self.penalty_ramp:
            penalty *= min(1.0, len(rows) / self.penalty_ramp)
        if self.prior_weight is not None:
            label = self._rescored(rows, penalty)
        else:
            # the earlier sequences are free in the joint solution; with respect_answers the answers
            # already returned also hold their places (a used-up class costs the overflow penalty)
            hard = HARD_OVERFLOW if math.isinf(penalty) else penalty
            used_up = np.where(answered >= self.capacities, hard, 0.0) if self.respect_answers else None
            label = int(assign_labels(np.stack(rows), self.capacities, penalty, used_up)[-1])
        answered[label] += 1
        return int(self.classes.gestures[label])

    def _rescored(self, rows: list[np.ndarray], penalty: float) -> int:
        """The new sequence's class by its own log-probabilities and the free slots the earlier
        sequences' assignment leaves (``prior_weight``)."""
        used = np.zeros(len(self.capacities), dtype=np.int64)
        if len(rows) > 1:
            np.add.at(used, assign_labels(np.stack(rows[:-1]), self.capacities, penalty), 1)
        free = np.maximum(self.capacities - used, 0)
        prior = np.log((free + 0.5) / (self.capacities + 0.5))
        return int(np.argmax(np.where(self.capacities > 0, rows[-1] + self.prior_weight * prior, -np.inf)))

    def fresh(self) -> SubjectAssignment:
        """The same settings, no history."""
        return SubjectAssignment(
            self.classes,
            self.overflow_penalty,
            self.max_subjects,
            self.max_sequences_per_subject,
            self.respect_answers,
            self.plain_until,
            self.fallback,
            self.penalty_ramp,
            self.prior_weight,
        )

    def reset(self) -> None:
        """Forget every subject's history."""
        self._history.clear()

    def n_sequences(self, subject: str) -> int:
        return len(self._history[subject][0]) if subject in self._history else 0

    def offline(self, subjects: np.ndarray, heads: Heads | np.ndarray) -> np.ndarray:
        """Every sequence at once: each subject's whole set assigned jointly (what a gateway that
        serves one sequence at a time cannot do). Missing subjects get the plain answer."""
        heads = as_heads(heads)
        self._check_heads(heads)
        subjects = np.asarray(subjects, dtype=object)
        log_probabilities = self.classes.log_probabilities(heads)
        labels = self.classes.plain_gestures(log_probabilities)
        for subject in {s for s in subjects if s}:
            index = np.flatnonzero(subjects == subject)
            assigned = assign_labels(log_probabilities[index], self.capacities, self.overflow_penalty)
            labels[index] = self.classes.gestures[assigned]
        return labels
