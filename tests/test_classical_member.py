"""The MiniRocket + ridge run member: its series, its saved arrays, its run folder and its predictor.

One tiny 2-fold run (168 kernels) on the toy data is trained once for the module (about a second
once numba has compiled MiniRocket). Tests that need aeon skip without it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields

import numpy as np
import polars as pl
import pytest

from codes.classical import minirocket
from codes.classical.minirocket import (
    ALPHAS,
    CHANNELS,
    MODEL_FILE,
    MiniRocketRidge,
    ModelFileError,
    feature_settings,
    fit_ridge,
    fit_temperature,
    sequence_series,
    temperature_log_loss,
)
from codes.common.features import feature_layout
from codes.common.schema import GESTURES, NUM_GESTURES
from codes.common.sequences import SequenceTable
from codes.common.training import IMU_ONLY_PROBABILITY_PREFIX
from codes.inference.run_folder import RunFolderError

N_KERNELS = 168
MAX_LEN = 64
PROBABILITIES = [f"prob_{g}" for g in GESTURES]


@pytest.fixture(scope="module")
def aeon():
    return pytest.importorskip("aeon")


def table_of(sequences: list[np.ndarray]) -> SequenceTable:
    """A SequenceTable of the IMU feature layout whose rows are the given ``(n_i, F)`` arrays."""
    names, groups = feature_layout(feature_settings())
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(sequences)
    return SequenceTable(
        sequence_ids=np.array([f"S{i}" for i in range(n)]),
        subjects=np.array(["A"] * n),
        offsets=offsets,
        features=np.concatenate(sequences).astype(np.float32) if n else np.zeros((0, len(names)), np.float32),
        step_valid=np.ones(offsets[-1], dtype=bool),
        feature_present=np.ones((n, len(names)), dtype=bool),
        demographics=np.full((n, 7), np.nan, dtype=np.float32),
        labels=np.zeros(n, dtype=np.int64),
        orientations=np.array([""] * n),
        feature_names=names,
        feature_groups=groups,
    )


def random_series(n: int, labels: np.ndarray, seed: int = 0, length: int = 32) -> np.ndarray:
    """``(n, 6, length)`` series whose label shows as a sine of its own frequency on channel 0."""
    rng = np.random.default_rng(seed)
    series = rng.normal(scale=0.3, size=(n, len(CHANNELS), length)).astype(np.float32)
    steps = np.arange(length)
    series[:, 0] += np.sin(steps[None, :] * (0.2 + 0.15 * labels[:, None]))
    return series


# ---------------------------------------------------------------- no aeon needed
def test_series_are_the_last_steps_left_padded_with_zeros():
    names = feature_layout(feature_settings())[0]
    columns = [names.index(c) for c in CHANNELS]
    rng = np.random.default_rng(0)
    long, short = rng.normal(size=(20, len(names))), rng.normal(size=(3, len(names)))
    short[1, columns[2]] = np.nan
    series = sequence_series(table_of([long, short, np.zeros((0, len(names)))]), max_len=8)

    assert series.shape == (3, len(CHANNELS), 8) and series.dtype == np.float32
    np.testing.assert_array_equal(series[0], long[-8:, columns].T.astype(np.float32))  # the last 8 steps
    expected = np.zeros((len(CHANNELS), 8), dtype=np.float32)
    expected[:, -3:] = np.nan_to_num(short[:, columns].T)  # ends at the last position, NaN -> 0
    np.testing.assert_array_equal(series[1], expected)
    assert not series[2].any()  # an empty sequence: zeros


def test_the_settings_default_to_exp020s_data_settings():
    pytest.importorskip("hydra")
    from codes.exp.exp020.config import DataConfig

    ours = {f.name: f.default for f in fields(minirocket.DataSettings)}
    theirs = DataConfig()
    for name, value in ours.items():
        assert getattr(theirs, name) == value, name


def test_help_lists_the_settings_and_an_unknown_setting_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        minirocket.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for key in (
        "data.source=auto",
        "data.max_len=128",
        "n_kernels=10000",
        "paths.data_dir=data",
        "output_root",
    ):
        assert key in text
    with pytest.raises(SystemExit) as stop:
        minirocket.main(["data.max_lenn=3"])
    assert stop.value.code == 2 and "data.max_lenn" in capsys.readouterr().err


def test_the_fitted_temperature_lowers_the_log_loss_of_ridge_scores():
    # ridge scores on the +-1 target scale: the right class is ahead by ~0.6, far too flat for T=1
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, size=400)
    decisions = rng.normal(scale=0.15, size=(400, 5)) - 0.8
    decisions[np.arange(400), targets] += 0.6
    temperature = fit_temperature(decisions, targets)
    assert temperature < 0.5
    assert (
        temperature_log_loss(decisions, targets, temperature)
        < temperature_log_loss(decisions, targets, 1.0) - 0.3
    )


def test_the_ridge_chooses_the_alpha_of_ridgeclassifiercvs_default_and_gives_its_decisions():
    from sklearn.linear_model import RidgeClassifierCV

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=80) * 3  # gesture indices 0, 3, 6, 9
    features = rng.normal(size=(80, 200))
    features[:, :4] += 2 * np.eye(4)[labels // 3]
    reference = RidgeClassifierCV(alphas=ALPHAS).fit(features, labels)
    coef, intercept, alpha, classes, loo = fit_ridge(features, labels)
    assert alpha == reference.alpha_
    np.testing.assert_array_equal(classes, [0, 3, 6, 9])
    np.testing.assert_allclose(
        features @ coef.T + intercept, reference.decision_function(features), atol=1e-10
    )
    assert loo.shape == (80, 4)
    # leave-one-out values: a left-out row is predicted worse than the fitted model predicts it
    fitted = features @ coef.T + intercept
    assert np.abs(loo - fitted).mean() > 1e-3


# ---------------------------------------------------------------- one fold's model (aeon)
@pytest.fixture(scope="module")
def unseen_fold(aeon):
    """A model fitted on 3 of the 18 gestures, and its training series."""
    labels = np.repeat([0, 5, 11], 20)
    series = random_series(len(labels), labels)
    model, info = minirocket.fit_fold(series, labels, n_kernels=N_KERNELS, seed=3)
    return model, info, series, labels


def test_the_restored_minirocket_transform_equals_the_fitted_one(unseen_fold):
    from aeon.transformations.collection.convolution_based import MiniRocket

    model, _, series, _ = unseen_fold
    fitted = MiniRocket(n_kernels=N_KERNELS, n_jobs=1, random_state=3).fit(series)
    other = random_series(7, np.arange(7), seed=9)
    for name, ours, theirs in zip(
        minirocket.PARAMETER_NAMES, model.parameters, fitted.parameters, strict=True
    ):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    np.testing.assert_array_equal(model.features(other), fitted.transform(other))
    restored = MiniRocketRidge(**{f.name: getattr(model, f.name) for f in fields(model) if f.init})
    assert restored.transformer() is not fitted
    np.testing.assert_array_equal(restored.features(other), fitted.transform(other))


def test_probabilities_sum_to_one_with_zeros_for_gestures_the_fold_never_saw(unseen_fold):
    model, info, series, labels = unseen_fold
    probabilities = model.probabilities(random_series(9, np.array([0, 5, 11] * 3), seed=4))
    assert probabilities.shape == (9, NUM_GESTURES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    unseen = np.setdiff1d(np.arange(NUM_GESTURES), [0, 5, 11])
    assert not probabilities[:, unseen].any()
    assert (probabilities[:, [0, 5, 11]] > 0).all()
    assert info["train_loss"] <= info["train_loss_t1"]  # the temperature is fitted on the LOO values
    assert (model.probabilities(series).argmax(1) == labels).mean() > 0.9  # it learnt the sines


def test_a_saved_model_loads_without_pickle_and_gives_identical_probabilities(unseen_fold, tmp_path):
    model, _, series, _ = unseen_fold
    path = model.save(tmp_path / MODEL_FILE)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == set(minirocket.MODEL_KEYS)
        assert all(data[key].dtype.kind in "iufU" for key in data.files)  # numbers and text, no objects
    loaded = MiniRocketRidge.load(path)
    np.testing.assert_array_equal(loaded.probabilities(series), model.probabilities(series))
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file and a rename


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", "missing_key", "object_array", "wrong_shape", "absent"]
)
def test_a_damaged_model_file_is_refused_naming_it(unseen_fold, tmp_path, damage):
    model, _, _, _ = unseen_fold
    path = model.save(tmp_path / MODEL_FILE)
    arrays = model.arrays()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing_key":
        del arrays["temperature"]
        np.savez(path, **arrays)
    elif damage == "object_array":
        arrays["classes"] = np.array([0, "x", None], dtype=object)
        np.savez(path, **arrays)
    elif damage == "wrong_shape":
        arrays["ridge_coef"] = arrays["ridge_coef"][:, :-1]
        np.savez(path, **arrays)
    else:
        path.unlink()
    with pytest.raises(ModelFileError, match=str(path)) as refused:
        MiniRocketRidge.load(path)
    assert isinstance(refused.value, RunFolderError)


# ---------------------------------------------------------------- a run folder (aeon)
@pytest.fixture(scope="module")
def run_dir(aeon, toy_data, tmp_path_factory):
    output_root = tmp_path_factory.mktemp("minirocket_runs")
    arguments = [
        "data.source=competition",
        f"paths.data_dir={toy_data}",
        f"output_root={output_root}",
        f"n_kernels={N_KERNELS}",
        f"data.max_len={MAX_LEN}",
        "data.n_folds=2",
        "run_name=toy",
    ]
    minirocket.main(arguments)
    return output_root / "minirocket" / "toy"


@pytest.fixture(scope="module")
def toy_frames(toy_data):
    return pl.read_csv(toy_data / "train.csv"), pl.read_csv(toy_data / "train_demographics.csv")


def test_the_run_folder_has_trainings_outputs(run_dir, toy_data):
    from codes.common.runs import read_run_record
    from codes.inference.run_folder import load_run_config

    oof = pl.read_parquet(run_dir / "oof.parquet")
    fixed = ["sequence_id", "fold", "gesture", "predicted_gesture", "predicted_gesture_imu_only"]
    assert oof.columns == fixed + PROBABILITIES + [f"{IMU_ONLY_PROBABILITY_PREFIX}{g}" for g in GESTURES]
    assert oof.height == 108 and sorted(oof["fold"].unique()) == [0, 1]
    probabilities = oof.select(PROBABILITIES).to_numpy()
    np.testing.assert_array_equal(probabilities, oof.select(oof.columns[-NUM_GESTURES:]).to_numpy())
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["overall"]) == {
        "score",
        "binary_f1",
        "macro_f1",
        "score_imu_only",
        "n_sequences",
        "wall_seconds",
    }
    assert sorted(metrics["folds"]) == ["0", "1"]
    for fold in metrics["folds"].values():
        assert fold["best_epoch"] == 0 and fold["epochs"] == 1 and fold["score"] == fold["score_imu_only"]
    cfg = load_run_config(run_dir)
    assert cfg.exp_name == "minirocket" and cfg.model.kind == "minirocket_ridge"
    assert (cfg.data.use_thm, cfg.data.tof_mode, cfg.data.max_len) == (False, "none", MAX_LEN)
    assert list(cfg.model.channels) == CHANNELS and cfg.model.n_kernels == N_KERNELS
    record = read_run_record(run_dir)
    assert set(record["data"]) == {"train.csv", "train_demographics.csv"}  # toy data: no folds.csv
    assert record["config"] == cfg.to_dict()
    assert all((run_dir / f"fold{k}" / MODEL_FILE).is_file() for k in (0, 1))


def test_an_existing_run_folder_is_not_overwritten(run_dir):
    before = (run_dir / "fold0" / MODEL_FILE).read_bytes()
    arguments = ["data.source=competition", f"output_root={run_dir.parents[1]}", "run_name=toy"]
    with pytest.raises(FileExistsError, match="choose another run_name"):
        minirocket.main(arguments)
    assert (run_dir / "fold0" / MODEL_FILE).read_bytes() == before


def test_the_oof_equals_the_predictors_answers_on_each_folds_sequences(run_dir, toy_frames):
    train, demographics = toy_frames
    predictor = minirocket.load_predictor(
        run_dir, strict=True, subject_aware=False, quantize=False, num_threads=1
    )
    assert predictor.folds == [0, 1] and predictor.max_len == MAX_LEN and predictor.device.type == "cpu"
    oof = pl.read_parquet(run_dir / "oof.parquet")
    for fold in (0, 1):
        single = predictor.restricted_to([fold])
        assert single.folds == [fold]
        rows = oof.filter(pl.col("fold") == fold)
        answered = single.predict_frame(
            train.filter(pl.col("sequence_id").is_in(rows["sequence_id"].to_list())), demographics
        )
        answered = rows.select("sequence_id").join(answered, on="sequence_id", how="left")
        np.testing.assert_allclose(
            answered.select(PROBABILITIES).to_numpy(), rows.select(PROBABILITIES).to_numpy(), atol=1e-5
        )
        assert answered["gesture"].to_list() == rows["predicted_gesture"].to_list()
        first = rows["sequence_id"][0]
        sequence = train.filter(pl.col("sequence_id") == first)
        subject = demographics.filter(pl.col("subject") == sequence["subject"][0])
        one = single.predict_probabilities(sequence, subject)
        np.testing.assert_allclose(one, rows.select(PROBABILITIES).to_numpy()[0], atol=1e-5)
    both = predictor.predict_frame(train.head(500), demographics)
    assert both["imu_only"].all()  # the model reads the IMU only


def test_a_sequence_shorter_than_minirockets_kernels_is_answered(run_dir, toy_frames):
    train, demographics = toy_frames
    predictor = minirocket.load_predictor(run_dir, strict=True)
    sequence = train.filter(pl.col("sequence_id") == train["sequence_id"][0]).head(5)
    subject = demographics.filter(pl.col("subject") == sequence["subject"][0])
    assert predictor.predict(sequence, subject) in GESTURES
    probabilities = predictor.predict_probabilities(sequence, subject)
    assert np.isfinite(probabilities).all() and abs(probabilities.sum() - 1) < 1e-5


def test_a_missing_fold_model_is_an_error_naming_it_unless_the_other_folds_are_named(run_dir, tmp_path):
    copy = tmp_path / "toy"
    shutil.copytree(run_dir, copy)
    (copy / "fold1" / MODEL_FILE).unlink()
    with pytest.raises(ModelFileError, match=str(copy / "fold1" / MODEL_FILE)):
        minirocket.load_predictor(copy)
    assert minirocket.load_predictor(copy, folds=[0]).folds == [0]
    with pytest.raises(ValueError, match="subject_aware"):
        minirocket.load_predictor(copy, folds=[0], subject_aware=True)
    assert minirocket.load_predictor(copy, folds=[0], subject_aware="pairs").subject_assignment is None


def test_grouped_decisions_of_a_subject_never_read_that_subjects_labels():
    """The temperature is fitted on decisions of ridges fitted without the sample's subject, so
    overlapping windows of one recording cannot make it overconfident."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 8))
    labels = np.arange(60) % 3
    groups = np.repeat(np.arange(6), 10)
    classes = np.arange(3)
    before = minirocket.grouped_decisions(features, labels, groups, 1.0, classes)
    relabelled = labels.copy()
    relabelled[groups == 2] = (labels[groups == 2] + 1) % 3
    after = minirocket.grouped_decisions(features, relabelled, groups, 1.0, classes)
    assert np.allclose(before[groups == 2], after[groups == 2])
    assert not np.allclose(before[groups != 2], after[groups != 2])
    assert minirocket.grouped_decisions(features, labels, np.zeros(60), 1.0, classes) is None


def test_a_blend_stages_and_serves_a_classical_member_and_refuses_it_damaged(run_dir, toy_frames, tmp_path):
    from codes.inference.blend import BlendError, fit_blend, load_blend
    from codes.inference.kaggle_package import stage_blend_dataset

    blend_dir = tmp_path / "blend"
    blend = fit_blend([run_dir], blend_dir)
    assert blend["members"][0]["needs"] == "imu_only" and blend["routes"]["imu_only"]["weights"] == [1.0]
    staged = stage_blend_dataset(blend_dir, tmp_path / "staged", "someone")
    assert (
        sorted(p.name for p in (staged / "members" / "00-minirocket-toy").rglob("*.npz")) == ["model.npz"] * 2
    )
    train, demographics = toy_frames
    frame = train.filter(
        pl.col("sequence_id").is_in(train["sequence_id"].unique(maintain_order=True).head(5).implode())
    )
    expected = (
        minirocket.load_predictor(run_dir).predict_frame(frame, demographics).select(PROBABILITIES).to_numpy()
    )
    for folder in (blend_dir, staged):
        served = (
            load_blend(folder, device="cpu")
            .predict_frame(frame, demographics)
            .select(PROBABILITIES)
            .to_numpy()
        )
        np.testing.assert_allclose(served, expected, atol=1e-6)
    model = staged / "members" / "00-minirocket-toy" / "fold1" / "model.npz"
    model.write_bytes(model.read_bytes()[:200])
    with pytest.raises(BlendError, match="cannot be served"):
        load_blend(staged, device="cpu")


def test_answering_leaves_the_torch_thread_count_as_it_was(run_dir, toy_data):
    """numba starts its OpenMP threads on MiniRocket's first transform, which resets torch's count
    (the same OpenMP runtime): a fresh process, as a served blend is, keeps the threads it chose."""
    import subprocess
    import sys

    script = f"""
import polars as pl, torch
torch.set_num_threads(1)
from codes.classical import minirocket
predictor = minirocket.load_predictor({str(run_dir)!r})
train = pl.read_csv({str(toy_data / "train.csv")!r})
predictor.predict(train.filter(pl.col("sequence_id") == train["sequence_id"][0]), None)
print("threads", torch.get_num_threads())
"""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "threads 1" in result.stdout
