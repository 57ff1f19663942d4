"""Subject-aware inference: the joint assignment under per-subject gesture counts, causal."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from codes.common.protocol import gesture_capacities, protocol_record, read_capacities
from codes.common.schema import GESTURES, NUM_GESTURES
from codes.inference.subject_assignment import SubjectAssignment, assign_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROTOCOL = np.array([8] * 8 + [8, 6, 6, 6, 2, 2, 2, 2, 2, 2][:10])  # 18 counts, 102 in all


def noisy_probabilities(labels: np.ndarray, signal: float, seed: int, bias_scale: float = 0.0) -> np.ndarray:
    """Softmax of Gaussian logits with ``signal`` added at the true label and, with
    ``bias_scale``, a per-gesture bias (a model whose priors do not match the subject's)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), NUM_GESTURES)) + rng.normal(size=NUM_GESTURES) * bias_scale
    logits[np.arange(len(labels)), labels] += signal
    weights = np.exp(logits - logits.max(1, keepdims=True))
    return weights / weights.sum(1, keepdims=True)


def protocol_labels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(NUM_GESTURES), PROTOCOL))


def test_protocol_capacities_are_the_most_one_subject_has():
    gestures = np.array([GESTURES[0]] * 3 + [GESTURES[1]] + [GESTURES[0]] * 5 + [GESTURES[2]] * 2)
    subjects = np.array(["a"] * 4 + ["b"] * 7)
    capacities = gesture_capacities(gestures, subjects)
    assert capacities[GESTURES[0]] == 5 and capacities[GESTURES[1]] == 1 and capacities[GESTURES[2]] == 2
    assert sum(capacities.values()) == 8 and capacities[GESTURES[5]] == 0


def test_protocol_json_round_trip(tmp_path):
    import json

    record = protocol_record(np.array([GESTURES[3]] * 2), np.array(["s", "s"]))
    (tmp_path / "protocol.json").write_text(json.dumps(record))
    assert read_capacities(tmp_path).tolist() == [0, 0, 0, 2] + [0] * 14
    assert read_capacities(tmp_path / "nowhere") is None
    (tmp_path / "protocol.json").write_text("{broken")
    with pytest.raises(ValueError, match="damaged"):
        read_capacities(tmp_path)


def test_a_perfect_model_gets_the_true_labels():
    labels = protocol_labels(0)
    probabilities = np.eye(NUM_GESTURES)[labels] * 0.9 + 0.1 / NUM_GESTURES
    assignment = SubjectAssignment(PROTOCOL)
    assert [assignment.answer("s", p) for p in probabilities] == labels.tolist()


def test_with_a_uniform_model_every_capacity_holds_at_every_step():
    assignment = SubjectAssignment(PROTOCOL)
    answers = [assignment.answer("s", np.full(NUM_GESTURES, 1 / NUM_GESTURES)) for _ in range(102)]
    counts = np.bincount(answers, minlength=NUM_GESTURES)
    assert (counts == PROTOCOL).all()
    for k in range(1, 103):  # and along the way: no prefix exceeds a capacity
        assert (np.bincount(answers[:k], minlength=NUM_GESTURES) <= PROTOCOL).all()


def test_with_respect_answers_the_returned_answers_never_exceed_a_capacity():
    probabilities = noisy_probabilities(protocol_labels(4), signal=1.0, seed=4, bias_scale=1.0)
    strict = SubjectAssignment(PROTOCOL, respect_answers=True)
    answers = [strict.answer("s", p) for p in probabilities]
    assert (np.bincount(answers, minlength=NUM_GESTURES) <= PROTOCOL).all()
    free = SubjectAssignment(PROTOCOL)  # the default: each step's joint solution holds them
    rows = []
    for p in probabilities:
        free.answer("s", p)
        rows.append(np.log(p))
        solution = assign_labels(np.stack(rows), PROTOCOL)
        assert (np.bincount(solution, minlength=NUM_GESTURES) <= PROTOCOL).all()


def test_a_capacity_of_zero_is_never_assigned():
    capacities = PROTOCOL.copy()
    capacities[4] = 0
    confident = np.full(NUM_GESTURES, 0.01)
    confident[4] = 1.0
    for penalty in (math.inf, 0.5):
        assignment = SubjectAssignment(capacities, overflow_penalty=penalty)
        assert all(assignment.answer("s", confident / confident.sum()) != 4 for _ in range(20))
    assert (assign_labels(np.log(np.tile(confident, (30, 1))), capacities, 0.0) != 4).all()


def test_overflow_penalty_zero_is_the_plain_argmax_and_the_assignment_corrects_biased_priors():
    accuracy = {"plain": [], "causal": [], "offline": []}
    for seed in range(5):
        labels = protocol_labels(seed)
        probabilities = noisy_probabilities(labels, signal=2.0, seed=seed, bias_scale=1.0)
        plain = probabilities.argmax(1)
        free = SubjectAssignment(PROTOCOL, overflow_penalty=0.0)
        assert [free.answer("s", p) for p in probabilities] == plain.tolist()
        causal = SubjectAssignment(PROTOCOL)
        answers = np.array([causal.answer("s", p) for p in probabilities])
        offline = causal.offline(np.array(["s"] * len(labels), dtype=object), probabilities)
        for name, got in (("plain", plain), ("causal", answers), ("offline", offline)):
            accuracy[name].append((got == labels).mean())
    mean = {name: float(np.mean(values)) for name, values in accuracy.items()}
    # measured: plain 0.347, causal 0.463, offline 0.578
    assert mean["causal"] > mean["plain"] + 0.05 and mean["offline"] > mean["causal"], mean


def test_answers_never_depend_on_later_sequences_or_on_other_subjects():
    labels = protocol_labels(2)
    probabilities = noisy_probabilities(labels, signal=1.5, seed=2, bias_scale=1.0)
    alone = SubjectAssignment(PROTOCOL)
    reference = [alone.answer("x", p) for p in probabilities]
    prefix = SubjectAssignment(PROTOCOL)  # the first 40 answers do not wait for the rest
    assert [prefix.answer("x", p) for p in probabilities[:40]] == reference[:40]
    other = noisy_probabilities(protocol_labels(3), signal=1.5, seed=3, bias_scale=1.0)
    for seed in (0, 1):  # another subject's sequences interleaved, in two orders
        mixed = SubjectAssignment(PROTOCOL)
        order = np.random.default_rng(seed).permutation(len(probabilities) + len(other))
        got = {}
        x_index = iter(range(len(probabilities)))
        y_rows = iter(np.random.default_rng(seed + 10).permutation(len(other)))
        for position in order:
            if position < len(probabilities):
                i = next(x_index)
                got[i] = mixed.answer("x", probabilities[i])
            else:
                mixed.answer("y", other[next(y_rows)])
        assert [got[i] for i in range(len(probabilities))] == reference


def test_missing_subjects_are_answered_alone_and_memory_is_bounded():
    assignment = SubjectAssignment(PROTOCOL, max_subjects=3, max_sequences_per_subject=5)
    uniform = np.full(NUM_GESTURES, 1 / NUM_GESTURES)
    peaked = uniform.copy()
    peaked[7] += 0.5
    for _ in range(12):
        assert assignment.answer(None, peaked) == 7 and assignment.answer("", peaked) == 7
    for subject in "abcde":
        for _ in range(9):
            assignment.answer(subject, uniform)
    assert [assignment.n_sequences(s) for s in "abcde"] == [0, 0, 5, 5, 5]
    assignment.reset()
    assert assignment.n_sequences("e") == 0


@pytest.fixture(scope="module")
def subject_run(toy_data, tmp_path_factory):
    """A tiny exp013 run on the toy data (6 subjects x 18 gestures: capacity 1 each)."""
    from tests.helpers import train_smoke_run

    return train_smoke_run("exp013", toy_data, tmp_path_factory.mktemp("subject_runs"), "trainer.epochs=2")


def test_training_stores_the_protocol_and_inference_uses_it_when_asked(subject_run, monkeypatch):
    from codes.exp.exp013.inference import load_predictor
    from codes.inference import experiment

    assert read_capacities(subject_run).tolist() == [1] * NUM_GESTURES
    assert load_predictor(subject_run, device="cpu", subject_aware=True).subject_assignment is not None
    assert load_predictor(subject_run, device="cpu", subject_aware=False).subject_assignment is None
    assert (load_predictor(subject_run, device="cpu").subject_assignment is not None) == (
        experiment.SUBJECT_AWARE_BY_DEFAULT
    )
    monkeypatch.setattr(experiment, "SUBJECT_AWARE_BY_DEFAULT", True)
    (subject_run / "protocol.json").rename(subject_run / "protocol.json.away")
    try:  # a run folder written before protocol.json existed: answered alone, or a clear error
        assert load_predictor(subject_run, device="cpu").subject_assignment is None
        with pytest.raises(FileNotFoundError, match=r"no protocol\.json"):
            load_predictor(subject_run, device="cpu", subject_aware=True)
    finally:
        (subject_run / "protocol.json.away").rename(subject_run / "protocol.json")


def test_the_gateway_and_batch_mode_give_the_same_answers_in_the_same_order(subject_run, toy_data, tmp_path):
    from codes.exp.exp013.inference import load_predictor
    from codes.inference.batch import run_batch
    from codes.inference.gateway import LocalGateway
    from tests.helpers import labelled_test_dir

    test_dir = labelled_test_dir(toy_data, tmp_path)
    labels = pl.read_csv(test_dir / "test_labels.csv")
    predictor = load_predictor(subject_run, device="cpu", strict=True, subject_aware=True)
    served = LocalGateway.from_dir(test_dir, seed=7).serve(predictor.predict).submission
    scores = run_batch(
        predictor.restricted_to(predictor.folds), test_dir, tmp_path / "submission.csv", order_seed=7
    )
    written = pl.read_csv(tmp_path / "submission.csv")
    joined = served.join(written, on="sequence_id", suffix="_batch")
    assert joined.height == labels.height and (joined["gesture"] == joined["gesture_batch"]).all()
    assert {"plain_score", "causal_score", "offline_score"} <= set(scores)
