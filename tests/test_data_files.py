"""Bad input gets an error a user can act on; the CSV readers' dtypes."""

import logging

import numpy as np
import polars as pl
import pytest

from codes.common.data_files import DataFileError, read_demographics, read_train
from codes.common.data_source import resolve_data_dir
from codes.common.schema import TOF_COLUMNS
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
