"""Per-step IMU / thermopile / ToF features and the missing-value rules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from codes.common.features import IMU_FEATURE_NAMES, FeatureSettings, fill_within_segments
from codes.common.schema import ACC_QUANTUM, GRAVITY, ROT_QUANTUM, SENSOR_COLUMNS, mirror_sensors
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
