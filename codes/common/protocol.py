"""The recording protocol seen in the training data: how often one subject performs each gesture.

Each competition subject performed every gesture x orientation pair under both starting
behaviours, so per subject each gesture occurs a known number of times (8 for each Target
gesture, 2 for the seated-only ones, ...; 102 sequences in all). The real files are close to but
not exactly complete, so these counts are upper bounds. Training writes them into the run folder
(``protocol.json``); subject-aware inference (``codes/inference/subject_assignment.py``) reads
them, so other protocols (other data sets) need no code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from codes.common.schema import GESTURES

PROTOCOL_FILE = "protocol.json"


def gesture_capacities(gestures: np.ndarray, subjects: np.ndarray) -> dict[str, int]:
    """Per gesture (every one of :data:`GESTURES`), the most times one subject performed it."""
    gestures, subjects = np.asarray(gestures).astype(str), np.asarray(subjects).astype(str)
    capacities = dict.fromkeys(GESTURES, 0)
    for subject in np.unique(subjects):
        names, counts = np.unique(gestures[subjects == subject], return_counts=True)
        for name, count in zip(names, counts, strict=True):
            if name in capacities:
                capacities[name] = max(capacities[name], int(count))
    return capacities


def protocol_record(gestures: np.ndarray, subjects: np.ndarray) -> dict:
    """What ``protocol.json`` holds: the capacities and where they come from."""
    capacities = gesture_capacities(gestures, subjects)
    return {
        "gesture_capacities": capacities,
        "rule": "per gesture, the most sequences one training subject has of it",
        "n_subjects": len(np.unique(np.asarray(subjects).astype(str))),
        "sequences_per_subject_at_most": int(sum(capacities.values())),
    }


def read_capacities(run_dir: Path) -> np.ndarray | None:
    """``(18,)`` int capacities in :data:`GESTURES` order from ``run_dir/protocol.json``; None
    when the run folder has none (written before it existed)."""
    path = Path(run_dir) / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())["gesture_capacities"]
        capacities = np.array([int(stored.get(g, 0)) for g in GESTURES], dtype=np.int64)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is damaged ({type(error).__name__}: {error}); copy it again or retrain"
        ) from None
    if (capacities < 0).any():
        raise ValueError(f"{path} holds a negative capacity")
    return capacities
