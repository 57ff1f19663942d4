"""The competition's data schema: the single source of truth for column names and label strings.

Every other module imports its column lists, gesture strings and sensor groups from here.
"""

from __future__ import annotations

import numpy as np

KAGGLE_DOWNLOAD_COMMAND = (
    "kaggle competitions download -c cmi-detect-behavior-with-sensor-data -p data && "
    "unzip data/cmi-detect-behavior-with-sensor-data.zip -d data"
)

# ---------------------------------------------------------------- sensor column groups
ACC_COLUMNS: list[str] = ["acc_x", "acc_y", "acc_z"]
ROT_COLUMNS: list[str] = ["rot_w", "rot_x", "rot_y", "rot_z"]
IMU_COLUMNS: list[str] = ACC_COLUMNS + ROT_COLUMNS
NUM_THERMOPILES = 5
NUM_TOF_SENSORS = 5
TOF_GRID_SIZE = 8  # each ToF sensor is an 8x8 grid, row-major from the top left
TOF_PIXELS = TOF_GRID_SIZE * TOF_GRID_SIZE
THM_COLUMNS: list[str] = [f"thm_{k}" for k in range(1, NUM_THERMOPILES + 1)]
TOF_COLUMNS_BY_SENSOR: dict[int, list[str]] = {
    k: [f"tof_{k}_v{p}" for p in range(TOF_PIXELS)] for k in range(1, NUM_TOF_SENSORS + 1)
}
TOF_COLUMNS: list[str] = [c for k in sorted(TOF_COLUMNS_BY_SENSOR) for c in TOF_COLUMNS_BY_SENSOR[k]]
SENSOR_COLUMNS: list[str] = IMU_COLUMNS + THM_COLUMNS + TOF_COLUMNS  # 7 + 5 + 320 = 332

TOF_NO_REFLECTION = -1  # ToF value meaning "no reflection received"
TOF_MAX_DISTANCE = 254  # largest ToF reading (uncalibrated units)
ACC_QUANTUM = 1.0 / 256.0  # acc_* values are multiples of this
ROT_QUANTUM = 1.0 / 16384.0  # rot_* values are multiples of this
GRAVITY = 9.80665  # m/s^2

# ---------------------------------------------------------------- physical ranges
# A reading outside its range cannot come from the device; it is taken as missing, by the same
# rule as NaN (codes.common.features.impossible_readings), before any feature is computed. The
# bounds are generous: readings of a working device lie well inside them.
ACC_MAX_ABS = 100.0  # m/s^2 per axis (about 10 g; the competition's values lie within about +-40)
ROT_MAX_ABS = 1.0  # every component of a rotation quaternion
ROT_NORM_RANGE = (0.5, 1.5)  # a quaternion whose norm lies outside is no rotation reading
THM_RANGE = (-40.0, 125.0)  # deg C (room and skin temperatures lie far inside)
# ToF: TOF_NO_REFLECTION (-1) or a distance in 0..TOF_MAX_DISTANCE (254), anything else impossible
# Demographics: a field outside its range is unknown (the binary fields take 0 or 1 only).
DEMOGRAPHIC_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),  # years (competition: 10-53)
    "height_cm": (50.0, 250.0),  # (competition: 135-190.5)
    "shoulder_to_wrist_cm": (10.0, 150.0),  # (competition: 41-71)
    "elbow_to_wrist_cm": (5.0, 100.0),  # (competition: 18-44)
}
BINARY_DEMOGRAPHIC_FIELDS: tuple[str, ...] = ("adult_child", "sex", "handedness")  # 0 or 1

# ---------------------------------------------------------------- file column orders
TRAIN_META_COLUMNS: list[str] = [
    "row_id",
    "sequence_type",
    "sequence_id",
    "sequence_counter",
    "subject",
    "orientation",
    "behavior",
    "phase",
    "gesture",
]
TRAIN_COLUMNS: list[str] = TRAIN_META_COLUMNS + SENSOR_COLUMNS  # 341
TEST_META_COLUMNS: list[str] = ["row_id", "sequence_id", "sequence_counter", "subject"]
TEST_COLUMNS: list[str] = TEST_META_COLUMNS + SENSOR_COLUMNS  # 336
LABEL_COLUMNS: list[str] = [c for c in TRAIN_COLUMNS if c not in TEST_COLUMNS]  # the 5 labels
DEMOGRAPHICS_COLUMNS: list[str] = [
    "subject",
    "adult_child",
    "age",
    "sex",
    "handedness",
    "height_cm",
    "shoulder_to_wrist_cm",
    "elbow_to_wrist_cm",
]
DEMOGRAPHIC_FIELDS: list[str] = DEMOGRAPHICS_COLUMNS[1:]  # the 7 numeric fields, in file order
# Labels of the synthetic test sequences (not a competition file): one row per sequence.
TEST_LABEL_COLUMNS: list[str] = ["sequence_id", "subject", "sequence_type", "orientation", "gesture"]

# ---------------------------------------------------------------- label strings
TARGET_GESTURES: list[str] = [
    "Above ear - pull hair",
    "Cheek - pinch skin",
    "Eyebrow - pull hair",
    "Eyelash - pull hair",
    "Forehead - pull hairline",
    "Forehead - scratch",
    "Neck - pinch skin",
    "Neck - scratch",
]
NON_TARGET_GESTURES: list[str] = [
    "Drink from bottle/cup",
    "Feel around in tray and pull out an object",
    "Glasses on/off",
    "Pinch knee/leg skin",
    "Pull air toward your face",
    "Scratch knee/leg skin",
    "Text on phone",
    "Wave hello",
    "Write name in air",
    "Write name on leg",
]
GESTURES: list[str] = TARGET_GESTURES + NON_TARGET_GESTURES  # class index = position here
GESTURE_TO_INDEX: dict[str, int] = {g: i for i, g in enumerate(GESTURES)}
NUM_GESTURES = len(GESTURES)  # 18
NON_TARGET_CLASS = "non_target"  # the collapsed class of the metric's 9-class half
SEQUENCE_TYPE_TARGET = "Target"
SEQUENCE_TYPE_NON_TARGET = "Non-Target"

ORIENTATIONS: list[str] = [
    "Seated Straight",
    "Lie on Back",
    "Lie on Side - Non Dominant",
    "Seated Lean Non Dom - FACE DOWN",
]
BEHAVIOR_RELAXES = "Relaxes and moves hand to target location"
BEHAVIOR_MOVES = "Moves hand to target location"
BEHAVIOR_AT_TARGET = "Hand at target location"
BEHAVIOR_PERFORMS = "Performs gesture"
STARTING_BEHAVIORS: list[str] = [BEHAVIOR_RELAXES, BEHAVIOR_MOVES]
BEHAVIORS: list[str] = [BEHAVIOR_RELAXES, BEHAVIOR_MOVES, BEHAVIOR_AT_TARGET, BEHAVIOR_PERFORMS]
PHASE_TRANSITION = "Transition"
PHASE_GESTURE = "Gesture"
PHASES: list[str] = [PHASE_TRANSITION, PHASE_GESTURE]
BEHAVIOR_TO_PHASE: dict[str, str] = {
    BEHAVIOR_RELAXES: PHASE_TRANSITION,
    BEHAVIOR_MOVES: PHASE_TRANSITION,
    BEHAVIOR_AT_TARGET: PHASE_TRANSITION,
    BEHAVIOR_PERFORMS: PHASE_GESTURE,
}

_SEATED_ONLY = {"Drink from bottle/cup", "Feel around in tray and pull out an object", "Glasses on/off"}
_FACE_DOWN_ONLY = {"Pinch knee/leg skin", "Scratch knee/leg skin", "Write name on leg"}
_NEVER_FACE_DOWN = {"Wave hello", "Write name in air", "Pull air toward your face"}


def _allowed_orientations(gesture: str) -> list[str]:
    if gesture in _SEATED_ONLY:
        return ["Seated Straight"]
    if gesture in _FACE_DOWN_ONLY:
        return ["Seated Lean Non Dom - FACE DOWN"]
    if gesture in _NEVER_FACE_DOWN:
        return [o for o in ORIENTATIONS if o != "Seated Lean Non Dom - FACE DOWN"]
    return list(ORIENTATIONS)


# The 51 gesture x orientation pairs that occur; each subject performs each pair under both
# starting behaviours (102 sequences per subject).
GESTURE_ORIENTATION_PAIRS: list[tuple[str, str]] = [
    (g, o) for g in GESTURES for o in _allowed_orientations(g)
]


def is_target(gesture: str) -> bool:
    """True for the 8 body-focused repetitive behaviours."""
    return gesture in TARGET_GESTURES


def sequence_type_of(gesture: str) -> str:
    return SEQUENCE_TYPE_TARGET if is_target(gesture) else SEQUENCE_TYPE_NON_TARGET


# ---------------------------------------------------------------- handedness mirroring
def _mirror_source_and_sign(column: str) -> tuple[str, float]:
    """Which column a mirrored ``column`` takes its value from, and the sign it gets."""
    if column in ("acc_x", "rot_y", "rot_z"):
        return column, -1.0
    swap = {"3": "5", "5": "3"}
    if column.startswith("thm_"):
        return "thm_" + swap.get(column[4:], column[4:]), 1.0
    if column.startswith("tof_"):
        sensor, pixel = column[4:].split("_v")
        row, col = divmod(int(pixel), TOF_GRID_SIZE)
        flipped = row * TOF_GRID_SIZE + (TOF_GRID_SIZE - 1 - col)
        return f"tof_{swap.get(sensor, sensor)}_v{flipped}", 1.0
    return column, 1.0


def mirror_permutation(columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Column permutation and signs that mirror a left-handed wearer onto a right-handed frame.

    ``mirrored[:, i] = sensors[:, perm[i]] * sign[i]`` for sensors in ``columns`` order: negate
    acc_x, rot_y, rot_z; swap thm_3 <-> thm_5 and tof_3 <-> tof_5; flip each ToF 8x8 grid
    left-right. The map is an involution (applying it twice gives the input back). ``columns``
    must be closed under the swap (e.g. all thermopiles or none).
    """
    index = {c: i for i, c in enumerate(columns)}
    perm = np.empty(len(columns), dtype=np.int64)
    sign = np.ones(len(columns), dtype=np.float32)
    for i, column in enumerate(columns):
        source, sign[i] = _mirror_source_and_sign(column)
        if source not in index:
            raise ValueError(f"mirroring {column} needs {source}, which is not among the columns")
        perm[i] = index[source]
    return perm, sign


MIRROR_PERMUTATION, MIRROR_SIGN = mirror_permutation(SENSOR_COLUMNS)


def mirror_sensors(sensors: np.ndarray, columns: list[str] | None = None) -> np.ndarray:
    """Mirror sensor rows ``(..., C)`` whose columns are ``columns`` (default SENSOR_COLUMNS).

    NaN stays NaN. See :func:`mirror_permutation` for the map.
    """
    if columns is None:
        perm, sign = MIRROR_PERMUTATION, MIRROR_SIGN
    else:
        perm, sign = mirror_permutation(list(columns))
    if sensors.shape[-1] != len(perm):
        raise ValueError(f"expected {len(perm)} sensor columns, got {sensors.shape[-1]}")
    return sensors[..., perm] * sign.astype(sensors.dtype, copy=False)
