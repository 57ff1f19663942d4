"""Hostile inputs: every odd frame gets one of the 18 gestures by a documented rule, never a crash.

A tiny exp013 model with random weights stands in for a trained run (the rules are about the
inputs, not the weights). Its predictor is strict: a failure inside raises instead of answering
the fallback, so an answer shows that the input was handled by its rule.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codes.common.data_files import DataFileError
from codes.common.features import (
    FeatureSettings,
    SensorBlocks,
    compute_step_features,
    feature_layout,
    impossible_readings,
)
from codes.common.schema import (
    ACC_COLUMNS,
    ACC_MAX_ABS,
    DEMOGRAPHICS_COLUMNS,
    GESTURES,
    ROT_COLUMNS,
    SENSOR_COLUMNS,
    TEST_COLUMNS,
    THM_COLUMNS,
    THM_RANGE,
    TOF_COLUMNS,
    TOF_MAX_DISTANCE,
)
from codes.common.sequences import FeatureNormalizer, build_sequence_table
from codes.exp.exp013.config import ModelConfig
from codes.exp.exp013.model import GestureClassifier
from codes.inference.batch import run_batch
from codes.inference.predictor import (
    FALLBACK_GESTURE,
    EnsemblePredictor,
    FoldMember,
    InputColumnsError,
)
from tests.helpers import make_demographics, make_frame

MAX_LEN = 32
SUBJECT = "SUBJ_000001"
PROBABILITY_COLUMNS = [f"prob_{g}" for g in GESTURES]
ATOL = 1e-4  # one sequence alone vs. a padded batch: float32 summation order only


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared CPU


def tiny_predictor(strict: bool = True, folds: int = 2) -> EnsemblePredictor:
    """exp013's model at tiny dims, random weights, identity normalisers (default feature settings)."""
    settings_ = FeatureSettings()
    n_features = len(feature_layout(settings_)[0])
    model_cfg = ModelConfig(
        d_model=16,
        num_blocks=2,
        num_heads=2,
        ff_dim=32,
        conv_kernel=3,
        demographics_dim=4,
        time_reduction=False,
    )
    members = []
    for fold in range(folds):
        torch.manual_seed(fold)
        normalizer = FeatureNormalizer.from_state_dict(
            {"mean": [0.0] * n_features, "scale": [1.0] * n_features}
        )
        members.append(FoldMember(fold, GestureClassifier(n_features, model_cfg, MAX_LEN), normalizer))
    return EnsemblePredictor(members, settings_, MAX_LEN, strict=strict)


@pytest.fixture(scope="module")
def predictor() -> EnsemblePredictor:
    return tiny_predictor()


def sensor_rows(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, 332) plausible readings: acc around gravity, unit quaternions, warm thermopiles, ToF."""
    values = np.empty((n_rows, len(SENSOR_COLUMNS)))
    gravity = np.array([0.0, 0.0, 9.8])
    values[:, 0:3] = np.round((rng.normal(0, 3, (n_rows, 3)) + gravity) * 256) / 256
    quaternions = rng.normal(size=(n_rows, 4)) * np.array([0.3, 1, 1, 1]) + np.array([3.0, 0, 0, 0])
    values[:, 3:7] = quaternions / np.linalg.norm(quaternions, axis=1, keepdims=True)
    values[:, 7:12] = rng.uniform(24, 36, (n_rows, 5))
    values[:, 12:] = rng.integers(-1, 255, (n_rows, 320))
    return values


def make_sequence(n_rows: int, seed: int = 0, sequence_id: str = "SEQ_000001", subject: str = SUBJECT):
    return make_frame([(sequence_id, subject, sensor_rows(n_rows, np.random.default_rng(seed)))])


def demographics_row(subject: str = SUBJECT, **changes) -> pl.DataFrame:
    return make_demographics([subject]).with_columns([pl.lit(v).alias(k) for k, v in changes.items()])


def with_values(frame: pl.DataFrame, column: str, rows: list[int], value) -> pl.DataFrame:
    """``frame`` with ``column`` set to ``value`` (None = null) at ``rows``."""
    at = pl.int_range(pl.len()).is_in(rows)
    return frame.with_columns(pl.when(at).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def probabilities_of(predictor, sequence, demographics) -> np.ndarray:
    probabilities = predictor.predict_probabilities(sequence, demographics)
    assert probabilities is not None and np.isfinite(probabilities).all()
    return probabilities


# ---------------------------------------------------------------- physically impossible values
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("acc_x", 1e30),
        ("acc_x", 3e38),
        ("acc_z", -1e30),
        ("acc_y", ACC_MAX_ABS + 0.5),
        ("rot_w", 1e30),
        ("rot_x", -3e38),
        ("rot_w", 1.2),  # a component beyond 1 (norm still within [0.5, 1.5])
        ("thm_2", 1e30),
        ("thm_2", -3e38),
        ("thm_5", THM_RANGE[1] + 1),
        ("tof_1_v0", 1e30),
        ("tof_3_v17", 300.0),
        ("tof_5_v63", -5.0),
        ("tof_2_v8", -0.5),
    ],
)
def test_physically_impossible_values_are_missing_values(predictor, column, value, caplog):
    """The same answer as the same readings null: the NaN rule, and a warning naming the column."""
    sequence, demographics = make_sequence(50), demographics_row()
    rows = [3, 4, 20]
    impossible = with_values(sequence, column, rows, value)
    missing = with_values(sequence, column, rows, None)
    np.testing.assert_allclose(
        probabilities_of(predictor, impossible, demographics),
        probabilities_of(predictor, missing, demographics),
        atol=1e-6,
    )
    lines = warnings_of(caplog).splitlines()
    assert any("outside their physical range" in line and column in line for line in lines)
    assert predictor.predict(impossible, demographics) in GESTURES
    # what the features hold: those of the null readings, bit for bit
    assert np.array_equal(
        predictor.sequence_table(impossible, demographics).features,
        predictor.sequence_table(missing, demographics).features,
    )


def test_a_quaternion_far_from_unit_norm_is_missing_as_a_whole(predictor):
    sequence, demographics = make_sequence(40), demographics_row()
    rows = [5, 6]
    short = sequence
    for column in ROT_COLUMNS:  # (0.2, 0.2, 0.2, 0.2): norm 0.4, every component in [-1, 1]
        short = with_values(short, column, rows, 0.2)
    missing = with_values(sequence, "rot_y", rows, None)  # one null component: the row's rotation is missing
    table = predictor.sequence_table(short, demographics)
    assert np.array_equal(table.features, predictor.sequence_table(missing, demographics).features)
    assert not table.step_valid[rows].any()
    # a quaternion of norm 1.4 is a reading (inside ROT_NORM_RANGE), used as it is
    long = sequence
    for column, value in zip(ROT_COLUMNS, (0.7, 0.7, 0.7, 0.7), strict=True):
        long = with_values(long, column, rows, value)
    assert predictor.sequence_table(long, demographics).step_valid.all()


def test_the_bounds_themselves_are_readings():
    columns = [*ACC_COLUMNS, *ROT_COLUMNS, *THM_COLUMNS, "tof_1_v0", "tof_1_v1"]
    inside = np.array(
        [
            [
                ACC_MAX_ABS,
                -ACC_MAX_ABS,
                9.8,
                1.0,
                0.0,
                0.0,
                0.0,
                *THM_RANGE,
                30.0,
                30.0,
                30.0,
                -1,
                TOF_MAX_DISTANCE,
            ],
            [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 36.0, 36.0, 36.0, 36.0, 36.0, 0, 0],  # norm 0.5
            [0.0, 0.0, 0.0, -1.0, 1.0, 0.5, 0.0, 36.0, 36.0, 36.0, 36.0, 36.0, 0, 0],  # norm 1.5
        ]
    )
    assert not impossible_readings(inside, columns).any()
    nan_row = np.full((1, len(columns)), np.nan)
    assert not impossible_readings(nan_row, columns).any()  # NaN is missing already, not impossible
    outside = inside[:1].repeat(3, axis=0)
    outside[0, 0], outside[1, 7], outside[2, 13] = np.nextafter(ACC_MAX_ABS, np.inf), THM_RANGE[0] - 0.01, 255
    flags = impossible_readings(outside, columns)
    assert flags.sum() == 3 and flags[0, 0] and flags[1, 7] and flags[2, 13]


def test_readings_inside_the_ranges_are_left_untouched_bit_for_bit():
    rng = np.random.default_rng(5)
    values = sensor_rows(300, rng)
    values[:, 0] = np.linspace(-ACC_MAX_ABS, ACC_MAX_ABS, 300)
    values[:5, 7] = THM_RANGE[0]
    values[5:10, 7] = THM_RANGE[1]
    values[rng.random(values.shape) < 0.02] = np.nan
    settings_ = FeatureSettings(tof_mode="raw")
    blocks = SensorBlocks.from_sensors(values.astype(np.float32), settings_)
    before = {name: None if a is None else a.copy() for name, a in vars(blocks).items()}
    blocks.drop_impossible_readings()
    for name, array in vars(blocks).items():
        assert np.array_equal(array, before[name], equal_nan=array.dtype.kind == "f"), name
    # the training reader's frame: integer ToF read as int16
    frame = pl.DataFrame(
        {c: values[:, i] for i, c in enumerate(SENSOR_COLUMNS)},
        schema_overrides=dict.fromkeys(SENSOR_COLUMNS, pl.Float64),
    ).fill_nan(None)
    frame = frame.with_columns(
        pl.col(TOF_COLUMNS).cast(pl.Int16), pl.col(SENSOR_COLUMNS[:12]).cast(pl.Float32)
    )
    blocks = SensorBlocks.from_sensors(frame, settings_)
    tof, missing = blocks.tof.copy(), blocks.tof_missing.copy()
    blocks.drop_impossible_readings()
    assert np.array_equal(blocks.tof, tof) and np.array_equal(blocks.tof_missing, missing)


@pytest.mark.parametrize("tof_dtype", [pl.Int16, pl.Float32])
def test_training_builds_its_table_by_the_same_rule(tof_dtype):
    """build_sequence_table (training's reader path): impossible readings give the features of nulls."""
    rng = np.random.default_rng(1)
    sequences = [(f"SEQ_{i:06d}", SUBJECT, sensor_rows(40, rng)) for i in range(3)]
    frame = make_frame(sequences, [GESTURES[0]] * 3)
    frame = frame.with_columns(
        pl.col(TOF_COLUMNS).cast(tof_dtype), pl.col(SENSOR_COLUMNS[:12]).cast(pl.Float32)
    )
    demographics = make_demographics([SUBJECT])
    odd, nulls = frame, frame
    for column, rows, value in (
        ("acc_x", [2, 50], 1e30),
        ("rot_z", [7], -3e38),
        ("thm_1", [41, 42], 3e38),
        ("tof_4_v9", [10, 90], 300),
        ("tof_2_v0", [11], -7),
    ):
        odd = with_values(odd, column, rows, value)
        nulls = with_values(nulls, column, rows, None)
    odd, nulls = (f.with_columns(pl.col(TOF_COLUMNS).cast(tof_dtype)) for f in (odd, nulls))
    assert odd.schema["tof_4_v9"] == tof_dtype
    odd_table = build_sequence_table(odd, demographics, FeatureSettings())
    null_table = build_sequence_table(nulls, demographics, FeatureSettings())
    assert np.isfinite(odd_table.features).all()
    assert np.array_equal(odd_table.features, null_table.features)
    assert np.array_equal(odd_table.step_valid, null_table.step_valid)
    assert not np.array_equal(
        odd_table.features, build_sequence_table(frame, demographics, FeatureSettings()).features
    )


def test_compute_step_features_keeps_the_features_finite_for_any_float32_value():
    rng = np.random.default_rng(2)
    values = sensor_rows(200, rng).astype(np.float32)
    extremes = np.array(
        [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e30, -1e30, 255, -2], np.float32
    )
    spots = rng.random(values.shape) < 0.2
    values[spots] = rng.choice(extremes, size=int(spots.sum()))
    offsets = np.array([0, 50, 120, 200])
    step = compute_step_features(
        values, offsets, np.array([False, True, False]), FeatureSettings(tof_mode="raw")
    )
    assert np.isfinite(step.features).all()


# ---------------------------------------------------------------- demographics
def test_another_subjects_demographics_are_unknown_with_a_warning(predictor, caplog):
    sequence = make_sequence(40)
    unknown = probabilities_of(predictor, sequence, None)
    other = demographics_row("SUBJ_000002", handedness=0)  # would flip the mirror if used
    np.testing.assert_allclose(probabilities_of(predictor, sequence, other), unknown, atol=1e-6)
    assert "not for the sequence's subject SUBJ_000001" in warnings_of(caplog)
    several = pl.concat([other, demographics_row("SUBJ_000003")], how="vertical_relaxed")
    np.testing.assert_allclose(probabilities_of(predictor, sequence, several), unknown, atol=1e-6)
    own = demographics_row(handedness=0)
    assert not np.allclose(probabilities_of(predictor, sequence, own), unknown, atol=1e-6)
    # the sequence's own row among others is used
    np.testing.assert_allclose(
        probabilities_of(predictor, sequence, pl.concat([other, own], how="vertical_relaxed")),
        probabilities_of(predictor, sequence, own),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("handedness", 2), ("handedness", -1), ("handedness", 0.5), ("adult_child", 5), ("sex", 3),
     ("age", 1e30), ("height_cm", -170.0), ("elbow_to_wrist_cm", 3e38)],
)  # fmt: skip
def test_demographics_out_of_range_are_unknown_with_a_warning(predictor, field, value, caplog):
    sequence = make_sequence(40)
    given_value = probabilities_of(predictor, sequence, demographics_row(**{field: value}))
    null = probabilities_of(predictor, sequence, demographics_row(**{field: None}))
    np.testing.assert_allclose(given_value, null, atol=1e-6)
    assert f"{field}={value:g} out of range: taken as unknown" in warnings_of(caplog)
    table = predictor.sequence_table(sequence, demographics_row(**{field: value}))
    assert np.isnan(table.demographics[0, DEMOGRAPHICS_COLUMNS.index(field) - 1])


def test_handedness_2_is_not_mirrored(predictor):
    sequence = make_sequence(40)
    as_two = predictor.sequence_table(sequence, demographics_row(handedness=2))
    as_right = predictor.sequence_table(sequence, demographics_row(handedness=1))
    assert np.array_equal(as_two.features, as_right.features)


# ---------------------------------------------------------------- frame types
def test_categorical_and_enum_columns_are_read_as_text(predictor, caplog):
    sequence, demographics = make_sequence(40), demographics_row()
    reference = probabilities_of(predictor, sequence, demographics)
    as_text = sequence.with_columns(pl.col(c).cast(pl.String) for c in TEST_COLUMNS)
    categorical = as_text.with_columns(pl.col(c).cast(pl.Categorical) for c in TEST_COLUMNS)
    np.testing.assert_allclose(probabilities_of(predictor, categorical, demographics), reference, atol=1e-6)
    thermopiles = as_text["thm_1"].unique().sort().to_list()
    enum = sequence.with_columns(pl.col("thm_1").cast(pl.String).cast(pl.Enum(thermopiles)))
    np.testing.assert_allclose(probabilities_of(predictor, enum, demographics), reference, atol=1e-6)
    categorical_demographics = demographics.with_columns(pl.all().cast(pl.String).cast(pl.Categorical))
    np.testing.assert_allclose(
        probabilities_of(predictor, categorical, categorical_demographics), reference, atol=1e-6
    )
    batch = predictor.predict_frame(categorical, categorical_demographics)
    np.testing.assert_allclose(batch.select(PROBABILITY_COLUMNS).to_numpy()[0], reference, atol=ATOL)


def test_a_pandas_frame_is_converted(predictor):
    sequence, demographics = make_sequence(40), demographics_row()
    reference = probabilities_of(predictor, sequence, demographics)
    np.testing.assert_allclose(
        probabilities_of(predictor, sequence.to_pandas(), demographics.to_pandas()), reference, atol=1e-6
    )
    # an object column mixing numbers and text: taken as text, what is no number is missing
    mixed = sequence.to_pandas()
    mixed["acc_x"] = mixed["acc_x"].astype(object)
    mixed.loc[3, "acc_x"] = "not a number"
    expected = probabilities_of(predictor, with_values(sequence, "acc_x", [3], None), demographics)
    np.testing.assert_allclose(probabilities_of(predictor, mixed, demographics), expected, atol=1e-6)
    assert isinstance(mixed, pd.DataFrame)
    with pytest.raises(TypeError, match="polars \\(or pandas\\) DataFrame, got dict"):
        predictor.predict(sequence.to_dict(as_series=False), demographics)


def test_columns_of_types_holding_no_numbers_are_missing(predictor, caplog):
    sequence, demographics = make_sequence(40), demographics_row()
    no_thermopiles = sequence.with_columns(pl.lit(None, pl.Float64).alias(c) for c in THM_COLUMNS)
    as_lists = sequence.with_columns(pl.col(c).cast(pl.String).str.split(".") for c in THM_COLUMNS)
    np.testing.assert_allclose(
        probabilities_of(predictor, as_lists, demographics),
        probabilities_of(predictor, no_thermopiles, demographics),
        atol=1e-6,
    )
    assert "which holds no numbers: taken as missing" in warnings_of(caplog)


# ---------------------------------------------------------------- batch mode
def hostile_frame() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Test-format rows of 7 sequences, each odd in another way, and demographics for some subjects."""
    parts = {
        "SEQ_000001": make_sequence(45, 1, "SEQ_000001", "SUBJ_000001"),
        "SEQ_000002": with_values(make_sequence(50, 2, "SEQ_000002", "SUBJ_000002"), "acc_x", [7], 1e30),
        "SEQ_000003": with_values(
            make_sequence(60, 3, "SEQ_000003", "SUBJ_000003"), "thm_3", [0, 1, 2], 3e38
        ),
        "SEQ_000004": with_values(make_sequence(33, 4, "SEQ_000004", "SUBJ_000004"), "tof_2_v5", [4], 1e30),
        "SEQ_000005": with_values(make_sequence(70, 5, "SEQ_000005", "SUBJ_000005"), "rot_w", [9, 10], 5.0),
        "SEQ_000006": make_sequence(90, 6, "SEQ_000006", "SUBJ_000001").sample(
            fraction=1.0, shuffle=True, seed=1
        ),
        "SEQ_000007": with_values(
            make_sequence(3, 7, "SEQ_000007", "SUBJ_000009"), "sequence_counter", [1], None
        ),
    }
    frame = pl.concat([p.with_columns(pl.col(SENSOR_COLUMNS).cast(pl.Float64)) for p in parts.values()])
    demographics = pl.concat(
        [
            demographics_row("SUBJ_000001"),
            demographics_row("SUBJ_000002", handedness=0),
            demographics_row("SUBJ_000003", handedness=2),  # out of range
            demographics_row("SUBJ_000004", age=1e30),
            demographics_row("SUBJ_000005", adult_child=None),
        ],  # SUBJ_000009 has no row
        how="vertical_relaxed",
    )
    return frame, demographics


def written_as_csv(frame: pl.DataFrame, directory) -> None:
    """test.csv of ``frame`` (the reader refuses an empty sequence_counter: SEQ_000007's gets 1)."""
    frame.with_columns(pl.col("sequence_counter").fill_null(1)).write_csv(directory / "test.csv")


def demographics_for(demographics: pl.DataFrame, sequence: pl.DataFrame) -> pl.DataFrame:
    return demographics.filter(pl.col("subject") == sequence["subject"][0])


def assert_batch_answers_as_predict(predictor, batch: pl.DataFrame, frame, demographics) -> None:
    for sequence in frame.partition_by("sequence_id", maintain_order=True):
        row = batch.filter(pl.col("sequence_id") == sequence["sequence_id"][0])
        single = predictor.predict_probabilities(sequence, demographics_for(demographics, sequence))
        assert row.height == 1
        if single is None:
            assert row["gesture"][0] == FALLBACK_GESTURE
            assert not np.isfinite(row.select(PROBABILITY_COLUMNS).to_numpy()).all()
        else:
            np.testing.assert_allclose(row.select(PROBABILITY_COLUMNS).to_numpy()[0], single, atol=ATOL)
            assert row["gesture"][0] == GESTURES[int(single.argmax())]


def test_batch_mode_answers_every_sequence_by_the_rules_of_predict(predictor, caplog):
    frame, demographics = hostile_frame()
    batch = predictor.predict_frame(frame, demographics, batch_size=3)
    assert batch["sequence_id"].to_list() == frame["sequence_id"].unique(maintain_order=True).to_list()
    assert np.isfinite(batch.select(PROBABILITY_COLUMNS).to_numpy()).all()
    assert_batch_answers_as_predict(predictor, batch, frame, demographics)
    warnings = warnings_of(caplog)
    assert (
        "physically impossible sensor value(s), taken as missing: SEQ_000002 (1), SEQ_000003 (3)" in warnings
    )
    assert "out of range, taken as unknown: SUBJ_000003, SUBJ_000004" in warnings


def test_run_batch_answers_a_file_with_impossible_values_and_scores_with_two_label_columns(
    predictor, tmp_path, capsys
):
    frame, demographics = hostile_frame()
    frame = with_values(frame, "acc_y", [0], 3e38)
    written_as_csv(frame, tmp_path)
    demographics.write_csv(tmp_path / "test_demographics.csv")
    ids = frame["sequence_id"].unique(maintain_order=True)
    pl.DataFrame({"sequence_id": ids, "gesture": [GESTURES[i] for i in range(len(ids))]}).write_csv(
        tmp_path / "test_labels.csv"
    )  # only the two columns scoring reads
    output = tmp_path / "submission.csv"
    scores = run_batch(predictor, tmp_path, output)
    submission = pl.read_csv(output)
    assert submission["sequence_id"].to_list() == ids.to_list() and set(submission["gesture"]) <= set(
        GESTURES
    )
    assert scores["n"] == len(ids) and "competition score: score" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            pl.DataFrame({"sequence_id": ["SEQ_000001"], "subject": [SUBJECT]}),
            r"lacks required columns: gesture",
        ),
        (
            pl.DataFrame({"sequence_id": ["SEQ_000001"], "gesture": ["Waving"]}),
            "outside the 18 competition gestures",
        ),
        (
            pl.DataFrame({"sequence_id": ["SEQ_000001"], "gesture": [GESTURES[0]]}),
            r"no label for 6 sequence\(s\)",
        ),
        (pl.DataFrame({"sequence_id": ["SEQ_000001"] * 2, "gesture": GESTURES[:2]}), "more than once"),
    ],
)
def test_a_bad_labels_file_is_an_error_before_anything_is_written(predictor, tmp_path, labels, message):
    frame, demographics = hostile_frame()
    written_as_csv(frame, tmp_path)
    demographics.write_csv(tmp_path / "test_demographics.csv")
    labels.write_csv(tmp_path / "test_labels.csv")
    with pytest.raises(DataFileError, match=message):
        run_batch(predictor, tmp_path, tmp_path / "submission.csv")
    assert not (tmp_path / "submission.csv").exists()


def test_a_failing_sequence_in_batch_mode_gets_the_fallback_with_a_warning_naming_it(caplog, monkeypatch):
    lenient = tiny_predictor(strict=False)
    frame, demographics = hostile_frame()
    reference = tiny_predictor(strict=True).predict_frame(frame, demographics)
    for member in lenient.members:
        forward = member.model.forward

        def failing_on_3_steps(features, mask, demographics=None, forward=forward):
            if (mask.sum(1) == 3).any():  # SEQ_000007, the only 3-row sequence
                raise RuntimeError("boom")
            return forward(features, mask, demographics)

        monkeypatch.setattr(member.model, "forward", failing_on_3_steps)
    batch = lenient.predict_frame(frame, demographics)
    failed = batch.filter(pl.col("sequence_id") == "SEQ_000007")
    assert failed["gesture"][0] == FALLBACK_GESTURE
    assert "got no finite probabilities, answered 'Neck - scratch': SEQ_000007" in warnings_of(caplog)
    others = batch.filter(pl.col("sequence_id") != "SEQ_000007")
    expected = reference.filter(pl.col("sequence_id") != "SEQ_000007")
    np.testing.assert_allclose(
        others.select(PROBABILITY_COLUMNS).to_numpy(),
        expected.select(PROBABILITY_COLUMNS).to_numpy(),
        atol=ATOL,
    )
    # the features of the whole frame failing: every sequence answered on its own
    monkeypatch.setattr(lenient, "frame_table", lambda *args: 1 / 0)
    one_by_one = lenient.predict_frame(frame, demographics)
    assert one_by_one["sequence_id"].to_list() == batch["sequence_id"].to_list()
    assert one_by_one["gesture"].to_list() == batch["gesture"].to_list()
    assert one_by_one["imu_only"].to_list() == batch["imu_only"].to_list()


# ---------------------------------------------------------------- any frame: a property
SPECIAL_VALUES = [
    math.nan, math.inf, -math.inf, 1e38, -1e38, 3e38, -3e38, 1e30, -1e30,
    0.0, -1.0, 254.0, 255.0, 100.5, -0.5, 2.0, 1e-30,
]  # fmt: skip
DTYPES = ["Float64", "Float32", "Int64", "String", "Categorical"]
GROUPS = {"acc": ACC_COLUMNS, "rot": ROT_COLUMNS, "thm": THM_COLUMNS, "tof": TOF_COLUMNS}


@st.composite
def recipes(draw) -> dict:
    """How to build a hostile test.csv frame (the values themselves come from a seeded rng)."""
    groups = {
        name: {
            "dtype": draw(st.sampled_from(DTYPES)),
            "specials": draw(st.lists(st.sampled_from(SPECIAL_VALUES), max_size=3)),
            "special_share": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
            "null_share": draw(st.sampled_from([0.0, 0.1, 1.0])),
            "text_junk": draw(st.booleans()),  # empty strings and words in text columns
        }
        for name in GROUPS
    }
    return {
        "n_rows": draw(
            st.one_of(st.integers(0, 60), st.integers(0, 60), st.sampled_from([1, 2, 700, 701, 2000, 5000]))
        ),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "groups": groups,
        "odd_column": draw(st.sampled_from(SENSOR_COLUMNS)),
        "odd_dtype": draw(st.sampled_from([*DTYPES, "Boolean", "Null"])),
        "counter": draw(st.sampled_from(["ordered", "shuffled", "null", "text"])),
        "categorical_ids": draw(st.booleans()),
        "null_subject": draw(st.booleans()),
        "demographics": draw(st.sampled_from(["own", "none", "empty", "other", "odd", "text"])),
    }


def typed(
    values: np.ndarray, nulls: np.ndarray, dtype: str, name: str, junk: bool, rng: np.random.Generator
) -> pl.Series:
    """``values`` (null where ``nulls``) as a column of ``dtype``; text may hold junk words."""
    series = pl.Series(name, values, dtype=pl.Float64).scatter(np.flatnonzero(nulls), None)
    if dtype == "Float32":
        return series.cast(pl.Float32)
    if dtype == "Int64":
        return series.cast(pl.Int64, strict=False)  # NaN, inf and overflow: null
    if dtype == "Boolean":
        return series.cast(pl.Boolean, strict=False)
    if dtype == "Null":
        return pl.Series(name, [None] * len(values))
    if dtype in ("String", "Categorical"):
        text = series.cast(pl.String)
        if junk and len(values):
            words = rng.choice(["", " ", "abc", "1,5", "--1"], size=len(values))
            junk_at = rng.random(len(values)) < 0.2
            text = pl.Series(
                name,
                [w if j else t for w, j, t in zip(words, junk_at, text.to_list(), strict=True)],
                dtype=pl.String,
            )
        return text.cast(pl.Categorical) if dtype == "Categorical" else text
    return series


def build_frame(recipe: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(recipe["seed"])
    n = recipe["n_rows"]
    values = sensor_rows(n, rng)
    columns: dict[str, pl.Series] = {}
    for name, names in GROUPS.items():
        group = recipe["groups"][name]
        block = values[:, [SENSOR_COLUMNS.index(c) for c in names]]
        if group["specials"] and group["special_share"]:
            spots = rng.random(block.shape) < group["special_share"]
            block[spots] = rng.choice(group["specials"], size=int(spots.sum()))
        nulls = rng.random(block.shape) < group["null_share"]
        for j, column in enumerate(names):
            dtype = recipe["odd_dtype"] if column == recipe["odd_column"] else group["dtype"]
            columns[column] = typed(block[:, j], nulls[:, j], dtype, column, group["text_junk"], rng)
    counter = np.arange(n)
    if recipe["counter"] == "shuffled":
        counter = rng.permutation(n)
    sequence_id, subject = "SEQ_000042", SUBJECT
    meta = {
        "row_id": pl.Series([f"{sequence_id}_{t:06d}" for t in counter], dtype=pl.String),
        "sequence_id": pl.Series([sequence_id] * n, dtype=pl.String),
        "sequence_counter": pl.Series(counter, dtype=pl.Int64),
        "subject": pl.Series([subject] * n, dtype=pl.String),
    }
    if recipe["counter"] == "null":
        meta["sequence_counter"] = pl.Series([None] * n, dtype=pl.Int64)
    elif recipe["counter"] == "text":
        meta["sequence_counter"] = meta["sequence_counter"].cast(pl.String)
    if recipe["null_subject"]:  # matches no demographics row: every field unknown
        meta["subject"] = pl.Series([None] * n, dtype=pl.String)
    if recipe["categorical_ids"]:
        meta = {k: v.cast(pl.String).cast(pl.Categorical) for k, v in meta.items()}
    frame = pl.DataFrame({**{k: v.alias(k) for k, v in meta.items()}, **columns}).select(TEST_COLUMNS)
    demographics = {
        "own": demographics_row(),
        "none": demographics_row().head(0),
        "empty": demographics_row().head(0),
        "other": demographics_row("SUBJ_000777", handedness=0),
        "odd": demographics_row(handedness=7, sex=-1, adult_child=None, age=math.inf, height_cm=3e38),
        "text": demographics_row()
        .with_columns(pl.all().cast(pl.String))
        .with_columns(pl.lit("").alias("age")),
    }[recipe["demographics"]]
    return frame, demographics


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes())
def test_any_frame_with_the_test_columns_gets_one_of_the_18_gestures(predictor, recipe):
    frame, demographics = build_frame(recipe)
    fallbacks = predictor.n_fallbacks
    gesture = predictor.predict(frame, None if recipe["demographics"] == "none" else demographics)
    assert gesture in GESTURES
    if frame.height == 0:
        assert gesture == FALLBACK_GESTURE
        assert predictor.predict_frame(frame, demographics).height == 0
        return
    assert predictor.n_fallbacks == fallbacks  # the model answered: the input was handled by its rules
    # batch mode, by the same rules
    batch = predictor.predict_frame(frame, demographics)
    single = predictor.predict_probabilities(frame, demographics)
    assert batch.height == 1 and batch["gesture"][0] in GESTURES
    np.testing.assert_allclose(batch.select(PROBABILITY_COLUMNS).to_numpy()[0], single, atol=ATOL)
    top_two = np.sort(single)[-2:]
    if top_two[1] - top_two[0] > 10 * ATOL:  # no near tie: the same answer
        assert batch["gesture"][0] == gesture


@settings(max_examples=25, deadline=None)
@given(recipe=recipes(), dropped=st.sets(st.sampled_from(SENSOR_COLUMNS), min_size=1, max_size=4))
def test_a_frame_without_a_required_column_raises_input_columns_error_naming_it(predictor, recipe, dropped):
    frame, demographics = build_frame({**recipe, "n_rows": min(recipe["n_rows"], 50)})
    frame = frame.drop(sorted(dropped))
    for call in (predictor.predict, predictor.predict_frame):
        with pytest.raises(InputColumnsError) as error:
            call(frame, demographics)
        assert all(column in str(error.value) for column in dropped)
