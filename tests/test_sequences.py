"""Sequence table: building, padding, normalisation, save/load and the feature cache."""

import logging
import os

import numpy as np
import polars as pl
import pytest

from codes.common.features import FeatureSettings
from codes.common.sequences import (
    FeatureNormalizer,
    SequenceTable,
    build_sequence_table,
    load_sequence_table,
    pad_sequences,
)
from tests.helpers import make_demographics, make_frame, rest_sensors, write_dataset


def _frame(lengths=(12, 5, 30), seed=0):
    rng = np.random.default_rng(seed)
    sequences = []
    for i, n in enumerate(lengths):
        sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, 9.8]), n, rng)
        sensors[:, :7] += rng.normal(scale=0.1, size=(n, 7))
        sequences.append((f"SEQ_{i:06d}", f"SUBJ_{i % 2:06d}", sensors))
    gestures = ["Wave hello", "Neck - scratch", "Cheek - pinch skin"][: len(lengths)]
    return make_frame(sequences, gestures=gestures), make_demographics(["SUBJ_000000", "SUBJ_000001"])


@pytest.fixture(scope="module")
def table():
    frame, demographics = _frame()
    return build_sequence_table(frame, demographics, FeatureSettings())


def test_table_metadata(table):
    assert table.lengths.tolist() == [12, 5, 30]
    assert table.gestures.tolist() == ["Wave hello", "Neck - scratch", "Cheek - pinch skin"]
    assert table.orientations.tolist() == ["Seated Straight"] * 3
    assert table.demographics.shape == (3, 7)


def test_rows_out_of_order_give_the_same_table(table):
    frame, demographics = _frame()
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)
    other = build_sequence_table(shuffled, demographics, FeatureSettings())
    order = np.argsort(other.sequence_ids)
    assert np.array_equal(other.sequence_ids[order], table.sequence_ids)
    rebuilt = other.subset(order)
    assert np.allclose(rebuilt.features, table.features)


def test_padding_keeps_the_last_steps_and_zeroes_the_rest(table):
    padded = pad_sequences(table, max_len=8)
    assert padded.features.shape == (3, 8, table.features.shape[1])
    assert padded.mask.sum(axis=1).tolist() == [8, 5, 8]
    # sequence 0 (12 steps): its last 8 rows, in order
    assert np.array_equal(padded.features[0], table.sequence_features(0)[-8:])
    # sequence 1 (5 steps): all its rows, then zeros
    assert np.array_equal(padded.features[1, :5], table.sequence_features(1))
    assert (padded.features[1, 5:] == 0).all() and not padded.mask[1, 5:].any()


def test_subset_and_save_load_round_trip(table, tmp_path):
    part = table.subset(np.array([2, 0]))
    assert part.sequence_ids.tolist() == ["SEQ_000002", "SEQ_000000"]
    assert np.array_equal(part.sequence_features(0), table.sequence_features(2))
    table.save(tmp_path / "t.npz")
    loaded = SequenceTable.load(tmp_path / "t.npz")
    for name in (
        "features",
        "offsets",
        "step_valid",
        "feature_present",
        "labels",
        "sequence_ids",
        "subjects",
    ):
        assert np.array_equal(getattr(loaded, name), getattr(table, name))
    assert loaded.feature_names == table.feature_names and loaded.feature_groups == table.feature_groups


def test_normalizer_uses_the_training_fold_only(table):
    train = table.subset(np.array([0, 1]))
    normalizer = FeatureNormalizer().fit(train)
    rows = train.features
    assert np.allclose(normalizer.scaler.mean_, rows.mean(axis=0), atol=1e-4)
    transformed = normalizer.transform(train)
    varying = rows.std(axis=0) > 1e-3
    assert np.allclose(transformed[:, varying].mean(axis=0), 0, atol=1e-4)
    # the held-out sequence is transformed with the training statistics, not its own
    held_out = normalizer.transform(table.subset(np.array([2])))
    expected = (table.sequence_features(2) - normalizer.scaler.mean_) / normalizer.scaler.scale_
    assert np.allclose(held_out, expected, atol=1e-4)
    again = FeatureNormalizer.from_state_dict(normalizer.state_dict())
    assert np.array_equal(again.transform(table), normalizer.transform(table))


def test_absent_features_are_left_out_of_the_fit_and_normalised_to_zero():
    frame, demographics = _frame(lengths=(20, 20, 20))
    frame = frame.with_columns(
        pl.when(pl.col("sequence_id") == "SEQ_000001").then(None).otherwise(pl.col("thm_2")).alias("thm_2")
    )
    table = build_sequence_table(frame, demographics, FeatureSettings())
    k = table.feature_names.index("thm_2")
    normalizer = FeatureNormalizer().fit(table)
    present_rows = np.concatenate([table.sequence_features(0)[:, k], table.sequence_features(2)[:, k]])
    assert normalizer.scaler.mean_[k] == pytest.approx(present_rows.mean(), abs=1e-4)
    assert (normalizer.transform(table)[table.offsets[1] : table.offsets[2], k] == 0).all()


def test_cache_returns_the_same_table_and_tracks_content_and_settings(tmp_path, caplog):
    frame, demographics = _frame()
    write_dataset(tmp_path, frame, demographics)
    with caplog.at_level(logging.INFO, logger="codes.common.sequences"):
        first = load_sequence_table(tmp_path, "train")
        second = load_sequence_table(tmp_path, "train")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("built") for m in messages) and any("from cache" in m for m in messages)
    assert np.array_equal(first.features, second.features)
    assert len(list((tmp_path / "cache").glob("train-*.npz"))) == 1
    load_sequence_table(tmp_path, "train", FeatureSettings(tof_mode="none"))
    assert len(list((tmp_path / "cache").glob("train-*.npz"))) == 2
    # new content (same file name) -> a new key, and the new values
    frame2, _ = _frame(seed=9)
    frame2.write_csv(tmp_path / "train.csv")
    third = load_sequence_table(tmp_path, "train")
    assert not np.allclose(third.features, first.features)
    assert len(list((tmp_path / "cache").glob("train-*.npz"))) == 3


def test_cache_is_keyed_by_content_not_by_file_time(tmp_path, caplog):
    frame, demographics = _frame()
    write_dataset(tmp_path, frame, demographics)
    first = load_sequence_table(tmp_path, "train")
    stat = (tmp_path / "train.csv").stat()
    os.utime(tmp_path / "train.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    with caplog.at_level(logging.INFO, logger="codes.common.sequences"):
        again = load_sequence_table(tmp_path, "train")
    assert any("from cache" in r.getMessage() for r in caplog.records)
    assert np.array_equal(again.features, first.features)
