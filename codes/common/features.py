"""Per-step features of every sequence, computed for the whole table at once.

Rows of one sequence are contiguous (sorted by ``sequence_counter``); "previous step" quantities
never cross a sequence boundary. All work is vectorised over the rows of the table, so one call
handles the full training file or a single sequence served at inference time alike.

Rules (documented in docs/data.md):
- Missing values: a missing acc or rot reading marks the step invalid (``step_valid``); each
  column group is filled within its sequence (forward, then backward); what is still missing
  (a sensor absent for the whole sequence) becomes 0, and a quaternion absent for the whole
  sequence becomes the identity. ``feature_present[s, f]`` says whether sequence ``s`` had any
  reading behind feature ``f``; normalisation maps absent features to 0 (the training mean).
- Physically impossible readings are missing values, by the rule above, before anything else
  (:func:`impossible_readings`; the ranges are in ``schema``): an acc component beyond
  +-``ACC_MAX_ABS``, a quaternion with a component beyond +-1 or a norm outside
  ``ROT_NORM_RANGE`` (all 4 components), a thermopile outside ``THM_RANGE``, a ToF pixel that is
  neither -1 nor in 0..``TOF_MAX_DISTANCE`` (its sensor's frame, as for a null pixel). Values
  inside the ranges are untouched.
- ToF ``-1`` (no reflection) counts as ``TOF_MAX_DISTANCE + 1`` (beyond range).
- ``tof_mode="grid"`` keeps the five 8x8 frames for a spatial model, each pixel as its closeness
  ``(255 - distance) / 255`` (no reflection = 0, the nearest reading = 1), with a validity flag
  per frame and per thermopile. A frame that was not read (a null, NaN or out-of-range pixel) or
  read no reflection at any pixel (all -1: a blank frame, counted) is masked: validity flag 0 and
  pixels 0, never filled from a neighbouring step; a blank frame sets its sensor's blank flag
  instead (a model may embed "nothing in range" without reading it as distances). The pixels and
  all flags are fixed-scale columns (``fixed_scale`` group): the normaliser leaves them as they are.
- Handedness: with ``mirror_left_handed`` the sensors of left-handed wearers are mirrored onto
  the right-handed frame before any feature is computed (``schema.mirror_sensors``).
- The quaternion is made sign-continuous within a sequence (q and -q are the same rotation).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from codes.common.schema import (
    ACC_COLUMNS,
    ACC_MAX_ABS,
    GRAVITY,
    IMU_COLUMNS,
    NUM_TOF_SENSORS,
    ROT_COLUMNS,
    ROT_MAX_ABS,
    ROT_NORM_RANGE,
    THM_COLUMNS,
    THM_RANGE,
    TOF_COLUMNS,
    TOF_COLUMNS_BY_SENSOR,
    TOF_MAX_DISTANCE,
    TOF_NO_REFLECTION,
    TOF_PIXELS,
    mirror_permutation,
)

# bump when a change alters the features computed for the same settings (2: physically impossible
# readings are missing values; caches built before may hold their overflowed features)
FEATURE_VERSION = 2

IMU_FEATURE_NAMES: list[str] = [
    "acc_x", "acc_y", "acc_z",
    "rot_w", "rot_x", "rot_y", "rot_z",
    "linear_acc_x", "linear_acc_y", "linear_acc_z",
    "angular_velocity_x", "angular_velocity_y", "angular_velocity_z",
    "angular_distance",
    "acc_magnitude", "linear_acc_magnitude", "angular_velocity_magnitude",
    "acc_jerk", "linear_acc_jerk",
]  # fmt: skip
TOF_SUMMARY_STATISTICS: list[str] = ["mean", "std", "min", "no_reflection_fraction"]
TOF_MODES = ("none", "summary", "raw", "grid")
GRID_SCALE = 255  # closeness = (GRID_SCALE - distance) / GRID_SCALE; distance 255 = no reflection
PARALLEL_MIN_ROWS = 20_000
PIECE_ROWS = 65_536  # rows per piece of compute_step_features (whole sequences)


@dataclass(frozen=True)
class FeatureSettings:
    """What the per-step feature vector holds; part of the cache key."""

    use_thm: bool = True  # the 5 thermopile temperatures
    # "none" | "summary" (4 statistics per sensor) | "raw" (320 pixels) | "grid" (320 closeness
    # pixels with a validity flag per frame and per thermopile, for a spatial model)
    tof_mode: str = "summary"
    mirror_left_handed: bool = True  # mirror left-handed wearers onto the right-handed frame
    sampling_rate_hz: float = 10.0  # turns per-step differences into per-second rates

    def __post_init__(self) -> None:
        if self.tof_mode not in TOF_MODES:
            raise ValueError(f"tof_mode must be one of {TOF_MODES}, got {self.tof_mode!r}")
        if not (math.isfinite(self.sampling_rate_hz) and self.sampling_rate_hz > 0):
            raise ValueError(
                f"sampling_rate_hz (data.sampling_rate_hz on the train.py command line) must be a finite "
                f"number > 0 (the rows' rate, 10 for the competition's data), got {self.sampling_rate_hz!r}"
            )

    @property
    def sensor_columns(self) -> list[str]:
        """Raw columns the features need, in SENSOR_COLUMNS order."""
        return (
            IMU_COLUMNS
            + (THM_COLUMNS if self.use_thm else [])
            + (TOF_COLUMNS if self.tof_mode != "none" else [])
        )

    def to_dict(self) -> dict:
        return asdict(self)


def feature_layout(settings: FeatureSettings) -> tuple[list[str], dict[str, list[int]]]:
    """Feature names and their groups (``imu``, ``thm``, ``tof``) as column indices.

    With ``tof_mode="grid"``, ``thm`` and ``tof`` also hold the validity flags, and sub-groups
    name the parts: ``thm_values``, ``thm_valid`` (one flag per thermopile), ``tof_grid`` (the
    320 closeness pixels, sensor by sensor, each 8x8 row-major), ``tof_valid`` (one flag per
    sensor: a frame with a reflection was read), ``tof_blank`` (one flag per sensor: the frame
    read no reflection at any pixel) and ``fixed_scale`` (the columns the normaliser leaves
    unscaled).
    """
    names = list(IMU_FEATURE_NAMES)
    groups = {"imu": list(range(len(names)))}
    if settings.tof_mode == "grid":
        return _grid_layout(settings, names, groups)
    if settings.use_thm:
        groups["thm"] = list(range(len(names), len(names) + len(THM_COLUMNS)))
        names += THM_COLUMNS
    if settings.tof_mode == "summary":
        tof_names = [
            f"tof_{k}_{stat}" for k in range(1, NUM_TOF_SENSORS + 1) for stat in TOF_SUMMARY_STATISTICS
        ]
    elif settings.tof_mode == "raw":
        tof_names = list(TOF_COLUMNS)
    else:
        tof_names = []
    if tof_names:
        groups["tof"] = list(range(len(names), len(names) + len(tof_names)))
        names += tof_names
    return names, groups


def _grid_layout(
    settings: FeatureSettings, names: list[str], groups: dict[str, list[int]]
) -> tuple[list[str], dict[str, list[int]]]:
    """:func:`feature_layout` of ``tof_mode="grid"``."""

    def add(group: str, new: list[str]) -> list[int]:
        columns = list(range(len(names), len(names) + len(new)))
        names.extend(new)
        groups[group] = columns
        return columns

    fixed = []
    if settings.use_thm:
        values = add("thm_values", list(THM_COLUMNS))
        valid = add("thm_valid", [f"{c}_valid" for c in THM_COLUMNS])
        groups["thm"] = values + valid
        fixed += valid
    grid = add("tof_grid", [f"{c}_closeness" for c in TOF_COLUMNS])
    valid = add("tof_valid", [f"tof_{k}_valid" for k in TOF_COLUMNS_BY_SENSOR])
    blank = add("tof_blank", [f"tof_{k}_blank" for k in TOF_COLUMNS_BY_SENSOR])
    groups["tof"] = grid + valid + blank
    groups["fixed_scale"] = fixed + grid + valid + blank
    return names, groups


# ---------------------------------------------------------------- segment helpers
def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """Sequence index of every row, from offsets ``(N + 1,)``."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def fill_within_segments(values: np.ndarray, valid: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Forward- then backward-fill rows where ``valid`` is False, never across a segment boundary.

    ``values`` is ``(R, C)``; rows of a segment with no valid row at all are left as they are.
    Returns ``values`` itself when there is nothing to fill, else a filled copy.
    """
    if valid.all():
        return values
    seg = segment_ids(offsets)
    fillable = ~valid & _segment_any(valid[:, None], offsets)[seg, 0]
    if not fillable.any():  # e.g. a sensor absent for whole sequences: nothing to fill from
        return values
    rows = np.arange(len(valid))
    starts, ends = offsets[:-1][seg], offsets[1:][seg] - 1
    # Invalid rows point at their segment's first row, so the running maximum never reaches back
    # into the previous segment; the same mirrored for the backward pass.
    forward = np.maximum.accumulate(np.where(valid, rows, starts))
    filled_valid = valid[forward]
    backward = np.minimum.accumulate(np.where(valid, rows, ends)[::-1])[::-1]
    source = np.where(filled_valid, forward, backward)
    filled = values.copy()
    filled[fillable] = values[source[fillable]]
    return filled


def fill_nan(values: np.ndarray, fill_value: float) -> np.ndarray:
    """Replace NaN in place (cheaper than ``np.nan_to_num``, which also scans for infinities)."""
    np.copyto(values, values.dtype.type(fill_value), where=np.isnan(values))
    return values


def previous_row_difference(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``values[t] - values[t - 1]`` within each segment; 0 on each segment's first row."""
    difference = np.zeros_like(values)
    difference[1:] = values[1:] - values[:-1]
    difference[offsets[:-1][np.diff(offsets) > 0]] = 0
    return difference


def sign_continuous_quaternions(quaternions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Flip signs so consecutive quaternions of a segment have a non-negative dot product."""
    dots = np.einsum("ij,ij->i", quaternions[1:], quaternions[:-1])
    flips = np.zeros(len(quaternions), dtype=np.int64)
    flips[1:] = dots < 0
    flips[offsets[:-1][np.diff(offsets) > 0]] = 0
    parity = np.cumsum(flips)
    parity -= np.repeat(parity[offsets[:-1]] if len(parity) else parity, np.diff(offsets))
    return np.where((parity % 2 == 1)[:, None], -quaternions, quaternions)


def _segment_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per segment: whether any row flag is True, ``(R, C)`` -> ``(N, C)``."""
    counts = np.add.reduceat(flags.astype(np.int64), offsets[:-1], axis=0) if len(flags) else flags
    return counts > 0


# ---------------------------------------------------------------- physically impossible readings
def acc_out_of_range(acc: np.ndarray) -> np.ndarray:
    """``(R, 3)`` -> ``(R, 3)`` bool: components beyond +-``ACC_MAX_ABS`` m/s^2 (NaN is not flagged)."""
    return np.abs(acc) > ACC_MAX_ABS


def quaternion_out_of_range(rot: np.ndarray) -> np.ndarray:
    """``(R, 4)`` -> ``(R,)`` bool: a component beyond +-1, or a norm outside ``ROT_NORM_RANGE``.

    A row holding NaN is flagged only for a component beyond +-1 (it is missing anyway); an
    all-zero row (norm 0) is flagged.
    """
    rot = rot.astype(np.float64, copy=False)  # no overflow in the squares
    low, high = ROT_NORM_RANGE
    with np.errstate(over="ignore", invalid="ignore"):
        squared_norm = np.einsum("ij,ij->i", rot, rot)
        return (np.abs(rot) > ROT_MAX_ABS).any(axis=1) | (squared_norm < low**2) | (squared_norm > high**2)


def thm_out_of_range(thm: np.ndarray) -> np.ndarray:
    """Temperatures (deg C) outside ``THM_RANGE``, elementwise (NaN is not flagged)."""
    low, high = THM_RANGE
    return (thm < low) | (thm > high)


def tof_out_of_range(tof: np.ndarray) -> np.ndarray:
    """ToF readings that are neither ``TOF_NO_REFLECTION`` nor in 0..``TOF_MAX_DISTANCE``, elementwise."""
    return ((tof < 0) & (tof != TOF_NO_REFLECTION)) | (tof > TOF_MAX_DISTANCE)


def impossible_readings(values: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """``(R, C)`` bool: the readings of ``values`` (columns named ``columns``) outside their
    physical range; a quaternion out of range flags its 4 components. NaN is not flagged.

    The rule :func:`compute_step_features` applies (those readings become missing values); the
    predictor uses it to say what it takes as missing.
    """
    index = {c: i for i, c in enumerate(columns)}
    flags = np.zeros(values.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for names, test in ((ACC_COLUMNS, acc_out_of_range), (THM_COLUMNS, thm_out_of_range)):
            positions = [index[c] for c in names if c in index]
            if positions:
                flags[:, positions] = test(values[:, positions])
        tof = [index[c] for c in TOF_COLUMNS if c in index]
        if tof:
            flags[:, tof] = tof_out_of_range(values[:, tof])
        if all(c in index for c in ROT_COLUMNS):
            rot = [index[c] for c in ROT_COLUMNS]
            flags[:, rot] = quaternion_out_of_range(values[:, rot])[:, None] & ~np.isnan(values[:, rot])
    return flags


# ---------------------------------------------------------------- features
def gravity_in_body_frame(quaternions: np.ndarray) -> np.ndarray:
    """``R(q)^T (0, 0, GRAVITY)`` for unit quaternions ``(R, 4)`` (w, x, y, z) -> ``(R, 3)``.

    The third row of the rotation matrix, so the same as scipy's
    ``Rotation.from_quat(q, scalar_first=True).apply([0, 0, GRAVITY], inverse=True)``.
    """
    w, x, y, z = quaternions.T
    gravity = np.empty((len(quaternions), 3), dtype=quaternions.dtype)
    gravity[:, 0] = x * z - w * y
    gravity[:, 1] = y * z + w * x
    gravity[:, 2] = 0.5 - (x * x + y * y)
    gravity *= 2 * GRAVITY
    return gravity


def relative_rotation_vectors(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Rotation vectors of ``previous^-1 * current`` for unit quaternions ``(R, 4)`` (w, x, y, z).

    The same as scipy's ``(Rotation.from_quat(previous, scalar_first=True).inv() *
    Rotation.from_quat(current, scalar_first=True)).as_rotvec()``, computed in closed form:
    the quaternion product ``conj(p) q``, made w >= 0, then angle / sin(angle / 2) times its
    vector part (a Taylor series below 1e-3 rad, as scipy does).
    """
    pw, pv = previous[:, 0], previous[:, 1:]
    qw, qv = current[:, 0], current[:, 1:]
    w = pw * qw + np.einsum("ij,ij->i", pv, qv)
    vector = pw[:, None] * qv - qw[:, None] * pv - np.cross(pv, qv)  # (R, 3)
    vector[w < 0] *= -1  # q and -q: the same rotation; the angle must lie in [0, pi]
    sine = np.sqrt(np.einsum("ij,ij->i", vector, vector))  # |v| = sin(angle / 2) for unit q
    angle = 2 * np.arctan2(sine, np.abs(w))
    small = angle <= 1e-3
    angle_sq = angle * angle
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(small, 2 + angle_sq / 12 + 7 * angle_sq * angle_sq / 2880, angle / np.sin(angle / 2))
    vector *= scale[:, None]
    return vector


def imu_features(
    acc: np.ndarray, quaternions: np.ndarray, offsets: np.ndarray, sampling_rate_hz: float
) -> np.ndarray:
    """The IMU_FEATURE_NAMES columns from filled acc ``(R, 3)`` and unit quaternions ``(R, 4)``."""
    quaternions = sign_continuous_quaternions(quaternions, offsets)
    linear_acc = acc - gravity_in_body_frame(quaternions)
    # body-frame rotation from step t-1 to step t; first step of each sequence: no rotation
    previous = np.empty_like(quaternions)
    previous[1:] = quaternions[:-1]
    first_rows = offsets[:-1][np.diff(offsets) > 0]
    previous[first_rows] = quaternions[first_rows]
    step_rotvec = relative_rotation_vectors(previous, quaternions)
    angular_velocity = step_rotvec * sampling_rate_hz
    features = np.empty((len(acc), len(IMU_FEATURE_NAMES)), dtype=np.float32)
    features[:, 0:3] = acc
    features[:, 3:7] = quaternions
    features[:, 7:10] = linear_acc
    features[:, 10:13] = angular_velocity
    features[:, 13] = _row_norm(step_rotvec)
    features[:, 14] = _row_norm(acc)
    features[:, 15] = _row_norm(linear_acc)
    features[:, 16] = _row_norm(angular_velocity)
    features[:, 17] = _row_norm(previous_row_difference(acc, offsets)) * sampling_rate_hz
    features[:, 18] = _row_norm(previous_row_difference(linear_acc, offsets)) * sampling_rate_hz
    return features


def _row_norm(values: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row of ``(R, C)``."""
    return np.sqrt(np.einsum("ij,ij->i", values, values))


def tof_summary_features(grid: np.ndarray) -> np.ndarray:
    """Mean, std and min distance and the fraction of no-reflection pixels of one ToF sensor.

    ``grid`` is ``(R, 64)``, integers or floats, with -1 for no reflection -> ``(R, 4)`` float32;
    a row holding NaN gets NaN statistics. The statistics are float32 sums of integer-valued
    distances (exact below 2**24), so they do not depend on the grid's dtype or memory order.
    """
    pixels = grid.T  # (64, R): contiguous rows for the column-major blocks of SensorBlocks, so
    # the reductions over pixels below run along contiguous memory
    n_pixels = np.float32(grid.shape[1])
    no_reflection = pixels == TOF_NO_REFLECTION
    if _fits_uint8_distances(pixels):
        # -1 wraps to 255 = TOF_MAX_DISTANCE + 1 ("beyond range"); one byte per pixel
        compact = pixels.astype(np.uint8)
        distances = compact.astype(np.float32)
        minimum = compact.min(axis=0)
    else:
        distances = np.where(no_reflection, np.float32(TOF_MAX_DISTANCE + 1), pixels).astype(
            np.float32, copy=False
        )
        minimum = distances.min(axis=0)
    mean = distances.sum(axis=0) / n_pixels
    variance = np.maximum(np.einsum("ij,ij->j", distances, distances) / n_pixels - mean * mean, 0.0)
    summary = np.empty((grid.shape[0], len(TOF_SUMMARY_STATISTICS)), dtype=np.float32)
    summary[:, 0] = mean
    summary[:, 1] = np.sqrt(variance)
    summary[:, 2] = minimum
    summary[:, 3] = np.count_nonzero(no_reflection, axis=0) / n_pixels
    return summary


def _fits_uint8_distances(pixels: np.ndarray) -> bool:
    """Whether integer readings are all in -1..254, so that a uint8 cast maps them to distances."""
    return (
        pixels.dtype.kind == "i"
        and pixels.size > 0
        and TOF_NO_REFLECTION == -1
        and TOF_MAX_DISTANCE == 254
        and pixels.min() >= -1
        and pixels.max() <= TOF_MAX_DISTANCE
    )


def tof_distances(grid: np.ndarray) -> np.ndarray:
    """The raw ToF feature: ``(R, 64)`` float32 distances, no reflection = beyond range."""
    return np.where(grid == TOF_NO_REFLECTION, np.float32(TOF_MAX_DISTANCE + 1), grid).astype(
        np.float32, copy=False
    )


def tof_closeness(grid: np.ndarray) -> np.ndarray:
    """The grid feature of one sensor: ``(R, 64)`` readings (-1 = no reflection) -> float32
    ``(GRID_SCALE - distance) / GRID_SCALE``, with no reflection at distance 255 (closeness 0).

    Integer readings give multiples of 1/255 exactly (``SequenceTable.save`` stores them as
    bytes). NaN stays NaN (the frame is masked by the caller).
    """
    distances = np.where(grid == TOF_NO_REFLECTION, np.float32(TOF_MAX_DISTANCE + 1), grid).astype(
        np.float32, copy=False
    )
    return (np.float32(GRID_SCALE) - distances) / np.float32(GRID_SCALE)


@functools.cache
def tof_mirror_sources(columns: tuple[str, ...]) -> dict[int, tuple[int, np.ndarray]]:
    """For each ToF sensor: the sensor a mirrored wearer's reading comes from, and its pixel order.

    Mirroring (``schema.mirror_permutation``) maps the pixels of one sensor onto those of one
    sensor (tof_3 <-> tof_5, each grid flipped left-right), with sign +1. Cached: the same for
    every call with the same columns.
    """
    columns = list(columns)
    perm, sign = _mirror_map(tuple(columns))
    index = {c: i for i, c in enumerate(columns)}
    sources = {}
    for k, names in TOF_COLUMNS_BY_SENSOR.items():
        mirrored = [columns[perm[index[c]]] for c in names]
        source_sensors = {int(c[4 : c.index("_v")]) for c in mirrored}
        if len(source_sensors) != 1 or (sign[[index[c] for c in names]] != 1).any():
            raise ValueError(f"mirroring ToF sensor {k} does not map one sensor's pixels onto it")
        sources[k] = (source_sensors.pop(), np.array([int(c[c.index("_v") + 2 :]) for c in mirrored]))
    return sources


@dataclass
class StepFeatures:
    """Features of the rows of a table of sequences."""

    features: np.ndarray  # (R, F) float32
    step_valid: np.ndarray  # (R,) bool: acc and rot were both read at this step
    feature_present: np.ndarray  # (N, F) bool: the sequence had readings behind the feature
    # readings taken as missing for lying outside their physical range, per column group
    # ("acc", "rot", "thm", "tof"; a quaternion counts its read components); with
    # tof_mode="grid" also the frames the grid masks ("tof_unread_frames", "tof_blank_frames")
    impossible_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class SensorBlocks:
    """The raw sensor columns of some rows as numpy blocks, one per column group (unmirrored)."""

    imu: np.ndarray  # (R, 7) float64, IMU_COLUMNS, NaN = missing
    thm: np.ndarray | None  # (R, 5) float32, THM_COLUMNS, NaN = missing
    # (R, 320) TOF_COLUMNS: float32 with NaN = missing, or int16 straight from an integer
    # frame, where the entries of missing frames are arbitrary (tof_missing says which)
    tof: np.ndarray | None
    tof_missing: np.ndarray | None  # (R, 5) bool: ToF sensor k's frame was not read (any pixel)

    @classmethod
    def from_sensors(cls, sensors: np.ndarray | pl.DataFrame, settings: FeatureSettings) -> SensorBlocks:
        """Blocks of ``settings.sensor_columns`` given as ``(R, C)`` numbers or as a polars frame
        (numeric columns; ToF columns may be integers)."""
        use_tof = settings.tof_mode != "none"
        if isinstance(sensors, pl.DataFrame):
            frame = sensors.rechunk()  # one buffer per column (the CSV reader gives many small ones)

            def numbers(names: list[str], dtype: pl.DataType, fill: float) -> np.ndarray:
                part = pl.DataFrame([frame.get_column(c) for c in names])  # cheaper than select
                if any(t != dtype for t in part.dtypes):
                    part = part.cast(dtype)
                if any(frame.get_column(c).null_count() for c in names):
                    part = part.fill_null(fill)
                values = part.to_numpy()
                return values if values.flags.writeable else values.copy()  # not a view of polars memory

            tof = tof_missing = None
            schema = frame.schema
            if use_tof and all(schema[c] == pl.Int16 for c in TOF_COLUMNS):
                # the values buffers as they are, without a copy per null fill: (320, R) -> (R, 320)
                tof = np.stack([_values_buffer(frame.get_column(c)) for c in TOF_COLUMNS]).T
                tof_missing = np.zeros((frame.height, NUM_TOF_SENSORS), dtype=bool)
                with_nulls = [
                    k
                    for k, names in TOF_COLUMNS_BY_SENSOR.items()
                    if any(frame.get_column(c).null_count() for c in names)
                ]
                if with_nulls:
                    flags = frame.select(
                        pl.any_horizontal(pl.col(TOF_COLUMNS_BY_SENSOR[k]).is_null()).alias(str(k))
                        for k in with_nulls
                    )
                    for k in with_nulls:
                        tof_missing[:, k - 1] = flags.get_column(str(k)).to_numpy()
            elif use_tof:
                tof = numbers(TOF_COLUMNS, pl.Float32, np.nan)
                tof_missing = _tof_nan_frames(tof)
            return cls(
                imu=numbers(IMU_COLUMNS, pl.Float64, np.nan),
                thm=numbers(THM_COLUMNS, pl.Float32, np.nan) if settings.use_thm else None,
                tof=tof,
                tof_missing=tof_missing,
            )
        columns = tuple(settings.sensor_columns)

        def numbers_of(names: list[str], dtype: type) -> np.ndarray:
            # fancy indexing copies
            return sensors[:, _positions(columns, tuple(names))].astype(dtype, copy=False)

        tof = numbers_of(TOF_COLUMNS, np.float32) if use_tof else None
        return cls(
            imu=numbers_of(IMU_COLUMNS, np.float64),
            thm=numbers_of(THM_COLUMNS, np.float32) if settings.use_thm else None,
            tof=tof,
            tof_missing=_tof_nan_frames(tof),
        )

    def drop_impossible_readings(self, dropped: dict[str, int] | None = None) -> SensorBlocks:
        """Readings outside their physical range become missing values, in place; returns self.

        The rule of :func:`impossible_readings`: acc components and thermopiles become NaN, a
        quaternion out of range becomes NaN as a whole, a ToF pixel out of range marks its
        sensor's frame missing (``tof_missing``), as a null pixel does. Values inside the ranges
        are untouched. ``dropped``, when given, receives the count of readings dropped per column
        group ("acc", "rot", "thm", "tof"; a quaternion counts its read components).
        """
        dropped = {} if dropped is None else dropped
        acc_cols = _positions(tuple(IMU_COLUMNS), tuple(ACC_COLUMNS))
        rot_cols = _positions(tuple(IMU_COLUMNS), tuple(ROT_COLUMNS))
        with np.errstate(invalid="ignore"):
            acc = self.imu[:, acc_cols]
            bad = acc_out_of_range(acc)
            if bad.any():
                dropped["acc"] = int(np.count_nonzero(bad))
                acc[bad] = np.nan
                self.imu[:, acc_cols] = acc
            bad_rows = quaternion_out_of_range(self.imu[:, rot_cols])
            if bad_rows.any():
                dropped["rot"] = int(np.count_nonzero(~np.isnan(self.imu[np.ix_(bad_rows, rot_cols)])))
                self.imu[np.ix_(bad_rows, rot_cols)] = np.nan
            if self.thm is not None:
                bad = thm_out_of_range(self.thm)
                if bad.any():
                    dropped["thm"] = int(np.count_nonzero(bad))
                    self.thm[bad] = np.nan
            if self.tof is None or self.tof.size == 0:
                return self
            if self.tof.dtype.kind in "iu" and (
                self.tof.min() >= TOF_NO_REFLECTION and self.tof.max() <= TOF_MAX_DISTANCE
            ):
                return self  # integers in -1..254: every reading in range (the usual case)
            bad = tof_out_of_range(self.tof)
        if not bad.any():
            return self
        dropped["tof"] = int(np.count_nonzero(bad))
        if self.tof.dtype.kind == "f":
            self.tof[bad] = np.nan
        frames = np.stack(
            [bad[:, (k - 1) * TOF_PIXELS : k * TOF_PIXELS].any(axis=1) for k in TOF_COLUMNS_BY_SENSOR], axis=1
        )
        self.tof_missing = self.tof_missing | frames
        return self


def _values_buffer(column: pl.Series) -> np.ndarray:
    """A read-only view of a one-chunk integer column's values; entries under nulls are arbitrary."""
    array = column.to_arrow()
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


def _tof_nan_frames(tof: np.ndarray | None) -> np.ndarray | None:
    """``(R, 5)``: whether a float ToF block holds NaN in each sensor's frame."""
    if tof is None:
        return None
    nan = np.isnan(tof)
    return np.stack(
        [nan[:, (k - 1) * TOF_PIXELS : k * TOF_PIXELS].any(axis=1) for k in TOF_COLUMNS_BY_SENSOR], axis=1
    )


def compute_step_features(
    sensors: np.ndarray | pl.DataFrame,
    offsets: np.ndarray,
    left_handed: np.ndarray,
    settings: FeatureSettings,
    n_threads: int | None = None,
) -> StepFeatures:
    """Features of every row.

    sensors: ``(R, C)`` raw values of ``settings.sensor_columns`` (NaN, null or a physically
    impossible reading = missing, see :func:`impossible_readings`), as a numpy array or a polars
    frame with those columns (numeric; ToF may be integers); offsets: ``(N + 1,)`` row offsets of
    the N sequences; left_handed: ``(N,)`` bool.

    Every feature of a row depends on its own sequence only, so the table is cut at sequence
    boundaries into pieces of about ``PIECE_ROWS`` rows, computed in ``n_threads`` threads
    (default: the CPU count, at most 4, for tables of at least ``PARALLEL_MIN_ROWS`` rows, else
    1; numpy and polars release the GIL). A piece's columns become one numpy block per column
    group (:class:`SensorBlocks`). Small pieces keep every temporary small: no time lost to
    mapping fresh memory for full-length temporaries, and better use of the CPU caches.
    """
    columns = settings.sensor_columns
    width = sensors.width if isinstance(sensors, pl.DataFrame) else sensors.shape[1]
    if width != len(columns):
        raise ValueError(f"expected {len(columns)} sensor columns, got {width}")
    offsets = np.asarray(offsets, dtype=np.int64)
    left_handed = np.asarray(left_handed, dtype=bool)
    n_rows, n_features = int(offsets[-1]), len(feature_layout(settings)[0])
    tof_mirror = (
        tof_mirror_sources(tuple(columns))
        if settings.tof_mode != "none" and settings.mirror_left_handed
        else {}
    )
    result = StepFeatures(
        features=np.empty((n_rows, n_features), dtype=np.float32),
        step_valid=np.empty(n_rows, dtype=bool),
        feature_present=np.empty((len(offsets) - 1, n_features), dtype=bool),
    )
    if n_threads is None:  # threads pay off on whole files, not on a single served sequence
        n_threads = min(4, os.cpu_count() or 1) if n_rows >= PARALLEL_MIN_ROWS else 1
    cuts = np.searchsorted(offsets, np.arange(PIECE_ROWS, n_rows, PIECE_ROWS))
    bounds = np.unique(np.concatenate([[0], cuts, [len(offsets) - 1]]))

    def run(first: int, last: int) -> dict[str, int]:
        """Sequences ``first:last`` into their rows of ``result``; the readings dropped as impossible."""
        start, end = int(offsets[first]), int(offsets[last])
        part = sensors.slice(start, end - start) if isinstance(sensors, pl.DataFrame) else sensors[start:end]
        dropped: dict[str, int] = {}
        blocks = SensorBlocks.from_sensors(part, settings).drop_impossible_readings(dropped)
        _compute_piece(
            blocks,
            offsets[first : last + 1] - start,
            left_handed[first:last],
            settings,
            tof_mirror,
            StepFeatures(
                result.features[start:end], result.step_valid[start:end], result.feature_present[first:last]
            ),
            dropped,
        )
        return dropped

    pieces = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    if n_threads > 1 and len(pieces) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            dropped = [
                future.result() for future in [pool.submit(run, first, last) for first, last in pieces]
            ]
    else:
        dropped = [run(first, last) for first, last in pieces]
    for counts in dropped:
        for group, count in counts.items():
            result.impossible_counts[group] = result.impossible_counts.get(group, 0) + count
    return result


def _compute_piece(
    blocks: SensorBlocks,
    offsets: np.ndarray,
    left_handed: np.ndarray,
    settings: FeatureSettings,
    tof_mirror: dict[int, tuple[int, np.ndarray]],
    out: StepFeatures,
    counts: dict[str, int],
) -> None:
    """:func:`compute_step_features` of some whole sequences, written into ``out``; ``counts``
    receives the masked ToF frames of ``tof_mode="grid"`` (``tof_blank_frames``: all -1;
    ``tof_unread_frames``: a null, NaN or out-of-range pixel).

    Mirroring: IMU and thermopile columns are mirrored (in ``blocks``) before any feature is
    computed. A ToF feature of a row depends on that row's grid only, so ToF features are
    computed from the unmirrored grids and then taken, for left-handed wearers, from the
    mirrored sensor (pixels reordered for the raw features; the summary statistics do not
    depend on the pixel order): the same values, without copying the grids.
    """
    lengths = np.diff(offsets)
    left_rows = np.repeat(left_handed, lengths) if settings.mirror_left_handed else None
    if left_rows is not None and not left_rows.any():
        left_rows = None

    def store(start: int, values: np.ndarray, present: np.ndarray) -> None:
        """Write a block into ``out``; features of a sensor absent from a sequence become 0."""
        block_columns = slice(start, start + values.shape[1])
        out.features[:, block_columns] = values
        out.feature_present[:, block_columns] = present
        if not present.all():
            if (present == present[:, :1]).all():  # the usual case: the block is absent as a whole
                out.features[np.repeat(~present[:, 0], lengths), block_columns] = 0.0
            else:
                for j in np.flatnonzero(~present.all(axis=0)):
                    out.features[np.repeat(~present[:, j], lengths), start + j] = 0.0

    # IMU
    imu = _mirrored(blocks.imu, IMU_COLUMNS, left_rows)
    acc_cols = [IMU_COLUMNS.index(c) for c in ACC_COLUMNS]
    rot_cols = [IMU_COLUMNS.index(c) for c in ROT_COLUMNS]
    acc_valid = np.isfinite(imu[:, acc_cols]).all(axis=1)
    rot_valid = np.isfinite(imu[:, rot_cols]).all(axis=1) & (
        np.abs(np.nan_to_num(imu[:, rot_cols])).sum(axis=1) > 0
    )
    acc = fill_nan(fill_within_segments(imu[:, acc_cols], acc_valid, offsets), 0.0)
    rot = fill_within_segments(imu[:, rot_cols], rot_valid, offsets)
    rot_missing = ~np.isfinite(rot).all(axis=1)
    rot[rot_missing] = [1.0, 0.0, 0.0, 0.0]
    rot /= np.linalg.norm(rot, axis=1, keepdims=True)
    imu_read = _segment_any((acc_valid | rot_valid)[:, None], offsets)
    out.step_valid[:] = acc_valid & rot_valid
    store(
        0,
        imu_features(acc, rot, offsets, settings.sampling_rate_hz),
        np.repeat(imu_read, len(IMU_FEATURE_NAMES), axis=1),
    )
    column = len(IMU_FEATURE_NAMES)

    # thermopiles
    if blocks.thm is not None:
        thm = _mirrored(blocks.thm, THM_COLUMNS, left_rows)
        thm_valid = np.isfinite(thm)
        filled = np.column_stack(
            [fill_within_segments(thm[:, k], thm_valid[:, k], offsets) for k in range(thm.shape[1])]
        )
        store(column, fill_nan(filled, 0.0), _segment_any(thm_valid, offsets))
        column += len(THM_COLUMNS)
        if settings.tof_mode == "grid":  # a flag per thermopile and step: read, not filled in
            store(column, thm_valid.astype(np.float32), _segment_any(thm_valid, offsets))
            column += len(THM_COLUMNS)

    # ToF: features of the unmirrored grids, then those of the mirrored sensor for left-handed rows
    if blocks.tof is None:
        return
    if settings.tof_mode == "grid":
        _store_tof_grid(blocks, offsets, left_rows, tof_mirror, store, column, counts)
        return
    unmirrored = {}
    for k in TOF_COLUMNS_BY_SENSOR:
        grid = blocks.tof[:, (k - 1) * TOF_PIXELS : k * TOF_PIXELS]
        features = tof_summary_features(grid) if settings.tof_mode == "summary" else tof_distances(grid)
        unmirrored[k] = features, blocks.tof_missing[:, k - 1]
    for k, (features, missing) in unmirrored.items():
        if left_rows is not None:
            source, pixels = tof_mirror[k]
            source_features, source_missing = unmirrored[source]
            from_source = source_features[left_rows]
            features = features.copy()
            features[left_rows] = from_source[:, pixels] if settings.tof_mode == "raw" else from_source
            missing = np.where(left_rows, source_missing, missing)
        valid = ~missing
        # rows with a dropped frame take a read frame's features; a sequence without any read
        # frame is absent (its features become 0 in store)
        filled = fill_within_segments(features, valid, offsets)
        present = np.repeat(_segment_any(valid[:, None], offsets), features.shape[1], axis=1)
        store(column, filled, present)
        column += features.shape[1]


def _store_tof_grid(
    blocks: SensorBlocks,
    offsets: np.ndarray,
    left_rows: np.ndarray | None,
    tof_mirror: dict[int, tuple[int, np.ndarray]],
    store,
    column: int,
    counts: dict[str, int],
) -> None:
    """The ``tof_mode="grid"`` columns from ``column`` on: 320 closeness pixels, 5 validity flags,
    5 blank flags.

    A frame not read or blank (every pixel -1) is masked: validity flag 0 and pixels 0; a blank
    frame sets the blank flag. Left-handed rows take the mirrored sensor's frame with its columns
    flipped (``tof_mirror_sources``), and its flags.
    """
    n_sensors = len(TOF_COLUMNS_BY_SENSOR)
    # integer readings in -1..254 (the usual case) as bytes: code = 255 - distance, 0 = no
    # reflection; the float path gives the same closeness (code / 255) for integer values
    as_codes = _fits_uint8_distances(blocks.tof)
    unmirrored = {}
    for k in TOF_COLUMNS_BY_SENSOR:
        grid = blocks.tof[:, (k - 1) * TOF_PIXELS : k * TOF_PIXELS]
        missing = blocks.tof_missing[:, k - 1]
        if as_codes:
            values = np.uint8(GRID_SCALE) - grid.astype(np.uint8)  # -1 wraps to 255: code 0
            blank = ~values.any(axis=1) & ~missing
        else:
            values = tof_closeness(grid)
            blank = (grid == TOF_NO_REFLECTION).all(axis=1) & ~missing
        for name, frames in (("tof_blank_frames", blank), ("tof_unread_frames", missing)):
            if frames.any():
                counts[name] = counts.get(name, 0) + int(np.count_nonzero(frames))
        unmirrored[k] = values, missing, blank
    valid_flags = np.empty((len(blocks.tof), n_sensors), dtype=np.float32)
    blank_flags = np.empty_like(valid_flags)
    left = np.flatnonzero(left_rows) if left_rows is not None else None
    for k, (values, missing, blank) in unmirrored.items():
        if left is not None:  # only the left-handed rows change: no copy of the others' work
            source, pixels = tof_mirror[k]
            source_values, source_missing, source_blank = unmirrored[source]
            values, missing, blank = values.copy(), missing.copy(), blank.copy()
            values[left] = source_values[left][:, pixels]
            missing[left], blank[left] = source_missing[left], source_blank[left]
        masked = missing | blank
        if as_codes:
            values = np.where(masked[:, None], np.uint8(0), values)
            closeness = np.divide(values, np.float32(GRID_SCALE), dtype=np.float32)
        else:
            closeness = np.where(masked[:, None], np.float32(0.0), values)
        valid_flags[:, k - 1] = ~masked
        blank_flags[:, k - 1] = blank
        present = np.repeat(_segment_any(~masked[:, None], offsets), TOF_PIXELS, axis=1)
        store(column + (k - 1) * TOF_PIXELS, closeness, present)
    read = _segment_any(~blocks.tof_missing, offsets)  # a blank frame is a reading
    if left_rows is not None:  # the flags of sensor k come from its mirror source
        left = _segment_any(left_rows[:, None], offsets)[:, 0]
        sources = [tof_mirror[k][0] - 1 for k in TOF_COLUMNS_BY_SENSOR]
        read = np.where(left[:, None], read[:, sources], read)
    store(column + n_sensors * TOF_PIXELS, valid_flags, read)
    store(column + n_sensors * TOF_PIXELS + n_sensors, blank_flags, read)


def _mirrored(values: np.ndarray, names: list[str], left_rows: np.ndarray | None) -> np.ndarray:
    """``values`` (columns ``names``, closed under the mirror map) with the rows of left-handed
    wearers mirrored, in place."""
    if left_rows is not None:
        perm, sign = _mirror_map(tuple(names))
        values[left_rows] = values[left_rows][:, perm] * sign.astype(values.dtype)
    return values


@functools.cache
def _mirror_map(columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``schema.mirror_permutation``, cached (it is called for every sequence served); read-only."""
    perm, sign = mirror_permutation(list(columns))
    perm.flags.writeable = sign.flags.writeable = False
    return perm, sign


@functools.cache
def _positions(columns: tuple[str, ...], names: tuple[str, ...]) -> list[int]:
    """Where ``names`` are among ``columns``, cached."""
    index = {c: i for i, c in enumerate(columns)}
    return [index[c] for c in names]
