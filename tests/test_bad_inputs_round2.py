"""Bad input on the input path (issue 21, round 2): every case stops with an error that names the
file and the fix, or follows a documented rule; none trains or serves silently.

Per-sequence labels, duplicate columns, units, out-of-range demographics, files that are no
plain UTF-8 CSV, and the normaliser over sensors a table never has.
"""

from __future__ import annotations

import gzip
import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from codes.common.data_files import (
    DataFileError,
    MalformedFileError,
    read_demographics,
    read_test,
    read_train,
)
from codes.common.features import FeatureSettings
from codes.common.schema import DEMOGRAPHIC_FIELDS, GRAVITY, THM_COLUMNS, TOF_COLUMNS
from codes.common.sequences import FeatureNormalizer, build_sequence_table, load_sequence_table
from codes.inference.predictor import InputColumnsError
from tests.helpers import make_demographics, make_frame, rest_sensors, write_dataset

SUBJECTS = ["SUBJ_000001", "SUBJ_000002"]
GESTURE_OF = {"SEQ_000000": "Neck - scratch", "SEQ_000001": "Wave hello", "SEQ_000002": "Text on phone"}
ROWS = 30  # per sequence: SEQ_000000 is on lines 2-31, SEQ_000001 on lines 32-61, ...


def sequences(acc: np.ndarray | None = None) -> list:
    """3 sequences of 2 subjects at rest, acceleration ``acc`` (default: gravity in m/s^2) plus noise."""
    acc = np.array([0.0, 0.0, GRAVITY]) if acc is None else acc
    rng = np.random.default_rng(0)
    result = []
    for i, sequence_id in enumerate(GESTURE_OF):
        sensors = rest_sensors(np.array([1.0, 0, 0, 0]), acc, ROWS, rng)
        sensors[:, :3] += rng.normal(scale=0.05 * np.abs(acc).max(), size=(ROWS, 3))
        result.append((sequence_id, SUBJECTS[i % 2], sensors))
    return result


def train_frame(**kwargs) -> pl.DataFrame:
    return make_frame(sequences(**kwargs), list(GESTURE_OF.values()))


def write_train(directory: Path, frame: pl.DataFrame | None = None, demographics=None) -> Path:
    demographics = make_demographics(SUBJECTS, {SUBJECTS[1]}) if demographics is None else demographics
    return write_dataset(directory, train_frame() if frame is None else frame, demographics)


def write_test(directory: Path) -> Path:
    frame = make_frame(sequences())
    return write_dataset(directory, frame, make_demographics(SUBJECTS), split="test")


def with_row_value(frame: pl.DataFrame, row: int, column: str, value: object) -> pl.DataFrame:
    values = frame[column].to_list()
    values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))


# ---------------------------------------------------------------- 1. per-sequence fields
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("gesture", "Wave hello"),
        ("subject", "SUBJ_000002"),
        ("orientation", "Lie on Back"),
        ("sequence_type", "Non-Target"),
    ],
)
def test_a_per_sequence_field_that_changes_within_a_sequence_is_named_with_its_lines(tmp_path, column, value):
    write_train(tmp_path, with_row_value(train_frame(), 5, column, value))  # SEQ_000000, line 7
    for read in (
        lambda: read_train(tmp_path),
        lambda: read_train(tmp_path, meta_columns=("sequence_id", "sequence_counter")),  # narrowed
        lambda: load_sequence_table(tmp_path, use_cache=False),
    ):
        with pytest.raises(MalformedFileError) as error:
            read()
        message = str(error.value)
        assert str(tmp_path / "train.csv") in message and "SEQ_000000" in message
        assert "lines 2 and 7" in message and column in message and repr(value) in message


def test_a_sequence_type_that_does_not_follow_from_the_gesture_is_named(tmp_path):
    frame = train_frame()
    wrong = pl.when(pl.col("sequence_id") == "SEQ_000001").then(pl.lit("Target"))
    write_train(tmp_path, frame.with_columns(wrong.otherwise(pl.col("sequence_type")).alias("sequence_type")))
    with pytest.raises(MalformedFileError) as error:
        read_train(tmp_path, meta_columns=("sequence_id",))
    message = str(error.value)
    assert "SEQ_000001" in message and "'Target'" in message and "'Wave hello'" in message
    assert "lines 32, 33, 34, 35, 36, ... (30 in all)" in message and "'Non-Target'" in message


def test_build_sequence_table_refuses_a_frame_whose_label_changes_within_a_sequence():
    frame = with_row_value(train_frame(), ROWS + 3, "gesture", "Glasses on/off")  # SEQ_000001
    with pytest.raises(
        DataFileError, match=r"SEQ_000001 .*more than one gesture \('Wave hello', then 'Glasses"
    ):
        build_sequence_table(frame, make_demographics(SUBJECTS), FeatureSettings())


# ---------------------------------------------------------------- 2. a column named twice
def _with_first_column(path: Path, name: str, value: str) -> None:
    """``path`` with an extra first column ``name`` (a name the file already has) holding ``value``."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([f"{name},{lines[0]}", *[f"{value},{line}" for line in lines[1:]]]) + "\n")


@pytest.mark.parametrize(
    ("file", "column", "read"),
    [
        ("train.csv", "acc_x", lambda d: read_train(d)),
        ("test.csv", "acc_x", lambda d: read_test(d)),
        ("test_demographics.csv", "handedness", lambda d: read_demographics(d / "test_demographics.csv")),
    ],
)
def test_a_column_named_twice_is_an_error_naming_the_file_and_the_column(tmp_path, file, column, read):
    (write_train if file == "train.csv" else write_test)(tmp_path)
    _with_first_column(tmp_path / file, column, "0")  # zeros placed first would replace the readings
    with pytest.raises(MalformedFileError) as error:
        read(tmp_path)
    message = str(error.value)
    assert str(tmp_path / file) in message and repr(column) in message and "more than once" in message


def test_predict_refuses_a_pandas_frame_with_a_column_twice_naming_it():
    from tests.test_hostile_inputs import tiny_predictor

    sequence = make_frame(sequences()[:1]).to_pandas()
    doubled = pd.concat([sequence, sequence[["acc_y"]] * 0], axis=1)
    with pytest.raises(InputColumnsError, match=r"more than once: acc_y"):
        tiny_predictor().predict(doubled, make_demographics(SUBJECTS[:1]))


# ---------------------------------------------------------------- 3. units
@pytest.mark.parametrize(
    ("acc", "unit", "fix"),
    [
        (np.array([0.0, 0.0, 1.0]), "g", f"multiply acc_x, acc_y and acc_z by {GRAVITY}"),
        (np.array([0.0, 0.0, 1000.0]), "milli-g", f"by {GRAVITY / 1000}"),
    ],
)
def test_acceleration_in_another_unit_stops_training_naming_the_unit_and_the_fix(tmp_path, acc, unit, fix):
    write_train(tmp_path, train_frame(acc=acc))
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and f"looks recorded in {unit}" in message
    assert fix in message and "+data.check_units=false" in message


def test_the_unit_check_can_be_overridden_with_a_warning(tmp_path, caplog):
    write_train(tmp_path, train_frame(acc=np.array([0.0, 0.0, 1.0])))
    with caplog.at_level(logging.WARNING):
        table = load_sequence_table(tmp_path, use_cache=False, check_units=False)
    assert table.n_sequences == 3
    assert "acceleration looks recorded in g, not m/s^2" in caplog.text


def test_a_table_read_with_the_unit_check_off_is_not_reused_by_a_checked_load(tmp_path):
    """The unit check runs where the CSV is parsed: the cache must not carry an unchecked table
    into a later load that checks."""
    write_train(tmp_path, train_frame(acc=np.array([0.0, 0.0, 1.0])))
    assert load_sequence_table(tmp_path, check_units=False).n_sequences == 3
    with pytest.raises(DataFileError, match="looks recorded in g"):
        load_sequence_table(tmp_path)


class _Loaded(Exception):
    """Ends a training run once its table is loaded."""


def test_train_py_stops_on_acceleration_in_g_unless_told_to_go_on(tmp_path, monkeypatch):
    from codes.common import training
    from codes.exp.exp013 import train
    from tests.helpers import training_config

    data = write_train(tmp_path / "data", train_frame(acc=np.array([0.0, 0.0, 1.0])))
    model = {"d_model": 8, "num_blocks": 1, "num_heads": 2, "ff_dim": 8}
    with pytest.raises(DataFileError, match=r"looks recorded in g.*\+data\.check_units=false"):
        train.run_training(training_config("exp013", data, tmp_path / "out", model, "run_name=stop"))
    loaded = []

    def load_and_stop(*args, **kwargs):
        loaded.append(load_sequence_table(*args, **kwargs))
        raise _Loaded

    monkeypatch.setattr(training, "load_sequence_table", load_and_stop)
    cfg = training_config("exp013", data, tmp_path / "out", model, "run_name=go", "+data.check_units=false")
    with pytest.raises(_Loaded):
        train.run_training(cfg)
    assert loaded[0].n_sequences == 3


@pytest.mark.parametrize(
    ("to_unit", "unit", "fix"),
    [(lambda c: c + 273.15, "Kelvin", "subtract 273.15"), (lambda c: c * 9 / 5 + 32, "deg F", "subtract 32")],
)
def test_thermopiles_in_kelvin_or_fahrenheit_stop_training(tmp_path, to_unit, unit, fix):
    frame = train_frame()
    write_train(tmp_path, frame.with_columns([to_unit(pl.col(c)).alias(c) for c in THM_COLUMNS]))
    with pytest.raises(DataFileError, match=rf"thermopile temperature looks recorded in {unit}.*{fix}"):
        read_train(tmp_path)


def test_a_height_in_metres_stops_training_naming_the_file_and_the_fix(tmp_path):
    demographics = make_demographics(SUBJECTS).with_columns(pl.col("height_cm") / 100)
    write_train(tmp_path, demographics=demographics)
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train_demographics.csv") in message
    assert "height_cm looks recorded in metres" in message and "multiply height_cm by 100" in message


def test_values_in_the_competition_units_pass_without_a_unit_warning(tmp_path, caplog):
    write_train(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_sequence_table(tmp_path, use_cache=False)
    assert "recorded in" not in caplog.text and "may not be in" not in caplog.text


def test_predict_warns_once_about_acceleration_in_g_and_still_answers(caplog):
    from tests.test_hostile_inputs import tiny_predictor

    predictor = tiny_predictor()
    frame = make_frame(sequences(acc=np.array([0.0, 0.0, 1.0])))
    with caplog.at_level(logging.WARNING):
        for sequence in frame.partition_by("sequence_id", maintain_order=True):
            predictor.predict(sequence, make_demographics(SUBJECTS))
    assert caplog.text.count("acceleration looks recorded in g") == 1


def test_batch_mode_warns_once_about_acceleration_in_g_and_answers_as_predict(caplog):
    from tests.test_hostile_inputs import tiny_predictor

    frame = make_frame(sequences(acc=np.array([0.0, 0.0, 1.0])))
    with caplog.at_level(logging.WARNING):
        batch = tiny_predictor().predict_frame(frame, make_demographics(SUBJECTS))
    assert caplog.text.count("the test frame: acceleration looks recorded in g") == 1
    assert batch.height == 3


def test_batch_mode_takes_a_sequences_subject_from_its_first_row_as_predict_does():
    """A regression guard: build_sequence_table now refuses a subject that changes within a
    sequence, and batch mode still answers such a sequence as predict() does."""
    from tests.test_hostile_inputs import tiny_predictor

    predictor = tiny_predictor()
    frame = with_row_value(
        make_frame(sequences()), 4, "subject", SUBJECTS[1]
    )  # SEQ_000000: SUBJ_000001 first
    demographics = make_demographics(SUBJECTS, {SUBJECTS[1]})
    batch = predictor.predict_frame(frame, demographics)
    single = predictor.predict_probabilities(
        frame.filter(pl.col("sequence_id") == "SEQ_000000"), demographics
    )
    probabilities = [c for c in batch.columns if c.startswith("prob_")]
    np.testing.assert_allclose(batch.select(probabilities).to_numpy()[0], single, atol=1e-4)


# ---------------------------------------------------------------- 4. demographics out of range
def test_out_of_range_demographics_are_unknown_in_training_as_in_predict(tmp_path, caplog):
    from tests.test_hostile_inputs import tiny_predictor

    demographics = make_demographics(SUBJECTS).with_columns(
        pl.when(pl.col("subject") == SUBJECTS[1])
        .then(pl.lit(2))
        .otherwise(pl.col("handedness"))
        .alias("handedness"),
        pl.when(pl.col("subject") == SUBJECTS[1]).then(pl.lit(-5)).otherwise(pl.col("age")).alias("age"),
    )
    write_train(tmp_path, demographics=demographics)
    with caplog.at_level(logging.WARNING):
        table = load_sequence_table(tmp_path, use_cache=False)
    odd = table.subjects == SUBJECTS[1]
    unknown = [DEMOGRAPHIC_FIELDS.index("handedness"), DEMOGRAPHIC_FIELDS.index("age")]
    assert np.isnan(table.demographics[np.ix_(odd, unknown)]).all()
    expected = make_demographics(SUBJECTS).select(DEMOGRAPHIC_FIELDS).to_numpy().astype(np.float32)
    np.testing.assert_array_equal(table.demographics[~odd], np.repeat(expected[:1], (~odd).sum(), axis=0))
    kept = [i for i in range(len(DEMOGRAPHIC_FIELDS)) if i not in unknown]
    np.testing.assert_array_equal(table.demographics[np.ix_(odd, kept)][0], expected[1, kept])
    assert "out of range, taken as unknown: SUBJ_000002" in caplog.text and "handedness" in caplog.text
    # the same rule as predict(): the same demographics vector for the subject's row
    row = demographics.filter(pl.col("subject") == SUBJECTS[1])
    np.testing.assert_array_equal(
        tiny_predictor().demographics_vector(row, SUBJECTS[1]), table.demographics[odd][0]
    )


# ---------------------------------------------------------------- 5. files that are no plain UTF-8 CSV
READERS = {
    "train.csv": lambda d: read_train(d),
    "test.csv": lambda d: read_test(d),
    "test_demographics.csv": lambda d: read_demographics(d / "test_demographics.csv"),
}


def written(directory: Path, file: str) -> Path:
    (write_train if file == "train.csv" else write_test)(directory)
    return directory / file


def _zipped(path: Path) -> bytes:
    archive = path.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(path, path.name)
    return archive.read_bytes()


FORMATS = {
    "gzip": (lambda p: gzip.compress(p.read_bytes()), r"gzip-compressed.*gunzip"),
    "zip": (_zipped, r"zip archive.*unzip"),
    "utf16": (lambda p: p.read_text().encode("utf-16"), r"UTF-16 byte-order mark.*save it as UTF-8"),
    "utf16-no-bom": (lambda p: p.read_text().encode("utf-16-le"), r"NUL bytes.*save it as UTF-8"),
    "cr-only": (lambda p: p.read_bytes().replace(b"\n", b"\r"), r"CR-only line endings.*[Cc]onvert"),
}


@pytest.mark.parametrize("file", list(READERS))
@pytest.mark.parametrize("kind", list(FORMATS))
def test_a_file_that_is_no_plain_utf8_csv_is_named_with_the_fix(tmp_path, file, kind):
    path = written(tmp_path, file)
    convert, expected = FORMATS[kind]
    path.write_bytes(convert(path))
    with pytest.raises(MalformedFileError, match=expected) as error:
        READERS[file](tmp_path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("file", list(READERS))
def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path, file):
    path = written(tmp_path, file)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"SUBJ_", b"SUBJ\xe9", 1)  # latin-1, line 3
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(MalformedFileError) as error:
        READERS[file](tmp_path)
    message = str(error.value)
    assert f"{path}, line 3: bytes that are not UTF-8" in message and "iconv" in message


@pytest.mark.parametrize("file", list(READERS))
def test_a_header_name_with_spaces_around_it_is_named_with_the_fix(tmp_path, file):
    path = written(tmp_path, file)
    text = path.read_text()
    path.write_text(
        text.replace(",sex,", ", sex,", 1)
        if "demographics" in file
        else text.replace(",acc_y,", ", acc_y,", 1)
    )
    name = "' sex'" if "demographics" in file else "' acc_y'"
    with pytest.raises(
        MalformedFileError,
        match=rf"{path}: header names with spaces around them: column \d+ {name}.*Remove the spaces",
    ):
        READERS[file](tmp_path)


def test_a_directory_named_train_csv_is_said_to_be_a_directory(tmp_path):
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(DataFileError, match=r"train\.csv is a directory, not a file"):
        read_train(tmp_path)


# ---------------------------------------------------------------- 6. the normaliser
def test_fitting_the_normaliser_on_imu_only_data_warns_nothing_and_keeps_the_imu_statistics():
    frame = train_frame().with_columns([pl.lit(None, pl.Float64).alias(c) for c in THM_COLUMNS + TOF_COLUMNS])
    table = build_sequence_table(frame, make_demographics(SUBJECTS), FeatureSettings())
    assert table.imu_only.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalizer = FeatureNormalizer().fit(table)
        normalised = normalizer.transform(table)
    imu = table.feature_groups["imu"]
    features = table.features[:, imu].astype(np.float64)
    std = features.std(axis=0)
    expected = (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(normalised[:, imu], expected, rtol=1e-4, atol=1e-4)
    others = table.feature_groups["thm"] + table.feature_groups["tof"]
    assert (normalised[:, others] == 0).all()
    assert (normalizer.scaler.mean_[others] == 0).all() and (normalizer.scaler.scale_[others] == 1).all()


# ---- sweep findings
def _one_subject(frame: pl.DataFrame, subject: str, columns: list[str], convert) -> pl.DataFrame:
    """``frame`` with ``columns`` of ``subject``'s rows converted by ``convert`` (an expression map)."""
    chosen = pl.col("subject") == subject
    return frame.with_columns(
        [pl.when(chosen).then(convert(pl.col(c))).otherwise(pl.col(c)).alias(c) for c in columns]
    )


@pytest.mark.parametrize(
    ("columns", "convert", "unit", "fix"),
    [
        (
            ["acc_x", "acc_y", "acc_z"],
            lambda c: c / GRAVITY,
            "g",
            f"multiply acc_x, acc_y and acc_z by {GRAVITY}",
        ),
        (THM_COLUMNS, lambda c: c * 9 / 5 + 32, "deg F", "subtract 32"),
    ],
)
def test_one_subject_in_another_unit_stops_training_naming_the_subject(tmp_path, columns, convert, unit, fix):
    """SUBJ_000002 holds a third of the rows: the file's median is in the expected unit."""
    write_train(tmp_path, _one_subject(train_frame(), SUBJECTS[1], columns, convert))
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and SUBJECTS[1] in message and SUBJECTS[0] not in message
    assert f"1 of 2 subject(s) looks recorded in {unit}" in message and fix in message
    assert "+data.check_units=false" in message
    assert load_sequence_table(tmp_path, use_cache=False, check_units=False).n_sequences == 3


@pytest.mark.parametrize(
    ("columns", "convert", "seen"),
    [
        (THM_COLUMNS, lambda c: c * 0 - 1, f"{SUBJECTS[1]} (-1)"),  # a sensor stuck at a missing code
        (["acc_x", "acc_y", "acc_z"], lambda c: c * None, f"{SUBJECTS[1]} (no reading)"),  # no IMU at all
    ],
)
def test_one_subject_whose_sensor_no_unit_explains_is_warned_about_by_name(
    tmp_path, caplog, columns, convert, seen
):
    """A whole subject's thermopiles at -1, or its acceleration never read, trains (the values are
    used by their rules) but not without a word: the subject is named."""
    write_train(tmp_path, _one_subject(train_frame(), SUBJECTS[1], columns, convert))
    with caplog.at_level(logging.WARNING):
        assert load_sequence_table(tmp_path, use_cache=False).n_sequences == 3
    assert "1 of 2 subject(s) is unusual" in caplog.text and seen in caplog.text
    assert SUBJECTS[0] not in caplog.text


def test_one_subject_in_g_in_test_csv_is_warned_about_naming_the_subject(tmp_path, caplog):
    frame = _one_subject(
        make_frame(sequences()), SUBJECTS[1], ["acc_x", "acc_y", "acc_z"], lambda c: c / GRAVITY
    )
    write_dataset(tmp_path, frame, make_demographics(SUBJECTS), split="test")
    with caplog.at_level(logging.WARNING):
        read_test(tmp_path)
    assert (
        f"looks recorded in g, not m/s^2: the median norm of (acc_x, acc_y, acc_z) of subject {SUBJECTS[1]}"
        in (caplog.text)
    )


@pytest.mark.parametrize(
    ("factor", "unit", "fix"), [(1 / 2.54, "inches", "by 2.54"), (0.01, "metres", "by 100")]
)
def test_a_single_subjects_height_in_another_unit_stops_training_naming_it(tmp_path, factor, unit, fix):
    demographics = _one_subject(make_demographics(SUBJECTS), SUBJECTS[0], ["height_cm"], lambda c: c * factor)
    write_train(tmp_path, demographics=demographics)
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train_demographics.csv") in message and SUBJECTS[0] in message
    assert f"height_cm of 1 of 2 subject(s) looks recorded in {unit}" in message and fix in message


def _tof_as(frame: pl.DataFrame, convert) -> pl.DataFrame:
    return frame.with_columns([convert(pl.col(c).cast(pl.Int64)).alias(c) for c in TOF_COLUMNS])


@pytest.mark.parametrize(
    ("convert", "cause", "fix"),
    [
        # the random readings hold few -1: the smallest distances stand in for more "no reflection"
        (lambda c: pl.when(c < 10).then(255).otherwise(c), "255 for no reflection", "replace 255 by -1"),
        (
            lambda c: pl.when(c == -1).then(-1).otherwise(c * 4),
            "another scale",
            "divide the tof_* distances by about 4",
        ),
    ],
)
def test_tof_in_another_scale_stops_training_and_is_warned_about_in_test_csv(
    tmp_path, caplog, convert, cause, fix
):
    write_train(tmp_path, _tof_as(train_frame(), convert))
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and cause in message and fix in message
    assert "+data.check_units=false" in message
    with caplog.at_level(logging.WARNING):
        assert read_train(tmp_path, check_units=False).height == 3 * ROWS
    assert cause in caplog.text
    test_dir = tmp_path / "test"
    write_dataset(
        test_dir, _tof_as(make_frame(sequences()), convert), make_demographics(SUBJECTS), split="test"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_test(test_dir)
    assert cause in caplog.text and fix in caplog.text


def test_training_warns_once_with_the_readings_dropped_as_impossible_per_group(tmp_path, caplog):
    """A few impossible readings (under the ToF rule's 1%) train, with one warning counting them."""
    frame = with_row_value(train_frame(), 3, "tof_2_v5", 300.0)
    frame = with_row_value(frame, 4, "thm_1", 500.0)
    frame = with_row_value(frame, 5, "acc_x", 1e6)
    write_train(tmp_path, frame)
    with caplog.at_level(logging.WARNING):
        load_sequence_table(tmp_path, use_cache=False)
    warned = [r.getMessage() for r in caplog.records if "physically impossible" in r.getMessage()]
    assert len(warned) == 1
    assert str(tmp_path / "train.csv") in warned[0]
    assert "3 sensor value(s)" in warned[0] and "acc 1, rot 0, thm 1, tof 1" in warned[0]


def test_valid_readings_train_without_an_impossible_readings_warning(tmp_path, caplog):
    write_train(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_sequence_table(tmp_path, use_cache=False)
    assert "physically impossible" not in caplog.text and "ToF looks" not in caplog.text


@pytest.mark.parametrize("odd", ["Seated Straight ", "seated straight"])
def test_an_orientation_string_outside_the_competitions_is_named(tmp_path, odd):
    write_train(tmp_path, train_frame().with_columns(orientation=pl.lit(odd)))
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and repr(odd) in message and "'Lie on Back'" in message


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), 0.0])
def test_a_sampling_rate_that_is_not_a_finite_positive_number_is_refused_naming_the_setting(rate):
    with pytest.raises(ValueError, match=r"data\.sampling_rate_hz.*finite number > 0"):
        FeatureSettings(sampling_rate_hz=rate)


@pytest.mark.parametrize("ending", [b"\n\n", b"\n\n\n", b"\r\n\r\n"])
def test_empty_lines_at_the_end_of_a_csv_are_accepted_and_read_no_row(tmp_path, ending):
    write_train(tmp_path / "plain")
    expected = load_sequence_table(tmp_path / "plain", use_cache=False)
    padded = write_train(tmp_path / "padded")
    for name in ("train.csv", "train_demographics.csv"):
        path = padded / name
        path.write_bytes(path.read_bytes().rstrip(b"\n") + ending)
    table = load_sequence_table(padded, use_cache=False)
    assert np.array_equal(table.sequence_ids, expected.sequence_ids)
    assert np.array_equal(table.features, expected.features)
    assert np.array_equal(table.demographics, expected.demographics, equal_nan=True)


def test_an_empty_line_before_the_last_row_is_still_an_error(tmp_path):
    path = write_train(tmp_path) / "train.csv"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([*lines[:5], b"", *lines[5:]]))
    with pytest.raises(
        MalformedFileError, match=r"line 6 is empty, between rows of data: delete the empty line"
    ):
        read_train(tmp_path)


def test_demographics_ids_with_spaces_around_them_get_a_hint(tmp_path):
    demographics = make_demographics(SUBJECTS).with_columns(pl.col("subject") + " ")
    write_train(tmp_path, demographics=demographics)
    with pytest.raises(DataFileError) as error:
        load_sequence_table(tmp_path, use_cache=False)
    message = str(error.value)
    assert "2 subject(s) have no row" in message and f"'{SUBJECTS[0]} '" in message
    assert "remove the spaces around the subject ids" in message
