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
- ToF ``-1`` (no reflection) counts as ``TOF_MAX_DISTANCE + 1`` (beyond range).
- Handedness: with ``mirror_left_handed`` the sensors of left-handed wearers are mirrored onto
  the right-handed frame before any feature is computed (``schema.mirror_sensors``).
- The quaternion is made sign-continuous within a sequence (q and -q are the same rotation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

from codes.common.schema import (
    ACC_COLUMNS,
    GRAVITY,
    IMU_COLUMNS,
    NUM_TOF_SENSORS,
    ROT_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TOF_COLUMNS_BY_SENSOR,
    TOF_MAX_DISTANCE,
    TOF_NO_REFLECTION,
    TOF_PIXELS,
    mirror_permutation,
)

FEATURE_VERSION = 1  # bump when a change alters the features computed for the same settings

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
TOF_MODES = ("none", "summary", "raw")
PARALLEL_MIN_ROWS = 20_000


@dataclass(frozen=True)
class FeatureSettings:
    """What the per-step feature vector holds; part of the cache key."""

    use_thm: bool = True  # the 5 thermopile temperatures
    tof_mode: str = "summary"  # "none" | "summary" (4 statistics per sensor) | "raw" (320 pixels)
    mirror_left_handed: bool = True  # mirror left-handed wearers onto the right-handed frame
    sampling_rate_hz: float = 10.0  # turns per-step differences into per-second rates

    def __post_init__(self) -> None:
        if self.tof_mode not in TOF_MODES:
            raise ValueError(f"tof_mode must be one of {TOF_MODES}, got {self.tof_mode!r}")
        if self.sampling_rate_hz <= 0:
            raise ValueError(f"sampling_rate_hz must be positive, got {self.sampling_rate_hz}")

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
    """Feature names and their groups (``imu``, ``thm``, ``tof``) as column indices."""
    names = list(IMU_FEATURE_NAMES)
    groups = {"imu": list(range(len(names)))}
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


# ---------------------------------------------------------------- features
def imu_features(
    acc: np.ndarray, quaternions: np.ndarray, offsets: np.ndarray, sampling_rate_hz: float
) -> np.ndarray:
    """The IMU_FEATURE_NAMES columns from filled acc ``(R, 3)`` and unit quaternions ``(R, 4)``."""
    quaternions = sign_continuous_quaternions(quaternions, offsets)
    rotation = Rotation.from_quat(quaternions, scalar_first=True)
    linear_acc = acc - rotation.apply([0.0, 0.0, GRAVITY], inverse=True)
    # body-frame rotation from step t-1 to step t; first step of each sequence: no rotation
    previous = np.roll(quaternions, 1, axis=0)
    first_rows = offsets[:-1][np.diff(offsets) > 0]
    previous[first_rows] = quaternions[first_rows]
    step_rotvec = (Rotation.from_quat(previous, scalar_first=True).inv() * rotation).as_rotvec()
    angular_distance = np.linalg.norm(step_rotvec, axis=1, keepdims=True)
    angular_velocity = step_rotvec * sampling_rate_hz
    acc_jerk = np.linalg.norm(previous_row_difference(acc, offsets), axis=1, keepdims=True) * sampling_rate_hz
    linear_jerk = (
        np.linalg.norm(previous_row_difference(linear_acc, offsets), axis=1, keepdims=True) * sampling_rate_hz
    )
    return np.concatenate(
        [
            acc,
            quaternions,
            linear_acc,
            angular_velocity,
            angular_distance,
            np.linalg.norm(acc, axis=1, keepdims=True),
            np.linalg.norm(linear_acc, axis=1, keepdims=True),
            np.linalg.norm(angular_velocity, axis=1, keepdims=True),
            acc_jerk,
            linear_jerk,
        ],
        axis=1,
    )


def tof_summary_features(grid: np.ndarray) -> np.ndarray:
    """Mean, std and min distance and the fraction of no-reflection pixels of one ToF sensor.

    ``grid`` is ``(R, 64)`` with -1 for no reflection (already filled, no NaN) -> ``(R, 4)``.
    """
    no_reflection = grid == TOF_NO_REFLECTION
    distances = np.where(no_reflection, np.float32(TOF_MAX_DISTANCE + 1), grid)
    mean = distances.mean(axis=1)
    variance = np.maximum(np.einsum("ij,ij->i", distances, distances) / grid.shape[1] - mean * mean, 0.0)
    return np.stack(
        [mean, np.sqrt(variance), distances.min(axis=1), no_reflection.mean(axis=1, dtype=np.float32)], axis=1
    ).astype(np.float32)


@dataclass
class StepFeatures:
    """Features of the rows of a table of sequences."""

    features: np.ndarray  # (R, F) float32
    step_valid: np.ndarray  # (R,) bool: acc and rot were both read at this step
    feature_present: np.ndarray  # (N, F) bool: the sequence had readings behind the feature


def compute_step_features(
    sensors: np.ndarray | pl.DataFrame,
    offsets: np.ndarray,
    left_handed: np.ndarray,
    settings: FeatureSettings,
    n_threads: int | None = None,
) -> StepFeatures:
    """Features of every row.

    sensors: ``(R, C)`` raw values of ``settings.sensor_columns`` (NaN or null = missing), as a
    numpy array or a polars frame with those columns; offsets: ``(N + 1,)`` row offsets of the N
    sequences; left_handed: ``(N,)`` bool. The column groups (IMU, thermopiles, each ToF sensor)
    are processed in ``n_threads`` threads (default: the CPU count, at most 4, for tables of at
    least ``PARALLEL_MIN_ROWS`` rows, else 1); numpy and polars release the GIL.
    """
    columns = settings.sensor_columns
    width = sensors.width if isinstance(sensors, pl.DataFrame) else sensors.shape[1]
    if width != len(columns):
        raise ValueError(f"expected {len(columns)} sensor columns, got {width}")
    index = {c: i for i, c in enumerate(columns)}
    left_rows = np.repeat(left_handed, np.diff(offsets)) if settings.mirror_left_handed else None
    mirror_left = left_rows is not None and bool(left_rows.any())
    mirror_source, mirror_sign = mirror_permutation(columns)

    def block(names: list[str], dtype: type) -> np.ndarray:
        """A copy of some sensor columns, mirrored for left-handed wearers (never the input)."""
        wanted = np.array([index[c] for c in names])
        if isinstance(sensors, pl.DataFrame):
            values = sensors.select(names).to_numpy().astype(dtype, copy=False)
            if not values.flags.writeable:  # a zero-copy view of polars memory
                values = values.copy()
            if mirror_left:
                sources = [columns[i] for i in mirror_source[wanted]]
                mirrored = sensors.select(sources).filter(pl.Series(left_rows)).to_numpy()
                values[left_rows] = mirrored * mirror_sign[wanted]
            return values
        values = sensors[:, wanted].astype(dtype, copy=False)  # fancy indexing copies
        if mirror_left:
            values[left_rows] = sensors[np.ix_(left_rows, mirror_source[wanted])] * mirror_sign[wanted]
        return values

    def imu_block() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        imu = block(IMU_COLUMNS, np.float64)
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
        features = imu_features(acc, rot, offsets, settings.sampling_rate_hz).astype(np.float32)
        imu_read = _segment_any((acc_valid | rot_valid)[:, None], offsets)
        return features, np.repeat(imu_read, len(IMU_FEATURE_NAMES), axis=1), acc_valid & rot_valid

    def thm_block() -> tuple[np.ndarray, np.ndarray]:
        thm = block(THM_COLUMNS, np.float32)
        thm_valid = np.isfinite(thm)
        filled = np.column_stack(
            [fill_within_segments(thm[:, k], thm_valid[:, k], offsets) for k in range(thm.shape[1])]
        )
        return fill_nan(filled, 0.0), _segment_any(thm_valid, offsets)

    def tof_block(sensor_columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tof = block(sensor_columns, np.float32)
        missing = np.isnan(tof)
        frame_valid = ~missing.any(axis=1)  # a ToF frame is read (or dropped) whole
        tof = fill_within_segments(tof, frame_valid, offsets)
        if missing.any():  # NaN left where a sequence has no frame at all
            np.copyto(tof, np.float32(TOF_NO_REFLECTION), where=np.isnan(tof))
        if settings.tof_mode == "summary":
            features = tof_summary_features(tof)
        else:
            features = np.where(tof == TOF_NO_REFLECTION, np.float32(TOF_MAX_DISTANCE + 1), tof)
        return features, np.repeat(_segment_any(frame_valid[:, None], offsets), features.shape[1], axis=1)

    # (task, number of feature columns it writes), in feature_layout order
    tasks: list[tuple[Callable, int]] = [(imu_block, len(IMU_FEATURE_NAMES))]
    if settings.use_thm:
        tasks.append((thm_block, len(THM_COLUMNS)))
    if settings.tof_mode != "none":
        tof_width = TOF_PIXELS if settings.tof_mode == "raw" else len(TOF_SUMMARY_STATISTICS)
        tasks += [(partial(tof_block, columns), tof_width) for columns in TOF_COLUMNS_BY_SENSOR.values()]
    if n_threads is None:  # threads pay off on whole files, not on a single served sequence
        n_threads = min(4, os.cpu_count() or 1) if offsets[-1] >= PARALLEL_MIN_ROWS else 1
    names, _ = feature_layout(settings)
    features = np.empty((int(offsets[-1]), len(names)), dtype=np.float32)
    lengths = np.diff(offsets)

    def store(start: int, values: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Write a block into ``features``; features of a sensor absent from a sequence become 0."""
        block_columns = slice(start, start + values.shape[1])
        features[:, block_columns] = values
        if not present.all():
            if (present == present[:, :1]).all():  # the usual case: the block is absent as a whole
                features[np.repeat(~present[:, 0], lengths), block_columns] = 0.0
            else:
                for j in np.flatnonzero(~present.all(axis=0)):
                    features[np.repeat(~present[:, j], lengths), start + j] = 0.0
        return present

    def run(task, start: int):
        result = task()
        store(start, result[0], result[1])
        return result[1:]

    starts = np.cumsum([0] + [width for _, width in tasks])
    jobs = [(task, int(start)) for (task, _), start in zip(tasks, starts, strict=False)]
    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            results = [future.result() for future in [pool.submit(run, task, start) for task, start in jobs]]
    else:
        results = [run(task, start) for task, start in jobs]
    step_valid = results[0][1]
    feature_present = np.concatenate([r[0] for r in results], axis=1)
    return StepFeatures(features=features, step_valid=step_valid, feature_present=feature_present)
