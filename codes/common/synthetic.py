"""Synthetic stand-in for the competition data, generated from a physical model of each gesture.

    python -m codes.common.synthetic --out data/synthetic --subjects 20 --seed 0 [--test-subjects N]

Writes ``train.csv``, ``train_demographics.csv``, ``test.csv``, ``test_demographics.csv`` and
``test_labels.csv`` in the exact competition format (see ``codes.common.schema``).

The model, in short:

- Frames. Torso frame: x anterior, y to the subject's left, z superior (head). World frame: z up.
  Device (sensor) frame on the dominant wrist: x across the wrist, y along the forearm towards
  the fingers, z out of the device face. ``q`` (w, x, y, z, Hamilton) rotates device vectors into
  the world; the accelerometer reads ``R(q)^T (a_linear + g e_z)``.
- Every subject is simulated right-handed; left-handed subjects are mirrored with
  ``schema.mirror_sensors`` (a mirrored scene is a left-handed wearer). Two subjects wear the
  device rotated 180 degrees about its z axis (the whole device: IMU, thermopiles and ToF).
- A sequence: start pose (hand relaxed at rest, or raised in front) -> minimum-jerk reach with a
  slerped orientation to the gesture's wrist pose (``Relaxes...``/``Moves...``), a short pause
  with tremor (``Hand at target location``), then the gesture's motion (``Performs gesture``).
  Linear acceleration is the second derivative of the wrist trajectory (computed on a 4x finer
  time grid). The body orientation (seated, lying on the back or on the side, leaning face down)
  rotates the whole scene relative to gravity.
- Thermopiles and ToF see the body (head, neck, torso, shoulders, thighs, the bed when lying)
  and held objects (bottle, phone, tray) as spheres and planes: each ToF pixel casts a ray,
  each thermopile integrates the view factor of warm surfaces, with a thermal lag.
- Sequence lengths do not depend on the gesture; tempo, amplitude and pose vary per subject and
  per sequence; sensor noise, quantisation, quaternion sign convention (w >= 0), rot drop-outs,
  whole-sensor nulls (thm_5, tof_5) and IMU-only sequences (half of the test set) follow the
  real files.

Everything is drawn from numpy Generators seeded from ``--seed`` (one SeedSequence child per
subject), so a seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.signal import lfilter

from codes.common.schema import (
    ACC_COLUMNS,
    ACC_QUANTUM,
    BEHAVIOR_AT_TARGET,
    BEHAVIOR_MOVES,
    BEHAVIOR_PERFORMS,
    BEHAVIOR_TO_PHASE,
    BEHAVIORS,
    DEMOGRAPHICS_COLUMNS,
    GESTURE_ORIENTATION_PAIRS,
    GESTURES,
    GRAVITY,
    IMU_COLUMNS,
    NUM_THERMOPILES,
    NUM_TOF_SENSORS,
    ORIENTATIONS,
    ROT_COLUMNS,
    ROT_QUANTUM,
    SENSOR_COLUMNS,
    STARTING_BEHAVIORS,
    TEST_COLUMNS,
    TEST_LABEL_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TOF_COLUMNS_BY_SENSOR,
    TOF_GRID_SIZE,
    TOF_MAX_DISTANCE,
    TOF_NO_REFLECTION,
    TRAIN_COLUMNS,
    mirror_sensors,
    sequence_type_of,
)

# ------------------------------------------------------------------ file names
TRAIN_FILE = "train.csv"
TRAIN_DEMOGRAPHICS_FILE = "train_demographics.csv"
TEST_FILE = "test.csv"
TEST_DEMOGRAPHICS_FILE = "test_demographics.csv"
TEST_LABELS_FILE = "test_labels.csv"

# ------------------------------------------------------------------ dataset-level constants
SAMPLING_RATE_HZ = 10.0
OVERSAMPLE = 4  # trajectories are differentiated on a grid this many times finer
MIN_SEQUENCE_LENGTH = 29
MAX_SEQUENCE_LENGTH = 700
LENGTH_LOG_MEDIAN = np.log(31.0)  # length = 29 + lognormal excess (median ~60, mean ~70)
LENGTH_LOG_SIGMA = 0.72
SEQUENCES_PER_SUBJECT = len(GESTURE_ORIENTATION_PAIRS) * len(STARTING_BEHAVIORS)  # 102
ID_SPACE = 1_000_000  # ids are 6 digits
LEFT_HANDED_SHARE = 0.12
ROTATED_DEVICE_SUBJECTS = 2  # when there are at least ROTATED_DEVICE_MIN_SUBJECTS train subjects
ROTATED_DEVICE_MIN_SUBJECTS = 10
THM5_MISSING_SHARE = 0.058
TOF5_MISSING_SHARE = 0.052
TRAIN_IMU_ONLY_SHARE = 0.02
TEST_IMU_ONLY_SHARE = 0.5
ROT_MISSING_SEQUENCE_SHARE = 0.0015  # rot null for the whole sequence
ROT_DROPOUT_RUNS_PER_SEQUENCE = 0.09  # Poisson rate of short rot drop-out runs
ROT_DROPOUT_MAX_RUN = 6

# ------------------------------------------------------------------ difficulty knobs
SUBJECT_POSE_POSITION_SD = 0.030  # m, per subject and gesture x orientation pair
SUBJECT_POSE_ROTATION_SD = 0.22  # rad
SEQUENCE_POSE_POSITION_SD = 0.015  # m, per sequence
SEQUENCE_POSE_ROTATION_SD = 0.10  # rad
BODY_ROTATION_SD = 0.10  # rad, how a subject sits/lies in one sequence
TREMOR_POSITION_M = 0.004
TREMOR_ROTATION_RAD = 0.04
ACC_NOISE_SD = 0.12  # m/s^2
ROT_NOISE_RAD = 0.006
YAW_DRIFT_RAD_PER_SQRT_S = 0.01
THM_NOISE_SD = 0.05  # deg C
THM_TIME_CONSTANT_S = 0.8
THM_GAIN = 2.2  # view-factor signal -> share of the skin-ambient contrast
TOF_NOISE_SD = 2.0  # ToF units
TOF_NOISE_PER_UNIT = 0.015  # extra noise proportional to the distance
TOF_PIXEL_DROPOUT = 0.01
TOF_UNITS_PER_M = 1000.0  # 1 unit ~ 1 mm
TOF_FOV_DEG = 45.0

DT = 1.0 / SAMPLING_RATE_HZ


# ================================================================== quaternion helpers
def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of (..., 4) quaternions (w, x, y, z), broadcasting."""
    aw, ax, ay, az = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bw, bx, by, bz = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """Inverse of unit quaternions."""
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4) from rotation vectors (..., 3) (axis * angle, radians)."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(rotvec, axis=-1, keepdims=True)
    half = 0.5 * angle
    # sin(a/2)/a -> 1/2 as a -> 0
    scale = np.where(angle > 1e-9, np.sin(half) / np.maximum(angle, 1e-9), 0.5)
    return np.concatenate([np.cos(half), rotvec * scale], axis=-1)


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) of unit quaternions (..., 4), angle in [0, pi]."""
    q = np.where(q[..., :1] < 0, -q, q)
    vector_norm = np.linalg.norm(q[..., 1:], axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(vector_norm, q[..., :1])
    scale = np.where(vector_norm > 1e-12, angle / np.maximum(vector_norm, 1e-12), 2.0)
    return q[..., 1:] * scale


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of unit quaternions (..., 4)."""
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def quat_from_axes(forward: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Device orientation whose y axis points along ``forward`` and z axis along ``normal``.

    ``normal`` is orthogonalised against ``forward``; x = y cross z.
    """
    y_axis = forward / np.linalg.norm(forward)
    z_axis = normal - np.dot(normal, y_axis) * y_axis
    z_axis = z_axis / np.linalg.norm(z_axis)
    x_axis = np.cross(y_axis, z_axis)
    return quat_from_matrix(np.stack([x_axis, y_axis, z_axis], axis=1))


def quat_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Unit quaternion (w >= 0) of one 3x3 rotation matrix (Shepperd's method)."""
    m = matrix
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    candidates = np.array([trace, m[0, 0], m[1, 1], m[2, 2]])
    largest = int(np.argmax(candidates))
    if largest == 0:
        w = 0.5 * np.sqrt(1.0 + trace)
        q = np.array(
            [w, (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)]
        )
    else:
        i = largest - 1
        j, k = (i + 1) % 3, (i + 2) % 3
        vector = np.zeros(3)
        vector[i] = 0.5 * np.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 0.0))
        vector[j] = (m[j, i] + m[i, j]) / (4 * vector[i])
        vector[k] = (m[k, i] + m[i, k]) / (4 * vector[i])
        q = np.array([(m[k, j] - m[j, k]) / (4 * vector[i]), *vector])
    q = q / np.linalg.norm(q)
    return -q if q[0] < 0 else q


def quat_slerp(q0: np.ndarray, q1: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Spherical interpolation from ``q0`` to ``q1`` at ``fraction`` (T,) -> (T, 4)."""
    if np.dot(q0, q1) < 0:
        q1 = -q1
    relative = quat_to_rotvec(quat_multiply(quat_conjugate(q0), q1))
    return quat_multiply(q0, quat_from_rotvec(fraction[:, None] * relative))


def _axis_quat(axis: int, angle: float) -> np.ndarray:
    rotvec = np.zeros(3)
    rotvec[axis] = angle
    return quat_from_rotvec(rotvec)


Q_ROTATE_180_Z = np.array([0.0, 0.0, 0.0, 1.0])  # a device worn rotated 180 deg about its z axis


# ================================================================== time profiles
def min_jerk(u: np.ndarray) -> np.ndarray:
    """Minimum-jerk profile 0 -> 1 on u in [0, 1] (clipped outside)."""
    u = np.clip(u, 0.0, 1.0)
    return u**3 * (10.0 - 15.0 * u + 6.0 * u * u)


def _bump(u: np.ndarray, start: float, rise: float, hold: float, fall: float) -> np.ndarray:
    """Smooth 0 -> 1 -> 0 profile: rises from ``start``, holds, then falls back."""
    up = min_jerk((u - start) / rise)
    down = min_jerk((u - start - rise - hold) / fall)
    return up - down


def _smooth_noise(
    rng: np.random.Generator, t: np.ndarray, n_dims: int, f_low: float, f_high: float, n_terms: int = 4
) -> np.ndarray:
    """Smooth random signal (len(t), n_dims), unit-ish amplitude: a sum of random sinusoids."""
    freqs = rng.uniform(f_low, f_high, size=(n_terms, n_dims))
    phases = rng.uniform(0, 2 * np.pi, size=(n_terms, n_dims))
    weights = rng.normal(size=(n_terms, n_dims)) / np.sqrt(n_terms)
    return np.einsum("kd,tkd->td", weights, np.sin(2 * np.pi * freqs * t[:, None, None] + phases))


# ================================================================== sensors on the device
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sensor_frames() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointing directions (5, 3) and ToF image axes u (columns) / v (rows) in the device frame.

    Sensors 1, 2, 4 lie in the device's x = 0 plane (their image columns run along x); 3 and 5
    face +x / -x and are mirror images of each other, so that mirroring across x swaps 3 <-> 5
    and flips every grid left-right, as ``schema.mirror_sensors`` does.
    """
    x = np.array([1.0, 0.0, 0.0])
    mirror = np.diag([-1.0, 1.0, 1.0])
    w1 = _unit([0.0, 1.0, -0.25])  # towards the fingers, slightly to the palm side
    w2 = _unit([0.0, 0.0, 1.0])  # out of the device face
    w3 = _unit([1.0, 0.0, 0.3])  # one side
    w4 = _unit([0.0, -1.0, 0.5])  # towards the elbow
    u3 = np.array([0.0, 1.0, 0.0])
    pointing = np.stack([w1, w2, w3, w4, mirror @ w3])
    u_axes = np.stack([x, x, u3, x, -(mirror @ u3)])
    v_axes = np.stack([_unit(np.cross(u, w)) for u, w in zip(u_axes[:4], pointing[:4], strict=True)])
    v_axes = np.concatenate([v_axes, (mirror @ v_axes[2])[None]])
    return pointing, u_axes, v_axes


SENSOR_POINTING, _SENSOR_U, _SENSOR_V = _sensor_frames()


def _pixel_directions() -> np.ndarray:
    """Unit ray directions (5, 64, 3) of every ToF pixel in the device frame, row-major from top left."""
    step = np.tan(np.deg2rad(TOF_FOV_DEG / TOF_GRID_SIZE))
    offsets = (np.arange(TOF_GRID_SIZE) - (TOF_GRID_SIZE - 1) / 2) * step
    col = np.tile(offsets, TOF_GRID_SIZE)  # left -> right
    row = -np.repeat(offsets, TOF_GRID_SIZE)  # top row first
    rays = (
        SENSOR_POINTING[:, None, :]
        + col[None, :, None] * _SENSOR_U[:, None, :]
        + row[None, :, None] * _SENSOR_V[:, None, :]
    )
    return _unit(rays)


PIXEL_DIRECTIONS = _pixel_directions()
PIXEL_DIRECTIONS_FLAT = PIXEL_DIRECTIONS.reshape(-1, 3).astype(np.float32)
SENSOR_OFFSET_M = 0.015  # sensors sit this far from the wrist centre along their pointing direction


# ================================================================== the body
# Orientations: torso-to-world rotation (torso frame: x anterior, y left, z superior).
def _body_quaternion(orientation: str) -> np.ndarray:
    if orientation == ORIENTATIONS[0]:  # Seated Straight: torso upright
        return np.array([1.0, 0.0, 0.0, 0.0])
    if orientation == ORIENTATIONS[1]:  # Lie on Back: torso horizontal, chest facing up
        return _axis_quat(1, -np.pi / 2)
    if orientation == ORIENTATIONS[2]:  # Lie on Side - Non Dominant: left side down
        return _axis_quat(0, -np.pi / 2)
    if orientation == ORIENTATIONS[3]:  # Seated Lean Non Dom - FACE DOWN: pitched forward, leaning left
        return quat_multiply(_axis_quat(1, np.deg2rad(60.0)), _axis_quat(0, -np.deg2rad(25.0)))
    raise ValueError(f"unknown orientation {orientation!r}")


BODY_QUATERNIONS = {o: _body_quaternion(o) for o in ORIENTATIONS}
SEATED_ORIENTATIONS = (ORIENTATIONS[0], ORIENTATIONS[3])
HEAD_CENTRE = np.array([0.0, 0.0, 0.40])
HEAD_RADIUS = 0.10
THIGH_RADIUS = 0.075
HIP_RIGHT = np.array([0.0, -0.10, -0.33])
THIGH_LENGTH = 0.45


@dataclass(frozen=True)
class BodyScene:
    """Static surfaces of one sequence in the torso frame.

    Spheres: centres (K, 3), radii (K,), warmth (K,) = temperature contrast as a fraction of
    (skin - ambient). Planes: normals (P, 3) pointing towards the subject, offsets (P,) with
    ``normal . x = offset`` on the plane.
    """

    centres: np.ndarray
    radii: np.ndarray
    warmth: np.ndarray
    plane_normals: np.ndarray
    plane_offsets: np.ndarray
    plane_warmth: np.ndarray
    up: np.ndarray  # world up in the torso frame
    thigh_direction: np.ndarray
    knee_top: np.ndarray
    thigh_top: np.ndarray


def _body_scene(orientation: str, body_q: np.ndarray, scale: float, with_tray: bool) -> BodyScene:
    up = quat_to_matrix(body_q).T @ np.array([0.0, 0.0, 1.0])
    if orientation in SEATED_ORIENTATIONS:
        forward_world = quat_to_matrix(body_q).T @ np.array([1.0, 0.0, 0.0])
        thigh_direction = _unit(forward_world - 0.1 * up)
    else:  # lying: legs extended along the torso axis
        thigh_direction = np.array([0.05, 0.0, -1.0])
        thigh_direction = _unit(thigh_direction)
    centres = [HEAD_CENTRE, [0.0, 0.0, 0.26], [0.0, 0.0, 0.06], [0.02, 0.0, -0.16]]
    radii = [HEAD_RADIUS, 0.055, 0.15, 0.15]
    warmth = [1.0, 1.0, 0.55, 0.5]
    for side in (-1.0, 1.0):
        centres.append([-0.01, 0.18 * side, 0.16])
        radii.append(0.065)
        warmth.append(0.5)
        hip = HIP_RIGHT * np.array([1.0, -side, 1.0])
        for k in (1, 2, 3):
            centres.append(hip + thigh_direction * THIGH_LENGTH * k / 3)
            radii.append(THIGH_RADIUS)
            warmth.append(0.6)
    centres = np.asarray(centres) * scale
    radii = np.asarray(radii) * scale
    warmth = np.asarray(warmth)
    knee_right = (HIP_RIGHT + thigh_direction * THIGH_LENGTH) * scale
    mid_right = (HIP_RIGHT + thigh_direction * THIGH_LENGTH * 2 / 3) * scale
    knee_top = knee_right + up * THIGH_RADIUS * scale
    thigh_top = mid_right + up * THIGH_RADIUS * scale
    if with_tray:  # a tray on the table in front, at room temperature
        centres = np.vstack([centres, np.array([0.40, -0.05, -0.46]) * scale])
        radii = np.append(radii, 0.15 * scale)
        warmth = np.append(warmth, 0.0)
    normals, offsets, plane_warmth = np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    if orientation == ORIENTATIONS[1]:  # bed behind the back
        normals, offsets, plane_warmth = (
            np.array([[1.0, 0.0, 0.0]]),
            np.array([-0.16 * scale]),
            np.array([0.2]),
        )
    elif orientation == ORIENTATIONS[2]:  # bed on the left side
        normals, offsets, plane_warmth = (
            np.array([[0.0, -1.0, 0.0]]),
            np.array([-0.20 * scale]),
            np.array([0.2]),
        )
    return BodyScene(
        centres, radii, warmth, normals, offsets, plane_warmth, up, thigh_direction, knee_top, thigh_top
    )


# ================================================================== gestures
@dataclass(frozen=True)
class GestureModel:
    """Where the hand goes (contact point, forearm direction, back-of-hand normal) and how it moves.

    ``site``: "head" (offset from the head centre), "torso" (absolute, torso frame), "knee" or
    "thigh" (offset in a leg frame: along the thigh, left, world up).
    """

    site: str
    contact: tuple[float, float, float]
    forearm: tuple[float, float, float]
    dorsal: tuple[float, float, float]
    motion: str
    held_object: str | None = None


GESTURE_MODELS: dict[str, GestureModel] = {
    "Above ear - pull hair": GestureModel(
        "head", (0.0, -0.10, 0.07), (0.1, 0.35, 0.93), (0.0, -1.0, 0.3), "pull"
    ),
    "Cheek - pinch skin": GestureModel(
        "head", (0.07, -0.065, -0.03), (0.35, 0.25, 0.9), (0.3, -1.0, 0.0), "pinch"
    ),
    "Eyebrow - pull hair": GestureModel(
        "head", (0.095, -0.03, 0.03), (0.25, 0.35, 0.9), (1.0, -0.3, 0.0), "pull"
    ),
    "Eyelash - pull hair": GestureModel(
        "head", (0.10, -0.03, 0.005), (0.3, 0.35, 0.88), (1.0, -0.2, -0.1), "pull"
    ),
    "Forehead - pull hairline": GestureModel(
        "head", (0.08, -0.01, 0.08), (0.2, 0.3, 0.93), (1.0, -0.2, 0.3), "pull"
    ),
    "Forehead - scratch": GestureModel(
        "head", (0.095, -0.01, 0.06), (0.25, 0.3, 0.92), (1.0, -0.2, 0.2), "scratch"
    ),
    "Neck - pinch skin": GestureModel(
        "torso", (0.045, -0.03, 0.26), (0.3, 0.6, 0.75), (0.6, -0.6, 0.0), "pinch"
    ),
    "Neck - scratch": GestureModel(
        "torso", (0.03, -0.05, 0.27), (0.2, 0.5, 0.85), (0.3, -1.0, 0.0), "scratch"
    ),
    "Drink from bottle/cup": GestureModel(
        "head", (0.14, -0.02, -0.06), (0.5, 0.5, 0.7), (0.3, -1.0, 0.0), "drink", "bottle"
    ),
    "Feel around in tray and pull out an object": GestureModel(
        "torso", (0.38, -0.08, -0.30), (1.0, 0.2, -0.4), (0.0, 0.0, 1.0), "tray"
    ),
    "Glasses on/off": GestureModel(
        "head", (0.08, -0.08, 0.01), (0.4, 0.3, 0.85), (0.2, -1.0, 0.2), "glasses"
    ),
    "Pinch knee/leg skin": GestureModel("knee", (0.0, 0.0, 0.0), (1.0, 0.3, -0.2), (0.0, 0.0, 1.0), "pinch"),
    "Pull air toward your face": GestureModel(
        "torso", (0.42, -0.12, 0.25), (0.6, 0.2, 0.8), (1.0, 0.0, -0.2), "pull_air"
    ),
    "Scratch knee/leg skin": GestureModel(
        "knee", (0.0, 0.0, 0.0), (1.0, 0.3, -0.2), (0.0, 0.0, 1.0), "scratch"
    ),
    "Text on phone": GestureModel(
        "torso", (0.30, -0.02, -0.05), (0.7, 0.7, 0.1), (0.3, 0.0, 1.0), "text", "phone"
    ),
    "Wave hello": GestureModel("torso", (0.12, -0.30, 0.42), (0.1, -0.1, 1.0), (-1.0, 0.0, 0.0), "wave"),
    "Write name in air": GestureModel(
        "torso", (0.45, -0.12, 0.15), (1.0, 0.1, 0.2), (0.0, -0.3, 1.0), "write_air"
    ),
    "Write name on leg": GestureModel(
        "thigh", (0.0, 0.0, 0.0), (1.0, 0.4, -0.2), (0.0, 0.0, 1.0), "write_leg"
    ),
}
assert set(GESTURE_MODELS) == set(GESTURES)

# Held objects, in the device frame: centre, radius, warmth (a cold drink reads below ambient).
HELD_OBJECTS: dict[str, tuple[tuple[float, float, float], float, float]] = {
    "bottle": ((0.0, 0.10, -0.06), 0.035, -0.3),
    "phone": ((0.0, 0.11, -0.04), 0.045, 0.1),
}
HAND_LENGTH_M = 0.09  # contact point -> wrist, along the forearm


def _leg_frame(scene: BodyScene) -> np.ndarray:
    """Columns: along the thigh, to the left, world up (torso-frame vectors)."""
    along = scene.thigh_direction
    left = _unit(np.cross(scene.up, along))
    up = _unit(np.cross(along, left))
    return np.stack([along, left, up], axis=1)


WRIST_CLEARANCE_M = 0.035  # the wrist centre stays this far outside every body surface


def _clear_of_body(position: np.ndarray, scene: BodyScene, scale: float) -> np.ndarray:
    """Push a wrist position out of the body spheres (the hand lies between wrist and skin)."""
    for _ in range(2):
        for centre, radius in zip(scene.centres, scene.radii, strict=True):
            offset = position - centre
            distance = float(np.linalg.norm(offset))
            minimum = radius + WRIST_CLEARANCE_M * scale
            if distance < minimum:
                position = centre + offset * (minimum / max(distance, 1e-6))
    return position


def _target_pose(model: GestureModel, scene: BodyScene, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Wrist position (torso frame) and device orientation (device -> torso) of a gesture."""
    contact = np.asarray(model.contact) * scale
    forearm, dorsal = np.asarray(model.forearm, dtype=float), np.asarray(model.dorsal, dtype=float)
    if model.site == "head":
        point = HEAD_CENTRE * scale + contact
    elif model.site == "torso":
        point = contact
    else:
        leg = _leg_frame(scene)
        point = (scene.knee_top if model.site == "knee" else scene.thigh_top) + leg @ contact
        forearm, dorsal = leg @ forearm, leg @ dorsal
    forearm = _unit(forearm)
    return point - HAND_LENGTH_M * scale * forearm, quat_from_axes(forearm, dorsal)


def _rest_pose(
    orientation: str, scene: BodyScene, scale: float, behavior: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Start of the transition: relaxed at rest, or raised in front (a random, different position)."""
    if behavior == BEHAVIOR_MOVES:
        position = np.array([0.33, -0.18, 0.02]) * scale + rng.uniform(-0.12, 0.12, size=3)
        forward = _unit(np.array([1.0, 0.2, 0.2]) + rng.normal(0, 0.35, size=3))
        normal = scene.up + rng.normal(0, 0.4, size=3)
        return position, quat_from_axes(forward, normal)
    if orientation in SEATED_ORIENTATIONS:  # resting on the right thigh
        leg = _leg_frame(scene)
        forward = leg @ np.array([1.0, 0.1, -0.1])
        return scene.thigh_top - HAND_LENGTH_M * scale * _unit(forward) + 0.03 * scene.up, quat_from_axes(
            forward, scene.up
        )
    if orientation == ORIENTATIONS[1]:  # on the bed beside the hip, back of the hand up
        return np.array([-0.08, -0.27, -0.22]) * scale, quat_from_axes(np.array([0.0, 0.0, -1.0]), scene.up)
    # lying on the left side: the right hand rests on the right hip
    return np.array([0.05, -0.20, -0.28]) * scale, quat_from_axes(np.array([0.3, 0.0, -1.0]), scene.up)


def _motion(
    kind: str,
    tau: np.ndarray,
    duration: float,
    tempo: float,
    amplitude: float,
    rng: np.random.Generator,
    up: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gesture's own movement on times ``tau`` (s since the gesture started).

    Returns (displacement in the device frame of the target pose, displacement in the torso
    frame, rotation vector in the device frame), each (len(tau), 3).
    """
    n = len(tau)
    local = np.zeros((n, 3))
    body = np.zeros((n, 3))
    rotvec = np.zeros((n, 3))
    u = tau / max(duration, 1e-6)
    if kind == "scratch":
        freq = min(rng.uniform(2.2, 3.6) * tempo, 4.4)
        phase = rng.uniform(0, 2 * np.pi)
        burst = 0.65 + 0.35 * np.sin(2 * np.pi * tau / rng.uniform(1.5, 3.0) + rng.uniform(0, 2 * np.pi))
        wave = np.sin(2 * np.pi * freq * tau + phase) * burst
        size = 0.012 * amplitude
        local[:, 1] = size * wave
        local[:, 2] = 0.3 * size * np.sin(2 * np.pi * freq * tau + phase + 0.6) * burst
        rotvec[:, 0] = 0.12 * amplitude * np.sin(2 * np.pi * freq * tau + phase + 0.3) * burst
    elif kind == "pull":
        period = rng.uniform(1.4, 2.4) / tempo
        cycle = np.mod(tau / period + rng.uniform(0, 0.3), 1.0)
        pull = np.where((cycle > 0.2) & (cycle < 0.9), np.sin(np.pi * (cycle - 0.2) / 0.7) ** 2, 0.0)
        local[:, 2] = 0.035 * amplitude * pull
        local[:, 1] = -0.02 * amplitude * pull
        rotvec[:, 1] = 0.25 * amplitude * pull
        rotvec[:, 0] = 0.15 * amplitude * pull
    elif kind == "pinch":
        freq = rng.uniform(0.8, 1.4) * tempo
        squeeze = np.maximum(np.sin(2 * np.pi * freq * tau + rng.uniform(0, 2 * np.pi)), 0.0) ** 2
        rotvec[:, 1] = 0.18 * amplitude * squeeze
        rotvec[:, 0] = 0.08 * amplitude * squeeze
        local[:, 2] = 0.004 * amplitude * squeeze
    elif kind == "wave":
        freq = rng.uniform(1.2, 2.0) * tempo
        swing = np.sin(2 * np.pi * freq * tau + rng.uniform(0, 2 * np.pi))
        rotvec[:, 2] = 0.55 * amplitude * swing
        local[:, 0] = 0.07 * amplitude * swing
    elif kind in ("write_air", "write_leg"):
        in_air = kind == "write_air"
        size = (0.04 if in_air else 0.012) * amplitude
        f_high = (1.6 if in_air else 2.0) * tempo
        path = _smooth_noise(rng, tau, 2, 0.4 * tempo, f_high, n_terms=3) * size
        drift = (0.15 if in_air else 0.05) * amplitude * (u - 0.5)
        if in_air:  # the frontal plane: across (x) and up (z) of a forward-pointing forearm
            local[:, 0] = path[:, 0] + drift
            local[:, 2] = path[:, 1]
        else:  # the thigh's surface plane
            local[:, 0] = path[:, 0] + drift
            local[:, 1] = path[:, 1]
        rotvec[:, 2] = 1.5 * path[:, 0]
        rotvec[:, 0] = 1.5 * path[:, 1]
    elif kind == "drink":
        tilt = _bump(u, rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.35), 0.25)
        rotvec[:, 0] = -1.0 * amplitude * tilt
        local[:, 1] = 0.04 * amplitude * tilt
    elif kind == "text":
        rate = 3.0 * tempo
        n_taps = rng.poisson(rate * duration) + 1
        tap_times = np.sort(rng.uniform(0, duration, size=n_taps))
        taps = np.exp(-0.5 * ((tau[:, None] - tap_times[None, :]) / 0.05) ** 2).sum(axis=1)
        local[:, 2] = -0.004 * amplitude * taps
        rotvec[:, 0] = 0.05 * amplitude * taps
        rotvec += 0.05 * _smooth_noise(rng, tau, 3, 0.1, 0.5)
    elif kind == "tray":
        rummage = _smooth_noise(rng, tau, 3, 0.5, 2.5) * (1.0 - min_jerk((u - 0.6) / 0.15))[:, None]
        local += 0.015 * amplitude * rummage
        rotvec += 0.12 * amplitude * rummage
        lift = min_jerk((u - 0.65) / 0.3)
        body += 0.15 * amplitude * lift[:, None] * up
        rotvec[:, 0] += 0.3 * amplitude * lift
    elif kind == "glasses":
        away = _bump(u, rng.uniform(0.05, 0.15), rng.uniform(0.25, 0.35), rng.uniform(0.1, 0.2), 0.3)
        body[:, 0] = 0.15 * amplitude * away
        body[:, 2] = -0.08 * amplitude * away
        rotvec[:, 1] = 0.4 * amplitude * away
    elif kind == "pull_air":
        period = rng.uniform(1.3, 2.2) / tempo
        sweep = 0.5 - 0.5 * np.cos(2 * np.pi * tau / period)
        body[:, 0] = -0.22 * amplitude * sweep
        body[:, 2] = 0.05 * amplitude * sweep
        rotvec[:, 0] = 0.5 * amplitude * sweep
    else:
        raise ValueError(f"unknown motion {kind!r}")
    fade_in = min_jerk(tau / 0.3)[:, None]
    return local * fade_in, body * fade_in, rotvec * fade_in


# ================================================================== subjects
@dataclass(frozen=True)
class SubjectProfile:
    """Demographics plus the subject's personal style and sensor offsets."""

    subject: str
    adult_child: int
    age: int
    sex: int
    handedness: int  # 0 left / 1 right
    height_cm: float
    shoulder_to_wrist_cm: float
    elbow_to_wrist_cm: float
    rotated_device: bool
    scale: float  # body size relative to a 170 cm adult
    tempo: float
    amplitude: float
    length_log_offset: float
    heading: float  # yaw of the room frame of the sensor fusion
    ambient_c: float
    skin_c: float
    thm_offsets: np.ndarray  # (5,)
    tof_gain: float
    acc_bias: np.ndarray  # (3,)
    pose_offsets: np.ndarray  # (51, 3) position offsets per gesture x orientation pair
    pose_rotations: np.ndarray  # (51, 3) rotation vectors per pair

    def demographics_row(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "adult_child": self.adult_child,
            "age": self.age,
            "sex": self.sex,
            "handedness": self.handedness,
            "height_cm": self.height_cm,
            "shoulder_to_wrist_cm": self.shoulder_to_wrist_cm,
            "elbow_to_wrist_cm": self.elbow_to_wrist_cm,
        }


def _round_half(value: float) -> float:
    return float(np.round(value * 2.0) / 2.0)


def make_subject(
    subject: str, left_handed: bool, rotated_device: bool, rng: np.random.Generator
) -> SubjectProfile:
    """Draw a subject: age, sex, body size (correlated) and personal style."""
    adult = rng.random() < 0.5
    if adult:
        age = int(min(53, 18 + np.floor(rng.gamma(1.6, 7.0))))
    else:
        age = int(rng.integers(10, 18))
    sex = int(rng.random() < 0.5)
    if age >= 18:
        height = (163.0 if sex == 0 else 176.0) + rng.normal(0, 7.0)
    else:
        height = 138.0 + (age - 10) * 4.2 + (3.0 if sex else 0.0) + rng.normal(0, 6.0)
    height = float(np.clip(_round_half(height), 135.0, 190.5))
    shoulder = float(np.clip(_round_half(height * 0.335 + rng.normal(0, 2.2)), 41.0, 71.0))
    elbow = float(np.clip(_round_half(height * 0.16 + rng.normal(0, 1.6)), 18.0, 44.0))
    n_pairs = len(GESTURE_ORIENTATION_PAIRS)
    tempo = float(np.exp(rng.normal(0, 0.15)))
    return SubjectProfile(
        subject=subject,
        adult_child=int(age >= 18),
        age=age,
        sex=sex,
        handedness=0 if left_handed else 1,
        height_cm=height,
        shoulder_to_wrist_cm=shoulder,
        elbow_to_wrist_cm=elbow,
        rotated_device=rotated_device,
        scale=height / 170.0,
        tempo=tempo,
        amplitude=float(np.exp(rng.normal(0, 0.25))),
        length_log_offset=float(-0.6 * np.log(tempo) + rng.normal(0, 0.12)),
        heading=float(rng.uniform(-np.pi, np.pi)),
        ambient_c=float(rng.uniform(24.0, 28.5)),
        skin_c=float(rng.uniform(32.0, 35.5)),
        thm_offsets=rng.normal(0, 0.4, size=NUM_THERMOPILES),
        tof_gain=float(rng.uniform(0.9, 1.1)),
        acc_bias=rng.normal(0, 0.05, size=3),
        pose_offsets=rng.normal(0, SUBJECT_POSE_POSITION_SD, size=(n_pairs, 3)),
        pose_rotations=rng.normal(0, SUBJECT_POSE_ROTATION_SD, size=(n_pairs, 3)),
    )


# ================================================================== one sequence
@dataclass(frozen=True)
class SimulatedSequence:
    """One sequence: sensor rows (T, 332) in SENSOR_COLUMNS order and its labels."""

    sensors: np.ndarray
    gesture: str
    orientation: str
    behaviors: np.ndarray  # (T,) indices into schema.BEHAVIORS


def _sequence_segments(profile: SubjectProfile, rng: np.random.Generator) -> tuple[int, int, int]:
    """Rows of the transition, the pause and the gesture; independent of the gesture."""
    excess = np.exp(rng.normal(LENGTH_LOG_MEDIAN + profile.length_log_offset, LENGTH_LOG_SIGMA))
    length = int(np.clip(MIN_SEQUENCE_LENGTH + np.round(excess), MIN_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH))
    n_gesture = max(8, round(rng.uniform(0.35, 0.55) * length))
    n_pause = max(2, round(rng.uniform(0.05, 0.15) * length))
    return length - n_gesture - n_pause, n_pause, n_gesture


def _tof_depths(
    origins: np.ndarray,
    rays: np.ndarray,
    scene: BodyScene,
    sphere_centres: np.ndarray,
    sphere_radii: np.ndarray,
    sphere_near: np.ndarray,
) -> np.ndarray:
    """Distance (m, inf when nothing is hit) along every ray: origins (T, 5, 3), rays (T, 5, 64, 3).

    ``sphere_near`` (T, K): rows where sphere k can be within range; others are skipped.
    """
    depth = np.full(rays.shape[:3], np.inf, dtype=rays.dtype)
    for k in range(len(sphere_radii)):
        rows = np.flatnonzero(sphere_near[:, k])
        if rows.size == 0:
            continue
        to_centre = (sphere_centres[rows, k, None, :] - origins[rows]).astype(rays.dtype)  # (R, 5, 3)
        along = (rays[rows] @ to_centre[..., None])[..., 0]  # (R, 5, 64)
        c2 = (np.einsum("tsc,tsc->ts", to_centre, to_centre) - sphere_radii[k] ** 2)[:, :, None]
        disc = along * along - c2
        hit = (disc >= 0) & ((along > 0) | (c2 < 0))
        hit_depth = np.where(c2 < 0, 0.0, along - np.sqrt(np.maximum(disc, 0.0)))
        depth[rows] = np.minimum(depth[rows], np.where(hit, hit_depth, np.inf))
    for normal, offset in zip(scene.plane_normals, scene.plane_offsets, strict=True):
        height = origins @ normal - offset  # (T, 5): > 0 on the subject's side
        facing = rays @ normal.astype(rays.dtype)  # (T, 5, 64): < 0 when the ray goes towards the plane
        plane_depth = np.where(facing < -1e-6, height[:, :, None] / np.maximum(-facing, 1e-6), np.inf)
        np.minimum(depth, np.where(height[:, :, None] > 0, plane_depth, 0.0), out=depth)
    return depth


def _thermopile_signal(
    origins: np.ndarray,
    pointing: np.ndarray,
    scene: BodyScene,
    sphere_centres: np.ndarray,
    sphere_radii: np.ndarray,
    sphere_warmth: np.ndarray,
) -> np.ndarray:
    """Warmth seen by each thermopile (T, 5): view factors of the surfaces times their warmth."""
    to_centre = sphere_centres[:, None, :, :] - origins[:, :, None, :]  # (T, 5, K, 3)
    distance = np.linalg.norm(to_centre, axis=-1)
    cosine = np.einsum("tsc,tskc->tsk", pointing, to_centre) / np.maximum(distance, 1e-6)
    angular = np.clip(sphere_radii / np.maximum(distance, 1e-6), 0.0, 1.0) ** 2
    facing = np.clip(cosine + 0.3, 0.0, 1.0) ** 1.5
    view = angular * facing
    signal = (view * sphere_warmth).sum(axis=-1) / (1.0 + view.sum(axis=-1))
    for normal, offset, warmth in zip(
        scene.plane_normals, scene.plane_offsets, scene.plane_warmth, strict=True
    ):
        height = np.maximum(origins @ normal - offset, 0.02)
        facing_plane = np.clip(-(pointing @ normal), 0.0, 1.0)
        signal = signal + warmth * facing_plane * np.clip(0.15 / height, 0.0, 1.0)
    return signal


def simulate_sequence(
    profile: SubjectProfile, pair_index: int, behavior: str, rng: np.random.Generator
) -> SimulatedSequence:
    """Simulate one sequence of ``profile`` for GESTURE_ORIENTATION_PAIRS[pair_index], right-handed."""
    gesture, orientation = GESTURE_ORIENTATION_PAIRS[pair_index]
    model = GESTURE_MODELS[gesture]
    scale = profile.scale
    n_transition, n_pause, n_gesture = _sequence_segments(profile, rng)
    length = n_transition + n_pause + n_gesture

    # ---- scene: body orientation (with a per-sequence wobble), surfaces, poses
    body_q = quat_multiply(
        BODY_QUATERNIONS[orientation], quat_from_rotvec(rng.normal(0, BODY_ROTATION_SD, 3))
    )
    scene = _body_scene(orientation, body_q, scale, with_tray=model.motion == "tray")
    target_position, target_q = _target_pose(model, scene, scale)
    target_position = target_position + profile.pose_offsets[pair_index] * scale
    target_position = target_position + rng.normal(0, SEQUENCE_POSE_POSITION_SD, 3)
    target_q = quat_multiply(
        target_q,
        quat_from_rotvec(profile.pose_rotations[pair_index] + rng.normal(0, SEQUENCE_POSE_ROTATION_SD, 3)),
    )
    target_position = _clear_of_body(target_position, scene, scale)
    start_position, start_q = _rest_pose(orientation, scene, scale, behavior, rng)
    start_position = _clear_of_body(start_position, scene, scale)
    tempo = profile.tempo * float(np.exp(rng.normal(0, 0.08)))
    amplitude = profile.amplitude * float(np.exp(rng.normal(0, 0.15)))

    # ---- wrist trajectory on the fine grid (torso frame)
    fine_dt = DT / OVERSAMPLE
    n_fine = length * OVERSAMPLE
    t_fine = np.arange(n_fine) * fine_dt
    transition_end = n_transition * DT
    gesture_start = (n_transition + n_pause) * DT
    hold = rng.uniform(0.0, 0.3) * transition_end
    reach = min_jerk((t_fine - hold) / max(transition_end - hold, DT))
    arc = np.sin(np.pi * reach)[:, None] * (rng.normal(0, 0.04, 3) + 0.05 * scene.up)
    position = start_position + reach[:, None] * (target_position - start_position) + arc
    target_matrix = quat_to_matrix(target_q)
    tau = np.maximum(t_fine - gesture_start, 0.0)
    in_gesture = (t_fine >= gesture_start)[:, None]
    local, body_shift, motion_rotvec = _motion(
        model.motion, tau, n_gesture * DT, tempo, amplitude, rng, scene.up
    )
    position = position + in_gesture * (local @ target_matrix.T + body_shift)
    tremor_weights = rng.normal(0, 1, size=2)
    position = position + TREMOR_POSITION_M * abs(tremor_weights[0]) * _smooth_noise(rng, t_fine, 3, 0.2, 1.5)
    linear_acc = np.gradient(np.gradient(position, fine_dt, axis=0), fine_dt, axis=0)[::OVERSAMPLE]
    position = position[::OVERSAMPLE]

    # ---- device orientation at the sample times (device -> torso)
    reach_coarse = reach[::OVERSAMPLE]
    device_q = quat_slerp(start_q, target_q, reach_coarse)
    rotvec = motion_rotvec[::OVERSAMPLE] * in_gesture[::OVERSAMPLE]
    rotvec = rotvec + TREMOR_ROTATION_RAD * abs(tremor_weights[1]) * _smooth_noise(
        rng, t_fine[::OVERSAMPLE], 3, 0.2, 1.5
    )
    device_q = quat_multiply(device_q, quat_from_rotvec(rotvec))
    hand_matrix = quat_to_matrix(device_q)  # the hand's frame, whichever way the device is worn
    if profile.rotated_device:
        device_q = quat_multiply(device_q, Q_ROTATE_180_Z)
    device_matrix = quat_to_matrix(device_q)  # (T, 3, 3)

    # ---- IMU
    gravity_body = GRAVITY * scene.up
    acc = np.einsum("tji,tj->ti", device_matrix, linear_acc + gravity_body)
    acc = acc + profile.acc_bias + rng.normal(0, ACC_NOISE_SD, size=acc.shape)
    heading = profile.heading + rng.normal(0, 0.3)
    drift = np.cumsum(rng.normal(0, YAW_DRIFT_RAD_PER_SQRT_S * np.sqrt(DT), size=length))
    yaw = np.zeros((length, 3))
    yaw[:, 2] = heading + drift
    world_q = quat_multiply(quat_multiply(quat_from_rotvec(yaw), body_q), device_q)
    world_q = quat_multiply(world_q, quat_from_rotvec(rng.normal(0, ROT_NOISE_RAD, size=(length, 3))))
    world_q = world_q / np.linalg.norm(world_q, axis=1, keepdims=True)
    world_q = np.where(world_q[:, :1] < 0, -world_q, world_q)

    # ---- surfaces seen by the thermopiles and ToF (torso frame)
    centres = np.broadcast_to(scene.centres, (length, *scene.centres.shape))
    radii, warmth = scene.radii, scene.warmth
    if model.held_object is not None:
        held_centre, held_radius, held_warmth = HELD_OBJECTS[model.held_object]
        held = position + hand_matrix @ (np.asarray(held_centre) * scale)
        centres = np.concatenate([centres, held[:, None, :]], axis=1)
        radii = np.append(radii, held_radius * scale)
        warmth = np.append(warmth, held_warmth)
    pointing = np.einsum("tij,sj->tsi", device_matrix, SENSOR_POINTING)  # (T, 5, 3)
    origins = position[:, None, :] + SENSOR_OFFSET_M * pointing

    signal = _thermopile_signal(origins, pointing, scene, centres, radii, warmth)
    skin_contrast = profile.skin_c - profile.ambient_c
    temperature = (
        profile.ambient_c + 0.8 + profile.thm_offsets + skin_contrast * np.minimum(THM_GAIN * signal, 1.0)
    )
    alpha = 1.0 - np.exp(-DT / THM_TIME_CONSTANT_S)
    lagged = lfilter([alpha], [1.0, alpha - 1.0], temperature - temperature[0], axis=0) + temperature[0]
    thm = lagged + rng.normal(0, THM_NOISE_SD, size=lagged.shape)

    # only spheres that come within ToF range matter for the rays
    reach_m = (TOF_MAX_DISTANCE + 40) / TOF_UNITS_PER_M
    gap = np.linalg.norm(centres - position[:, None, :], axis=-1) - radii
    near = gap < reach_m + SENSOR_OFFSET_M
    rays = (PIXEL_DIRECTIONS_FLAT[None] @ device_matrix.transpose(0, 2, 1).astype(np.float32)).reshape(
        length, NUM_TOF_SENSORS, TOF_GRID_SIZE * TOF_GRID_SIZE, 3
    )  # (T, 5, 64, 3), torso frame
    depth = _tof_depths(origins, rays, scene, centres, radii, near)
    tof = depth * TOF_UNITS_PER_M * profile.tof_gain
    finite = np.isfinite(tof)
    tof = np.where(finite, tof, 0.0)
    tof = np.round(tof + rng.normal(0, 1, size=tof.shape) * (TOF_NOISE_SD + TOF_NOISE_PER_UNIT * tof))
    tof = np.clip(tof, 0, None)
    no_reflection = ~finite | (tof > TOF_MAX_DISTANCE) | (rng.random(tof.shape) < TOF_PIXEL_DROPOUT)
    tof = np.where(no_reflection, TOF_NO_REFLECTION, tof)

    sensors = np.empty((length, len(SENSOR_COLUMNS)), dtype=np.float64)
    sensors[:, 0:3] = np.round(acc / ACC_QUANTUM) * ACC_QUANTUM
    sensors[:, 3:7] = np.round(world_q / ROT_QUANTUM) * ROT_QUANTUM
    sensors[:, 7:12] = np.round(thm, 4)
    sensors[:, 12:] = tof.reshape(length, NUM_TOF_SENSORS * TOF_GRID_SIZE * TOF_GRID_SIZE)

    # rot drop-outs: short runs of rows
    for _ in range(rng.poisson(ROT_DROPOUT_RUNS_PER_SEQUENCE)):
        run = int(rng.integers(1, ROT_DROPOUT_MAX_RUN + 1))
        start = int(rng.integers(0, max(1, length - run)))
        sensors[start : start + run, 3:7] = np.nan

    behavior_index = BEHAVIORS.index(behavior)
    behaviors = np.concatenate(
        [
            np.full(n_transition, behavior_index),
            np.full(n_pause, BEHAVIORS.index(BEHAVIOR_AT_TARGET)),
            np.full(n_gesture, BEHAVIORS.index(BEHAVIOR_PERFORMS)),
        ]
    ).astype(np.int8)
    return SimulatedSequence(sensors, gesture, orientation, behaviors)


def simulate_subject(profile: SubjectProfile, rng: np.random.Generator) -> list[SimulatedSequence]:
    """All 102 sequences of a subject (51 pairs x 2 starting behaviours), in the file's hand frame."""
    sequences = []
    for pair_index in range(len(GESTURE_ORIENTATION_PAIRS)):
        for behavior in STARTING_BEHAVIORS:
            sequence = simulate_sequence(profile, pair_index, behavior, rng)
            if profile.handedness == 0:
                sequence = SimulatedSequence(
                    mirror_sensors(sequence.sensors),
                    sequence.gesture,
                    sequence.orientation,
                    sequence.behaviors,
                )
            sequences.append(sequence)
    return sequences


# ================================================================== the dataset
def _choose_count(rng: np.random.Generator, n_items: int, share: float) -> np.ndarray:
    """Boolean mask with round(share * n_items) randomly chosen True entries."""
    mask = np.zeros(n_items, dtype=bool)
    mask[rng.choice(n_items, size=round(share * n_items), replace=False)] = True
    return mask


def _left_handed_mask(rng: np.random.Generator, n_subjects: int) -> np.ndarray:
    """~12 % left-handed; at least one when there are 4 subjects or more."""
    if n_subjects >= 4:
        mask = np.zeros(n_subjects, dtype=bool)
        n_left = max(1, round(LEFT_HANDED_SHARE * n_subjects))
        mask[rng.choice(n_subjects, size=n_left, replace=False)] = True
        return mask
    return rng.random(n_subjects) < LEFT_HANDED_SHARE


def _apply_missing_sensors(
    sequences: list[SimulatedSequence], rng: np.random.Generator, imu_only_share: float
) -> np.ndarray:
    """Null whole sensors of some sequences in place; returns the IMU-only mask.

    IMU-only: every thermopile and ToF column null. thm_5 / tof_5 are null in THM5_MISSING_SHARE /
    TOF5_MISSING_SHARE of the sequences, the IMU-only ones included when they are fewer (train);
    otherwise (test, half IMU-only) in that share of the sequences that carry those sensors.
    """
    n = len(sequences)
    imu_only = _choose_count(rng, n, imu_only_share)
    carrying = np.flatnonzero(~imu_only)

    def whole_sensor_missing(share: float) -> np.ndarray:
        if imu_only.sum() <= share * n:
            count = round(share * n) - int(imu_only.sum())
        else:
            count = round(share * len(carrying))
        mask = imu_only.copy()
        mask[rng.choice(carrying, size=count, replace=False)] = True
        return mask

    thm5 = whole_sensor_missing(THM5_MISSING_SHARE)
    tof5 = whole_sensor_missing(TOF5_MISSING_SHARE)
    rot_missing = _choose_count(rng, n, ROT_MISSING_SEQUENCE_SHARE)
    thm5_index = SENSOR_COLUMNS.index(THM_COLUMNS[-1])
    tof5_slice = slice(SENSOR_COLUMNS.index(TOF_COLUMNS_BY_SENSOR[NUM_TOF_SENSORS][0]), len(SENSOR_COLUMNS))
    first_thm = SENSOR_COLUMNS.index(THM_COLUMNS[0])
    rot_slice = slice(SENSOR_COLUMNS.index(ROT_COLUMNS[0]), SENSOR_COLUMNS.index(ROT_COLUMNS[-1]) + 1)
    for i, sequence in enumerate(sequences):
        if thm5[i]:
            sequence.sensors[:, thm5_index] = np.nan
        if tof5[i]:
            sequence.sensors[:, tof5_slice] = np.nan
        if imu_only[i]:
            sequence.sensors[:, first_thm:] = np.nan
        if rot_missing[i]:
            sequence.sensors[:, rot_slice] = np.nan
    return imu_only


def _sensor_frame(sensors: np.ndarray) -> pl.DataFrame:
    """Sensor columns: acc/rot/thm as floats, ToF as Int16; NaN -> null."""
    frame = pl.from_numpy(sensors, schema=SENSOR_COLUMNS, orient="row")
    float_columns = IMU_COLUMNS + THM_COLUMNS
    return frame.with_columns(
        pl.col(ACC_COLUMNS + ROT_COLUMNS).fill_nan(None).cast(pl.Float64),  # exact dyadic values
        pl.col(THM_COLUMNS).fill_nan(None).cast(pl.Float32),
        pl.col(TOF_COLUMNS).fill_nan(None).cast(pl.Int16),
    ).select([pl.col(c) for c in float_columns] + [pl.col(c) for c in TOF_COLUMNS])


def _table(
    sequences: list[SimulatedSequence], sequence_ids: list[str], subjects: list[str], with_labels: bool
) -> pl.DataFrame:
    """One file's table, sequences in sequence_id order, rows in counter order."""
    order = np.argsort(np.asarray(sequence_ids), kind="stable")
    lengths = np.array([len(sequences[i].sensors) for i in order])
    row_sequence = np.repeat(np.arange(len(order)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counter = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    meta = pl.DataFrame(
        {
            "sequence_id": [sequence_ids[i] for i in order],
            "subject": [subjects[i] for i in order],
            "sequence_type": [sequence_type_of(sequences[i].gesture) for i in order],
            "orientation": [sequences[i].orientation for i in order],
            "gesture": [sequences[i].gesture for i in order],
        }
    )
    rows = meta[row_sequence].with_columns(sequence_counter=pl.Series(counter, dtype=pl.Int64))
    rows = rows.with_columns(
        row_id=pl.concat_str(
            [pl.col("sequence_id"), pl.lit("_"), pl.col("sequence_counter").cast(pl.Utf8).str.zfill(6)]
        )
    )
    if with_labels:
        behavior_codes = np.concatenate([sequences[i].behaviors for i in order])
        behavior_names = pl.Series(BEHAVIORS)[behavior_codes]
        phase_names = pl.Series([BEHAVIOR_TO_PHASE[b] for b in BEHAVIORS])[behavior_codes]
        rows = rows.with_columns(behavior=behavior_names, phase=phase_names)
    sensors = np.concatenate([sequences[i].sensors for i in order]).astype(np.float32)
    table = pl.concat([rows, _sensor_frame(sensors)], how="horizontal")
    return table.select(TRAIN_COLUMNS if with_labels else TEST_COLUMNS)


def default_workers() -> int:
    """Worker processes used by default: the CPU cores, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def _subject_task(
    task: tuple[str, bool, bool, np.random.SeedSequence],
) -> tuple[SubjectProfile, list[SimulatedSequence]]:
    """Draw and simulate one subject from its own seed (independent of every other subject)."""
    subject, left_handed, rotated_device, subject_seed = task
    rng = np.random.default_rng(subject_seed)
    profile = make_subject(subject, left_handed, rotated_device, rng)
    return profile, simulate_subject(profile, rng)


def generate_dataset(
    out_dir: Path,
    n_subjects: int = 20,
    seed: int = 0,
    n_test_subjects: int | None = None,
    workers: int | None = None,
) -> dict[str, Path]:
    """Write the five synthetic files into ``out_dir``; returns {file name: path}.

    ``n_subjects`` train subjects plus ``n_test_subjects`` separate test subjects (default
    max(2, n_subjects // 5)); every subject performs the 51 gesture x orientation pairs under both
    starting behaviours. The same arguments give byte-identical files, whatever ``workers``
    (processes simulating subjects in parallel; default :func:`default_workers`).
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    n_test = max(2, n_subjects // 5) if n_test_subjects is None else n_test_subjects
    if n_test < 1:
        raise ValueError(f"n_test_subjects must be at least 1, got {n_test}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_total = n_subjects + n_test

    ids_seed, assignment_seed, subjects_seed = np.random.SeedSequence(seed).spawn(3)
    ids_rng = np.random.default_rng(ids_seed)
    assignment_rng = np.random.default_rng(assignment_seed)
    subject_ids = [f"SUBJ_{n:06d}" for n in ids_rng.choice(ID_SPACE, size=n_total, replace=False)]
    sequence_numbers = ids_rng.choice(ID_SPACE, size=n_total * SEQUENCES_PER_SUBJECT, replace=False)
    left_handed = np.concatenate(
        [_left_handed_mask(assignment_rng, n_subjects), _left_handed_mask(assignment_rng, n_test)]
    )
    rotated = np.zeros(n_total, dtype=bool)
    if n_subjects >= ROTATED_DEVICE_MIN_SUBJECTS:
        rotated[assignment_rng.choice(n_subjects, size=ROTATED_DEVICE_SUBJECTS, replace=False)] = True

    tasks = [
        (subject_ids[i], bool(left_handed[i]), bool(rotated[i]), subject_seed)
        for i, subject_seed in enumerate(subjects_seed.spawn(n_total))
    ]
    n_workers = min(default_workers() if workers is None else max(1, workers), n_total)
    if n_workers == 1:
        results = [_subject_task(task) for task in tasks]
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as executor:
            results = list(executor.map(_subject_task, tasks))
    profiles = [profile for profile, _ in results]
    sequences = [sequence for _, subject_sequences in results for sequence in subject_sequences]
    del results
    sequence_ids = [f"SEQ_{n:06d}" for n in sequence_numbers]
    sequence_subjects = [p.subject for p in profiles for _ in range(SEQUENCES_PER_SUBJECT)]

    n_train_sequences = n_subjects * SEQUENCES_PER_SUBJECT
    train_part = slice(0, n_train_sequences)
    test_part = slice(n_train_sequences, None)
    _apply_missing_sensors(sequences[train_part], assignment_rng, TRAIN_IMU_ONLY_SHARE)
    _apply_missing_sensors(sequences[test_part], assignment_rng, TEST_IMU_ONLY_SHARE)

    paths = {
        name: out_dir / name
        for name in (TRAIN_FILE, TRAIN_DEMOGRAPHICS_FILE, TEST_FILE, TEST_DEMOGRAPHICS_FILE, TEST_LABELS_FILE)
    }
    for part, data_file, demographics_file, with_labels, subject_part in (
        (train_part, TRAIN_FILE, TRAIN_DEMOGRAPHICS_FILE, True, slice(0, n_subjects)),
        (test_part, TEST_FILE, TEST_DEMOGRAPHICS_FILE, False, slice(n_subjects, None)),
    ):
        table = _table(sequences[part], sequence_ids[part], sequence_subjects[part], with_labels)
        table.write_csv(paths[data_file])
        del table
        demographics = pl.DataFrame([p.demographics_row() for p in profiles[subject_part]])
        demographics = demographics.with_columns(
            pl.col("adult_child", "age", "sex", "handedness").cast(pl.Int64),
            pl.col("height_cm", "shoulder_to_wrist_cm", "elbow_to_wrist_cm").cast(pl.Float64),
        )
        demographics.select(DEMOGRAPHICS_COLUMNS).sort("subject").write_csv(paths[demographics_file])

    test_order = np.argsort(np.asarray(sequence_ids[test_part]), kind="stable")
    test_sequences = sequences[test_part]
    labels = pl.DataFrame(
        {
            "sequence_id": [sequence_ids[test_part][i] for i in test_order],
            "subject": [sequence_subjects[test_part][i] for i in test_order],
            "sequence_type": [sequence_type_of(test_sequences[i].gesture) for i in test_order],
            "orientation": [test_sequences[i].orientation for i in test_order],
            "gesture": [test_sequences[i].gesture for i in test_order],
        }
    )
    labels.select(TEST_LABEL_COLUMNS).write_csv(paths[TEST_LABELS_FILE])
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="output folder")
    parser.add_argument("--subjects", type=int, default=20, help="train subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--test-subjects",
        type=int,
        default=None,
        help="separate test subjects (default max(2, subjects // 5))",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes simulating subjects (default: cores, at most 4)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = generate_dataset(
        args.out,
        n_subjects=args.subjects,
        seed=args.seed,
        n_test_subjects=args.test_subjects,
        workers=args.workers,
    )
    elapsed = time.perf_counter() - started
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"done in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
