"""Inference: a trained run as the competition's predict(), batch mode, the gateway stand-in, Kaggle packaging.

One tiny 2-fold run per experiment is trained once for the module (a few seconds each).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from torch.optim.swa_utils import AveragedModel

from codes.common.checkpoint import load_checkpoint
from codes.common.ema import get_ema_multi_avg_fn_with_warmup
from codes.common.folds import assign_folds
from codes.common.metric import competition_score
from codes.common.schema import (
    GESTURES,
    IMU_COLUMNS,
    SENSOR_COLUMNS,
    TEST_COLUMNS,
    TEST_LABEL_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    mirror_sensors,
)
from codes.common.sequences import load_sequence_table
from codes.common.training import predict_probabilities
from codes.inference.batch import run_batch, score_predictions
from codes.inference.experiment import run_precision
from codes.inference.gateway import GatewayError, LocalGateway, latency_summary
from codes.inference.kaggle_package import stage_code_dataset, stage_run_dataset
from codes.inference.predictor import FALLBACK_GESTURE, InputColumnsError
from codes.inference.run_folder import (
    ConfigView,
    RunFolderError,
    evaluated_weights,
    load_run_config,
    select_folds,
)
from tests.helpers import training_config

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("exp013", "exp018")
TINY = {"d_model": 32, "num_blocks": 3, "num_heads": 4, "ff_dim": 64, "conv_kernel": 7, "demographics_dim": 8}
TINY_BERT = {"bert.num_layers": 1, "bert.num_heads": 4}
NON_IMU = THM_COLUMNS + TOF_COLUMNS
ATOL = 1e-4  # one sequence alone vs. a padded batch of 32: float32 summation order only


def exp_module(exp: str, name: str):
    return importlib.import_module(f"codes.exp.{exp}.{name}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared CPU


@pytest.fixture(scope="module")
def run_dir_of(toy_data, tmp_path_factory):
    """``run_dir_of(exp)``: a tiny 2-fold, 2-epoch run of ``exp`` on the toy data, trained once."""
    output_dir = tmp_path_factory.mktemp("inference_runs")
    runs: dict[str, Path] = {}

    def get(exp: str) -> Path:
        if exp not in runs:
            model = {**TINY, **(TINY_BERT if exp == "exp018" else {})}
            cfg = training_config(exp, toy_data, output_dir, model, "run_name=tiny", "trainer.epochs=2")
            exp_module(exp, "train").run_training(cfg)
            runs[exp] = output_dir / exp / "tiny"
        return runs[exp]

    return get


@pytest.fixture(scope="module")
def predictor018(run_dir_of):
    return exp_module("exp018", "inference").load_predictor(
        run_dir_of("exp018"), device="cpu", strict=True, subject_aware=False
    )


@pytest.fixture(scope="module")
def toy_sequences(toy_data) -> dict[str, pl.DataFrame]:
    """Every toy sequence as the gateway serves it: test.csv columns, ``pl.read_csv`` dtypes."""
    frame = pl.read_csv(toy_data / "train.csv").select(TEST_COLUMNS)
    return {key[0]: part for key, part in frame.partition_by("sequence_id", as_dict=True).items()}


@pytest.fixture(scope="module")
def toy_demographics(toy_data) -> pl.DataFrame:
    return pl.read_csv(toy_data / "train_demographics.csv")


def demographics_of(demographics: pl.DataFrame, sequence: pl.DataFrame) -> pl.DataFrame:
    return demographics.filter(pl.col("subject") == sequence["subject"][0])


def imu_only(sequence: pl.DataFrame) -> pl.DataFrame:
    return sequence.with_columns([pl.lit(None, dtype=sequence.schema[c]).alias(c) for c in NON_IMU])


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------- a saved run reproduces training
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_a_predictor_restricted_to_fold_k_reproduces_the_out_of_fold_predictions_of_fold_k(
    exp, run_dir_of, toy_sequences, toy_demographics
):
    run_dir = run_dir_of(exp)
    predictor = exp_module(exp, "inference").load_predictor(
        run_dir, device="cpu", strict=True, subject_aware=False
    )
    assert predictor.folds == [0, 1]
    oof = pl.read_parquet(run_dir / "oof.parquet")
    probability_columns = [f"prob_{g}" for g in GESTURES]
    for fold in (0, 1):
        single = predictor.restricted_to([fold])
        assert single.folds == [fold]
        rows = oof.filter(pl.col("fold") == fold)
        assert rows.height > 0
        expected = rows.select(probability_columns).to_numpy()
        got = np.stack(
            [
                single.predict_probabilities(
                    toy_sequences[s], demographics_of(toy_demographics, toy_sequences[s])
                )
                for s in rows["sequence_id"]
            ]
        )
        np.testing.assert_allclose(got, expected, atol=ATOL)
        clear = np.sort(expected, axis=1)[:, -1] - np.sort(expected, axis=1)[:, -2] > 10 * ATOL
        assert clear.sum() > 0
        predicted = np.array(GESTURES)[got.argmax(1)]
        assert (predicted[clear] == rows["predicted_gesture"].to_numpy()[clear]).all()
    # the other fold's model answers differently: the restriction is real
    assert not np.allclose(
        predictor.restricted_to([0]).predict_probabilities(*_first(toy_sequences, toy_demographics)),
        predictor.restricted_to([1]).predict_probabilities(*_first(toy_sequences, toy_demographics)),
    )


def _first(sequences, demographics):
    sequence = next(iter(sequences.values()))
    return sequence, demographics_of(demographics, sequence)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_imu_only_sequences_take_the_imu_only_path_training_evaluated(
    exp, run_dir_of, toy_data, toy_sequences, toy_demographics
):
    """Thermopiles and ToF all null -> the probabilities training computed with those inputs zeroed."""
    run_dir = run_dir_of(exp)
    dataset_module, model_module = (exp_module(exp, n) for n in ("dataset", "model"))
    cfg = load_run_config(run_dir)
    table = load_sequence_table(toy_data, "train", dataset_module.feature_settings(cfg.data))
    folds = assign_folds(table.gestures, table.subjects, cfg.data.n_folds, cfg.data.fold_seed)
    predictor = exp_module(exp, "inference").load_predictor(
        run_dir, folds=[1], device="cpu", strict=True, subject_aware=False
    )
    _, valid, valid_index, _ = dataset_module.split_fold(table, folds, 1, cfg.data.max_len)
    # the training way of loading the EMA weights, independent of codes.inference.run_folder
    model = model_module.GestureClassifier(valid.features.shape[-1], cfg.model, cfg.data.max_len)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(0.9), use_buffers=True)
    ema.load_state_dict(load_checkpoint(run_dir / "fold1" / "best.pt")["ema"])
    expected, _ = predict_probabilities(
        ema, valid.imu_only(dataset_module.non_imu_columns(table)), 32, torch.device("cpu"), None
    )
    got = np.stack(
        [
            predictor.predict_probabilities(
                imu_only(toy_sequences[s]), demographics_of(toy_demographics, toy_sequences[s])
            )
            for s in table.sequence_ids[valid_index]
        ]
    )
    np.testing.assert_allclose(got, expected, atol=ATOL)
    full = predictor.predict_probabilities(*_first(toy_sequences, toy_demographics))
    sequence, demographics = _first(toy_sequences, toy_demographics)
    assert not np.allclose(full, predictor.predict_probabilities(imu_only(sequence), demographics))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_inference_needs_neither_hydra_nor_omegaconf(exp, run_dir_of, toy_data):
    """A Kaggle image may lack them: loading and predicting must not import them."""
    script = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf"):
            raise ImportError(f"{{name}} is blocked")
sys.meta_path.insert(0, Blocker())
import polars as pl
from codes.exp.{exp}.inference import load_predictor
predictor = load_predictor({str(run_dir_of(exp))!r}, device="cpu")
frame = pl.read_csv({str(toy_data / "train.csv")!r}, n_rows=60)
sequence = frame.filter(pl.col("sequence_id") == frame["sequence_id"][0])
print(predictor.predict(sequence, pl.read_csv({str(toy_data / "train_demographics.csv")!r}).head(1)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] in GESTURES


def test_inference_takes_the_precision_the_run_trained_with():
    assert run_precision(ConfigView({"machine": {"precision": "bf16"}, "trainer": {}})) == "bf16"
    # run folders written before the machine section: trainer.precision, else auto
    assert run_precision(ConfigView({"trainer": {"precision": "fp32"}})) == "fp32"
    assert run_precision(ConfigView({"trainer": {}})) == "auto"


# ---------------------------------------------------------------- odd sequences
def _probabilities(predictor, sequence, demographics):
    probabilities = predictor.predict_probabilities(sequence, demographics)
    assert probabilities is not None and np.isfinite(probabilities).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert predictor.predict(sequence, demographics) == GESTURES[int(probabilities.argmax())]
    return probabilities


def assert_same_probabilities(predictor, reference, sequences, demographics, count: int, atol: float) -> None:
    """The two predictors give the same probabilities on the first ``count`` sequences."""
    for sequence_id in list(sequences)[:count]:
        sequence = sequences[sequence_id]
        sequence_demographics = demographics_of(demographics, sequence)
        np.testing.assert_allclose(
            _probabilities(predictor, sequence, sequence_demographics),
            _probabilities(reference, sequence, sequence_demographics),
            atol=atol,
        )


def test_nan_rows_are_filled_from_their_neighbours_with_a_warning(
    predictor018, toy_sequences, toy_demographics, caplog
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    gap_rows = pl.int_range(pl.len()).is_in([3, 4, 10])
    with_gaps = sequence.with_columns(
        [pl.when(gap_rows).then(None).otherwise(pl.col(c)).alias(c) for c in SENSOR_COLUMNS]
    ).with_columns(
        pl.when(pl.int_range(pl.len()) == 12).then(float("nan")).otherwise(pl.col("rot_x")).alias("rot_x")
    )
    _probabilities(predictor018, with_gaps, demographics)
    assert "4 of" in warnings_of(caplog) and "lack an acc or rot reading" in warnings_of(caplog)
    # the rule: a missing reading is the previous row's (forward fill within the sequence)
    imu = sequence.select(IMU_COLUMNS).cast(pl.Float64).to_numpy().copy()
    imu[[3, 4]] = imu[2]
    imu[10] = imu[9]
    imu[12, 3:] = imu[11, 3:]
    copied = sequence.with_columns([pl.Series(c, imu[:, i]) for i, c in enumerate(IMU_COLUMNS)])
    table_gaps = predictor018.sequence_table(with_gaps, demographics)
    table_copied = predictor018.sequence_table(copied, demographics)
    raw = table_gaps.feature_groups["imu"][: len(IMU_COLUMNS)]  # acc and quaternion features
    np.testing.assert_allclose(table_gaps.features[:, raw], table_copied.features[:, raw], atol=1e-6)
    assert not table_gaps.step_valid[[3, 4, 10, 12]].any() and table_copied.step_valid.all()


def test_a_single_row_gives_a_gesture_with_a_warning(predictor018, toy_sequences, toy_demographics, caplog):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    _probabilities(predictor018, sequence.tail(1), demographics)
    assert "has 1 row(s), fewer than any training sequence" in warnings_of(caplog)


def test_2000_rows_use_only_the_last_max_len_steps_with_a_warning(
    predictor018, toy_sequences, toy_demographics, caplog
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    long = pl.concat([sequence] * (2000 // sequence.height + 1)).head(2000)
    long = long.with_columns(pl.int_range(pl.len()).alias("sequence_counter"))
    reference = _probabilities(predictor018, long, demographics)
    assert "has 2000 rows, more than any training sequence" in warnings_of(caplog)
    # rows before the window (and the one before it, which the step differences read) change nothing;
    # the quaternions are left as they are: their sign continuity runs from the sequence start
    early = pl.int_range(pl.len()) < 2000 - predictor018.max_len - 1
    rng = np.random.default_rng(0)
    changed = long.with_columns(
        [pl.when(early).then(pl.lit(float(rng.normal(5, 3)))).otherwise(pl.col(c)).alias(c) for c in ["acc_x", "acc_y", "acc_z", *THM_COLUMNS]]
    )  # fmt: skip
    np.testing.assert_allclose(_probabilities(predictor018, changed, demographics), reference, atol=1e-6)
    last = long.with_columns(
        pl.when(pl.int_range(pl.len()) >= 2000 - predictor018.max_len).then(pl.col("acc_x") + 3.0).otherwise(pl.col("acc_x"))
    )  # fmt: skip
    assert not np.allclose(_probabilities(predictor018, last, demographics), reference, atol=1e-6)


def test_all_null_rotation_uses_the_identity_quaternion_with_a_warning(
    predictor018, toy_sequences, toy_demographics, caplog
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    no_rot = sequence.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in IMU_COLUMNS[3:]])
    identity = sequence.with_columns(
        pl.lit(1.0).alias("rot_w"),
        pl.lit(0.0).alias("rot_x"),
        pl.lit(0.0).alias("rot_y"),
        pl.lit(0.0).alias("rot_z"),
    )
    np.testing.assert_allclose(
        _probabilities(predictor018, no_rot, demographics),
        _probabilities(predictor018, identity, demographics),
        atol=1e-6,
    )
    assert "has no rotation reading: the identity quaternion is used" in warnings_of(caplog)


def test_null_or_missing_demographics_are_unknown_with_a_warning(
    predictor018, toy_sequences, toy_demographics, caplog
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    all_null = demographics.with_columns([pl.lit(None).alias(c) for c in demographics.columns[1:]])
    reference = _probabilities(predictor018, sequence, all_null)
    assert "handedness" in warnings_of(caplog) and "taken as unknown" in warnings_of(caplog)
    for unknown in (demographics.head(0), demographics.select("subject"), None):
        np.testing.assert_allclose(_probabilities(predictor018, sequence, unknown), reference, atol=1e-6)
    assert "no demographics row for subject" in warnings_of(caplog)
    known = _probabilities(predictor018, sequence, demographics)
    assert not np.allclose(known, reference, atol=1e-6)
    # one field null: only that field is unknown
    no_age = demographics.with_columns(pl.lit(None).alias("age"))
    caplog.clear()
    _probabilities(predictor018, sequence, no_age)
    assert "field(s) age missing" in warnings_of(caplog)


def test_handedness_comes_from_the_demographics_row(predictor018, toy_sequences, toy_demographics):
    """A left-handed wearer's mirrored recording gives the right-handed wearer's features."""
    sequence, demographics = _first(toy_sequences, toy_demographics)
    right = demographics.with_columns(pl.lit(1).alias("handedness"))
    left = demographics.with_columns(pl.lit(0).alias("handedness"))
    values = sequence.select(SENSOR_COLUMNS).cast(pl.Float64).to_numpy()
    mirrored = sequence.with_columns(
        [pl.Series(c, mirror_sensors(values)[:, i]) for i, c in enumerate(SENSOR_COLUMNS)]
    )
    as_right = predictor018.sequence_table(sequence, right)
    as_left = predictor018.sequence_table(mirrored, left)
    np.testing.assert_allclose(as_left.features, as_right.features, atol=1e-5)
    assert not np.allclose(
        predictor018.sequence_table(mirrored, right).features, as_right.features, atol=1e-3
    )


def test_rows_out_of_order_are_sorted_by_the_counter(predictor018, toy_sequences, toy_demographics, caplog):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    shuffled = sequence.sample(fraction=1.0, shuffle=True, seed=3)
    np.testing.assert_allclose(
        _probabilities(predictor018, shuffled, demographics),
        _probabilities(predictor018, sequence, demographics),
        atol=1e-6,
    )
    assert "not in sequence_counter order" in warnings_of(caplog)


def test_text_typed_and_infinite_values_are_missing_values(
    predictor018, toy_sequences, toy_demographics, caplog
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    reference = _probabilities(predictor018, imu_only(sequence), demographics)
    # pl.read_csv types a column that is empty in its first rows as text
    as_text = imu_only(sequence).with_columns([pl.col(c).cast(pl.String) for c in NON_IMU])
    np.testing.assert_allclose(_probabilities(predictor018, as_text, demographics), reference, atol=1e-6)
    infinite = sequence.with_columns([pl.lit(float("inf")).alias(c) for c in NON_IMU])
    np.testing.assert_allclose(_probabilities(predictor018, infinite, demographics), reference, atol=1e-6)
    assert "infinite sensor value(s) taken as missing" in warnings_of(caplog)


def test_missing_columns_are_an_error_naming_them(predictor018, toy_sequences, toy_demographics):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    with pytest.raises(InputColumnsError, match=r"2 column\(s\).*acc_x, tof_3_v7"):
        predictor018.predict(sequence.drop("acc_x", "tof_3_v7"), demographics)
    # columns the model does not read may be missing
    assert predictor018.predict(sequence.drop("row_id", "sequence_counter"), demographics) in GESTURES


def test_an_empty_sequence_or_a_failing_model_gives_the_fallback(
    predictor018, toy_sequences, toy_demographics, caplog, monkeypatch
):
    sequence, demographics = _first(toy_sequences, toy_demographics)
    lenient = predictor018.restricted_to(predictor018.folds)
    lenient.strict = False
    assert lenient.predict(sequence.head(0), demographics) == FALLBACK_GESTURE
    assert "has no rows" in warnings_of(caplog)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lenient.members[0].model, "forward", broken)
    assert lenient.predict(sequence, demographics) == FALLBACK_GESTURE
    assert any(r.levelno == logging.ERROR and "failed" in r.getMessage() for r in caplog.records)
    assert lenient.n_fallbacks == 2
    strict = lenient.restricted_to(lenient.folds)
    strict.strict = True
    with pytest.raises(RuntimeError, match="boom"):
        strict.predict(sequence, demographics)

    def nan_logits(features, mask, demographics=None):
        return {"gesture_logits": torch.full((len(features), len(GESTURES)), float("nan"))}

    monkeypatch.setattr(lenient.members[0].model, "forward", nan_logits)
    only_nan = lenient.restricted_to([lenient.members[0].fold])
    assert only_nan.predict(sequence, demographics) == FALLBACK_GESTURE
    # a fold with non-finite output is left out; the other fold still answers
    assert lenient.predict(sequence, demographics) == predictor018.restricted_to([1]).predict(
        sequence, demographics
    )
    assert "non-finite probabilities" in warnings_of(caplog)


def test_int8_quantisation_is_a_cpu_option_close_to_fp32(
    run_dir_of, predictor018, toy_sequences, toy_demographics
):
    inference = exp_module("exp018", "inference")
    quantized = inference.load_predictor(
        run_dir_of("exp018"), device="cpu", quantize=True, strict=True, subject_aware=False
    )
    layers = list(quantized.members[0].model.modules())
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in layers)
    assert not any(type(m) is torch.nn.Linear for m in layers)
    for sequence_id in list(toy_sequences)[:10]:
        sequence = toy_sequences[sequence_id]
        demographics = demographics_of(toy_demographics, sequence)
        np.testing.assert_allclose(
            _probabilities(quantized, sequence, demographics),
            _probabilities(predictor018, sequence, demographics),
            atol=0.05,
        )
    with pytest.raises(ValueError, match="CPU setting"):
        inference.load_predictor(run_dir_of("exp018"), device=torch.device("cuda"), quantize=True)


def test_bf16_precision_is_an_option_close_to_fp32(run_dir_of, predictor018, toy_sequences, toy_demographics):
    bf16 = exp_module("exp018", "inference").load_predictor(
        run_dir_of("exp018"), device="cpu", strict=True, precision="bf16", subject_aware=False
    )
    assert bf16.autocast_dtype == torch.bfloat16 and predictor018.autocast_dtype is None
    differences = []
    for sequence_id in list(toy_sequences)[:10]:
        sequence = toy_sequences[sequence_id]
        demographics = demographics_of(toy_demographics, sequence)
        fast = _probabilities(bf16, sequence, demographics)
        reference = _probabilities(predictor018, sequence, demographics)
        np.testing.assert_allclose(fast, reference, atol=0.05)
        differences.append(np.abs(fast - reference).max())
    assert max(differences) > 0  # bf16 really ran


def test_a_run_saved_before_pack_padded_steps_existed_loads_and_predicts_the_same(
    run_dir_of, predictor018, toy_sequences, toy_demographics, tmp_path
):
    """``model.pack_padded_steps`` is a speed setting: a run folder whose config.yaml predates
    it loads (packed by default), and ``false`` in the config gives the same probabilities."""
    inference = exp_module("exp018", "inference")
    for setting in (None, False):
        old = tmp_path / f"run-{setting}"
        shutil.copytree(run_dir_of("exp018"), old)
        config = yaml.safe_load((old / "config.yaml").read_text())
        if setting is None:
            del config["model"]["pack_padded_steps"]
        else:
            config["model"]["pack_padded_steps"] = setting
        (old / "config.yaml").write_text(yaml.safe_dump(config))
        loaded = inference.load_predictor(old, device="cpu", strict=True, subject_aware=False)
        assert_same_probabilities(loaded, predictor018, toy_sequences, toy_demographics, 4, atol=1e-5)


def test_fold_models_run_in_threads_give_the_same_probabilities(
    run_dir_of, predictor018, toy_sequences, toy_demographics
):
    parallel = exp_module("exp018", "inference").load_predictor(
        run_dir_of("exp018"), device="cpu", strict=True, fold_threads=2, subject_aware=False
    )
    assert parallel.restricted_to([0, 1]).fold_threads == 2
    assert_same_probabilities(parallel, predictor018, toy_sequences, toy_demographics, 8, atol=1e-6)


# ---------------------------------------------------------------- gateway stand-in and batch mode
@pytest.fixture(scope="module")
def test_dir(toy_data, tmp_path_factory) -> Path:
    """The toy sequences as a test set: every other one IMU-only, one subject without demographics, labels."""
    directory = tmp_path_factory.mktemp("toy_test")
    train = pl.read_csv(toy_data / "train.csv")
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    imu_ids = ids[1::2]
    test = train.select(TEST_COLUMNS).with_columns(
        [
            pl.when(pl.col("sequence_id").is_in(imu_ids)).then(None).otherwise(pl.col(c)).alias(c)
            for c in NON_IMU
        ]
    )
    test.write_csv(directory / "test.csv")
    demographics = pl.read_csv(toy_data / "train_demographics.csv")
    demographics.filter(pl.col("subject") != "SUBJ_000005").write_csv(directory / "test_demographics.csv")
    train.group_by("sequence_id", maintain_order=True).first().select(TEST_LABEL_COLUMNS).write_csv(
        directory / "test_labels.csv"
    )
    return directory


def test_the_gateway_serves_every_sequence_shuffled_with_its_demographics_and_checks_answers(test_dir):
    gateway = LocalGateway.from_dir(test_dir, seed=0)
    file_order = pl.read_csv(test_dir / "test.csv")["sequence_id"].unique(maintain_order=True).to_list()
    served = []

    def spy(sequence: pl.DataFrame, demographics: pl.DataFrame) -> str:
        assert sequence.columns == TEST_COLUMNS and sequence["sequence_id"].n_unique() == 1
        assert sequence["sequence_counter"].to_list() == list(range(sequence.height))
        subject = sequence["subject"][0]
        assert demographics.height == (0 if subject == "SUBJ_000005" else 1)
        assert (demographics["subject"] == subject).all()
        served.append(sequence["sequence_id"][0])
        return GESTURES[len(served) % len(GESTURES)]

    result = gateway.serve(spy)
    assert sorted(served) == sorted(file_order) and served != file_order
    assert result.submission["sequence_id"].to_list() == served
    assert served == gateway.sequence_ids()  # a seed fixes the order; None gives a new one each run
    assert len(result.seconds) == len(served) and set(result.latency_ms()) >= {"p50", "p99"}
    with pytest.raises(GatewayError, match=r"SEQ_\d{6}.*'Waving'"):
        gateway.serve(lambda s, d: "Waving")
    with pytest.raises(GatewayError, match=r"SEQ_\d{6}.*int"):
        gateway.serve(lambda s, d: 3)


def test_latency_summary_percentiles():
    summary = latency_summary(np.arange(1, 101) / 1000.0)
    assert summary["p50"] == pytest.approx(50.5) and summary["max"] == pytest.approx(100.0)
    assert summary["p99"] == pytest.approx(99.01)


def test_batch_and_per_sequence_predictions_agree_and_the_score_is_printed(
    predictor018, test_dir, tmp_path, capsys
):
    output = tmp_path / "submission.csv"
    scores = run_batch(predictor018, test_dir, output, batch_size=16)
    submission = pl.read_csv(output)
    assert submission.columns == ["sequence_id", "gesture"] and submission.height == 108
    assert set(submission["gesture"]) <= set(GESTURES)
    labels = pl.read_csv(test_dir / "test_labels.csv")
    joined = submission.join(labels, on="sequence_id", suffix="_true")
    assert scores["score"] == pytest.approx(competition_score(joined["gesture_true"], joined["gesture"]))
    assert scores["n_imu_only"] == 54 and scores["n_all_sensors"] == 54
    assert f"score {scores['score']:.4f} on 108 sequences" in capsys.readouterr().out

    served = LocalGateway.from_dir(test_dir, seed=1).serve(predictor018.predict).submission
    both = submission.join(served, on="sequence_id", suffix="_served")
    assert both.height == 108 and (both["gesture"] == both["gesture_served"]).all()
    # and the probabilities, not only their argmax
    frame = pl.read_csv(test_dir / "test.csv")
    batch = predictor018.predict_frame(frame, pl.read_csv(test_dir / "test_demographics.csv"))
    demographics = pl.read_csv(test_dir / "test_demographics.csv")
    for sequence_id in batch["sequence_id"].to_list()[:20]:
        sequence = frame.filter(pl.col("sequence_id") == sequence_id)
        single = predictor018.predict_probabilities(sequence, demographics_of(demographics, sequence))
        row = batch.filter(pl.col("sequence_id") == sequence_id).select([f"prob_{g}" for g in GESTURES])
        np.testing.assert_allclose(single, row.to_numpy()[0], atol=ATOL)


def test_score_predictions_names_uncovered_sequences():
    predictions = pl.DataFrame({"sequence_id": ["SEQ_000001", "SEQ_000002"], "gesture": GESTURES[:2]})
    labels = pl.DataFrame({"sequence_id": ["SEQ_000001"], "gesture": GESTURES[:1]})
    with pytest.raises(ValueError, match="cover 1 of the 2"):
        score_predictions(predictions, labels)


def test_the_batch_command_line_writes_a_submission_and_prints_the_score(run_dir_of, test_dir, tmp_path):
    output = tmp_path / "cli" / "submission.csv"
    command = [
        sys.executable, str(REPO_ROOT / "codes" / "exp" / "exp018" / "inference.py"),
        f"run_dir={run_dir_of('exp018')}", f"data={test_dir}", f"output={output}", "device=cpu", "num_threads=1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "competition score: score " in result.stdout and f"submission: {output}" in result.stdout
    assert pl.read_csv(output).height == 108
    with pytest.raises(RunFolderError, match="is not a run folder"):
        exp_module("exp018", "inference").main([f"run_dir={tmp_path}", f"data={test_dir}"])
    with pytest.raises(SystemExit, match="run_dir=outputs/exp018/<run> is required"):
        exp_module("exp018", "inference").main([f"data={test_dir}"])


# ---------------------------------------------------------------- run folders
def test_evaluated_weights_are_the_ema_ones_when_training_kept_an_ema():
    weights = {"w": torch.ones(2)}
    ema = {"module.w": torch.full((2,), 3.0), "n_averaged": torch.tensor(7)}
    state, kind = evaluated_weights({"model": weights, "ema": ema})
    assert kind == "ema" and set(state) == {"w"} and torch.equal(state["w"], torch.full((2,), 3.0))
    state, kind = evaluated_weights({"model": weights, "ema": None})
    assert kind == "model" and torch.equal(state["w"], torch.ones(2))
    with pytest.raises(RunFolderError):
        evaluated_weights({"ema": None})


def test_run_folder_errors_say_what_is_wrong(tmp_path, run_dir_of):
    with pytest.raises(RunFolderError, match="is not a run folder"):
        load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  d_model: 8\n")
    with pytest.raises(RunFolderError, match="no trained fold"):
        select_folds(tmp_path)
    cfg = load_run_config(tmp_path)
    assert cfg.model.d_model == 8
    with pytest.raises(AttributeError, match=r"'model\.bert'"):
        _ = cfg.model.bert
    with pytest.raises(RunFolderError, match=r"no trained fold \[3\]; it holds folds \[0, 1\]"):
        select_folds(run_dir_of("exp018"), [3])


def test_a_run_of_one_experiment_loaded_by_another_is_a_clear_error(run_dir_of):
    with pytest.raises(RunFolderError, match="trained by exp013"):
        exp_module("exp018", "inference").load_predictor(run_dir_of("exp013"), device="cpu")


# ---------------------------------------------------------------- Kaggle packaging
def test_staged_datasets_serve_the_same_predictions_and_the_script_falls_back_to_batch_mode(
    run_dir_of, test_dir, tmp_path, predictor018
):
    run_dir = run_dir_of("exp018")
    code = stage_code_dataset(tmp_path / "code", "someone")
    run = stage_run_dataset(run_dir, tmp_path / "run", "someone")
    code_meta = json.loads((code / "dataset-metadata.json").read_text())
    run_meta = json.loads((run / "dataset-metadata.json").read_text())
    assert code_meta["id"] == "someone/cmi-bfrb-code" and run_meta["id"] == "someone/cmi-exp018-tiny"
    assert (code / "codes" / "inference" / "predictor.py").is_file() and (
        code / "kaggle" / "submission.py"
    ).is_file()
    assert not list(code.rglob("__pycache__")) and not list(run.rglob("last.pt"))
    slim = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert slim["ema"] is None and slim["weights"] == "ema"
    assert (run / "fold0" / "best.pt").stat().st_size < (run_dir / "fold0" / "best.pt").stat().st_size

    output = tmp_path / "working" / "submission.csv"
    environment = {
        **os.environ,
        "CMI_INPUT_ROOT": str(tmp_path),
        "CMI_COMPETITION_DIR": str(test_dir),
        "CMI_OUTPUT": str(output),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(code / "kaggle" / "submission.py")],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kaggle_evaluation is not importable" in result.stdout
    assert (
        f"code: {code / 'codes' / 'exp' / 'exp018'}" in result.stdout
    )  # the staged copy, found by searching
    expected = predictor018.predict_frame(
        pl.read_csv(test_dir / "test.csv"), pl.read_csv(test_dir / "test_demographics.csv")
    )
    submission = pl.read_csv(output)
    assert submission["sequence_id"].to_list() == expected["sequence_id"].to_list()
    assert submission["gesture"].to_list() == expected["gesture"].to_list()
