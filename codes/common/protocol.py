"""The recording protocol seen in the training data: how often one subject performs each class.

Each competition subject performed every gesture x orientation pair under both starting
behaviours: 51 pairs x 2 = 102 sequences, so per subject each pair occurs twice and each gesture
2 to 8 times. The real files are close to but not exactly complete, so these counts are upper
bounds: per class, the most sequences one training subject has of it. Training writes them into
the run folder (``protocol.json``); subject-aware inference (``codes/inference/subject_assignment.py``)
reads them, so other protocols (other data sets) need no code change.

``protocol.json`` versions:

- 1: ``gesture_capacities`` only (run folders written before pairs were counted): subject-aware
  inference works at gesture level;
- 2: also ``pair_capacities``, one entry per gesture x orientation pair a training subject
  performed: the assignment works on p(gesture, orientation) when the model has an orientation
  head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codes.common.schema import GESTURES, ORIENTATIONS

PROTOCOL_FILE = "protocol.json"
PROTOCOL_VERSION = 2
CAPACITY_RULE = "per class, the most sequences one training subject has of it"


def class_capacities(classes: np.ndarray, subjects: np.ndarray) -> dict[str, int]:
    """Per class label (any hashable string), the most times one subject has it."""
    classes, subjects = np.asarray(classes).astype(str), np.asarray(subjects).astype(str)
    capacities: dict[str, int] = {}
    for subject in np.unique(subjects):
        names, counts = np.unique(classes[subjects == subject], return_counts=True)
        for name, count in zip(names, counts, strict=True):
            capacities[name] = max(capacities.get(name, 0), int(count))
    return capacities


def gesture_capacities(gestures: np.ndarray, subjects: np.ndarray) -> dict[str, int]:
    """Per gesture (every one of :data:`GESTURES`), the most times one subject performed it."""
    counted = class_capacities(gestures, subjects)
    return {g: counted.get(g, 0) for g in GESTURES}


def pair_capacities(gestures: np.ndarray, orientations: np.ndarray, subjects: np.ndarray) -> list[dict]:
    """Per gesture x orientation pair a subject performed (known gesture and orientation), the
    most times one subject performed it, in :data:`GESTURES` x :data:`ORIENTATIONS` order."""
    gestures, orientations = np.asarray(gestures).astype(str), np.asarray(orientations).astype(str)
    known = np.isin(gestures, GESTURES) & np.isin(orientations, ORIENTATIONS)
    keys = np.char.add(np.char.add(gestures[known], "\t"), orientations[known])
    counted = class_capacities(keys, np.asarray(subjects).astype(str)[known])
    return [
        {"gesture": g, "orientation": o, "capacity": counted[f"{g}\t{o}"]}
        for g in GESTURES
        for o in ORIENTATIONS
        if f"{g}\t{o}" in counted
    ]


def protocol_record(
    gestures: np.ndarray, subjects: np.ndarray, orientations: np.ndarray | None = None
) -> dict:
    """What ``protocol.json`` holds: the capacities and where they come from (version 2 with
    ``orientations``; without them, the gesture-level version 1)."""
    capacities = gesture_capacities(gestures, subjects)
    record = {
        "version": 1,
        "gesture_capacities": capacities,
        "rule": CAPACITY_RULE,
        "n_subjects": len(np.unique(np.asarray(subjects).astype(str))),
        "sequences_per_subject_at_most": int(sum(capacities.values())),
    }
    if orientations is not None:
        pairs = pair_capacities(gestures, orientations, subjects)
        record["version"] = PROTOCOL_VERSION
        record["pair_capacities"] = pairs
        record["pairs"] = len(pairs)
    return record


@dataclass(frozen=True)
class Protocol:
    """The capacities of a run folder's ``protocol.json``."""

    version: int
    gestures: np.ndarray  # (18,) int, in GESTURES order
    pairs: np.ndarray | None  # (18, 4) int, GESTURES x ORIENTATIONS; None in version 1

    @property
    def has_pairs(self) -> bool:
        return self.pairs is not None and bool((self.pairs > 0).any())


def _damaged(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is damaged ({type(error).__name__}: {error}); copy it again or retrain")


def read_protocol(run_dir: Path) -> Protocol | None:
    """The run folder's protocol; None when it has no ``protocol.json`` (written before it existed)."""
    path = Path(run_dir) / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        version = int(stored.get("version", 1))
        gestures = np.array([int(stored["gesture_capacities"].get(g, 0)) for g in GESTURES], dtype=np.int64)
        pairs = None
        if version >= 2:
            pairs = np.zeros((len(GESTURES), len(ORIENTATIONS)), dtype=np.int64)
            for entry in stored["pair_capacities"]:
                pairs[GESTURES.index(entry["gesture"]), ORIENTATIONS.index(entry["orientation"])] = int(
                    entry["capacity"]
                )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _damaged(path, error) from None
    if version > PROTOCOL_VERSION:
        raise ValueError(
            f"{path} is protocol version {version}; this code reads versions 1 to {PROTOCOL_VERSION}: "
            "update the code, or serve the run with the code that trained it"
        )
    if (gestures < 0).any() or (pairs is not None and (pairs < 0).any()):
        raise ValueError(f"{path} holds a negative capacity")
    return Protocol(version, gestures, pairs)


def read_capacities(run_dir: Path) -> np.ndarray | None:
    """``(18,)`` int gesture capacities in :data:`GESTURES` order from ``run_dir/protocol.json``;
    None when the run folder has none."""
    protocol = read_protocol(run_dir)
    return None if protocol is None else protocol.gestures
