"""Out-of-fold CV of trained runs with sensor groups removed: what each modality is worth.

    python benchmarks/modality_cv.py --runs outputs/exp020/quick-s42 outputs/exp021/quick-early-s42 \
        [--data data/synthetic] [--threads 1]

Every fold model of a run answers its own validation sequences (the run's ``oof.parquet`` says
which) through the saved predictor (``load_predictor``: the weights and normaliser training
used), four times: with every sensor (the training's CV), without thermopiles and ToF (IMU-only),
without ToF (thermopiles kept), without thermopiles (ToF kept). A removed group's columns are
null, as in the hidden test set's IMU-only half, so the features hold them as absent. Prints one
row per run and, per experiment label (the run folder's parent and the text before ``-s<seed>``),
the mean and min-max over its runs, with the run's own CV from ``metrics.json`` as a check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codes.common.data_files import TRAIN_DEMOGRAPHICS_FILE, read_demographics, read_train
from codes.common.metric import competition_score
from codes.common.schema import TEST_COLUMNS, THM_COLUMNS, TOF_COLUMNS
from codes.inference.run_folder import load_run_config

CONDITIONS = {
    "all sensors": [],
    "IMU-only": THM_COLUMNS + TOF_COLUMNS,
    "no ToF (thm kept)": TOF_COLUMNS,
    "no thm (ToF kept)": THM_COLUMNS,
}


def modality_scores(run_dir: Path, train: pl.DataFrame, demographics: pl.DataFrame) -> dict[str, float]:
    """The run's out-of-fold competition score under each condition."""
    exp = load_run_config(run_dir).exp_name
    predictor = importlib.import_module(f"codes.exp.{exp}.inference").load_predictor(
        run_dir, device="cpu", subject_aware=False
    )
    folds = pl.read_parquet(run_dir / "oof.parquet").select("sequence_id", "fold")
    gesture_of = dict(train.select("sequence_id", "gesture").unique("sequence_id").iter_rows())
    truth, answers = [], defaultdict(list)
    for fold in sorted(folds["fold"].unique().to_list()):
        ids = folds.filter(pl.col("fold") == fold)["sequence_id"]
        frame = train.filter(pl.col("sequence_id").is_in(ids.implode())).select(TEST_COLUMNS)
        member = predictor.restricted_to([fold])
        for condition, removed in CONDITIONS.items():
            served = frame.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in removed)
            predictions = member.predict_frame(served, demographics)
            if condition == "all sensors":
                truth += [gesture_of[s] for s in predictions["sequence_id"]]
            answers[condition] += predictions["gesture"].to_list()
    truth = np.array(truth, dtype=object)
    return {c: competition_score(truth, np.array(a, dtype=object)) for c, a in answers.items()}


def label_of(run_dir: Path) -> str:
    name = re.sub(r"-s\d+$", "", run_dir.name)
    return f"{run_dir.parent.name} {name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="the runs' training data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = read_train(args.data)
    demographics = read_demographics(args.data / TRAIN_DEMOGRAPHICS_FILE)
    names = list(CONDITIONS)
    print("| run | metrics.json CV | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    grouped = defaultdict(list)
    for run_dir in args.runs:
        scores = modality_scores(run_dir, train, demographics)
        cv = json.loads((run_dir / "metrics.json").read_text())["overall"]["score"]
        grouped[label_of(run_dir)].append(scores)
        print(
            f"| {run_dir.parent.name}/{run_dir.name} | {cv:.4f} | "
            + " | ".join(f"{scores[c]:.4f}" for c in names)
            + " |"
        )
    print("\n| runs | n | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for label, runs in grouped.items():
        cells = []
        for c in names:
            values = [r[c] for r in runs]
            cells.append(f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        print(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
