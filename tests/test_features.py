"""Per-step IMU / thermopile / ToF features and the missing-value rules."""

import itertools
from functools import partial

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from codes.common.features import (
    IMU_FEATURE_NAMES,
    FeatureSettings,
    compute_step_features,
    fill_within_segments,
    gravity_in_body_frame,
    imu_features,
    relative_rotation_vectors,
    tof_summary_features,
)
from codes.common.schema import (
    ACC_QUANTUM,
    GRAVITY,
    IMU_COLUMNS,
    ROT_QUANTUM,
    SENSOR_COLUMNS,
    TOF_COLUMNS,
    mirror_sensors,
)
from codes.common.sequences import build_sequence_table
from tests.helpers import make_demographics, make_frame, rest_sensors

FEATURE = {name: i for i, name in enumerate(IMU_FEATURE_NAMES)}
LINEAR = [FEATURE[f"linear_acc_{a}"] for a in "xyz"]
ANGULAR = [FEATURE[f"angular_velocity_{a}"] for a in "xyz"]


def quantise(sensors: np.ndarray) -> np.ndarray:
    """The competition's quantisation and rot_w >= 0 convention."""
    out = sensors.copy()
    out[:, 0:3] = np.round(out[:, 0:3] / ACC_QUANTUM) * ACC_QUANTUM
    q = out[:, 3:7] * np.where(out[:, 3:4] < 0, -1.0, 1.0)
    out[:, 3:7] = np.round(q / ROT_QUANTUM) * ROT_QUANTUM
    return out


def table_of(sensor_list, settings=None, left_handed=frozenset()):
    sequences = [(f"SEQ_{i:06d}", f"SUBJ_{i:06d}", s) for i, s in enumerate(sensor_list)]
    frame = make_frame(sequences, gestures=["Wave hello"] * len(sequences))
    demographics = make_demographics([s for _, s, _ in sequences], set(left_handed))
    return build_sequence_table(frame, demographics, settings or FeatureSettings())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_linear_acceleration_at_rest_is_zero_in_any_orientation(seed):
    rng = np.random.default_rng(seed)
    rotation = Rotation.random(random_state=seed)
    acc = rotation.apply([0.0, 0.0, GRAVITY], inverse=True)
    sensors = quantise(rest_sensors(rotation.as_quat(scalar_first=True), acc, 30, rng))
    table = table_of([sensors])
    linear = table.features[:, LINEAR]
    assert np.abs(linear).max() < 0.02  # quantisation of acc (1/256) and rot (1/16384)
    assert np.allclose(table.features[:, FEATURE["acc_magnitude"]], GRAVITY, atol=0.01)


@pytest.mark.parametrize("rate_hz", [10.0, 50.0])
def test_angular_velocity_of_a_constant_rate_rotation_is_recovered(rate_hz):
    rng = np.random.default_rng(0)
    omega = np.array([0.4, -1.1, 2.0])  # rad/s, body frame
    n = 60
    start = Rotation.random(random_state=1)
    rotations = start * Rotation.from_rotvec(np.outer(np.arange(n) / rate_hz, omega))
    sensors = rest_sensors(np.zeros(4), np.zeros(3), n, rng)
    sensors[:, 3:7] = rotations.as_quat(scalar_first=True)
    sensors[:, 0:3] = rotations.apply([0.0, 0.0, GRAVITY], inverse=True)
    sensors = quantise(sensors)  # includes sign jumps where rot_w crosses 0
    table = table_of([sensors], FeatureSettings(sampling_rate_hz=rate_hz))
    angular = table.features[:, ANGULAR]
    assert np.allclose(angular[0], 0.0)  # first step: no previous reading
    assert np.allclose(angular[1:], omega, atol=0.05 * rate_hz / 10)
    distance = table.features[1:, FEATURE["angular_distance"]]
    assert np.allclose(distance, np.linalg.norm(omega) / rate_hz, atol=5e-3)
    # the stored quaternion is sign-continuous
    q = table.features[:, FEATURE["rot_w"] : FEATURE["rot_z"] + 1]
    assert (np.einsum("ij,ij->i", q[1:], q[:-1]) > 0).all()


def test_quaternion_sign_does_not_change_features():
    rng = np.random.default_rng(5)
    rotations = Rotation.random(40, random_state=2)
    sensors = rest_sensors(np.zeros(4), np.zeros(3), 40, rng)
    sensors[:, 3:7] = rotations.as_quat(scalar_first=True)
    sensors[:, 0:3] = rng.normal(size=(40, 3))
    flipped = sensors.copy()
    rows = rng.random(40) < 0.5
    flipped[rows, 3:7] *= -1
    a, b = table_of([sensors]), table_of([flipped])
    imu = a.feature_groups["imu"]
    rot = slice(FEATURE["rot_w"], FEATURE["rot_z"] + 1)
    other = [i for i in imu if i not in range(rot.start, rot.stop)]
    assert np.allclose(a.features[:, other], b.features[:, other], atol=1e-5)
    assert np.allclose(np.abs(a.features[:, rot]), np.abs(b.features[:, rot]), atol=1e-6)


def test_left_handed_wearer_is_mirrored_onto_the_right_handed_frame():
    rng = np.random.default_rng(7)
    sensors = rest_sensors(
        Rotation.random(random_state=3).as_quat(scalar_first=True), rng.normal(size=3), 25, rng
    )
    sensors[:, 0:7] += rng.normal(scale=0.05, size=(25, 7))
    left = table_of([sensors], left_handed={"SUBJ_000000"})
    right_of_mirrored = table_of([mirror_sensors(sensors)])
    assert np.allclose(left.features, right_of_mirrored.features, atol=1e-4)
    unmirrored = table_of([sensors], FeatureSettings(mirror_left_handed=False), left_handed={"SUBJ_000000"})
    assert not np.allclose(unmirrored.features, left.features, atol=1e-3)


def test_fill_never_crosses_a_sequence_boundary():
    values = np.array([[1.0], [np.nan], [3.0], [np.nan], [np.nan], [6.0], [np.nan]])
    valid = np.isfinite(values[:, 0])
    offsets = np.array([0, 3, 7])
    filled = fill_within_segments(values, valid, offsets)[:, 0]
    # sequence 1 starts missing: filled backwards from its own 6.0, not from 3.0
    assert filled.tolist() == [1.0, 1.0, 3.0, 6.0, 6.0, 6.0, 6.0]
    lonely = fill_within_segments(values[:2], np.array([False, False]), np.array([0, 2]))
    # nothing to fill from: the rows are returned unchanged, for the caller's rule
    assert np.array_equal(lonely, values[:2], equal_nan=True)


def test_missing_imu_rows_are_filled_and_marked_invalid():
    rng = np.random.default_rng(0)
    q = Rotation.random(random_state=4).as_quat(scalar_first=True)
    sensors = rest_sensors(
        q, Rotation.from_quat(q, scalar_first=True).apply([0, 0, GRAVITY], inverse=True), 12, rng
    )
    sensors[[0, 5, 6], 3:7] = np.nan
    table = table_of([sensors])
    assert table.step_valid.tolist() == [i not in (0, 5, 6) for i in range(12)]
    assert np.isfinite(table.features).all()
    assert np.abs(table.features[:, LINEAR]).max() < 1e-4


def test_a_sensor_missing_for_the_whole_sequence_is_zero_and_marked_absent():
    rng = np.random.default_rng(1)
    sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, GRAVITY]), 20, rng)
    col = {c: i for i, c in enumerate(SENSOR_COLUMNS)}
    sensors[:, col["thm_5"]] = np.nan
    sensors[:, col["tof_5_v0"] : col["tof_5_v63"] + 1] = np.nan
    imu_only = sensors.copy()
    imu_only[:, 7:] = np.nan
    no_rot = sensors.copy()
    no_rot[:, 3:7] = np.nan
    table = table_of([sensors, imu_only, no_rot])
    names = table.feature_names
    absent_0 = {names[i] for i in np.flatnonzero(~table.feature_present[0])}
    assert absent_0 == {"thm_5", "tof_5_mean", "tof_5_std", "tof_5_min", "tof_5_no_reflection_fraction"}
    for name in absent_0:
        assert (table.sequence_features(0)[:, names.index(name)] == 0).all()
    assert table.imu_only.tolist() == [False, True, False]
    assert (table.sequence_features(1)[:, len(IMU_FEATURE_NAMES) :] == 0).all()
    # a quaternion absent throughout becomes the identity: finite features, invalid steps
    assert np.isfinite(table.features).all()
    assert not table.step_valid[table.offsets[2] :].any()


def test_tof_no_reflection_counts_as_beyond_range():
    rng = np.random.default_rng(2)
    sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, GRAVITY]), 5, rng)
    col = {c: i for i, c in enumerate(SENSOR_COLUMNS)}
    sensors[:, col["tof_1_v0"] : col["tof_1_v63"] + 1] = -1
    sensors[:, col["tof_2_v0"] : col["tof_2_v63"] + 1] = 100
    sensors[:, col["tof_2_v0"]] = -1
    table = table_of([sensors])
    f = {n: table.features[0, i] for i, n in enumerate(table.feature_names)}
    assert f["tof_1_mean"] == 255 and f["tof_1_no_reflection_fraction"] == 1.0
    assert f["tof_2_min"] == 100 and f["tof_2_no_reflection_fraction"] == pytest.approx(1 / 64)
    assert f["tof_2_mean"] == pytest.approx((63 * 100 + 255) / 64)
    raw = table_of([sensors], FeatureSettings(tof_mode="raw"))
    assert len(raw.feature_groups["tof"]) == 320
    assert raw.features[0, raw.feature_names.index("tof_1_v3")] == 255


def test_feature_settings_validate():
    with pytest.raises(ValueError, match="tof_mode"):
        FeatureSettings(tof_mode="pixels")
    assert FeatureSettings(use_thm=False, tof_mode="none").sensor_columns == SENSOR_COLUMNS[:7]


# ---------------------------------------------------------------- closed-form IMU math vs scipy
def scipy_imu_features(acc, quaternions, offsets, rate_hz):
    """The IMU features computed with scipy ``Rotation`` objects (the reference)."""
    quaternions = quaternions.copy()
    for start, end in itertools.pairwise(offsets):  # sign continuity, one step at a time
        for t in range(start + 1, end):
            if quaternions[t] @ quaternions[t - 1] < 0:
                quaternions[t] *= -1
    rotation = Rotation.from_quat(quaternions, scalar_first=True)
    linear = acc - rotation.apply([0.0, 0.0, GRAVITY], inverse=True)
    previous = np.roll(quaternions, 1, axis=0)
    previous[offsets[:-1]] = quaternions[offsets[:-1]]
    rotvec = (Rotation.from_quat(previous, scalar_first=True).inv() * rotation).as_rotvec()

    def jerk(values):
        diff = np.diff(values, axis=0, prepend=values[:1])
        diff[offsets[:-1]] = 0
        return np.linalg.norm(diff, axis=1, keepdims=True) * rate_hz

    norm = partial(np.linalg.norm, axis=1, keepdims=True)
    return np.concatenate(
        [
            *(acc, quaternions, linear, rotvec * rate_hz, norm(rotvec), norm(acc), norm(linear)),
            *(norm(rotvec * rate_hz), jerk(acc), jerk(linear)),
        ],
        axis=1,
    )


def random_quaternion_sequences(rng, lengths):
    """Unit quaternions with random signs: random jumps, slow drifts (angles below 1e-3 rad, the
    Taylor branch), repeats (zero rotation) and near half turns (an exact half turn has two
    rotation vectors, +-pi times the axis, and rounding picks one)."""
    n = sum(lengths)
    q = Rotation.random(n, random_state=int(rng.integers(2**31))).as_quat(scalar_first=True)
    for share, angle in ((0.3, 2e-4), (0.1, 0.0), (0.05, np.pi - 0.05)):
        rows = np.flatnonzero(rng.random(n) < share)
        rows = rows[rows > 0]
        axes = rng.normal(size=(len(rows), 3))
        steps = Rotation.from_rotvec(angle * axes / np.linalg.norm(axes, axis=1, keepdims=True))
        q[rows] = (Rotation.from_quat(q[rows - 1], scalar_first=True) * steps).as_quat(scalar_first=True)
    q *= np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None]
    return q


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_closed_form_imu_math_matches_scipy_rotation(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=5)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    q = random_quaternion_sequences(rng, lengths)
    acc = rng.normal(scale=5.0, size=(len(q), 3))
    rotation = Rotation.from_quat(q, scalar_first=True)
    assert np.allclose(gravity_in_body_frame(q), rotation.apply([0, 0, GRAVITY], inverse=True), atol=1e-12)
    previous = np.roll(q, 1, axis=0)
    expected = (Rotation.from_quat(previous, scalar_first=True).inv() * rotation).as_rotvec()
    assert np.allclose(relative_rotation_vectors(previous, q), expected, rtol=1e-9, atol=1e-12)
    ours = imu_features(acc, q, offsets, 10.0)
    reference = scipy_imu_features(acc, q, offsets, 10.0)
    assert ours.dtype == np.float32
    assert np.allclose(ours, reference.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_imu_features_with_missing_rows_match_scipy_on_the_filled_readings():
    """NaN rows (filled within the sequence), an all-zero quaternion (missing), a sequence without
    any quaternion (identity) and a left-handed wearer, against the scipy reference."""
    rng = np.random.default_rng(11)
    lengths = [30, 12, 25]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = offsets[-1]
    sensors = np.zeros((n, len(IMU_COLUMNS)))
    sensors[:, 3:7] = random_quaternion_sequences(rng, lengths)
    sensors[:, 0:3] = rng.normal(scale=5.0, size=(n, 3))
    sensors[[0, 5, 6, 29], 3:7] = np.nan  # first and last rows of sequence 0 among them
    sensors[7, 3:7] = 0.0  # no quaternion is all zeros: missing
    sensors[[3, 4], 0] = np.nan
    sensors[30:42, 3:7] = np.nan  # sequence 1: no quaternion at all
    left = np.array([False, False, True])
    imu_settings = FeatureSettings(use_thm=False, tof_mode="none")
    ours = compute_step_features(sensors, offsets, left, imu_settings).features

    filled = sensors.copy()
    filled[offsets[2] :] = mirror_sensors(sensors[offsets[2] :], IMU_COLUMNS)  # the left-handed one
    filled[7, 3:7] = np.nan
    for start, end in itertools.pairwise(offsets):  # forward fill, then backward fill
        for columns in (slice(0, 3), slice(3, 7)):
            rows = list(range(start, end))
            for order in (rows, rows[::-1]):
                last = None
                for t in order:
                    if not np.isnan(filled[t, columns]).any():
                        last = filled[t, columns]
                    elif last is not None:
                        filled[t, columns] = last
    filled[30:42, 3:7] = [1.0, 0.0, 0.0, 0.0]
    q = filled[:, 3:7] / np.linalg.norm(filled[:, 3:7], axis=1, keepdims=True)
    reference = scipy_imu_features(filled[:, 0:3], q, offsets, 10.0)
    assert np.allclose(ours, reference.astype(np.float32), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- ToF dtypes
def test_tof_summary_is_the_same_for_integer_and_float_grids():
    rng = np.random.default_rng(3)
    grid = rng.integers(-1, 255, size=(500, 64)).astype(np.int16)
    grid[rng.random(500) < 0.3] = -1
    expected = tof_summary_features(grid.astype(np.float32))
    assert np.array_equal(tof_summary_features(grid), expected)  # the uint8 path
    assert np.array_equal(tof_summary_features(np.asfortranarray(grid)), expected)
    wide = grid.copy()
    wide[0, 0] = 300  # outside the sensor's range: the general path, still distance 300
    assert tof_summary_features(wide)[0, 2] == min(
        300, grid[0, 1:].min() if (grid[0, 1:] >= 0).all() else 255
    )
    assert np.array_equal(tof_summary_features(wide), tof_summary_features(wide.astype(np.float32)))


def test_integer_tof_columns_give_the_same_features_as_float_ones():
    rng = np.random.default_rng(4)
    lengths = [20, 35, 9]
    sensor_list = []
    for n in lengths:
        s = rest_sensors(
            Rotation.random(random_state=int(rng.integers(100))).as_quat(scalar_first=True),
            rng.normal(size=3),
            n,
            rng,
        )
        s[rng.random(n) < 0.2, 12:] = np.nan  # dropped ToF frames
        sensor_list.append(s)
    sensor_list[2][:, 12 + 4 * 64 :] = np.nan  # tof_5 absent from a sequence
    sequences = [(f"SEQ_{i:06d}", f"SUBJ_{i % 2:06d}", s) for i, s in enumerate(sensor_list)]
    frame = make_frame(sequences, gestures=["Wave hello"] * len(sequences))
    demographics = make_demographics(["SUBJ_000000", "SUBJ_000001"], {"SUBJ_000001"})
    integer = frame.with_columns(pl.col(TOF_COLUMNS).cast(pl.Int16))
    for tof_mode in ("summary", "raw"):
        expected = build_sequence_table(frame, demographics, FeatureSettings(tof_mode=tof_mode))
        table = build_sequence_table(integer, demographics, FeatureSettings(tof_mode=tof_mode))
        assert np.array_equal(table.features, expected.features)
        assert np.array_equal(table.feature_present, expected.feature_present)


@pytest.mark.parametrize("tof_mode", ["summary", "raw"])
def test_pieces_threads_and_input_kinds_do_not_change_the_features(monkeypatch, tof_mode):
    """Numpy input, a polars frame with float ToF and one with int16 ToF; one piece or many
    (cut at sequence boundaries), one thread or two: the same features."""
    rng = np.random.default_rng(8)
    lengths = rng.integers(1, 60, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.zeros(3), int(offsets[-1]), rng)
    sensors[:, 0:7] += rng.normal(scale=0.3, size=(len(sensors), 7))
    sensors[rng.random(len(sensors)) < 0.1, 3:7] = np.nan
    sensors[rng.random(len(sensors)) < 0.1, 12 + 64 : 12 + 128] = np.nan  # tof_2 frames dropped
    sensors[offsets[3] : offsets[5], 12:] = np.nan  # two IMU-only sequences
    left = rng.random(len(lengths)) < 0.4
    settings = FeatureSettings(tof_mode=tof_mode)
    expected = compute_step_features(sensors, offsets, left, settings, n_threads=1)
    frame = pl.DataFrame(sensors, schema=SENSOR_COLUMNS).fill_nan(None)
    integer = frame.with_columns(pl.col(TOF_COLUMNS).cast(pl.Int16))
    monkeypatch.setattr("codes.common.features.PIECE_ROWS", 97)
    for values in (sensors, frame, integer):
        for n_threads in (1, 2):
            step = compute_step_features(values, offsets, left, settings, n_threads=n_threads)
            assert np.array_equal(step.features, expected.features)
            assert np.array_equal(step.step_valid, expected.step_valid)
            assert np.array_equal(step.feature_present, expected.feature_present)
