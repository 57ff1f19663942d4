"""The synthetic dataset follows the competition's conventions exactly (codes/common/synthetic.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from codes.common import synthetic
from codes.common.schema import (
    ACC_COLUMNS,
    ACC_QUANTUM,
    BEHAVIOR_AT_TARGET,
    BEHAVIOR_PERFORMS,
    BEHAVIOR_TO_PHASE,
    DEMOGRAPHICS_COLUMNS,
    GESTURE_ORIENTATION_PAIRS,
    GRAVITY,
    ROT_COLUMNS,
    ROT_QUANTUM,
    SENSOR_COLUMNS,
    STARTING_BEHAVIORS,
    TEST_COLUMNS,
    TEST_LABEL_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TOF_MAX_DISTANCE,
    TOF_NO_REFLECTION,
    TRAIN_COLUMNS,
    mirror_sensors,
    sequence_type_of,
)

N_SUBJECTS = 4
N_TEST_SUBJECTS = 2
FILES = ("train.csv", "train_demographics.csv", "test.csv", "test_demographics.csv", "test_labels.csv")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_dataset(out, n_subjects=N_SUBJECTS, seed=0, n_test_subjects=N_TEST_SUBJECTS, workers=2)
    return out


@pytest.fixture(scope="module")
def train(dataset_dir: Path) -> pl.DataFrame:
    return pl.read_csv(dataset_dir / "train.csv", infer_schema_length=None)


@pytest.fixture(scope="module")
def test_frame(dataset_dir: Path) -> pl.DataFrame:
    return pl.read_csv(dataset_dir / "test.csv", infer_schema_length=None)


@pytest.fixture(scope="module")
def demographics(dataset_dir: Path) -> pl.DataFrame:
    return pl.read_csv(dataset_dir / "train_demographics.csv")


def test_writes_the_five_files_with_schema_columns(dataset_dir: Path) -> None:
    expected = {
        "train.csv": TRAIN_COLUMNS,
        "test.csv": TEST_COLUMNS,
        "train_demographics.csv": DEMOGRAPHICS_COLUMNS,
        "test_demographics.csv": DEMOGRAPHICS_COLUMNS,
        "test_labels.csv": TEST_LABEL_COLUMNS,
    }
    for name, columns in expected.items():
        header = (dataset_dir / name).open().readline().strip().split(",")
        assert header == columns, name


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthetic.generate_dataset(
        again, n_subjects=N_SUBJECTS, seed=0, n_test_subjects=N_TEST_SUBJECTS, workers=1
    )
    for name in FILES:
        assert (again / name).read_bytes() == (dataset_dir / name).read_bytes(), name
    small_a, small_b = tmp_path / "a", tmp_path / "b"
    synthetic.generate_dataset(small_a, n_subjects=1, seed=0, n_test_subjects=1, workers=1)
    synthetic.generate_dataset(small_b, n_subjects=1, seed=1, n_test_subjects=1, workers=1)
    for name in FILES:
        assert (small_a / name).read_bytes() != (small_b / name).read_bytes(), name


def test_id_formats_and_row_ids(train: pl.DataFrame, test_frame: pl.DataFrame) -> None:
    for frame in (train, test_frame):
        assert frame["sequence_id"].str.contains(r"^SEQ_\d{6}$").all()
        assert frame["subject"].str.contains(r"^SUBJ_\d{6}$").all()
        expected = frame["sequence_id"] + "_" + frame["sequence_counter"].cast(pl.Utf8).str.zfill(6)
        assert (frame["row_id"] == expected).all()
        assert frame["row_id"].is_unique().all()
    assert not set(train["sequence_id"]) & set(test_frame["sequence_id"])
    assert not set(train["subject"]) & set(test_frame["subject"])


def test_rows_of_a_sequence_are_contiguous_and_counted(train: pl.DataFrame, test_frame: pl.DataFrame) -> None:
    for frame in (train, test_frame):
        ids = frame["sequence_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        assert len(starts) == frame["sequence_id"].n_unique(), "a sequence's rows are split"
        lengths = np.diff(np.r_[starts, len(ids)])
        expected = np.concatenate([np.arange(n) for n in lengths])
        assert np.array_equal(frame["sequence_counter"].to_numpy(), expected)
    # sequences of a subject are interleaved with other subjects' (shuffled order)
    subjects = train.group_by("sequence_id", maintain_order=True).agg(pl.col("subject").first())["subject"]
    assert (subjects != subjects.shift(1)).sum() > N_SUBJECTS


def test_every_subject_performs_all_pairs_under_both_starting_behaviours(train: pl.DataFrame) -> None:
    per_sequence = train.group_by("sequence_id").agg(
        pl.col("subject", "gesture", "orientation", "behavior", "sequence_type").first()
    )
    expected = sorted((g, o, b) for g, o in GESTURE_ORIENTATION_PAIRS for b in STARTING_BEHAVIORS)
    assert per_sequence["subject"].n_unique() == N_SUBJECTS
    for (_,), rows in per_sequence.group_by(["subject"]):
        assert len(rows) == synthetic.SEQUENCES_PER_SUBJECT == 102
        assert sorted(rows.select("gesture", "orientation", "behavior").rows()) == expected
    assert all(sequence_type_of(g) == t for g, t in per_sequence.select("gesture", "sequence_type").rows())


def test_timeline_start_behaviour_then_pause_then_gesture(train: pl.DataFrame) -> None:
    assert all(BEHAVIOR_TO_PHASE[b] == p for b, p in train.select("behavior", "phase").unique().rows())
    runs = train.group_by("sequence_id", maintain_order=True).agg(
        pl.col("behavior").rle().struct.field("value").alias("order"),
        pl.col("gesture", "orientation").n_unique(),
    )
    for order in runs["order"]:
        assert len(order) == 3
        assert order[0] in STARTING_BEHAVIORS
        assert list(order[1:]) == [BEHAVIOR_AT_TARGET, BEHAVIOR_PERFORMS]
    assert (runs["gesture"] == 1).all() and (runs["orientation"] == 1).all()


def test_lengths_are_within_the_real_bounds(train: pl.DataFrame, test_frame: pl.DataFrame) -> None:
    lengths = pl.concat([train.group_by("sequence_id").len(), test_frame.group_by("sequence_id").len()])[
        "len"
    ]
    assert lengths.min() >= synthetic.MIN_SEQUENCE_LENGTH == 29
    assert lengths.max() <= synthetic.MAX_SEQUENCE_LENGTH == 700
    assert 50 <= lengths.median() <= 72


def test_acc_is_quantised_and_includes_gravity(train: pl.DataFrame) -> None:
    acc = train.select(ACC_COLUMNS).to_numpy()
    assert not np.isnan(acc).any()
    assert np.array_equal(acc / ACC_QUANTUM, np.round(acc / ACC_QUANTUM))
    assert abs(np.linalg.norm(acc, axis=1).mean() - GRAVITY) < 0.6


def test_rot_is_a_quantised_unit_quaternion_with_non_negative_w(train: pl.DataFrame) -> None:
    rot = train.select(ROT_COLUMNS).to_numpy()
    missing = np.isnan(rot)
    assert (missing.all(axis=1) == missing.any(axis=1)).all(), "rot drops out as a whole"
    assert 0.0005 < missing[:, 0].mean() < 0.03
    rot = rot[~missing[:, 0]]
    assert np.array_equal(rot / ROT_QUANTUM, np.round(rot / ROT_QUANTUM))
    assert (rot[:, 0] >= 0).all()
    assert np.abs(np.linalg.norm(rot, axis=1) - 1.0).max() < 1e-3


def test_gravity_removed_through_the_quaternion_is_small_at_the_pause(train: pl.DataFrame) -> None:
    """The quaternion convention: acc = R(q)^T (a_linear + g e_z) with q rotating sensor -> world."""
    pause = train.filter(pl.col("behavior") == BEHAVIOR_AT_TARGET).drop_nulls(ROT_COLUMNS)
    acc = pause.select(ACC_COLUMNS).to_numpy()
    matrices = synthetic.quat_to_matrix(pause.select(ROT_COLUMNS).to_numpy())
    gravity_in_sensor = np.einsum("nji,j->ni", matrices, np.array([0.0, 0.0, GRAVITY]))
    linear = np.linalg.norm(acc - gravity_in_sensor, axis=1)
    assert np.median(linear) < 0.6
    # a wrong convention (R instead of R^T) leaves most of the gravity in place
    wrong = np.einsum("nij,j->ni", matrices, np.array([0.0, 0.0, GRAVITY]))
    assert np.median(np.linalg.norm(acc - wrong, axis=1)) > 2 * np.median(linear)


def test_thermopiles_and_tof_values(train: pl.DataFrame) -> None:
    thm = train.select(THM_COLUMNS).to_numpy()
    assert 20.0 < np.nanmin(thm) and np.nanmax(thm) < 40.0
    assert 24.0 < np.nanmean(thm) < 31.0
    tof_dtypes = {train.schema[c] for c in TOF_COLUMNS}
    assert tof_dtypes <= {pl.Int64, pl.Int32, pl.Int16}
    tof = train.select(TOF_COLUMNS).to_numpy().astype(float)
    values = tof[~np.isnan(tof)]
    assert set(np.unique(values)) <= {TOF_NO_REFLECTION, *range(TOF_MAX_DISTANCE + 1)}
    no_reflection = (values == TOF_NO_REFLECTION).mean()
    assert 0.3 < no_reflection < 0.95  # far from the body nothing is in range
    # near the body (gesture at the neck) the ToF sees far more surface than with the hand in the air
    neck = train.filter((pl.col("gesture") == "Neck - scratch") & (pl.col("behavior") == BEHAVIOR_PERFORMS))
    air = train.filter((pl.col("gesture") == "Write name in air") & (pl.col("behavior") == BEHAVIOR_PERFORMS))
    hits = [(f.select(TOF_COLUMNS).to_numpy() >= 0).mean() for f in (neck, air)]
    assert hits[0] > 2 * hits[1]
    assert np.nanmean(neck.select(THM_COLUMNS).to_numpy()) > np.nanmean(air.select(THM_COLUMNS).to_numpy())


def test_whole_sensor_nulls_and_imu_only_test_half(train: pl.DataFrame, test_frame: pl.DataFrame) -> None:
    first_tof5 = "tof_5_v0"
    per_sequence = train.group_by("sequence_id").agg(
        pl.col("thm_5").is_null().all().alias("thm5"),
        pl.col(first_tof5).is_null().all().alias("tof5"),
        (pl.col(first_tof5).is_null().all() == pl.col("tof_5_v63").is_null().all()).alias("tof5_whole"),
    )
    n = len(per_sequence)
    assert per_sequence["thm5"].sum() == round(synthetic.THM5_MISSING_SHARE * n)
    assert per_sequence["tof5"].sum() == round(synthetic.TOF5_MISSING_SHARE * n)
    assert per_sequence["tof5_whole"].all()
    # a sensor is either null for the whole sequence or present on every row
    partial = train.group_by("sequence_id").agg(
        (pl.col(c).is_null().any() & ~pl.col(c).is_null().all()).alias(c)
        for c in THM_COLUMNS + TOF_COLUMNS[:64]
    )
    assert not partial.drop("sequence_id").to_numpy().any()

    sensor_columns = THM_COLUMNS + TOF_COLUMNS
    imu_only = test_frame.group_by("sequence_id").agg(
        pl.all_horizontal(pl.col(c).is_null().all() for c in sensor_columns).alias("imu_only"),
        pl.col("thm_1").is_null().any().alias("thm_1_gap"),
    )
    assert imu_only["imu_only"].sum() == round(len(imu_only) / 2)
    assert (imu_only["thm_1_gap"] == imu_only["imu_only"]).all()


def test_demographics(dataset_dir: Path, demographics: pl.DataFrame, train: pl.DataFrame) -> None:
    test_demographics = pl.read_csv(dataset_dir / "test_demographics.csv")
    assert len(demographics) == N_SUBJECTS and len(test_demographics) == N_TEST_SUBJECTS
    assert set(demographics["subject"]) == set(train["subject"])
    for frame in (demographics, test_demographics):
        assert frame["subject"].is_unique().all()
        assert frame["age"].is_between(10, 53).all()
        assert (frame["adult_child"] == (frame["age"] >= 18).cast(pl.Int64)).all()
        assert frame["sex"].is_in([0, 1]).all() and frame["handedness"].is_in([0, 1]).all()
        assert frame["height_cm"].is_between(135.0, 190.5).all()
        assert frame["shoulder_to_wrist_cm"].is_between(41.0, 71.0).all()
        assert frame["elbow_to_wrist_cm"].is_between(18.0, 44.0).all()
        for column in ("height_cm", "shoulder_to_wrist_cm", "elbow_to_wrist_cm"):
            assert ((frame[column] * 2) == (frame[column] * 2).round()).all()
    assert (demographics["handedness"] == 0).sum() >= 1  # at least one left-handed subject (n >= 4)


def test_test_labels_match_the_test_sequences(dataset_dir: Path, test_frame: pl.DataFrame) -> None:
    labels = pl.read_csv(dataset_dir / "test_labels.csv")
    sequences = test_frame.group_by("sequence_id", maintain_order=True).agg(pl.col("subject").first())
    assert labels["sequence_id"].to_list() == sequences["sequence_id"].to_list()
    assert labels["subject"].to_list() == sequences["subject"].to_list()
    assert all(sequence_type_of(g) == t for g, t in labels.select("gesture", "sequence_type").rows())
    expected = sorted(GESTURE_ORIENTATION_PAIRS * len(STARTING_BEHAVIORS) * N_TEST_SUBJECTS)
    assert sorted(labels.select("gesture", "orientation").rows()) == expected


def _mean_acc_per_pair(frame: pl.DataFrame) -> np.ndarray:
    """(51 pairs, 3) mean acc over the gesture phase, pairs in schema order."""
    means = (
        frame.filter(pl.col("behavior") == BEHAVIOR_PERFORMS)
        .group_by("gesture", "orientation")
        .agg(pl.col(ACC_COLUMNS).mean())
    )
    lookup = {(g, o): (x, y, z) for g, o, x, y, z in means.rows()}
    return np.array([lookup[pair] for pair in GESTURE_ORIENTATION_PAIRS])


def test_left_handed_subjects_are_mirror_images(train: pl.DataFrame, demographics: pl.DataFrame) -> None:
    """A left-hander's acc_x pattern over the 51 pairs is the right-handers' one with its sign flipped."""
    left = demographics.filter(pl.col("handedness") == 0)["subject"].to_list()
    right = train.filter(~pl.col("subject").is_in(left))
    reference = _mean_acc_per_pair(right)[:, 0]
    for subject in left:
        pattern = _mean_acc_per_pair(train.filter(pl.col("subject") == subject))[:, 0]
        assert np.corrcoef(pattern, reference)[0, 1] < 0
        assert np.corrcoef(-pattern, reference)[0, 1] > 0.3
        # acc_z (not mirrored) agrees without any flip
        z_pattern = _mean_acc_per_pair(train.filter(pl.col("subject") == subject))[:, 2]
        assert np.corrcoef(z_pattern, _mean_acc_per_pair(right)[:, 2])[0, 1] > 0.3


def test_mirroring_a_left_handed_sequence_restores_the_right_handed_frame() -> None:
    rng = np.random.default_rng(3)
    profile = synthetic.make_subject("SUBJ_000001", left_handed=False, rotated_device=False, rng=rng)
    sequence = synthetic.simulate_sequence(profile, 0, STARTING_BEHAVIORS[0], np.random.default_rng(5))
    mirrored = mirror_sensors(sequence.sensors)
    assert np.allclose(mirror_sensors(mirrored), sequence.sensors, equal_nan=True)
    assert sequence.sensors.shape[1] == len(SENSOR_COLUMNS)


def test_rotated_device_turns_the_sensor_frame_by_180_degrees_about_z() -> None:
    rng = np.random.default_rng(11)
    normal = synthetic.make_subject("SUBJ_000002", left_handed=False, rotated_device=False, rng=rng)
    rotated = synthetic.SubjectProfile(**{**normal.__dict__, "rotated_device": True})
    pair = GESTURE_ORIENTATION_PAIRS.index(("Wave hello", "Seated Straight"))
    a = synthetic.simulate_sequence(normal, pair, STARTING_BEHAVIORS[1], np.random.default_rng(7)).sensors
    b = synthetic.simulate_sequence(rotated, pair, STARTING_BEHAVIORS[1], np.random.default_rng(7)).sensors
    valid = ~np.isnan(a[:, 3]) & ~np.isnan(b[:, 3])
    # same draws: x and y flip sign, z is unchanged (up to the per-subject bias and noise)
    assert np.abs(a[:, 0] + b[:, 0]).mean() < 0.5 and np.abs(a[:, 1] + b[:, 1]).mean() < 0.5
    assert np.abs(a[:, 2] - b[:, 2]).mean() < 0.5
    expected = synthetic.quat_multiply(a[valid, 3:7], synthetic.Q_ROTATE_180_Z)
    dots = np.abs(np.sum(expected * b[valid, 3:7], axis=1))
    assert dots.min() > 0.999


def test_cli_writes_the_files(tmp_path: Path) -> None:
    synthetic.main(
        ["--out", str(tmp_path), "--subjects", "1", "--test-subjects", "1", "--seed", "2", "--workers", "1"]
    )
    for name in FILES:
        assert (tmp_path / name).is_file()
    assert re.match(r"^SUBJ_\d{6}$", pl.read_csv(tmp_path / "test_labels.csv")["subject"][0])
