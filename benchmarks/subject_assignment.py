"""Plain, causal and offline subject-aware scores of a run on a labelled test set, and the cost.

    python benchmarks/subject_assignment.py --run-dir outputs/exp018/<run> [--data data/synthetic]
        [--orders 5] [--penalty inf] [--latency-subjects 1]

The fold ensemble's probabilities of every test sequence are computed once (batch mode); the
causal answers are then those ``predict()`` gives when the gateway serves the sequences in a
shuffled order (``--orders`` seeds), the offline ones assign each subject's whole test set at
once. Scores: the competition score overall and on the IMU-only sequences. Latency: ``predict()``
p50/p99 through the local gateway stand-in, plain and subject-aware, on the sequences of
``--latency-subjects`` subjects.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codes.common.data_files import TEST_DEMOGRAPHICS_FILE, read_demographics, read_test
from codes.common.schema import GESTURES
from codes.inference.batch import read_labels, score_predictions, serving_order, subject_aware_answers
from codes.inference.gateway import LocalGateway, latency_summary
from codes.inference.run_folder import load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--penalty", type=float, default=math.inf)
    parser.add_argument("--latency-subjects", type=int, default=1)
    args = parser.parse_args()

    exp = load_run_config(args.run_dir).exp_name
    inference = importlib.import_module(f"codes.exp.{exp}.inference")
    predictor = inference.load_predictor(
        args.run_dir, device="cpu", subject_aware=True, overflow_penalty=args.penalty
    )
    frame = read_test(args.data)
    demographics = read_demographics(args.data / TEST_DEMOGRAPHICS_FILE)
    labels = read_labels(args.data, frame["sequence_id"])
    predictions = predictor.predict_frame(frame, demographics)
    probabilities = predictions.select([f"prob_{g}" for g in GESTURES]).to_numpy()
    subject_of = dict(frame.select("sequence_id", "subject").unique("sequence_id").iter_rows())
    subjects = np.array([subject_of[s] for s in predictions["sequence_id"]], dtype=object)
    names = np.array(GESTURES, dtype=object)

    def scores(indices: np.ndarray) -> tuple[float, float]:
        scored = score_predictions(predictions.with_columns(pl.Series("gesture", names[indices])), labels)
        return scored["score"], scored["score_imu_only"]

    rows = {"plain": [scores(probabilities.argmax(1))]}
    rows["offline"] = [scores(predictor.subject_assignment.offline(subjects, probabilities))]
    rows["causal"] = [
        scores(
            subject_aware_answers(
                predictor.subject_assignment, subjects, probabilities, serving_order(len(subjects), seed)
            )
        )
        for seed in range(args.orders)
    ]
    print(
        f"{exp} run {args.run_dir.name}, {len(subjects)} test sequences of {len(set(subjects))} subjects, penalty {args.penalty}"
    )
    print("| answers | score | IMU-only score |")
    print("| --- | ---: | ---: |")
    for name, values in rows.items():
        values = np.array(values)
        spread = (
            f" (min {values[:, 0].min():.4f}, max {values[:, 0].max():.4f}, {len(values)} orders)"
            if len(values) > 1
            else ""
        )
        print(f"| {name} | {values[:, 0].mean():.4f}{spread} | {values[:, 1].mean():.4f} |")

    chosen = sorted(set(subjects))[: args.latency_subjects]
    served_frame = frame.filter(pl.col("subject").is_in(chosen))
    for aware in (False, True, False, True):
        latency_predictor = inference.load_predictor(args.run_dir, device="cpu", subject_aware=aware)
        result = LocalGateway(served_frame, demographics, seed=0).serve(latency_predictor.predict)
        summary = latency_summary(result.seconds)
        print(
            f"predict() {'subject-aware' if aware else 'plain':13s} on {len(result.seconds)} sequences: "
            f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms"
        )


if __name__ == "__main__":
    main()
