"""Plain, causal and offline subject-aware scores of trained runs on a labelled test set, and the cost.

    python benchmarks/subject_assignment.py --runs outputs/exp019/quick-s42 outputs/exp020/quick-s42 ...
        [--data data/synthetic] [--orders 5] [--analysis] [--latency-run outputs/exp020/quick-s42]

Each run's fold ensemble gives every test sequence's head probabilities once (batch mode,
``with_heads``); the causal answers are then those ``predict()`` gives when the gateway serves the
sequences in a shuffled order (``--orders`` seeds), the offline ones assign each subject's whole
test set at once. Answers:

- ``plain``: each sequence alone (the gesture head's argmax); ``plain (<joint> marginal)``: alone,
  the gesture with the largest p(gesture) = sum over orientations of the joint (what the
  assignment starts from: the gain of the assignment itself is over this row);
- ``causal gesture``: the assignment over the 18 gestures (per-subject gesture counts);
- ``causal pair (<joint>)``: over the gesture x orientation pairs, p(gesture, orientation) from
  the heads (``product`` of the gesture and orientation heads, the ``pair`` head, or both pooled:
  ``pair_product``); only the joints whose heads a run has;
- ``offline gesture`` / ``offline pair (<joint>)``: each subject's whole set at once.

Scores are the competition score overall, on the IMU-only and on the all-sensor sequences;
mean (min-max) over the orders and the runs of one experiment. ``--analysis`` adds where the
causal gain comes from: the gain by the position of a sequence in its subject's served order,
and variants (early answers plain, a finite or growing overflow penalty, the history's
assignment as a prior). ``--latency-run``: ``predict()`` p50 through the local gateway stand-in
on one subject's sequences (served last: the 102nd and the 10 before it), plain and
subject-aware in turn, twice, 1 torch thread. ``--oof``: each head's plain answers on the runs'
out-of-fold sequences (every fold model on its own validation subjects of train.csv, all sensors
and with the thermopiles and ToF removed, as training's CV scores them): is a joint's marginal a
better plain answer than the gesture head?
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codes.common.data_files import (
    TEST_DEMOGRAPHICS_FILE,
    TRAIN_DEMOGRAPHICS_FILE,
    read_demographics,
    read_test,
    read_train,
)
from codes.common.metric import competition_score
from codes.common.protocol import read_protocol
from codes.common.schema import GESTURES, SENSOR_COLUMNS, TEST_COLUMNS
from codes.inference.batch import read_labels, serving_order, subject_aware_answers
from codes.inference.gateway import LocalGateway, latency_summary
from codes.inference.predictor import heads_of_frame
from codes.inference.run_folder import load_run_config
from codes.inference.subject_assignment import JOINT_HEADS, JOINTS, AssignmentClasses, SubjectAssignment

NAMES = np.array(GESTURES, dtype=object)
POSITION_BUCKETS = [
    (1, 10),
    (11, 25),
    (26, 51),
    (52, 76),
    (77, 102),
]  # a sequence's place in its subject's order


class RunOutputs:
    """One run's test-set heads, labels and subjects."""

    def __init__(self, run_dir: Path, data_dir: Path) -> None:
        self.run_dir = run_dir
        self.exp = load_run_config(run_dir).exp_name
        inference = importlib.import_module(f"codes.exp.{self.exp}.inference")
        predictor = inference.load_predictor(run_dir, device="cpu")
        frame = read_test(data_dir)
        demographics = read_demographics(data_dir / TEST_DEMOGRAPHICS_FILE)
        predictions = predictor.predict_frame(frame, demographics, with_heads=True)
        labels = read_labels(data_dir, frame["sequence_id"])
        truth = dict(labels.select("sequence_id", "gesture").iter_rows())
        subject_of = dict(frame.select("sequence_id", "subject").unique("sequence_id").iter_rows())
        self.truth = np.array([truth[s] for s in predictions["sequence_id"]], dtype=object)
        self.subjects = np.array([subject_of[s] for s in predictions["sequence_id"]], dtype=object)
        self.imu_only = predictions["imu_only"].to_numpy()
        self.heads = heads_of_frame(predictions)
        self.protocol = read_protocol(run_dir)

    def joints(self) -> list[str]:
        return [j for j in JOINTS if all(h in self.heads for h in JOINT_HEADS[j])]

    def scores(self, indices: np.ndarray, subset: np.ndarray | None = None) -> tuple[float, float, float]:
        """(score, IMU-only score, all-sensor score) of gesture indices (on ``subset`` rows)."""
        chosen = np.ones(len(indices), bool) if subset is None else subset
        predicted = NAMES[indices]

        def score(rows: np.ndarray) -> float:
            rows = rows & chosen
            return competition_score(self.truth[rows], predicted[rows]) if rows.any() else math.nan

        everything = np.ones(len(indices), bool)
        return score(everything), score(self.imu_only), score(~self.imu_only)

    def assignment(self, level: str, joint: str = "product", **options) -> SubjectAssignment:
        if level == "gesture":
            return SubjectAssignment(AssignmentClasses.gesture_level(self.protocol.gestures), **options)
        return SubjectAssignment(AssignmentClasses.pair_level(self.protocol.pairs, joint), **options)

    def positions(self, order: np.ndarray) -> np.ndarray:
        """(N,) 1-based place of each sequence in its subject's served order."""
        place = np.zeros(len(order), dtype=np.int64)
        seen: dict[str, int] = defaultdict(int)
        for i in order:
            seen[self.subjects[i]] += 1
            place[i] = seen[self.subjects[i]]
        return place


def spread(values: list[float]) -> str:
    values = np.array(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ({values.min():.4f}-{values.max():.4f})"


def print_table(
    title: str, rows: dict[str, list[tuple[float, float, float]]], plain_key: str = "plain"
) -> None:
    print(f"\n#### {title}\n")
    print("| answers | score | gain over plain | IMU-only | all sensors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    plain = np.mean([v[0] for v in rows[plain_key]])
    for name, values in rows.items():
        score, imu, full = (list(column) for column in zip(*values, strict=True))
        print(
            f"| {name} | {spread(score)} | {np.mean(score) - plain:+.4f} | {spread(imu)} | {spread(full)} |"
        )


def main_scores(runs: list[RunOutputs], orders: int) -> None:
    by_exp: dict[str, list[RunOutputs]] = defaultdict(list)
    for run in runs:
        by_exp[run.exp].append(run)
    for exp, members in by_exp.items():
        rows: dict[str, list] = defaultdict(list)
        for run in members:
            plain = run.heads["gesture"].argmax(1)
            rows["plain"] += [run.scores(plain)] * orders  # the same for every order
            for joint in run.joints():  # the joint's own plain answer: its gesture marginal
                classes = AssignmentClasses.pair_level(run.protocol.pairs, joint)
                marginal = classes.plain_gestures(classes.log_probabilities(run.heads))
                rows[f"plain ({joint} marginal)"] += [run.scores(marginal)] * orders
            variants = {"causal gesture": run.assignment("gesture")}
            variants |= {f"causal pair ({j})": run.assignment("pair", j) for j in run.joints()}
            for name, assignment in variants.items():
                for seed in range(orders):
                    order = serving_order(len(plain), seed)
                    rows[name].append(
                        run.scores(subject_aware_answers(assignment, run.subjects, run.heads, order))
                    )
            rows["offline gesture"] += [
                run.scores(run.assignment("gesture").offline(run.subjects, run.heads))
            ] * orders
            for joint in run.joints():
                offline = run.assignment("pair", joint).offline(run.subjects, run.heads)
                rows[f"offline pair ({joint})"] += [run.scores(offline)] * orders
        names = ", ".join(r.run_dir.name for r in members)
        print_table(f"{exp}: {len(members)} run(s) ({names}) x {orders} serving orders", rows)


def analysis(runs: list[RunOutputs], orders: int) -> None:
    """Where the causal gain comes from, on the runs with a pair-level protocol."""
    by_exp: dict[str, list[RunOutputs]] = defaultdict(list)
    for run in runs:
        if run.protocol is not None and run.protocol.has_pairs and run.joints():
            by_exp[run.exp].append(run)
    for exp, members in by_exp.items():
        joint = members[0].joints()[-1]  # the richest joint the runs have
        gains: dict[tuple[int, int], list[tuple[float, float, float]]] = defaultdict(list)
        rows: dict[str, list] = defaultdict(list)
        variants = {
            f"causal pair ({joint})": {},
            "plain for the first 10": {"plain_until": 11},
            "plain for the first 25": {"plain_until": 26},
            "penalty 2 nats": {"overflow_penalty": 2.0},
            "penalty 4 nats, growing to it over 102": {"overflow_penalty": 4.0, "penalty_ramp": 102},
            "history's assignment as a prior, weight 1": {"prior_weight": 1.0},
            "history's assignment as a prior, weight 3": {"prior_weight": 3.0},
        }
        started = time.perf_counter()
        for run in members:
            plain = run.heads["gesture"].argmax(1)
            rows["plain"] += [run.scores(plain)] * orders
            for name, options in variants.items():
                assignment = run.assignment("pair", joint, **options)
                for seed in range(orders):
                    order = serving_order(len(plain), seed)
                    answers = subject_aware_answers(assignment, run.subjects, run.heads, order)
                    rows[name].append(run.scores(answers))
                    if options:
                        continue
                    place = run.positions(order)
                    for low, high in POSITION_BUCKETS:
                        inside = (place >= low) & (place <= high)
                        accuracy = (NAMES[answers[inside]] == run.truth[inside]).mean()
                        plain_accuracy = (NAMES[plain[inside]] == run.truth[inside]).mean()
                        gains[(low, high)].append(
                            (
                                run.scores(answers, inside)[0] - run.scores(plain, inside)[0],
                                accuracy,
                                plain_accuracy,
                            )
                        )
        print_table(
            f"{exp}: causal variants, pair level ({joint}), {len(members)} run(s) x {orders} orders", rows
        )
        print(
            f"\n#### {exp}: the causal gain by a sequence's place in its subject's served order ({joint})\n"
        )
        print("| place | score gain over plain | accuracy causal | accuracy plain |")
        print("| --- | ---: | ---: | ---: |")
        for (low, high), values in gains.items():
            gain, accuracy, plain_accuracy = (np.array(c) for c in zip(*values, strict=True))
            print(
                f"| {low}-{high} | {gain.mean():+.4f} ({gain.min():+.4f} to {gain.max():+.4f}) | "
                f"{accuracy.mean():.4f} | {plain_accuracy.mean():.4f} |"
            )
        print(f"\n({time.perf_counter() - started:.0f} s)")


def latency(run_dir: Path, data_dir: Path) -> None:
    """predict() p50 at a subject's last-served sequences, plain and subject-aware in turn."""
    torch.set_num_threads(1)
    exp = load_run_config(run_dir).exp_name
    inference = importlib.import_module(f"codes.exp.{exp}.inference")
    frame = read_test(data_dir)
    demographics = read_demographics(data_dir / TEST_DEMOGRAPHICS_FILE)
    subject = sorted(frame["subject"].unique().to_list())[0]
    served = frame.filter(pl.col("subject") == subject)
    print(f"\n#### predict() latency, {exp} run {run_dir.name}, subject {subject}, 1 torch thread\n")
    print("| predictor | sequences | p50 all | p50 at the last 11 (92nd-102nd) | p99 all |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for aware in (False, True, False, True):
        predictor = inference.load_predictor(run_dir, device="cpu", subject_aware=aware)
        result = LocalGateway(served, demographics, seed=0).serve(predictor.predict)
        everything, last = latency_summary(result.seconds), latency_summary(result.seconds[-11:])
        print(
            f"| {'subject-aware' if aware else 'plain'} | {len(result.seconds)} | {everything['p50']:.1f} ms | "
            f"{last['p50']:.1f} ms | {everything['p99']:.1f} ms |"
        )
    # the assignment's own cost, without the models: the subject's heads replayed in serving order
    predictor = inference.load_predictor(run_dir, device="cpu", subject_aware=True)
    heads = heads_of_frame(predictor.predict_frame(served, demographics, with_heads=True))
    order = serving_order(len(heads["gesture"]), 0)
    seconds = []
    for i in order:
        started = time.perf_counter()
        predictor.subject_assignment.answer(subject, {h: p[i] for h, p in heads.items()})
        seconds.append(time.perf_counter() - started)
    print(
        f"\nThe assignment step alone ({predictor.subject_assignment.classes.level} level, "
        f"{predictor.subject_assignment.classes.joint}): p50 {1000 * np.median(seconds):.2f} ms over all "
        f"{len(seconds)}, {1000 * np.median(seconds[-11:]):.2f} ms at the last 11."
    )


def out_of_fold(run_dirs: list[Path], data_dir: Path) -> None:
    """CV scores of each head's plain answer: every fold model on its validation sequences."""
    train = read_train(data_dir)
    demographics = read_demographics(data_dir / TRAIN_DEMOGRAPHICS_FILE)
    non_imu = [c for c in SENSOR_COLUMNS if c.startswith(("thm_", "tof_"))]
    print("\n#### Plain answers on the out-of-fold sequences (training's CV), per head\n")
    print("| run | answers | CV | IMU-only CV |")
    print("| --- | --- | ---: | ---: |")
    for run_dir in run_dirs:
        exp = load_run_config(run_dir).exp_name
        predictor = importlib.import_module(f"codes.exp.{exp}.inference").load_predictor(
            run_dir, device="cpu"
        )
        folds = pl.read_parquet(run_dir / "oof.parquet").select("sequence_id", "fold")
        truth, answers = [], defaultdict(lambda: ([], []))
        for fold in sorted(folds["fold"].unique().to_list()):
            ids = folds.filter(pl.col("fold") == fold)["sequence_id"]
            frame = train.filter(pl.col("sequence_id").is_in(ids.implode())).select(TEST_COLUMNS)
            member = predictor.restricted_to([fold])
            parts = []
            for sensors in (
                frame,
                frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in non_imu),
            ):
                parts.append(member.predict_frame(sensors, demographics, with_heads=True))
            gesture_of = dict(train.select("sequence_id", "gesture").unique("sequence_id").iter_rows())
            truth += [gesture_of[s] for s in parts[0]["sequence_id"]]
            protocol = read_protocol(run_dir)
            for which, predictions in enumerate(parts):
                heads = heads_of_frame(predictions)
                answers["gesture head"][which].append(heads["gesture"].argmax(1))
                for joint in JOINTS:
                    if protocol.has_pairs and all(h in heads for h in JOINT_HEADS[joint]):
                        classes = AssignmentClasses.pair_level(protocol.pairs, joint)
                        marginal = classes.plain_gestures(classes.log_probabilities(heads))
                        answers[f"{joint} marginal"][which].append(marginal)
        truth = np.array(truth, dtype=object)
        for name, (full, imu) in answers.items():
            full, imu = NAMES[np.concatenate(full)], NAMES[np.concatenate(imu)]
            print(
                f"| {exp} {run_dir.name} | {name} | {competition_score(truth, full):.4f} | "
                f"{competition_score(truth, imu):.4f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--analysis", action="store_true")
    parser.add_argument("--latency-run", type=Path)
    parser.add_argument("--oof", action="store_true")
    parser.add_argument(
        "--train-data", type=Path, default=Path("data/synthetic"), help="--oof: the runs' training data"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [RunOutputs(run_dir, args.data) for run_dir in args.runs]
    subjects = len(set(runs[0].subjects))
    print(f"{len(runs[0].subjects)} test sequences of {subjects} subjects in {args.data}")
    main_scores(runs, args.orders)
    if args.analysis:
        analysis(runs, args.orders)
    if args.oof:
        out_of_fold(args.runs, args.train_data)
    if args.latency_run:
        latency(args.latency_run, args.data)


if __name__ == "__main__":
    main()
