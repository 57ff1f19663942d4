"""Falling back to the synthetic data, and the data-layer demo on it."""

import logging

from codes.common import demo
from codes.common.data_source import resolve_data_dir


def test_auto_generates_the_synthetic_data_once_and_says_so(tmp_path, caplog):
    synthetic = tmp_path / "synthetic"
    with caplog.at_level(logging.WARNING, logger="codes.common.data_source"):
        assert resolve_data_dir("auto", tmp_path / "data", synthetic, synthetic_subjects=2) == synthetic
    assert "generating the synthetic stand-in" in caplog.text
    assert (synthetic / "train.csv").is_file() and (synthetic / "test_labels.csv").is_file()
    stamp = (synthetic / "train.csv").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="codes.common.data_source"):
        resolve_data_dir("auto", tmp_path / "data", synthetic, synthetic_subjects=2)
    assert "using the synthetic stand-in" in caplog.text
    assert (synthetic / "train.csv").stat().st_mtime_ns == stamp  # not regenerated


def test_demo_runs_end_to_end_on_generated_data(tmp_path, capsys):
    demo.main(
        [
            "--data-dir", str(tmp_path / "data"), "--synthetic-dir", str(tmp_path / "synthetic"),
            "--synthetic-subjects", "5", "--folds", "5", "--max-len", "64",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "train: 510 sequences, 5 subjects" in printed
    assert "features (510, 64, 44)" in printed
    assert "(cache)" in printed
