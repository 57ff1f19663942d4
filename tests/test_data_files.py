"""Bad input gets an error a user can act on; the CSV readers' dtypes."""

import logging

import numpy as np
import polars as pl
import pytest

from codes.common.data_files import (
    DataFileError,
    MalformedFileError,
    read_demographics,
    read_test,
    read_train,
)
from codes.common.data_source import resolve_data_dir
from codes.common.schema import TOF_COLUMNS, TRAIN_COLUMNS
from codes.common.sequences import load_sequence_table
from tests.helpers import make_demographics, make_frame, rest_sensors, write_dataset


def _dataset(tmp_path, gestures=("Wave hello",)):
    rng = np.random.default_rng(0)
    seqs = [
        (f"SEQ_{i:06d}", "SUBJ_000001", rest_sensors(np.array([1.0, 0, 0, 0]), np.zeros(3), 30, rng))
        for i in range(len(gestures))
    ]
    return write_dataset(tmp_path, make_frame(seqs, list(gestures)), make_demographics(["SUBJ_000001"]))


def test_missing_file_names_the_path_and_the_download_command(tmp_path):
    with pytest.raises(DataFileError) as error:
        read_train(tmp_path)
    assert str(tmp_path / "train.csv") in str(error.value)
    assert "kaggle competitions download -c cmi-detect-behavior-with-sensor-data" in str(error.value)
    with pytest.raises(DataFileError, match=r"train_demographics\.csv"):
        _dataset(tmp_path)
        (tmp_path / "train_demographics.csv").unlink()
        load_sequence_table(tmp_path)


def test_missing_columns_are_listed(tmp_path):
    _dataset(tmp_path)
    frame = pl.read_csv(tmp_path / "train.csv").drop(["rot_w", "tof_3_v10"])
    frame.write_csv(tmp_path / "train.csv")
    with pytest.raises(DataFileError, match=r"lacks required columns: rot_w, tof_3_v10"):
        read_train(tmp_path)


def test_unknown_gesture_is_named(tmp_path):
    _dataset(tmp_path)
    frame = pl.read_csv(tmp_path / "train.csv").with_columns(pl.lit("Juggle").alias("gesture"))
    frame.write_csv(tmp_path / "train.csv")
    with pytest.raises(DataFileError, match="Juggle"):
        read_train(tmp_path)


def test_subject_without_demographics_is_named(tmp_path):
    _dataset(tmp_path)
    make_demographics(["SUBJ_000777"]).write_csv(tmp_path / "train_demographics.csv")
    with pytest.raises(DataFileError, match="SUBJ_000001"):
        load_sequence_table(tmp_path)


def test_duplicated_demographics_rows_are_named(tmp_path):
    demographics = make_demographics(["SUBJ_000001", "SUBJ_000001"])
    demographics.write_csv(tmp_path / "d.csv")
    with pytest.raises(DataFileError, match="SUBJ_000001"):
        read_demographics(tmp_path / "d.csv")


def test_strict_competition_source_refuses_to_fall_back(tmp_path):
    with pytest.raises(DataFileError, match="kaggle competitions download"):
        resolve_data_dir("competition", tmp_path / "data", tmp_path / "synthetic")
    _dataset(tmp_path / "data")
    assert resolve_data_dir("competition", tmp_path / "data", tmp_path / "synthetic") == tmp_path / "data"
    assert resolve_data_dir("auto", tmp_path / "data", tmp_path / "synthetic") == tmp_path / "data"


def test_integer_tof_fields_are_read_as_int16_and_give_the_same_table(tmp_path, caplog):
    rng = np.random.default_rng(1)
    sensors = [rest_sensors(np.array([1.0, 0, 0, 0]), np.zeros(3), n, rng) for n in (80, 120)]
    sensors[0][rng.random(80) < 0.2, 12:] = np.nan  # dropped ToF frames: empty fields
    seqs = [(f"SEQ_{i:06d}", "SUBJ_000001", s) for i, s in enumerate(sensors)]
    frame = make_frame(seqs, ["Wave hello", "Neck - scratch"])
    demographics = make_demographics(["SUBJ_000001"])
    as_floats = write_dataset(tmp_path / "floats", frame, demographics)  # ToF written as "100.0"
    integer_frame = frame.with_columns(pl.col(TOF_COLUMNS).cast(pl.Int16))
    as_integers = write_dataset(tmp_path / "integers", integer_frame, demographics)  # "100"
    assert read_train(as_floats).schema["tof_1_v0"] == pl.Float32
    assert read_train(as_integers).schema["tof_1_v0"] == pl.Int16
    expected = load_sequence_table(as_floats, use_cache=False)
    assert np.array_equal(load_sequence_table(as_integers, use_cache=False).features, expected.features)

    # integers in the first lines, a decimal far below them: read again as float32
    lines = (as_integers / "train.csv").read_text().splitlines()
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",12.5"
    (as_integers / "train.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="codes.common.data_files"):
        late_decimal = read_train(as_integers)
    assert any("reading them as float32" in r.getMessage() for r in caplog.records)
    assert late_decimal.schema["tof_5_v63"] == pl.Float32 and late_decimal["tof_5_v63"][-1] == 12.5
    assert late_decimal.drop("tof_5_v63").equals(read_train(as_floats).drop("tof_5_v63"))


# ---------------------------------------------------------------- malformed files: no silent loss
def _two_sequences(directory, split="train"):
    """train.csv (or test.csv) of 2 sequences x 30 rows: data lines 2-31 and 32-61."""
    rng = np.random.default_rng(0)
    seqs = [
        (f"SEQ_{i:06d}", "SUBJ_000001", rest_sensors(np.array([1.0, 0, 0, 0]), np.zeros(3), 30, rng))
        for i in range(2)
    ]
    frame = make_frame(seqs, ["Wave hello", "Neck - scratch"] if split == "train" else None)
    frame = frame.with_columns(pl.col(TOF_COLUMNS).cast(pl.Int16))  # as the synthetic files write them
    write_dataset(directory, frame, make_demographics(["SUBJ_000001"]), split)
    return directory / f"{split}.csv"


def _edit_line(path, number, edit):
    """Rewrite line ``number`` (1-based) of ``path`` with ``edit(fields) -> fields``."""
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = b",".join(edit(lines[number - 1].split(b",")))
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_file_cut_mid_line_is_an_error_naming_the_file_and_the_last_line(tmp_path, split):
    path = _two_sequences(tmp_path, split)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\n", len(data) // 2) + 200])  # 200 bytes into a line
    reader = read_train if split == "train" else read_test
    cut_line = path.read_bytes().count(b"\n") + 1
    with pytest.raises(
        MalformedFileError, match=rf"is cut short: its last line \(line {cut_line}\)"
    ) as error:
        reader(tmp_path)
    assert str(path) in str(error.value)
    with pytest.raises(MalformedFileError, match="is cut short"):  # the training path, cache on
        load_sequence_table(tmp_path, split)


def test_a_full_last_line_without_a_final_newline_is_read_with_a_warning(tmp_path, caplog):
    path = _two_sequences(tmp_path)
    expected = read_train(tmp_path)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with caplog.at_level(logging.WARNING, logger="codes.common.data_files"):
        assert read_train(tmp_path).equals(expected)
    assert "does not end with a newline: the last value of line 61 may be cut" in caplog.text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda fields: [*fields[:12], b"0.5", *fields[12:]], "has 342 field"),  # a field too many
        (lambda fields: fields[:12] + fields[13:], "has 340 field"),  # a field lost
        (lambda fields: [b""], "is empty"),
        (
            lambda fields: [b";".join(fields)],
            r"has 1 field\(s\) where the header has 341 \(it is separated by ';'",
        ),
    ],
)
def test_a_line_with_another_field_count_is_an_error_naming_it(tmp_path, edit, message):
    path = _two_sequences(tmp_path)
    _edit_line(path, 40, edit)
    with pytest.raises(MalformedFileError, match=rf"train\.csv, line 40 {message}"):
        read_train(tmp_path)
    _edit_line(_two_sequences(tmp_path / "test", "test"), 40, edit)
    with pytest.raises(MalformedFileError, match=r"test\.csv, line 40 "):  # test.csv's lines too
        read_test(tmp_path / "test")


def test_every_ragged_line_is_counted(tmp_path):
    path = _two_sequences(tmp_path)
    for number in (5, 9, 20, 33, 50, 60):
        _edit_line(path, number, lambda fields: fields[:-1])
    with pytest.raises(
        MalformedFileError, match=r"line 5 has 340 .*\(also lines 9, 20, 33, 50, \.\.\. \(6 lines in all\)\)"
    ):
        read_train(tmp_path)


def test_a_header_only_file_is_an_error_naming_it(tmp_path):
    path = _two_sequences(tmp_path)
    path.write_bytes(path.read_bytes().split(b"\n")[0] + b"\n")
    with pytest.raises(MalformedFileError, match=r"train\.csv holds no data rows, only its header line"):
        read_train(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(MalformedFileError, match=r"train\.csv is empty"):
        read_train(tmp_path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = _two_sequences(tmp_path)
    expected = read_train(tmp_path)
    demographics = read_demographics(tmp_path / "train_demographics.csv")
    for file in (path, tmp_path / "train_demographics.csv"):
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    assert read_train(tmp_path).equals(expected)
    assert read_demographics(tmp_path / "train_demographics.csv").equals(demographics)


@pytest.mark.parametrize("name", ["train.csv", "train_demographics.csv"])
def test_a_file_with_another_separator_is_named_with_the_separator(tmp_path, name):
    _two_sequences(tmp_path)
    path = tmp_path / name
    pl.read_csv(path).write_csv(path, separator=";")
    with pytest.raises(
        MalformedFileError, match=rf"{name} is not comma-separated: its header is separated by ';'"
    ):
        load_sequence_table(tmp_path, use_cache=False)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("acc_y", "abc", "'abc' is not a number"),
        ("thm_2", "12,5", None),  # a decimal comma: a field too many
        ("tof_3_v7", "n/a", "'n/a' is not a number"),  # integer ToF: int16 read, then float32
        ("sequence_counter", "1.5", "'1.5' is not an integer"),
    ],
)
def test_a_value_that_is_no_number_names_file_line_and_column(tmp_path, column, value, message):
    path = _two_sequences(tmp_path)
    position = TRAIN_COLUMNS.index(column)
    _edit_line(path, 12, lambda fields: [*fields[:position], value.encode(), *fields[position + 1 :]])
    expected = (
        rf"train\.csv, line 12, column {column}: {message}" if message else r"train\.csv, line 12 has 342"
    )
    with pytest.raises(MalformedFileError, match=expected):
        read_train(tmp_path)


@pytest.mark.parametrize(
    "column",
    [
        "row_id",
        "sequence_id",
        "sequence_counter",
        "subject",
        "sequence_type",
        "orientation",
        "behavior",
        "phase",
        "gesture",
    ],
)
def test_an_empty_id_or_label_is_named_with_its_lines(tmp_path, column):
    path = _two_sequences(tmp_path)
    position = TRAIN_COLUMNS.index(column)
    for number in (7, 45):
        _edit_line(path, number, lambda fields: [*fields[:position], b"", *fields[position + 1 :]])
    with pytest.raises(MalformedFileError, match=rf"train\.csv: column {column} is empty on lines 7 and 45"):
        read_train(tmp_path, meta_columns=("sequence_id",))  # checked even when not asked for


def test_sequence_counters_must_run_from_0_to_n_minus_1(tmp_path):
    path = _two_sequences(tmp_path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:20] + lines[21:]))  # line 21 (SEQ_000000, counter 19) lost
    with pytest.raises(
        MalformedFileError,
        match=r"line 21: sequence SEQ_000000 has no row with sequence_counter 19 \(the next counter is 20\)",
    ):
        read_train(tmp_path)
    path.write_bytes(b"\n".join([*lines[:50], lines[49], *lines[50:]]))  # line 50 twice
    with pytest.raises(
        MalformedFileError, match=r"lines 50 and 51: sequence SEQ_000001 has sequence_counter 18 twice"
    ):
        read_train(tmp_path)
    _edit_line(path, 2, lambda fields: [b"SEQ_000000_-00001", fields[1], fields[2], b"-1", *fields[4:]])
    with pytest.raises(
        MalformedFileError, match=r"line 2: sequence SEQ_000000 has a negative sequence_counter -1"
    ):
        read_train(tmp_path)
    path.write_bytes(b"\n".join(lines[:40]) + b"\n")  # cut at a line end: SEQ_000001 has rows 0..8
    assert read_train(tmp_path).height == 39  # undetectable: a complete, shorter sequence


def test_rows_in_another_order_are_read_and_give_the_same_table(tmp_path):
    path = _two_sequences(tmp_path)
    expected = load_sequence_table(tmp_path, use_cache=False)
    lines = path.read_bytes().split(b"\n")
    order = np.random.default_rng(0).permutation(np.arange(1, 61))
    path.write_bytes(b"\n".join([lines[0], *(lines[i] for i in order)]) + b"\n")
    assert np.array_equal(load_sequence_table(tmp_path, use_cache=False).features, expected.features)


def test_row_id_must_match_sequence_id_and_counter(tmp_path):
    path = _two_sequences(tmp_path)
    _edit_line(path, 33, lambda fields: [b"SEQ_000001_000007", *fields[1:]])  # counter 1
    with pytest.raises(
        MalformedFileError,
        match=r"line 33: row_id 'SEQ_000001_000007' does not match sequence_id 'SEQ_000001' and sequence_counter 1",
    ):
        read_train(tmp_path)
    frame = pl.read_csv(path).with_columns(
        row_id=pl.col("sequence_id") + "_" + pl.col("sequence_counter").cast(pl.String)
    )  # the counter without zero padding: the same row
    frame.write_csv(path)
    assert read_train(tmp_path)["row_id"][31] == "SEQ_000001_1"


def test_test_csv_ids_are_left_to_predicts_rules(tmp_path):
    path = _two_sequences(tmp_path, "test")
    _edit_line(path, 9, lambda fields: [fields[0], fields[1], b"", *fields[3:]])  # no sequence_counter
    assert read_test(tmp_path)["sequence_counter"].null_count() == 1


def test_quoted_fields_are_checked_by_the_csv_module(tmp_path):
    path = _two_sequences(tmp_path)
    expected = read_train(tmp_path)
    pl.read_csv(path).write_csv(path, quote_style="non_numeric")
    assert b'"' in path.read_bytes()
    assert read_train(tmp_path).equals(expected)
    _edit_line(path, 40, lambda fields: fields[:-1])
    with pytest.raises(MalformedFileError, match=r"line 40 has 340 field"):
        read_train(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\n", len(data) // 2) + 200])
    with pytest.raises(MalformedFileError, match="is cut short"):
        read_train(tmp_path)


def test_demographics_lines_and_subjects_are_checked(tmp_path):
    _two_sequences(tmp_path)
    path = tmp_path / "train_demographics.csv"
    make_demographics(["SUBJ_000001", "SUBJ_000002", "SUBJ_000003"]).write_csv(path)
    _edit_line(path, 3, lambda fields: fields[:4] + fields[5:])
    with pytest.raises(
        MalformedFileError, match=r"train_demographics\.csv, line 3 has 7 field\(s\) where the header has 8"
    ):
        read_demographics(path)
    make_demographics(["SUBJ_000001", "SUBJ_000002"]).write_csv(path)
    _edit_line(path, 3, lambda fields: [b"", *fields[1:]])
    with pytest.raises(MalformedFileError, match=r"column subject is empty on line 3"):
        read_demographics(path)
    make_demographics(["SUBJ_000001"]).write_csv(path)
    _edit_line(path, 2, lambda fields: [*fields[:2], b"thirty", *fields[3:]])
    with pytest.raises(MalformedFileError, match=r"line 2, column age: 'thirty' is not a number"):
        read_demographics(path)
