"""Subject-aware answers: assign labels jointly over a subject's sequences, causally.

A subject performs each gesture at most a known number of times (``codes/common/protocol.py``,
stored in the run folder at training time). For each new sequence, :class:`SubjectAssignment`
solves an assignment over that subject's sequences so far (the new one included) that maximises
the summed log-probability under those capacities, and answers the new sequence's label. It
never needs future sequences, and an answer already returned is never revised; subjects never
interfere. The solver is ``scipy.optimize.linear_sum_assignment`` on a capacity-expanded cost
matrix: one column per allowed occurrence of each gesture.

``overflow_penalty`` is the strength: going beyond a gesture's capacity costs that many nats
(``inf``: never, when the sequences fit; ``0``: capacities ignored, the plain argmax). A gesture
of capacity 0 is never assigned.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from scipy.optimize import linear_sum_assignment

LOG_FLOOR = 1e-12  # probabilities are floored here before the log
HARD_OVERFLOW = 1e6  # nats: the cost of a slot beyond capacity when the penalty is infinite


def assign_labels(
    log_probabilities: np.ndarray,
    capacities: np.ndarray,
    overflow_penalty: float = math.inf,
    last_row_cost: np.ndarray | None = None,
) -> np.ndarray:
    """``(n, G)`` log-probabilities -> ``(n,)`` gesture indices maximising their sum under ``capacities``.

    Each gesture ``g`` has ``capacities[g]`` slots at cost ``-log p``, and (when ``capacities[g]
    > 0``) ``n`` overflow slots at ``-log p + overflow_penalty`` (an infinite penalty is a very
    large one: only used when more sequences than slots must be placed). ``last_row_cost``
    ``(G,)`` is added to the last row's cost of each gesture.
    """
    log_probabilities = np.asarray(log_probabilities, dtype=np.float64)
    n, n_gestures = log_probabilities.shape
    capacities = np.asarray(capacities, dtype=np.int64)
    if (capacities <= 0).all():
        return log_probabilities.argmax(1)
    penalty = HARD_OVERFLOW if math.isinf(overflow_penalty) else float(overflow_penalty)
    slot_gesture = np.concatenate(
        [
            np.repeat(np.arange(n_gestures), np.minimum(capacities, n)),
            np.repeat(np.flatnonzero(capacities > 0), n),
        ]
    )
    slot_extra = np.concatenate(
        [np.zeros(int(np.minimum(capacities, n).sum())), np.full(int((capacities > 0).sum()) * n, penalty)]
    )
    cost = -log_probabilities[:, slot_gesture] + slot_extra[None, :]  # (n, slots)
    if last_row_cost is not None:
        cost[-1] += np.asarray(last_row_cost, dtype=np.float64)[slot_gesture]
    rows, columns = linear_sum_assignment(cost)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = slot_gesture[columns]
    return labels


def floored_log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR))


class SubjectAssignment:
    """Per-subject history of answered sequences' log-probabilities, bounded in memory.

    ``answer(subject, probabilities)`` returns the gesture index of the new sequence; a missing
    or empty subject is answered without history (the argmax). The capacities bind each step's
    joint solution, in which the earlier sequences are free: an earlier answer may later look
    wrong, and the returned answers may then exceed a capacity. ``respect_answers=True`` makes
    the answers already returned use up their gestures instead; on simulated subjects with
    biased priors that lost accuracy (0.349 against 0.512 for the default, plain argmax 0.388;
    docs/inference.md), since one early mistake then forces others. At most ``max_subjects`` subjects
    are kept (the least recently seen is dropped) and the last ``max_sequences_per_subject``
    sequences of each.
    """

    def __init__(
        self,
        capacities: np.ndarray,
        overflow_penalty: float = math.inf,
        max_subjects: int = 10_000,
        max_sequences_per_subject: int = 512,
        respect_answers: bool = False,
    ) -> None:
        self.capacities = np.asarray(capacities, dtype=np.int64)
        if self.capacities.ndim != 1 or (self.capacities < 0).any():
            raise ValueError("capacities must be one non-negative count per gesture")
        if overflow_penalty < 0:
            raise ValueError(f"overflow_penalty must be >= 0, got {overflow_penalty}")
        self.overflow_penalty = float(overflow_penalty)
        self.max_subjects, self.max_sequences_per_subject = int(max_subjects), int(max_sequences_per_subject)
        self.respect_answers = respect_answers
        # per subject: its sequences' log-probabilities and the count of each answer returned
        self._history: OrderedDict[str, tuple[list[np.ndarray], np.ndarray]] = OrderedDict()

    def answer(self, subject: str | None, probabilities: np.ndarray) -> int:
        log_probabilities = floored_log(probabilities)
        if not subject:
            return int(np.argmax(log_probabilities))
        rows, answered = self._history.setdefault(subject, ([], np.zeros(len(self.capacities), np.int64)))
        self._history.move_to_end(subject)
        rows.append(log_probabilities)
        del rows[: max(0, len(rows) - self.max_sequences_per_subject)]
        while len(self._history) > self.max_subjects:
            self._history.popitem(last=False)
        # the earlier sequences are free in the joint solution; with respect_answers the answers
        # already returned also hold their places (a used-up gesture costs the overflow penalty)
        penalty = HARD_OVERFLOW if math.isinf(self.overflow_penalty) else self.overflow_penalty
        used_up = np.where(answered >= self.capacities, penalty, 0.0) if self.respect_answers else None
        label = int(assign_labels(np.stack(rows), self.capacities, self.overflow_penalty, used_up)[-1])
        answered[label] += 1
        return label

    def fresh(self) -> SubjectAssignment:
        """The same settings, no history."""
        return SubjectAssignment(
            self.capacities,
            self.overflow_penalty,
            self.max_subjects,
            self.max_sequences_per_subject,
            self.respect_answers,
        )

    def reset(self) -> None:
        """Forget every subject's history."""
        self._history.clear()

    def n_sequences(self, subject: str) -> int:
        return len(self._history[subject][0]) if subject in self._history else 0

    def offline(self, subjects: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Every sequence at once: each subject's whole set assigned jointly (what a gateway that
        serves one sequence at a time cannot do). Missing subjects get the argmax."""
        subjects = np.asarray(subjects, dtype=object)
        log_probabilities = floored_log(probabilities)
        labels = log_probabilities.argmax(1)
        for subject in {s for s in subjects if s}:
            index = np.flatnonzero(subjects == subject)
            labels[index] = assign_labels(log_probabilities[index], self.capacities, self.overflow_penalty)
        return labels
