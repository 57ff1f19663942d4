"""The real-IMU benchmark's conversion (benchmarks/real_imu.py) on small synthetic arrays.

No seglearn or aeon needed: recordings are made up here, in load_watch's layout (acc in g, gyro
in rad/s, 50 Hz).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.spatial.transform import Rotation

from benchmarks import real_imu
from codes.common.features import FeatureSettings, gravity_in_body_frame, relative_rotation_vectors
from codes.common.folds import read_fold_file
from codes.common.schema import GESTURES, GRAVITY, TARGET_GESTURES, TEST_COLUMNS, TRAIN_COLUMNS
from codes.common.sequences import load_sequence_table

RATE = real_imu.SAMPLING_RATE_HZ


def _still(rotation: Rotation, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """acc (m/s^2) and gyro of a device held still in ``rotation`` (sensor -> world)."""
    acc = rotation.apply([0.0, 0.0, GRAVITY], inverse=True)
    return np.tile(acc, (steps, 1)), np.zeros((steps, 3))


def _rotating(
    rate: np.ndarray, steps: int, start: Rotation | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """A device turning at the constant body-frame ``rate`` (rad/s), no linear acceleration."""
    start = start or Rotation.identity()
    orientations = [start * Rotation.from_rotvec(rate * t / RATE) for t in range(steps)]
    acc = np.stack([o.apply([0.0, 0.0, GRAVITY], inverse=True) for o in orientations])
    return acc, np.tile(rate, (steps, 1)), orientations


def test_still_device_unit_quaternions_and_zero_linear_acceleration():
    for seed in range(5):
        rotation = Rotation.random(random_state=seed)
        acc, gyro = _still(rotation, 150)
        q = real_imu.complementary_filter(acc, gyro)
        assert q.shape == (150, 4)
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
        # the codes' linear acceleration: acc - R(q)^T (0, 0, g)
        np.testing.assert_allclose(acc - gravity_in_body_frame(q), 0.0, atol=1e-9)


def test_tilt_error_decays_towards_the_measured_acceleration():
    rotation = Rotation.random(random_state=7)
    acc, gyro = _still(rotation, 500)  # 10 s
    wrong = (rotation * Rotation.from_rotvec([0.5, 0.0, 0.0])).as_quat(scalar_first=True)
    q = real_imu.complementary_filter(acc, gyro, initial=wrong)
    error = np.linalg.norm(acc - gravity_in_body_frame(q), axis=1)
    assert error[0] > 4.0  # about 0.5 rad of tilt
    assert error[-1] < 1e-3 * error[0]


@pytest.mark.parametrize("axis", [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.3, -0.5, 0.8)])
def test_constant_rotation_rate_integrates_to_the_right_angle(axis):
    rate = 1.0 * np.asarray(axis) / np.linalg.norm(axis)  # 1 rad/s
    acc, gyro, truth = _rotating(rate, 51)  # 1 s: 1 rad
    q = real_imu.complementary_filter(acc, gyro, initial=truth[0].as_quat(scalar_first=True))
    turned = Rotation.from_quat(q[0], scalar_first=True).inv() * Rotation.from_quat(q[-1], scalar_first=True)
    np.testing.assert_allclose(turned.magnitude(), 1.0, atol=1e-9)
    np.testing.assert_allclose(turned.as_rotvec(), rate, atol=1e-9)
    # the codes' angular velocity, from consecutive quaternions, is the gyroscope's reading
    np.testing.assert_allclose(relative_rotation_vectors(q[:-1], q[1:]) * RATE, gyro[1:], atol=1e-9)
    np.testing.assert_allclose(acc - gravity_in_body_frame(q), 0.0, atol=1e-8)


def test_tilt_quaternion_maps_the_vector_to_up():
    rng = np.random.default_rng(0)
    up = np.concatenate([rng.normal(size=(20, 3)), [[0.0, 0.0, -2.0], [0.0, 0.0, 3.0]]])
    q = real_imu.tilt_quaternion(up)
    np.testing.assert_allclose(
        gravity_in_body_frame(q) / GRAVITY, up / np.linalg.norm(up, axis=1, keepdims=True), atol=1e-12
    )


def test_windows_are_200_steps_every_100():
    np.testing.assert_array_equal(real_imu.window_starts(650), [0, 100, 200, 300, 400])
    np.testing.assert_array_equal(real_imu.window_starts(600), [0, 100, 200, 300, 400])
    assert len(real_imu.window_starts(199)) == 0


def _fake_recordings(
    persons=range(1, 11), exercises=("ABD", "PEN"), steps=310, seed=0
) -> real_imu.Recordings:
    """Still-ish recordings (a little gyro noise) of every person x arm x exercise."""
    rng = np.random.default_rng(seed)
    signals, person_ids, sides, names = [], [], [], []
    for person in persons:
        for side in (0, 1):
            for exercise in exercises:
                rotation = Rotation.random(random_state=int(rng.integers(1 << 30)))
                acc, gyro = _still(rotation, steps)
                signals.append(
                    np.concatenate([acc / GRAVITY, gyro + rng.normal(0, 1e-3, gyro.shape)], axis=1)
                )
                person_ids.append(person)
                sides.append(side)
                names.append(exercise)
    return real_imu.Recordings(signals, np.array(person_ids), np.array(sides), names)


@pytest.fixture(scope="module")
def converted():
    return real_imu.convert_recordings(_fake_recordings())


def test_reserved_persons_are_never_in_the_output(converted):
    subjects = set(converted.train["subject"].unique().to_list())
    assert subjects == {real_imu.subject_name(p, s) for p in range(1, 8) for s in (0, 1)}
    assert set(converted.test["subject"].to_list()) <= subjects
    assert set(converted.train_demographics["subject"].to_list()) == subjects
    assert set(converted.folds["subject"].to_list()) == subjects
    assert converted.info["persons"] == list(range(1, 8))
    kept = real_imu.keep_benchmark_persons(_fake_recordings(persons=[3, 8, 9, 10]))
    assert kept.persons.tolist() == [3] * 4 and len(kept.signals) == 4
    with pytest.raises(ValueError, match="no recording"):
        real_imu.convert_recordings(_fake_recordings(persons=[8, 9, 10]))


def test_sequences_are_windows_with_counters(converted):
    train = converted.train
    assert train.columns == TRAIN_COLUMNS and converted.test.columns == TEST_COLUMNS
    # 7 persons x 2 arms x 2 exercises, 310 steps: windows at 0 and 100
    assert train["sequence_id"].n_unique() == 7 * 2 * 2 * 2
    counters = train.group_by("sequence_id").agg(pl.col("sequence_counter"))["sequence_counter"]
    assert all(c.to_list() == list(range(200)) for c in counters)
    assert train.filter(pl.col("sequence_counter") == 5)["row_id"][0].endswith("_000005")
    assert (
        train.select(real_imu.THM_COLUMNS + real_imu.TOF_COLUMNS[:3]).null_count().row(0) == (len(train),) * 8
    )
    assert set(train["gesture"].unique().to_list()) == {"Above ear - pull hair", "Wave hello"}
    assert set(train["sequence_type"].unique().to_list()) == {"Target", "Non-Target"}


def test_gesture_map_is_4_targets_and_3_non_targets():
    gestures = list(real_imu.EXERCISE_TO_GESTURE.values())
    assert len(set(gestures)) == 7 and set(gestures) <= set(GESTURES)
    assert sum(g in TARGET_GESTURES for g in gestures) == 4


def test_folds_group_both_arms_of_a_person(converted):
    folds = dict(converted.folds.iter_rows())
    assert sorted(set(folds.values())) == [0, 1, 2, 3, 4]
    for person in range(1, 8):
        assert folds[f"W{person:02d}L"] == folds[f"W{person:02d}R"]
    assert real_imu.person_folds(range(1, 8)) == real_imu.person_folds([7, 6, 5, 4, 3, 2, 1, 1])
    with pytest.raises(ValueError, match="at least 5 persons"):
        real_imu.person_folds([1, 2, 3])


def test_converted_files_read_back_through_the_readers(converted, tmp_path):
    real_imu.write_converted(converted, tmp_path)
    table = load_sequence_table(tmp_path, "train", FeatureSettings(sampling_rate_hz=RATE))
    assert table.n_sequences == 56 and (table.lengths == 200).all() and table.imu_only.all()
    assert set(table.subjects.tolist()) == set(converted.folds["subject"].to_list())
    names = table.feature_names
    linear = table.features[:, [names.index(f"linear_acc_{a}") for a in "xyz"]]
    assert np.abs(linear).max() < 0.05  # still devices: quantisation only
    acc = np.linalg.norm(table.features[:, [names.index(f"acc_{a}") for a in "xyz"]], axis=1)
    np.testing.assert_allclose(acc, GRAVITY, atol=0.01)
    test = load_sequence_table(tmp_path, "test", FeatureSettings(sampling_rate_hz=RATE))
    assert test.n_sequences == 14
    folds = read_fold_file(tmp_path / "folds.csv", table.subjects)
    persons = np.array([real_imu.person_of_subject(s) for s in table.subjects])
    for person in np.unique(persons):
        assert len(np.unique(folds[persons == person])) == 1


def test_fold_scores_and_table():
    gestures = np.array(["Wave hello", "Neck - scratch", "Wave hello", "Neck - scratch"], dtype=object)
    predictions = np.array(["Wave hello", "Wave hello", "Wave hello", "Neck - scratch"], dtype=object)
    result = real_imu.ModelResult("m", np.array([0, 0, 1, 1]), gestures, predictions, 3.0)
    scores = real_imu.fold_scores(result)
    assert scores["folds"][0]["accuracy"] == 0.5 and scores["folds"][1]["accuracy"] == 1.0
    assert scores["overall"]["accuracy"] == 0.75
    table = real_imu.markdown_table([result])
    assert "| m | accuracy | 0.5000 | 1.0000 | 0.7500 | 0.7500 | 3 s |" in table


def test_train_command_passes_the_overrides_through():
    command = real_imu.train_command("exp018", real_imu.Path("data/real_imu"), "r1", ["trainer.epochs=1"])
    assert command[1].endswith("exp018/train.py") and command[-1] == "trainer.epochs=1"
    assert {"data.max_len=200", "data.sampling_rate_hz=50", "data.source=competition"} <= set(command)
    assert real_imu.run_dir_of("exp018", "r1", ["paths.output_dir=/tmp/o"]).as_posix() == "/tmp/o/exp018/r1"


@pytest.mark.slow
def test_minirocket_runs_on_a_tiny_set():
    """Needs aeon (the bench extra); its first call compiles numba kernels (about 35 s, then cached)."""
    pytest.importorskip("aeon")
    rng = np.random.default_rng(0)
    series = rng.normal(size=(20, 6, 200)).astype(np.float32)
    gestures = np.array(["Wave hello", "Neck - scratch"] * 10, dtype=object)
    series[gestures == "Wave hello", 0] += np.sin(np.arange(200) / 3)
    predictions = real_imu.minirocket_predictions(series, gestures, np.arange(20) % 2, n_kernels=84)
    assert set(predictions.tolist()) <= set(gestures.tolist())
