"""Bad input gets an error a user can act on."""

import numpy as np
import polars as pl
import pytest

from codes.common.data_files import DataFileError, read_demographics, read_train
from codes.common.data_source import resolve_data_dir
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
