"""A local stand-in for the competition's gateway (``kaggle_evaluation``'s ``CMIGateway``).

Like the real one it reads test.csv and the demographics file with polars' default type
inference (``pl.read_csv``, no schema), serves each sequence in shuffled order as a polars
DataFrame with the test.csv columns together with its subject's demographics rows (a 1-row
frame; 0 rows when the subject is missing from the file), and checks every answer: a ``str``
that is one of the 18 gestures, or it stops with :class:`GatewayError` naming the sequence.
It also times every call, for the latency benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from codes.common.data_files import (
    TEST_DEMOGRAPHICS_FILE,
    TEST_FILE,
    check_columns,
    require_file,
)
from codes.common.schema import DEMOGRAPHICS_COLUMNS, GESTURES, TEST_COLUMNS

Predict = Callable[[pl.DataFrame, pl.DataFrame], str]
_GESTURE_SET = frozenset(GESTURES)


class GatewayError(RuntimeError):
    """An answer the competition's gateway would reject (wrong type or not one of the 18 gestures)."""


@dataclass
class GatewayResult:
    """What a served run gives back."""

    submission: pl.DataFrame  # sequence_id, gesture: in the order served
    seconds: np.ndarray  # (N,) wall time of each predict() call, in the order served

    def latency_ms(self) -> dict[str, float]:
        """p50 / p90 / p99 / mean / max of the per-call wall time, in milliseconds."""
        return latency_summary(self.seconds)


def latency_summary(seconds: np.ndarray) -> dict[str, float]:
    milliseconds = np.asarray(seconds, dtype=np.float64) * 1000.0
    if len(milliseconds) == 0:
        return {}
    return {
        "n": float(len(milliseconds)),
        "p50": float(np.percentile(milliseconds, 50)),
        "p90": float(np.percentile(milliseconds, 90)),
        "p99": float(np.percentile(milliseconds, 99)),
        "mean": float(milliseconds.mean()),
        "max": float(milliseconds.max()),
    }


class LocalGateway:
    """Serves a test-format frame one sequence at a time to ``predict(sequence, demographics)``."""

    def __init__(self, test: pl.DataFrame, demographics: pl.DataFrame, seed: int | None = None) -> None:
        check_columns(Path("<test frame>"), test.columns, TEST_COLUMNS)
        check_columns(Path("<demographics frame>"), demographics.columns, DEMOGRAPHICS_COLUMNS)
        self.test = test.select(TEST_COLUMNS)
        self.demographics = demographics
        self.seed = seed  # None: a different order every run, as on Kaggle

    @classmethod
    def from_files(cls, test_path: Path, demographics_path: Path, seed: int | None = None) -> LocalGateway:
        """Read the two files the way the competition's gateway does (``pl.read_csv`` defaults)."""
        return cls(pl.read_csv(require_file(test_path)), pl.read_csv(require_file(demographics_path)), seed)

    @classmethod
    def from_dir(cls, data_dir: Path, seed: int | None = None) -> LocalGateway:
        return cls.from_files(Path(data_dir) / TEST_FILE, Path(data_dir) / TEST_DEMOGRAPHICS_FILE, seed)

    def sequence_ids(self) -> list[str]:
        """Every sequence id, in the shuffled order they are served."""
        ids = self.test["sequence_id"].unique(maintain_order=True).to_list()
        order = np.random.default_rng(self.seed).permutation(len(ids))
        return [ids[i] for i in order]

    def batches(self) -> Iterator[tuple[str, pl.DataFrame, pl.DataFrame]]:
        """``(sequence_id, sequence rows, demographics rows of its subject)`` in serving order."""
        groups = self.test.partition_by("sequence_id", as_dict=True, maintain_order=True)
        for sequence_id in self.sequence_ids():
            sequence = groups[(sequence_id,)]
            subject = sequence["subject"][0]
            yield sequence_id, sequence, self.demographics.filter(pl.col("subject") == subject)

    def serve(self, predict: Predict) -> GatewayResult:
        """Call ``predict`` on every sequence, check each answer, time each call."""
        sequence_ids, answers, seconds = [], [], []
        for sequence_id, sequence, demographics in self.batches():
            started = time.perf_counter()
            answer = predict(sequence, demographics)
            seconds.append(time.perf_counter() - started)
            if not isinstance(answer, str):
                raise GatewayError(
                    f"sequence {sequence_id}: predict() returned {type(answer).__name__}, expected str"
                )
            if answer not in _GESTURE_SET:
                raise GatewayError(
                    f"sequence {sequence_id}: predict() returned {answer!r}, which is not one of the 18 gestures"
                )
            sequence_ids.append(sequence_id)
            answers.append(answer)
        submission = pl.DataFrame(
            {"sequence_id": sequence_ids, "gesture": answers}, schema=_SUBMISSION_SCHEMA
        )
        return GatewayResult(submission=submission, seconds=np.asarray(seconds))


_SUBMISSION_SCHEMA = {"sequence_id": pl.String, "gesture": pl.String}
