"""Subject-aware answers at pair level: protocol.json version 2, joint p(gesture, orientation)
from the heads, exp020's pair head, and the fall-backs (old protocol, a model without the heads)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from codes.common.protocol import PROTOCOL_FILE, pair_capacities, protocol_record, read_protocol
from codes.common.schema import GESTURE_ORIENTATION_PAIRS, GESTURES, NUM_GESTURES, ORIENTATIONS
from codes.inference.subject_assignment import AssignmentClasses, SubjectAssignment, assign_labels
from tests.helpers import experiment_config, labelled_test_dir, train_smoke_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIR_CAPACITIES = np.zeros((NUM_GESTURES, len(ORIENTATIONS)), dtype=np.int64)
for _g, _o in GESTURE_ORIENTATION_PAIRS:
    PAIR_CAPACITIES[GESTURES.index(_g), ORIENTATIONS.index(_o)] = 2


def protocol_subject(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A subject's 102 sequences in a random order: (gesture index, orientation index) each."""
    pairs = [(GESTURES.index(g), ORIENTATIONS.index(o)) for g, o in GESTURE_ORIENTATION_PAIRS] * 2
    order = np.random.default_rng(seed).permutation(len(pairs))
    gestures, orientations = np.array(pairs)[order].T
    return gestures, orientations


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def noisy_heads(gestures: np.ndarray, orientations: np.ndarray, seed: int, signal: float = 1.5) -> dict:
    """Gesture and orientation heads with Gaussian logits, the truth raised by ``signal`` (the
    orientation head is the surer one, as on the synthetic data)."""
    rng = np.random.default_rng(seed)
    gesture_logits = rng.normal(size=(len(gestures), NUM_GESTURES)) + rng.normal(size=NUM_GESTURES)
    gesture_logits[np.arange(len(gestures)), gestures] += signal
    orientation_logits = rng.normal(size=(len(gestures), len(ORIENTATIONS)))
    orientation_logits[np.arange(len(gestures)), orientations] += 3.0
    return {"gesture": softmax(gesture_logits), "orientation": softmax(orientation_logits)}


# ---------------------------------------------------------------- protocol.json version 2
def test_pair_capacities_are_the_most_one_subject_has_of_each_pair():
    gestures = np.array([GESTURES[0]] * 3 + [GESTURES[0]] * 2 + [GESTURES[1]])
    orientations = np.array([ORIENTATIONS[0]] * 2 + [ORIENTATIONS[1]] + [ORIENTATIONS[1]] * 2 + [""])
    subjects = np.array(["a", "a", "a", "b", "b", "b"])
    pairs = pair_capacities(gestures, orientations, subjects)
    assert pairs == [
        {"gesture": GESTURES[0], "orientation": ORIENTATIONS[0], "capacity": 2},
        {"gesture": GESTURES[0], "orientation": ORIENTATIONS[1], "capacity": 2},
    ]  # the unknown orientation counts for no pair


def test_protocol_versions_round_trip_and_an_unknown_version_is_refused(tmp_path):
    gestures, orientations = protocol_subject(0)
    names, places = np.array(GESTURES)[gestures], np.array(ORIENTATIONS)[orientations]
    record = protocol_record(names, np.array(["s"] * len(names)), places)
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps(record))
    protocol = read_protocol(tmp_path)
    assert protocol.version == 2 and protocol.has_pairs and record["pairs"] == 51
    assert (protocol.pairs == PAIR_CAPACITIES).all() and protocol.gestures.sum() == 102
    old = protocol_record(names, np.array(["s"] * len(names)))  # version 1: gesture counts only
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps(old))
    assert read_protocol(tmp_path).version == 1 and not read_protocol(tmp_path).has_pairs
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps(record | {"version": 3}))
    with pytest.raises(ValueError, match="version 3"):
        read_protocol(tmp_path)
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps(record | {"pair_capacities": [{"gesture": "x"}]}))
    with pytest.raises(ValueError, match="damaged"):
        read_protocol(tmp_path)


# ---------------------------------------------------------------- the joint and the assignment
def test_the_product_joint_is_the_heads_product_over_the_protocol_pairs():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")
    heads = noisy_heads(*protocol_subject(1), seed=1)
    got = classes.log_probabilities(heads)
    assert got.shape == (102, 51) and np.allclose(np.exp(got).sum(1), 1.0)
    raw = np.log(heads["gesture"][:, classes.gestures]) + np.log(
        heads["orientation"][:, classes.orientations]
    )
    assert np.allclose(got - got[:, :1], raw - raw[:, :1])  # the same up to each row's normaliser
    # marginalised over the orientations, the plain answer is a gesture the heads could give
    assert classes.plain_gestures(got).shape == (102,)


def test_the_pair_joint_reads_the_pair_head_in_schema_order():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "pair")
    for column, (gesture, orientation) in enumerate(GESTURE_ORIENTATION_PAIRS):
        pair_head = np.full(51, 0.1 / 50)
        pair_head[column] = 0.9
        chosen = classes.log_probabilities({"gesture": np.full(18, 1 / 18), "pair": pair_head}).argmax()
        assert (GESTURES[classes.gestures[chosen]], ORIENTATIONS[classes.orientations[chosen]]) == (
            gesture,
            orientation,
        )


def test_pairs_bind_where_gestures_do_not():
    """Per gesture a capacity of 8 over 4 orientations hardly binds; 2 per pair does: with a
    sure orientation head, the pair-level assignment beats the gesture level, causally too."""
    accuracy = {"plain": [], "gesture": [], "pair": [], "pair offline": []}
    for seed in range(4):
        gestures, orientations = protocol_subject(seed)
        heads = noisy_heads(gestures, orientations, seed)
        gesture_level = SubjectAssignment(AssignmentClasses.gesture_level(PAIR_CAPACITIES.sum(1)))
        pair_level = SubjectAssignment(AssignmentClasses.pair_level(PAIR_CAPACITIES, "product"))
        rows = [{h: p[i] for h, p in heads.items()} for i in range(102)]
        accuracy["plain"].append((heads["gesture"].argmax(1) == gestures).mean())
        accuracy["gesture"].append(np.mean([gesture_level.answer("s", r) for r in rows] == gestures))
        accuracy["pair"].append(np.mean([pair_level.answer("s", r) for r in rows] == gestures))
        offline = pair_level.fresh().offline(np.array(["s"] * 102, dtype=object), heads)
        accuracy["pair offline"].append((offline == gestures).mean())
    mean = {name: float(np.mean(values)) for name, values in accuracy.items()}
    # measured: plain 0.260, gesture 0.314, pair 0.355, pair offline 0.424
    assert mean["pair"] > mean["gesture"] + 0.02 and mean["pair offline"] > mean["pair"], mean


def test_a_subject_beyond_the_protocol_is_penalised_never_refused():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")
    gestures, orientations = protocol_subject(5)
    gestures, orientations = (
        np.concatenate([gestures, gestures[:48]]),
        np.concatenate([orientations, orientations[:48]]),
    )
    heads = noisy_heads(gestures, orientations, seed=5)
    for penalty in (math.inf, 2.0):
        assignment = SubjectAssignment(classes, overflow_penalty=penalty)
        answers = [assignment.answer("s", {h: p[i] for h, p in heads.items()}) for i in range(150)]
        assert len(answers) == 150 and all(0 <= a < NUM_GESTURES for a in answers)
    # hard counts: at 150 sequences only 48 go beyond the 102 slots, the rest keep to them
    labels = assign_labels(classes.log_probabilities(heads), classes.capacities)
    assert np.maximum(np.bincount(labels, minlength=51) - classes.capacities, 0).sum() == 48


def test_unknown_subjects_get_plain_answers_at_pair_level():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")
    gestures, orientations = protocol_subject(6)
    heads = noisy_heads(gestures, orientations, seed=6)
    assignment = SubjectAssignment(classes)
    plain = classes.plain_gestures(classes.log_probabilities(heads))
    for subject in (None, ""):
        assert [assignment.answer(subject, {h: p[i] for h, p in heads.items()}) for i in range(30)] == list(
            plain[:30]
        )
    assert assignment.n_sequences("") == 0


def test_heads_the_joint_lacks_fall_back_to_gesture_level_once(caplog):
    pair = AssignmentClasses.pair_level(PAIR_CAPACITIES, "auto")
    fallback = AssignmentClasses.gesture_level(PAIR_CAPACITIES.sum(1))
    gestures, orientations = protocol_subject(7)
    heads = noisy_heads(gestures, orientations, seed=7)
    reference = SubjectAssignment(fallback)
    expected = [reference.answer("s", heads["gesture"][i]) for i in range(40)]
    assignment = SubjectAssignment(pair, fallback=fallback)
    with caplog.at_level(logging.WARNING, logger="codes.inference.subject_assignment"):
        got = [assignment.answer("s", heads["gesture"][i]) for i in range(40)]
        assignment.fresh().answer("s", heads["gesture"][0])  # a copy says nothing again
    assert got == expected and assignment.classes.level == "gesture"
    assert len([r for r in caplog.records if "fall back" in r.getMessage()]) <= 1
    auto = SubjectAssignment(pair, fallback=fallback)  # with an orientation head: the product joint
    auto.answer("s", {h: p[0] for h, p in heads.items()})
    assert auto.classes.joint == "product"
    with pytest.raises(ValueError, match="orientation"):  # no fall-back given: an error, not a guess
        SubjectAssignment(AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")).answer(
            "s", heads["gesture"][0]
        )


def test_early_plain_answers_and_the_prior_variant_stay_causal():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")
    gestures, orientations = protocol_subject(8)
    heads = noisy_heads(gestures, orientations, seed=8)
    rows = [{h: p[i] for h, p in heads.items()} for i in range(102)]
    plain = classes.plain_gestures(classes.log_probabilities(heads))
    early = SubjectAssignment(classes, plain_until=11)
    assert [early.answer("s", r) for r in rows[:10]] == list(plain[:10])
    for options in ({"prior_weight": 1.0}, {"overflow_penalty": 4.0, "penalty_ramp": 102}):
        full = SubjectAssignment(classes, **options)
        prefix = SubjectAssignment(classes, **options)
        assert [full.answer("s", r) for r in rows][:30] == [prefix.answer("s", r) for r in rows[:30]]
    with pytest.raises(ValueError, match="penalty_ramp"):
        SubjectAssignment(classes, penalty_ramp=10)  # a ramp to an infinite penalty means nothing


# ---------------------------------------------------------------- exp020: the pair head end to end
def test_exp020_pair_loss_is_the_cross_entropy_of_the_known_pairs():
    from codes.exp.exp020.losses import compute_loss, pair_labels

    cfg = experiment_config("exp020", "variant=smoke", "machine=cpu", "trainer.orientation_weight=0").trainer
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "gesture_logits": torch.randn(4, 18, generator=generator),
        "target_logit": torch.randn(4, generator=generator),
        "pair_logits": torch.randn(4, 51, generator=generator),
    }
    labels = torch.tensor([0, 8, 8, 3])
    orientations = torch.tensor([2, 0, 1, -1])  # drink is only seated; the last is unknown
    pairs = pair_labels(labels, orientations)
    assert pairs.tolist()[2:] == [-1, -1]
    assert GESTURE_ORIENTATION_PAIRS[pairs[0]] == (GESTURES[0], ORIENTATIONS[2])
    without = compute_loss(
        {k: v for k, v in outputs.items() if k != "pair_logits"}, labels, cfg, None, orientations
    )
    expected = without + cfg.pair_weight * F.cross_entropy(outputs["pair_logits"][:2], pairs[:2])
    assert torch.isclose(compute_loss(outputs, labels, cfg, None, orientations), expected)


@pytest.fixture(scope="module")
def pair_run(toy_data, tmp_path_factory):
    """A tiny exp020 run on the toy data (its protocol counts pairs)."""
    return train_smoke_run("exp020", toy_data, tmp_path_factory.mktemp("pair_runs"), "trainer.epochs=1")


def test_exp020_serves_pairs_the_same_through_the_gateway_and_batch_mode(pair_run, toy_data, tmp_path):
    from codes.exp.exp020.inference import load_predictor
    from codes.inference.batch import run_batch
    from codes.inference.gateway import LocalGateway
    from codes.inference.predictor import heads_of_frame

    assert read_protocol(pair_run).has_pairs
    test_dir = labelled_test_dir(toy_data, tmp_path)
    predictor = load_predictor(pair_run, device="cpu", strict=True, subject_aware=True, joint="pair_product")
    assert predictor.subject_assignment.classes.level == "pair"
    served = LocalGateway.from_dir(test_dir, seed=3).serve(predictor.predict).submission
    scores = run_batch(
        predictor.restricted_to(predictor.folds), test_dir, tmp_path / "submission.csv", order_seed=3
    )
    joined = served.join(pl.read_csv(tmp_path / "submission.csv"), on="sequence_id", suffix="_batch")
    assert joined.height == served.height and (joined["gesture"] == joined["gesture_batch"]).all()
    assert {"plain_score", "causal_score", "offline_score"} <= set(scores)
    frame = predictor.predict_frame(pl.read_csv(test_dir / "test.csv"), None, with_heads=True)
    heads = heads_of_frame(frame)
    assert {h: p.shape[1] for h, p in heads.items()} == {"gesture": 18, "orientation": 4, "pair": 51}
    for probabilities in heads.values():
        assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_an_old_protocol_serves_at_gesture_level_and_says_so(pair_run, caplog):
    from codes.exp.exp020.inference import load_predictor

    path = pair_run / PROTOCOL_FILE
    original = path.read_text()
    record = json.loads(original)
    path.write_text(
        json.dumps(
            {k: v for k, v in record.items() if k not in ("pair_capacities", "pairs")} | {"version": 1}
        )
    )
    try:
        with caplog.at_level(logging.WARNING, logger="codes.inference.experiment"):
            predictor = load_predictor(pair_run, device="cpu", subject_aware=True)
        assert predictor.subject_assignment.classes.level == "gesture"
        assert [r for r in caplog.records if "gesture level" in r.getMessage()]
    finally:
        path.write_text(original)


def test_exp020_without_its_pair_head_is_exp019():
    from codes.exp.exp019.losses import compute_loss as loss_019
    from codes.exp.exp019.model import build_model as model_019
    from codes.exp.exp020.losses import compute_loss as loss_020
    from codes.exp.exp020.model import build_model as model_020

    off = ("model.pair_head=false", "trainer.pair_weight=0")
    cfg_019 = experiment_config("exp019", "variant=smoke", "machine=cpu")
    cfg_020 = experiment_config("exp020", "variant=smoke", "machine=cpu", *off)
    torch.manual_seed(0)
    first = model_019(cfg_019, 12).eval()
    torch.manual_seed(0)
    second = model_020(cfg_020, 12).eval()
    assert list(first.state_dict()) == list(second.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    features, mask = torch.randn(3, 20, 12), torch.ones(3, 20, dtype=torch.bool)
    with torch.no_grad():
        outputs = first(features, mask), second(features, mask)
    labels, orientations = torch.tensor([0, 9, 17]), torch.tensor([1, 0, -1])
    mix = (torch.tensor([2, 0, 1]), torch.tensor([0.7, 0.6, 0.9]))
    assert torch.equal(
        loss_019(outputs[0], labels, cfg_019.trainer, None, orientations, mix),
        loss_020(outputs[1], labels, cfg_020.trainer, None, orientations, mix),
    )


def test_pairs_mode_assigns_only_at_pair_level_else_answers_plain(pair_run, caplog):
    from codes.exp.exp020.inference import load_predictor
    from codes.inference.experiment import pair_level_only

    assert (
        load_predictor(pair_run, device="cpu", subject_aware="pairs").subject_assignment.classes.level
        == "pair"
    )
    with pytest.raises(ValueError, match="subject_aware"):
        load_predictor(pair_run, device="cpu", subject_aware="yes please")
    # a model without an orientation head: plain answers (the argmax), said once
    assignment = pair_level_only(pair_run, math.inf, "auto", 0)
    gestures, orientations = protocol_subject(9)
    heads = noisy_heads(gestures, orientations, seed=9)
    with caplog.at_level(logging.WARNING, logger="codes.inference.subject_assignment"):
        answers = [assignment.answer("s", heads["gesture"][i]) for i in range(102)]
    assert answers == heads["gesture"].argmax(1).tolist()
    path = pair_run / PROTOCOL_FILE
    original = path.read_text()
    path.write_text(json.dumps(json.loads(original) | {"version": 1}))
    try:  # a version-1 protocol: no pair counts, so no assignment at all
        assert load_predictor(pair_run, device="cpu", subject_aware="pairs").subject_assignment is None
    finally:
        path.write_text(original)


def test_the_kaggle_script_assigns_pairs_unless_switched_off(pair_run, toy_data, tmp_path):
    """Unset CMI_SUBJECT_AWARE: pair level (its batch fall-back prints the causal score); 0: plain."""
    import os

    from codes.common.runs import REPO_ROOT
    from tests.test_run_folder_safety import run_submission

    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CMI_CODE_DIR": str(REPO_ROOT),
        "CMI_RUN_DIR": str(pair_run),
        "CMI_EXPERIMENT": "exp020",
        "CMI_COMPETITION_DIR": str(labelled_test_dir(toy_data, tmp_path)),
        "CMI_OUTPUT": str(tmp_path / "submission.csv"),
    }
    environment.pop("CMI_SUBJECT_AWARE", None)
    default = run_submission(environment, tmp_path)
    assert default.returncode == 0, default.stderr[-2000:]
    assert "subject-aware: plain" in default.stdout
    switched_off = run_submission(environment | {"CMI_SUBJECT_AWARE": "0"}, tmp_path)
    assert switched_off.returncode == 0 and "subject-aware" not in switched_off.stdout


def test_a_head_without_finite_probabilities_is_answered_plain_and_not_remembered():
    classes = AssignmentClasses.pair_level(PAIR_CAPACITIES, "product")
    gestures, orientations = protocol_subject(10)
    heads = noisy_heads(gestures, orientations, seed=10)
    assignment = SubjectAssignment(classes)
    broken = {"gesture": heads["gesture"][0], "orientation": np.full(len(ORIENTATIONS), np.nan)}
    assert assignment.answer("s", broken) == int(heads["gesture"][0].argmax())
    assert assignment.n_sequences("s") == 0


def test_a_detached_pair_head_trains_itself_only():
    from codes.exp.exp020.model import build_model

    for detached in (False, True):
        cfg = experiment_config(
            "exp020", "variant=smoke", "machine=cpu", f"model.pair_head_detached={detached}"
        )
        torch.manual_seed(0)
        model = build_model(cfg, 12)
        outputs = model(torch.randn(3, 20, 12), torch.ones(3, 20, dtype=torch.bool))
        outputs["pair_logits"].logsumexp(-1).sum().backward()  # a loss of the pair head alone
        encoder = model.input_projection.weight.grad
        head = model.pair_head[0].weight.grad
        assert head is not None and head.abs().sum() > 0
        assert (encoder is None or encoder.abs().sum() == 0) == detached
