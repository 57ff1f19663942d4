"""Training augmentations: physically consistent edits of raw sensor sequences, and mixup.

Raw-signal augmentations act on one sequence's raw sensor rows ``(T, C)`` (the columns of
``FeatureSettings.sensor_columns``: acc in m/s^2, the quaternion rot_w..rot_z that rotates device
vectors into the world, thermopiles, ToF pixels; NaN = missing) *before* any per-step feature is
computed, so linear acceleration, angular velocity, jerk and the rest are recomputed from the
edited signals (:func:`batch_step_features`). Each one is switchable from an experiment's
``augment`` config section (:class:`RawAugmenter` reads the fields it names):

- **time stretch** (``stretch_prob``, ``stretch_range``): the sequence resampled to
  ``round(T * s)`` steps, as if performed ``s`` times slower. Quaternions are interpolated by
  slerp (never component-wise), with w >= 0 as in the competition files; the acceleration is
  split into gravity (from the quaternion) and linear acceleration, the linear part interpolated
  and scaled by ``1 / s^2`` (a motion ``s`` times slower has ``s^2`` times smaller accelerations),
  gravity recomputed from the slerped quaternion. Thermopiles are interpolated linearly where
  both neighbouring readings exist, else take the nearest reading; ToF frames are the nearest
  step's (a distance is not interpolated across a no-reflection -1); missing stays missing.
- **time shift** (``shift_max_steps``): the sequence ends up to k steps earlier (the window of the
  last ``max_len`` steps moves back in time).
- **device rotation** (``rotation_prob``, ``rotation_max_deg``): the device frame turned by a
  small random rotation M: acc -> M acc, q -> q M^-1, so gravity in the device frame is M g and
  the linear acceleration M (acc - g): |acc| is kept, a device at rest still reads zero linear
  acceleration. Thermopiles and ToF are left as they are.
- **handedness flip** (``flip_prob``): the sensors mirrored as if the device were worn on the
  other wrist (``schema.mirror_sensors``: acc_x, rot_y, rot_z negated, thermopiles and ToF sensors
  3 and 5 swapped, ToF grids flipped), the wearer's handedness left as it is: with
  ``data.mirror_left_handed`` the model then sees a gesture in the other wrist's frame (a device
  worn on the non-dominant wrist, a mislabelled handedness).

Mixup (:func:`mixup_batch`) acts on a batch of model inputs after the features: pairs of
sequences mixed with a weight ``lam ~ Beta(alpha, alpha)`` (the mixed inputs' weights sum to 1),
optionally only between sequences of the same orientation; the losses mix the labels with the
same weights (the gesture, the target-vs-non-target label, the orientation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from codes.common.features import FeatureSettings, StepFeatures, compute_step_features, gravity_in_body_frame
from codes.common.schema import ACC_COLUMNS, ROT_COLUMNS, mirror_permutation
from codes.common.sequences import FeatureNormalizer, PaddedSequences, SequenceTable, pad_sequences
from codes.common.synthetic import quat_conjugate, quat_from_rotvec, quat_multiply, quat_to_matrix

__all__ = [
    "RawAugmenter",
    "augmented_batch",
    "augmented_sequences",
    "batch_from_sequences",
    "batch_step_features",
    "flip_handedness",
    "mixup_batch",
    "rotate_device",
    "shift_end",
    "slerp_at",
    "time_stretch",
    "valid_quaternions",
]


def _positions(columns: list[str], names: list[str]) -> list[int]:
    return [columns.index(c) for c in names]


def valid_quaternions(rot: np.ndarray) -> np.ndarray:
    """(T,) bool: a finite, non-zero quaternion (the features' rule for a read rotation)."""
    return np.isfinite(rot).all(axis=1) & (np.abs(np.nan_to_num(rot)).sum(axis=1) > 0)


def _interpolate_columns(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``values`` (T, K) at fractional ``positions``: linear where both neighbours are finite,
    else the nearest row's value (NaN stays NaN)."""
    last = len(values) - 1
    low = np.minimum(np.floor(positions).astype(np.int64), max(last - 1, 0))
    high = np.minimum(low + 1, last)
    fraction = (positions - low)[:, None].astype(values.dtype)
    linear = values[low] * (1 - fraction) + values[high] * fraction
    nearest = values[np.rint(positions).astype(np.int64)]
    return np.where(np.isfinite(linear), linear, nearest)


@functools.cache
def _column_roles(columns: tuple[str, ...]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Positions of (acc, rot, thermopile, ToF) among ``columns``."""
    acc, rot = _positions(list(columns), ACC_COLUMNS), _positions(list(columns), ROT_COLUMNS)
    thm = [i for i, c in enumerate(columns) if c.startswith("thm_")]
    tof = [i for i, c in enumerate(columns) if c.startswith("tof_")]
    return acc, rot, thm, tof


@functools.cache
def _mirror_map(columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return mirror_permutation(list(columns))


def _canonical(quaternions: np.ndarray) -> np.ndarray:
    """Unit quaternions with w >= 0 (q and -q are the same rotation; the files' convention)."""
    quaternions = quaternions / np.linalg.norm(quaternions, axis=-1, keepdims=True)
    return np.where(quaternions[..., :1] < 0, -quaternions, quaternions)


def slerp_at(keys: np.ndarray, quaternions: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation of unit ``quaternions`` (K, 4) (w, x, y, z) given at
    increasing ``keys`` (K,), at ``positions`` (clipped to the keys' range), with w >= 0.

    The same rotations as ``scipy.spatial.transform.Slerp`` (tests compare them), vectorised
    over the positions: scipy's per-call overhead is larger than a whole short sequence's work.
    """
    positions = np.clip(positions, keys[0], keys[-1])
    low = np.clip(np.searchsorted(keys, positions, side="right") - 1, 0, max(len(keys) - 2, 0))
    high = np.minimum(low + 1, len(keys) - 1)
    span = keys[high] - keys[low]
    t = np.where(span > 0, (positions - keys[low]) / np.where(span > 0, span, 1), 0.0)[:, None]
    q0, q1 = quaternions[low], quaternions[high]
    dot = (q0 * q1).sum(axis=1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # the shorter arc
    theta = np.arccos(np.clip(np.abs(dot), 0.0, 1.0))
    sin_theta = np.sin(theta)
    close = sin_theta < 1e-9
    safe = np.where(close, 1.0, sin_theta)
    w0 = np.where(close, 1 - t, np.sin((1 - t) * theta) / safe)
    w1 = np.where(close, t, np.sin(t * theta) / safe)
    return _canonical(w0 * q0 + w1 * q1)


def time_stretch(sensors: np.ndarray, columns: list[str], factor: float) -> np.ndarray:
    """``sensors`` (T, C) resampled to ``round(T * factor)`` steps (see the module docstring).

    ToF pixels take the nearest step's frame (a distance is not interpolated across a
    no-reflection reading of -1); thermopiles are interpolated linearly.
    """
    length = len(sensors)
    new_length = max(2, round(length * factor))
    if length < 2 or new_length == length:
        return sensors.copy()
    positions = np.linspace(0.0, length - 1, new_length)
    nearest = np.rint(positions).astype(np.int64)
    scale = (new_length - 1) / (length - 1)  # the actual slow-down of the resampled time axis
    acc_cols, rot_cols, thm_cols, _ = _column_roles(tuple(columns))
    out = sensors[nearest]  # ToF (and anything not interpolated below): the nearest step
    if thm_cols:
        out[:, thm_cols] = _interpolate_columns(sensors[:, thm_cols], positions)
    acc = sensors[:, acc_cols].astype(np.float64)
    out[:, acc_cols] = _interpolate_columns(acc, positions)
    rot = sensors[:, rot_cols].astype(np.float64)
    valid = valid_quaternions(rot)
    if valid.sum() < 2:
        return out
    keys = np.flatnonzero(valid)
    new_rot = slerp_at(keys.astype(np.float64), _canonical(rot[keys]), positions)
    new_rot[~valid[nearest]] = np.nan  # a missing rotation stays missing
    out[:, rot_cols] = new_rot
    if valid.all() and np.isfinite(acc).all():
        # gravity from the slerped quaternion + the linear acceleration of a slower motion
        linear = acc - gravity_in_body_frame(_canonical(rot))
        out[:, acc_cols] = gravity_in_body_frame(new_rot) + _interpolate_columns(linear, positions) / scale**2
    return out


def shift_end(sensors: np.ndarray, steps: int) -> np.ndarray:
    """The sequence without its last ``steps`` steps (at least 2 steps are kept)."""
    return sensors[: max(2, len(sensors) - steps)].copy()


def rotate_device(
    sensors: np.ndarray, columns: list[str], rotation: np.ndarray, in_place: bool = False
) -> np.ndarray:
    """The device frame turned by the unit quaternion ``rotation`` m (w, x, y, z), the rotation
    M: acc -> M acc, q -> q m^-1 (missing stays missing). ``in_place`` edits ``sensors``."""
    out = sensors if in_place else sensors.copy()
    acc_cols, rot_cols, _, _ = _column_roles(tuple(columns))
    out[:, acc_cols] = sensors[:, acc_cols].astype(np.float64) @ quat_to_matrix(rotation).T  # NaN stays NaN
    rot = sensors[:, rot_cols].astype(np.float64)
    valid = valid_quaternions(rot)
    out[np.ix_(valid, rot_cols)] = _canonical(quat_multiply(rot[valid], quat_conjugate(rotation)))
    return out


def flip_handedness(sensors: np.ndarray, columns: list[str]) -> np.ndarray:
    """The sensors mirrored as if worn on the other wrist (:func:`schema.mirror_sensors`'s map)."""
    perm, sign = _mirror_map(tuple(columns))
    return sensors[..., perm] * sign.astype(sensors.dtype, copy=False)


@dataclass
class RawAugmenter:
    """The raw-signal augmentations an ``augment`` config section switches on, for one sequence."""

    columns: list[str]
    stretch_prob: float = 0.0
    stretch_range: tuple[float, float] = (0.8, 1.25)
    shift_max_steps: int = 0
    rotation_prob: float = 0.0
    rotation_max_deg: float = 10.0
    flip_prob: float = 0.0

    @classmethod
    def from_config(cls, augment_cfg, columns: list[str]) -> RawAugmenter:
        return cls(
            columns=list(columns),
            stretch_prob=augment_cfg.stretch_prob,
            stretch_range=tuple(augment_cfg.stretch_range),
            shift_max_steps=augment_cfg.shift_max_steps,
            rotation_prob=augment_cfg.rotation_prob,
            rotation_max_deg=augment_cfg.rotation_max_deg,
            flip_prob=augment_cfg.flip_prob,
        )

    @property
    def active(self) -> bool:
        """Whether any raw-signal augmentation is on (else the cached features serve training)."""
        return (
            self.stretch_prob > 0 or self.shift_max_steps > 0 or self.rotation_prob > 0 or self.flip_prob > 0
        )

    def __call__(self, sensors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An augmented copy of one sequence's raw rows (``sensors`` itself is never changed)."""
        owned = False  # whether ``sensors`` is already a copy this call may edit
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            sensors, owned = flip_handedness(sensors, self.columns), True
        if self.stretch_prob > 0 and rng.random() < self.stretch_prob:
            low, high = self.stretch_range
            factor = float(np.exp(rng.uniform(np.log(low), np.log(high))))  # symmetric in log scale
            sensors, owned = time_stretch(sensors, self.columns, factor), True
        if self.rotation_prob > 0 and rng.random() < self.rotation_prob:
            # a rotation vector with a uniform direction and an angle uniform in [0, max]
            direction = rng.normal(size=3)
            angle = np.deg2rad(self.rotation_max_deg) * rng.random()
            rotation = quat_from_rotvec(direction / np.linalg.norm(direction) * angle)
            sensors, owned = rotate_device(sensors, self.columns, rotation, in_place=owned), True
        if self.shift_max_steps > 0:
            steps = int(rng.integers(0, self.shift_max_steps + 1))
            sensors = sensors[: max(2, len(sensors) - steps)]  # a view: the rows are not edited
        return sensors


def batch_step_features(
    sequences: list[np.ndarray], left_handed: np.ndarray, settings: FeatureSettings
) -> tuple[StepFeatures, np.ndarray]:
    """Per-step features of some raw sequences in one call: (features, ``(N + 1,)`` offsets)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = np.concatenate(sequences).astype(np.float32, copy=False)
    return compute_step_features(rows, offsets, left_handed, settings, n_threads=1), offsets


def mixup_batch(
    batch_size: int, alpha: float, rng: np.random.Generator, groups: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup partners and weights: ``(partner (B,) int64, lam (B,) float32)``.

    Sequence ``i`` becomes ``lam[i] * x[i] + (1 - lam[i]) * x[partner[i]]``; ``lam ~ Beta(alpha,
    alpha)``, folded to >= 0.5 so the sequence keeps most of itself (its demographics and
    sensor availability stay its own). With ``groups`` (e.g. orientation indices) partners are
    drawn within the same group; a sequence alone in its group is its own partner (lam has no
    effect then).
    """
    lam = rng.beta(alpha, alpha, size=batch_size) if alpha > 0 else np.ones(batch_size)
    lam = np.maximum(lam, 1 - lam)
    if groups is None:
        partner = rng.permutation(batch_size)
    else:
        groups = np.asarray(groups)
        partner = np.arange(batch_size)
        for value in np.unique(groups):
            members = np.flatnonzero(groups == value)
            partner[members] = rng.permutation(members)
    return torch.from_numpy(partner.astype(np.int64)), torch.from_numpy(lam.astype(np.float32))


def augmented_sequences(
    table: SequenceTable, indices: np.ndarray, augmenter: RawAugmenter | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """The raw sensor rows of ``table``'s sequences at ``indices`` after ``augmenter`` (None: the
    rows as they are; the table's rows are never edited)."""
    if table.sensors is None:
        raise ValueError("the table holds no raw sensor rows: load it with keep_sensors=True")
    indices = np.asarray(indices, dtype=np.int64)
    sequences = [table.sensors[table.offsets[i] : table.offsets[i + 1]] for i in indices]
    if augmenter is not None:
        sequences = [augmenter(s, rng) for s in sequences]
    return sequences


def batch_from_sequences(
    table: SequenceTable,
    indices: np.ndarray,
    sequences: list[np.ndarray],
    settings: FeatureSettings,
    normalizer: FeatureNormalizer,
    max_len: int,
) -> PaddedSequences:
    """The padded, normalised features of raw ``sequences`` (one per index of ``table``, whose
    metadata they keep: handedness, demographics, labels)."""
    indices = np.asarray(indices, dtype=np.int64)
    step, offsets = batch_step_features(sequences, table.left_handed[indices], settings)
    batch = replace(
        table.subset(indices[:0]),  # the metadata of the batch's sequences, without copying rows
        sequence_ids=table.sequence_ids[indices],
        offsets=offsets,
        features=step.features,
        step_valid=step.step_valid,
        feature_present=step.feature_present,
        demographics=table.demographics[indices],
        labels=table.labels[indices],
        subjects=table.subjects[indices],
        orientations=table.orientations[indices],
        sensors=None,
    )
    return pad_sequences(batch, max_len, normalizer.transform(batch))


def augmented_batch(
    table: SequenceTable,
    indices: np.ndarray,
    settings: FeatureSettings,
    normalizer: FeatureNormalizer,
    max_len: int,
    augmenter: RawAugmenter | None,
    rng: np.random.Generator,
) -> PaddedSequences:
    """The padded, normalised features of ``table``'s sequences at ``indices``, computed from
    their raw sensor rows (``table.sensors``) after ``augmenter`` (None: no augmentation, the
    same values as the cached features give)."""
    sequences = augmented_sequences(table, indices, augmenter, rng)
    return batch_from_sequences(table, indices, sequences, settings, normalizer, max_len)
