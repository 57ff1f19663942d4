"""Training augmentations (codes/common/augment.py): physical consistency and the on-the-fly path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation, Slerp

from codes.common.augment import (
    RawAugmenter,
    augmented_batch,
    flip_handedness,
    mixup_batch,
    rotate_device,
    slerp_at,
    time_stretch,
)
from codes.common.features import (
    IMU_FEATURE_NAMES,
    FeatureSettings,
    compute_step_features,
    gravity_in_body_frame,
)
from codes.common.schema import SENSOR_COLUMNS, mirror_sensors
from codes.common.sequences import FeatureNormalizer, load_sequence_table, pad_sequences
from codes.common.synthetic import quat_from_rotvec, quat_multiply
from tests.helpers import rest_sensors, write_toy_data

COLUMNS = list(SENSOR_COLUMNS)
SETTINGS = FeatureSettings()


def feature(sensors: np.ndarray, name: str) -> np.ndarray:
    """One IMU feature of a single right-handed sequence."""
    step = compute_step_features(
        sensors.astype(np.float32), np.array([0, len(sensors)]), np.array([False]), SETTINGS
    )
    return step.features[:, IMU_FEATURE_NAMES.index(name)]


def features_of(sensors: np.ndarray, names: list[str]) -> np.ndarray:
    return np.stack([feature(sensors, n) for n in names], axis=1)


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.where(q[:, :1] < 0, -q, q)


def spinning_sequence(n: int, rate: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A device turning at a constant rate (rad/step, device frame), no linear acceleration."""
    step = quat_from_rotvec(rate)
    q = [random_quaternions(1, rng)[0]]
    for _ in range(n - 1):
        q.append(quat_multiply(q[-1], step))
    q = np.array(q)
    q = np.where(q[:, :1] < 0, -q, q)
    sensors = rest_sensors(q[0], np.zeros(3), n, rng)
    sensors[:, 3:7] = q
    sensors[:, 0:3] = gravity_in_body_frame(q)  # at rest apart from the turning
    return sensors


def test_slerp_matches_scipy():
    rng = np.random.default_rng(0)
    keys = np.array([0.0, 1.0, 3.0, 4.0, 7.0])
    quaternions = random_quaternions(len(keys), rng)
    positions = np.linspace(0, 7, 50)
    ours = slerp_at(keys, quaternions, positions)
    theirs = Slerp(keys, Rotation.from_quat(quaternions, scalar_first=True))(positions)
    expected = theirs.as_quat(canonical=True, scalar_first=True)
    np.testing.assert_allclose(ours, expected, atol=1e-9)


@pytest.mark.parametrize("factor", [0.8, 1.0, 1.25])
def test_stretch_keeps_unit_quaternions_with_the_sign_convention(factor):
    rng = np.random.default_rng(1)
    sensors = spinning_sequence(60, np.array([0.05, -0.02, 0.08]), rng)
    stretched = time_stretch(sensors, COLUMNS, factor)
    assert len(stretched) == round(60 * factor)
    q = stretched[:, 3:7]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    assert (q[:, 0] >= 0).all()


def test_stretch_slows_the_motion_physically():
    """Angular velocity divides by s, a device at rest keeps zero linear acceleration, and a
    linear acceleration divides by s^2."""
    rng = np.random.default_rng(2)
    sensors = spinning_sequence(80, np.array([0.0, 0.0, 0.06]), rng)
    factor = 1.25
    stretched = time_stretch(sensors, COLUMNS, factor)
    scale = (len(stretched) - 1) / 79
    before = feature(sensors, "angular_velocity_z")[5:-5].mean()
    after = feature(stretched, "angular_velocity_z")[5:-5].mean()
    assert after == pytest.approx(before / scale, rel=1e-3)
    linear = features_of(stretched, ["linear_acc_x", "linear_acc_y", "linear_acc_z"])
    assert np.abs(linear).max() < 1e-3

    still = rest_sensors(random_quaternions(1, rng)[0], np.zeros(3), 50, rng)
    still[:, 3:7] = still[0, 3:7]
    push = np.zeros((50, 3))
    push[:, 0] = np.sin(np.linspace(0, np.pi, 50))  # m/s^2 in the device frame
    still[:, 0:3] = gravity_in_body_frame(still[:, 3:7]) + push
    stretched = time_stretch(still, COLUMNS, 2.0)
    linear = feature(stretched, "linear_acc_x")
    assert linear.max() == pytest.approx(1.0 / ((len(stretched) - 1) / 49) ** 2, rel=2e-3)


def test_stretch_keeps_missing_readings_missing():
    rng = np.random.default_rng(3)
    sensors = spinning_sequence(40, np.array([0.03, 0.0, 0.0]), rng)
    sensors[10:14, 3:7] = np.nan
    sensors[:, 7] = np.nan  # a thermopile absent throughout
    stretched = time_stretch(sensors, COLUMNS, 1.0 / 0.8)
    assert np.isnan(stretched[:, 7]).all()
    missing = np.isnan(stretched[:, 3:7]).any(axis=1)
    assert 0 < missing.sum() <= 8
    assert np.isfinite(stretched[~missing, 3:7]).all()


def test_rotation_keeps_acc_magnitude_and_zero_linear_acceleration_at_rest():
    rng = np.random.default_rng(4)
    sensors = rest_sensors(random_quaternions(1, rng)[0], np.zeros(3), 30, rng)
    sensors[:, 0:3] = gravity_in_body_frame(sensors[:, 3:7])
    sensors[:, 0:3] += rng.normal(scale=0.01, size=(30, 3))  # sensor noise
    rotation = quat_from_rotvec(np.deg2rad(10) * np.array([0.6, -0.8, 0.0]))
    rotated = rotate_device(sensors, COLUMNS, rotation)
    np.testing.assert_allclose(
        np.linalg.norm(rotated[:, 0:3], axis=1), np.linalg.norm(sensors[:, 0:3], axis=1), rtol=1e-12
    )
    assert not np.allclose(rotated[:, 0:3], sensors[:, 0:3])
    np.testing.assert_allclose(np.linalg.norm(rotated[:, 3:7], axis=1), 1.0, atol=1e-12)
    linear_before = features_of(sensors, ["linear_acc_x", "linear_acc_y", "linear_acc_z"])
    linear_after = features_of(rotated, ["linear_acc_x", "linear_acc_y", "linear_acc_z"])
    # the rotated noise, nothing more: no gravity leaks into the linear acceleration
    np.testing.assert_allclose(
        np.linalg.norm(linear_after, axis=1), np.linalg.norm(linear_before, axis=1), atol=1e-4
    )
    assert np.abs(linear_after).max() < 0.1
    np.testing.assert_array_equal(rotated[:, 7:], sensors[:, 7:])  # thermopiles and ToF untouched


def test_flipping_twice_is_the_identity():
    rng = np.random.default_rng(5)
    sensors = rest_sensors(random_quaternions(1, rng)[0], np.array([1.0, 2.0, 9.0]), 20, rng)
    sensors[3, 15] = np.nan
    once = flip_handedness(sensors, COLUMNS)
    np.testing.assert_array_equal(once, mirror_sensors(sensors))  # the data layer's mirroring
    assert not np.array_equal(once[:, 0], sensors[:, 0])
    np.testing.assert_array_equal(flip_handedness(once, COLUMNS), sensors)


def test_mixup_weights_sum_to_one_and_respect_groups():
    rng = np.random.default_rng(6)
    groups = np.array([0, 0, 1, 1, 1, 2, 0, 1])
    partner, lam = mixup_batch(8, 0.4, rng, groups)
    assert ((lam >= 0.5) & (lam <= 1)).all()
    np.testing.assert_array_equal(groups[partner.numpy()], groups)
    assert partner[5] == 5  # alone in its group
    constant = torch.full((8, 4, 3), 2.5)
    mixed = lam[:, None, None] * constant + (1 - lam[:, None, None]) * constant[partner]
    torch.testing.assert_close(mixed, constant)


@pytest.fixture(scope="module")
def toy_table(tmp_path_factory):
    data_dir = write_toy_data(tmp_path_factory.mktemp("toy"))
    return load_sequence_table(data_dir, "train", SETTINGS, use_cache=False, keep_sensors=True)


def test_a_batch_computed_on_the_fly_equals_the_cached_features(toy_table):
    assert toy_table.left_handed.any()  # the mirrored path is covered
    normalizer = FeatureNormalizer().fit(toy_table)
    indices = np.array([3, 20, 21, 40, 7, 100])
    expected = pad_sequences(toy_table.subset(indices), 64, normalizer.transform(toy_table.subset(indices)))
    rng = np.random.default_rng(0)
    got = augmented_batch(toy_table, indices, SETTINGS, normalizer, 64, None, rng)
    np.testing.assert_array_equal(got.features, expected.features)
    np.testing.assert_array_equal(got.mask, expected.mask)
    inactive = RawAugmenter(columns=COLUMNS)
    assert not inactive.active
    got = augmented_batch(toy_table, indices, SETTINGS, normalizer, 64, inactive, rng)
    np.testing.assert_array_equal(got.features, expected.features)


def test_sensors_survive_the_cache(tmp_path):
    data_dir = write_toy_data(tmp_path / "toy")
    first = load_sequence_table(data_dir, "train", SETTINGS, keep_sensors=True)  # builds, caches
    second = load_sequence_table(data_dir, "train", SETTINGS, keep_sensors=True)  # from the cache
    np.testing.assert_array_equal(first.sensors, second.sensors)
    np.testing.assert_array_equal(first.features, second.features)
    assert load_sequence_table(data_dir, "train", SETTINGS).sensors is None
    rows = first.sensors
    subset = first.subset(np.array([5, 2]))
    np.testing.assert_array_equal(
        subset.sensors,
        np.concatenate(
            [rows[first.offsets[5] : first.offsets[6]], rows[first.offsets[2] : first.offsets[3]]]
        ),
    )


def test_augmented_batches_are_reproducible_and_change_the_features(toy_table):
    normalizer = FeatureNormalizer().fit(toy_table)
    augmenter = RawAugmenter(
        columns=COLUMNS, stretch_prob=1.0, rotation_prob=1.0, flip_prob=0.5, shift_max_steps=3
    )
    indices = np.arange(12)
    plain = augmented_batch(toy_table, indices, SETTINGS, normalizer, 64, None, np.random.default_rng(0))
    first = augmented_batch(toy_table, indices, SETTINGS, normalizer, 64, augmenter, np.random.default_rng(9))
    again = augmented_batch(toy_table, indices, SETTINGS, normalizer, 64, augmenter, np.random.default_rng(9))
    np.testing.assert_array_equal(first.features, again.features)
    assert not np.array_equal(first.mask, plain.mask)  # stretched lengths
    assert np.isfinite(first.features).all()
    assert (first.features[~first.mask] == 0).all()
