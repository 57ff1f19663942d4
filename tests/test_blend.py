"""Blends of runs (codes/inference/blend.py): checks on the members, honest (nested) weights,
routing by available sensors, serving through predict(), batch mode and the Kaggle script."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from codes.common.metric import competition_score
from codes.common.schema import GESTURES, NUM_GESTURES, THM_COLUMNS, TOF_COLUMNS
from codes.inference.blend import (
    BLEND_FILE,
    IMU_ONLY_COLUMNS,
    PROBABILITY_COLUMNS,
    BlendError,
    check_members,
    check_route_weights,
    combine_probabilities,
    fit_blend,
    fit_weights,
    imu_only_oof,
    load_blend,
    nested_blend,
    read_member_oof,
    score_of_indices,
)
from codes.inference.kaggle_package import stage_blend_dataset, stage_code_dataset
from tests.helpers import training_config

TINY = {"d_model": 32, "num_blocks": 3, "num_heads": 4, "ff_dim": 64, "conv_kernel": 7, "demographics_dim": 8}
NON_IMU = THM_COLUMNS + TOF_COLUMNS
ATOL = 1e-5  # float32 probabilities blended in float64, compared after the float32 round trip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- combining and fitting (no models)
def test_combines_match_hand_computed_cases():
    members = np.array([[[0.5, 0.5]], [[0.9, 0.1]]])
    assert np.allclose(combine_probabilities(members, np.array([0.5, 0.5]), "mean"), [[0.7, 0.3]])
    geometric = np.sqrt(np.array([0.5 * 0.9, 0.5 * 0.1]))
    assert np.allclose(
        combine_probabilities(members, np.array([0.5, 0.5]), "log"), [geometric / geometric.sum()]
    )
    assert np.allclose(combine_probabilities(members, np.array([0.0, 1.0]), "log"), [[0.9, 0.1]])


def _noisy_members(seed: int, n: int = 400, good_noise: float = 0.5, bad_noise: float = 3.0):
    """Two members' probabilities: one close to the labels, one mostly noise; labels and folds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_GESTURES, n)
    folds = np.arange(n) % 4

    def member(noise: float) -> np.ndarray:
        logits = rng.normal(0, noise, (n, NUM_GESTURES))
        logits[np.arange(n), labels] += 2.0
        exp = np.exp(logits - logits.max(1, keepdims=True))
        return exp / exp.sum(1, keepdims=True)

    return np.stack([member(good_noise), member(bad_noise)]), labels, folds


@pytest.mark.parametrize("method", ["log_loss", "greedy"])
@pytest.mark.parametrize("combine", ["mean", "log"])
def test_the_fit_weighs_the_better_member_more_and_weights_lie_on_the_simplex(combine, method):
    probabilities, labels, _ = _noisy_members(0)
    weights = fit_weights(probabilities, labels, combine, method)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[0] > 0.7


def test_the_greedy_fit_scores_with_the_competition_metric():
    rng = np.random.default_rng(3)
    names = np.array(GESTURES)
    for size in (1, 5, 60, 500):
        labels, predicted = rng.integers(0, NUM_GESTURES, size), rng.integers(0, NUM_GESTURES, size)
        predicted[: size // 2] = labels[: size // 2]
        expected = competition_score(names[labels], names[predicted])
        assert score_of_indices(labels, predicted) == pytest.approx(expected, abs=1e-12)
    only_non_targets = np.full(4, NUM_GESTURES - 1)
    assert score_of_indices(only_non_targets, only_non_targets) == pytest.approx(
        competition_score(names[only_non_targets], names[only_non_targets])
    )


@pytest.mark.parametrize("method", ["log_loss", "greedy"])
def test_nested_weights_of_fold_k_never_read_fold_k(method):
    probabilities, labels, folds = _noisy_members(1, bad_noise=1.0)
    _, before = nested_blend(probabilities, labels, folds, "log", method)
    shaken = probabilities.copy()
    shaken[:, folds == 2] = shaken[::-1][:, folds == 2]  # fold 2's OOF swapped between the members
    blended, after = nested_blend(shaken, labels, folds, "log", method)
    assert after["2"] == before["2"]  # fitted without fold 2
    assert after["0"] != before["0"]  # the other folds' weights read it
    assert np.allclose(
        blended[folds == 2], combine_probabilities(shaken[:, folds == 2], np.array(after["2"]), "log")
    )


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5, 0.6], "sum to"),
        ([1.2, -0.2], "negative"),
        ([np.nan, 1.0], "finite"),
        ([1.0], "one weight per member"),
    ],
)
def test_hand_edited_weights_are_refused(weights, message):
    with pytest.raises(BlendError, match=message):
        check_route_weights(weights, 2, "blend.json")
    assert check_route_weights([0.25, 0.75], 2, "blend.json").tolist() == [0.25, 0.75]


# ---------------------------------------------------------------- members that cannot be blended
def _fake_member(folder: Path, ids, folds, gestures, digest="a", extra_class=False, exp="exp013") -> Path:
    """A run folder holding only what fitting reads: config.yaml, run_record.json, oof.parquet."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"exp_name": exp, "data": {"use_thm": True}}))
    (folder / "run_record.json").write_text(
        json.dumps({"version": 1, "config": {}, "data": {"train.csv": digest}})
    )
    rng = np.random.default_rng(len(str(folder)))
    probabilities = rng.dirichlet(np.ones(NUM_GESTURES), len(ids)).astype(np.float32)
    columns = {"sequence_id": ids, "fold": folds, "gesture": gestures}
    columns |= {c: probabilities[:, i] for i, c in enumerate(PROBABILITY_COLUMNS)}
    columns |= {c: probabilities[:, i] for i, c in enumerate(IMU_ONLY_COLUMNS)}
    if extra_class:
        columns["prob_Juggling"] = np.zeros(len(ids), dtype=np.float32)
    pl.DataFrame(columns).write_parquet(folder / "oof.parquet")
    return folder


IDS = [f"SEQ_{i:03d}" for i in range(12)]
FOLDS = [i % 3 for i in range(12)]
LABELS = [GESTURES[i % NUM_GESTURES] for i in range(12)]


def test_members_on_other_folds_data_sequences_or_classes_are_refused_naming_what_differs(tmp_path):
    first = read_member_oof(_fake_member(tmp_path / "a", IDS, FOLDS, LABELS))
    same_reordered = read_member_oof(_fake_member(tmp_path / "b", IDS[::-1], FOLDS[::-1], LABELS[::-1]))
    aligned = check_members([first, same_reordered])
    assert aligned[1].sequence_ids.tolist() == IDS and aligned[1].folds.tolist() == FOLDS
    other_folds = read_member_oof(_fake_member(tmp_path / "c", IDS, [0, 0, *FOLDS[2:]], LABELS))
    with pytest.raises(BlendError, match="fold of sequence SEQ_001: 0 against 1"):
        check_members([first, other_folds])
    other_data = read_member_oof(_fake_member(tmp_path / "d", IDS, FOLDS, LABELS, digest="b"))
    with pytest.raises(BlendError, match=r"different data files: train\.csv"):
        check_members([first, other_data])
    other_ids = read_member_oof(_fake_member(tmp_path / "e", [*IDS[:-1], "SEQ_999"], FOLDS, LABELS))
    with pytest.raises(BlendError, match="SEQ_999"):
        check_members([first, other_ids])
    other_label = read_member_oof(_fake_member(tmp_path / "f", IDS, FOLDS, [LABELS[1], *LABELS[1:]]))
    with pytest.raises(BlendError, match="label of sequence SEQ_000"):
        check_members([first, other_label])
    with pytest.raises(BlendError, match=r"class list.*Juggling"):
        read_member_oof(_fake_member(tmp_path / "g", IDS, FOLDS, LABELS, extra_class=True))
    with pytest.raises(BlendError, match="more than once"):
        check_members([first, first])


# ---------------------------------------------------------------- trained members
@pytest.fixture(scope="module")
def blend_runs(toy_data, tmp_path_factory) -> dict[str, Path]:
    """Tiny 2-fold runs on the toy data: exp013 (all sensors, two seeds) and exp013 IMU-only."""
    output_dir = tmp_path_factory.mktemp("blend_runs")
    runs = {}
    for name, overrides in (
        ("all-s1", ["trainer.seed=1"]),
        ("all-s2", ["trainer.seed=2"]),
        ("imu", ["trainer.seed=3", "data.use_thm=false", "data.tof_mode=none"]),
    ):
        cfg = training_config(
            "exp013", toy_data, output_dir, TINY, f"run_name={name}", "trainer.epochs=2", *overrides
        )
        importlib.import_module("codes.exp.exp013.train").run_training(cfg)
        runs[name] = output_dir / "exp013" / name
    return runs


@pytest.fixture(scope="module")
def blend_dir(blend_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blends") / "three"
    fit_blend([blend_runs["all-s1"], blend_runs["all-s2"], blend_runs["imu"]], out, "log")
    return out


def test_training_stores_imu_only_probabilities_that_the_saved_folds_reproduce(blend_runs):
    run = blend_runs["all-s1"]
    oof = pl.read_parquet(run / "oof.parquet")
    stored = oof.select(IMU_ONLY_COLUMNS).to_numpy()
    assert np.allclose(stored.sum(1), 1.0, atol=1e-5)
    assert np.abs(stored - oof.select(PROBABILITY_COLUMNS).to_numpy()).max() > 1e-3  # another input
    recomputed = imu_only_oof(run, oof)  # the path of runs written before the columns existed
    assert np.allclose(recomputed, stored, atol=1e-4)


def test_the_blend_folder_reports_nested_and_in_sample_cv_and_declares_what_members_need(blend_dir):
    blend = json.loads((blend_dir / BLEND_FILE).read_text())
    assert [m["needs"] for m in blend["members"]] == ["all_sensors", "all_sensors", "imu_only"]
    for route in ("all_sensors", "imu_only"):
        report = blend["routes"][route]
        assert sum(report["weights"]) == pytest.approx(1.0)
        assert set(report["nested_weights"]) == {"0", "1"}
        assert {"nested", "in_sample", "equal_weights", "members"} <= set(report)
    assert "nested_all_sensor_members_only" in blend["routes"]["imu_only"]
    metrics = json.loads((blend_dir / "metrics.json").read_text())
    assert metrics["overall"]["score"] == blend["routes"]["all_sensors"]["nested"]["score"]


def _with_weights(blend_dir: Path, target: Path, all_sensors, imu_only) -> Path:
    shutil.copytree(blend_dir, target)
    blend = json.loads((target / BLEND_FILE).read_text())
    for member in blend["members"]:
        member["path"] = str((blend_dir / member["path"]).resolve())
    blend["routes"]["all_sensors"]["weights"] = all_sensors
    blend["routes"]["imu_only"]["weights"] = imu_only
    (target / BLEND_FILE).write_text(json.dumps(blend))
    return target


def test_imu_only_sequences_are_answered_with_the_imu_only_weights(blend_dir, blend_runs, toy_data, tmp_path):
    routed = load_blend(
        _with_weights(blend_dir, tmp_path / "routed", [1, 0, 0], [0, 0, 1]), device="cpu", strict=True
    )
    frame = pl.read_csv(toy_data / "train.csv").filter(pl.col("sequence_id").is_in(IDS_OF(toy_data, 4)))
    frame = frame.drop(
        [c for c in ("gesture", "orientation", "behavior", "phase", "sequence_type") if c in frame.columns]
    )
    demographics = pl.read_csv(toy_data / "train_demographics.csv")
    imu_frame = frame.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in NON_IMU])
    members = [
        importlib.import_module("codes.exp.exp013.inference").load_predictor(
            blend_runs[n], device="cpu", subject_aware=False
        )
        for n in ("all-s1", "imu")
    ]
    blended_all = routed.predict_frame(frame, demographics).select(PROBABILITY_COLUMNS).to_numpy()
    blended_imu = routed.predict_frame(imu_frame, demographics)
    assert not routed.predict_frame(frame, demographics)["imu_only"].any() and blended_imu["imu_only"].all()
    first_alone = members[0].predict_frame(frame, demographics).select(PROBABILITY_COLUMNS).to_numpy()
    imu_alone = members[1].predict_frame(imu_frame, demographics).select(PROBABILITY_COLUMNS).to_numpy()
    assert np.allclose(blended_all, first_alone, atol=ATOL)
    assert np.allclose(blended_imu.select(PROBABILITY_COLUMNS).to_numpy(), imu_alone, atol=ATOL)


def IDS_OF(data_dir: Path, count: int) -> list[str]:
    return (
        pl.read_csv(data_dir / "train.csv")["sequence_id"].unique(maintain_order=True).head(count).to_list()
    )


def test_the_blend_is_the_weighted_combination_of_its_members_in_predict_and_batch_mode(
    blend_dir, blend_runs, toy_data
):
    blend = json.loads((blend_dir / BLEND_FILE).read_text())
    predictor = load_blend(blend_dir, device="cpu", strict=True)
    frame = pl.read_csv(toy_data / "train.csv").filter(pl.col("sequence_id").is_in(IDS_OF(toy_data, 6)))
    demographics = pl.read_csv(toy_data / "train_demographics.csv")
    load = importlib.import_module("codes.exp.exp013.inference").load_predictor
    members = [
        load(blend_runs[n], device="cpu", subject_aware=False).predict_frame(frame, demographics)
        for n in ("all-s1", "all-s2", "imu")
    ]
    expected = combine_probabilities(
        np.stack([m.select(PROBABILITY_COLUMNS).to_numpy() for m in members]),
        np.array(blend["routes"]["all_sensors"]["weights"]),
        "log",
    )
    result = predictor.predict_frame(frame, demographics)
    assert np.allclose(result.select(PROBABILITY_COLUMNS).to_numpy(), expected, atol=ATOL)
    for sequence in frame.partition_by("sequence_id", maintain_order=True)[:2]:
        one = predictor.predict_probabilities(
            sequence, demographics.filter(pl.col("subject") == sequence["subject"][0])
        )
        row = result.filter(pl.col("sequence_id") == sequence["sequence_id"][0]).select(PROBABILITY_COLUMNS)
        assert np.allclose(one, row.to_numpy()[0], atol=1e-4)  # one sequence alone vs. a padded batch


def test_a_damaged_member_stops_the_blend_from_loading(blend_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(blend_dir, copy / "blend")
    blend = json.loads((copy / "blend" / BLEND_FILE).read_text())
    members = []
    for index, member in enumerate(blend["members"]):
        shutil.copytree((blend_dir / member["path"]).resolve(), copy / f"member{index}")
        members.append({**member, "path": f"../member{index}"})
    (copy / "blend" / BLEND_FILE).write_text(json.dumps({**blend, "members": members}))
    load_blend(copy / "blend", device="cpu")  # intact: loads
    edited = json.loads((copy / "blend" / BLEND_FILE).read_text())
    edited["routes"]["imu_only"]["weights"] = [0.6, 0.5, -0.1]
    (copy / "blend" / "blend.json").write_text(json.dumps(edited))
    with pytest.raises(BlendError, match="route imu_only: negative weight"):
        load_blend(copy / "blend", device="cpu")
    (copy / "blend" / BLEND_FILE).write_text(json.dumps({**blend, "members": members}))
    checkpoint = copy / "member1" / "fold1" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(BlendError, match=r"member .*all-s2 cannot be served"):
        load_blend(copy / "blend", device="cpu")
    shutil.rmtree(copy / "member1")
    with pytest.raises(BlendError, match="member1 does not exist"):
        load_blend(copy / "blend", device="cpu")


FAKE_SERVER = '''
"""A stand-in for the competition's kaggle_evaluation.cmi_inference_server: the local gateway."""
import os
from pathlib import Path

from codes.inference.gateway import LocalGateway


class CMIInferenceServer:
    def __init__(self, predict):
        self.predict = predict

    def run_local_gateway(self, data_paths):
        gateway = LocalGateway.from_files(Path(data_paths[0]), Path(data_paths[1]), seed=0)
        gateway.serve(self.predict).submission.write_csv(os.environ["GATEWAY_ANSWERS"])
'''


def test_the_kaggle_script_serves_a_staged_blend_through_the_gateway_as_batch_mode_answers(
    blend_dir, toy_data, tmp_path
):
    test_dir = tmp_path / "competition"
    shutil.copytree(toy_data, test_dir)
    train = pl.read_csv(toy_data / "train.csv")
    test = train.filter(pl.col("sequence_id").is_in(IDS_OF(toy_data, 8)))
    imu_half = test["sequence_id"].unique(maintain_order=True).head(4)
    test = test.with_columns(
        [
            pl.when(pl.col("sequence_id").is_in(imu_half.implode())).then(None).otherwise(pl.col(c)).alias(c)
            for c in NON_IMU
        ]
    )
    test.select(
        [c for c in test.columns if c not in ("gesture", "orientation", "behavior", "phase", "sequence_type")]
    ).write_csv(test_dir / "test.csv")
    shutil.copy(toy_data / "train_demographics.csv", test_dir / "test_demographics.csv")
    (test_dir / "kaggle_evaluation").mkdir()
    (test_dir / "kaggle_evaluation" / "__init__.py").write_text("")
    (test_dir / "kaggle_evaluation" / "cmi_inference_server.py").write_text(FAKE_SERVER)

    inputs = tmp_path / "input"
    code = stage_code_dataset(inputs / "code", "someone")
    staged = stage_blend_dataset(blend_dir, inputs / "blend", "someone")
    assert sorted(p.name for p in (staged / "members").iterdir()) == [
        "00-exp013-all-s1", "01-exp013-all-s2", "02-exp013-imu"
    ]  # fmt: skip
    answers = tmp_path / "gateway.csv"
    environment = {
        **os.environ, "CMI_INPUT_ROOT": str(inputs), "CMI_COMPETITION_DIR": str(test_dir),
        "GATEWAY_ANSWERS": str(answers), "OMP_NUM_THREADS": "1", "CMI_SUBJECT_AWARE": "0",
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(code / "kaggle" / "submission.py")],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"blend: {staged}" in result.stdout
    served = pl.read_csv(answers).sort("sequence_id")
    batch = load_blend(blend_dir, device="cpu", subject_aware=False).predict_frame(
        pl.read_csv(test_dir / "test.csv"), pl.read_csv(test_dir / "test_demographics.csv")
    )
    assert batch["imu_only"].sum() == 4
    assert served.to_dicts() == batch.select("sequence_id", "gesture").sort("sequence_id").to_dicts()


def test_batch_mode_serves_a_blend_from_the_command_line_and_scores_it(blend_dir, toy_data, tmp_path, capsys):
    from codes.inference.blend import main

    test_dir = tmp_path / "data"
    test_dir.mkdir()
    train = pl.read_csv(toy_data / "train.csv").filter(pl.col("sequence_id").is_in(IDS_OF(toy_data, 6)))
    train.drop("gesture", "orientation", "behavior", "phase", "sequence_type", strict=False).write_csv(
        test_dir / "test.csv"
    )
    shutil.copy(toy_data / "train_demographics.csv", test_dir / "test_demographics.csv")
    train.group_by("sequence_id", maintain_order=True).agg(pl.col("gesture").first()).write_csv(
        test_dir / "test_labels.csv"
    )
    output = tmp_path / "submission.csv"
    scores = main(["predict", f"blend_dir={blend_dir}", f"data={test_dir}", f"output={output}", "device=cpu"])
    expected = load_blend(blend_dir, device="cpu", subject_aware=False).predict_frame(
        pl.read_csv(test_dir / "test.csv"), pl.read_csv(test_dir / "test_demographics.csv")
    )
    assert pl.read_csv(output).to_dicts() == expected.select("sequence_id", "gesture").to_dicts()
    assert scores["n"] == 6 and "competition score" in capsys.readouterr().out
