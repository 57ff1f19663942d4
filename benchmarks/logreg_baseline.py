"""Logistic-regression baseline on per-sequence mean/std features (a difficulty check of the data).

    python benchmarks/logreg_baseline.py --data data/synthetic --folds 5 --seed 42

Features per sequence: mean and std of every sensor column (a column that is null throughout the
sequence gives 0 for both), plus indicators "thermopile k missing" / "ToF sensor k missing".
StandardScaler + LogisticRegression; subject-grouped folds from ``assign_folds``; the
out-of-fold predictions are scored with the competition metric. Two variants: all sensors and
IMU only (acc + rot features).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from codes.common.folds import assign_folds
from codes.common.metric import binary_f1, competition_score, macro_f1
from codes.common.schema import (
    IMU_COLUMNS,
    NUM_TOF_SENSORS,
    SENSOR_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS_BY_SENSOR,
)

TRAIN_FILE = "train.csv"


def sequence_features(train: pl.DataFrame) -> tuple[pl.DataFrame, list[str], list[str]]:
    """One row per sequence: gesture, subject, mean/std features; returns (table, all names, IMU names)."""
    aggregations: list[pl.Expr] = [pl.col("gesture").first(), pl.col("subject").first()]
    imu_features, all_features = [], []
    for column in SENSOR_COLUMNS:
        values = pl.col(column).cast(pl.Float64)
        aggregations += [
            values.mean().fill_null(0.0).alias(f"{column}_mean"),
            values.std().fill_null(0.0).alias(f"{column}_std"),
        ]
        names = [f"{column}_mean", f"{column}_std"]
        all_features += names
        if column in IMU_COLUMNS:
            imu_features += names
    for column in THM_COLUMNS:
        aggregations.append(pl.col(column).is_null().all().cast(pl.Float64).alias(f"{column}_missing"))
        all_features.append(f"{column}_missing")
    for sensor in range(1, NUM_TOF_SENSORS + 1):
        first_pixel = TOF_COLUMNS_BY_SENSOR[sensor][0]
        aggregations.append(
            pl.col(first_pixel).is_null().all().cast(pl.Float64).alias(f"tof_{sensor}_missing")
        )
        all_features.append(f"tof_{sensor}_missing")
    table = train.group_by("sequence_id", maintain_order=True).agg(aggregations).sort("sequence_id")
    return table, all_features, imu_features


def cross_validate(
    features: np.ndarray, gestures: np.ndarray, folds: np.ndarray, seed: int, max_iter: int, c: float
) -> np.ndarray:
    """Out-of-fold gesture predictions."""
    predictions = np.empty(len(gestures), dtype=object)
    for fold in np.unique(folds):
        train_mask = folds != fold
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=c, random_state=seed))
        model.fit(features[train_mask], gestures[train_mask])
        predictions[~train_mask] = model.predict(features[~train_mask])
    return predictions


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="folder holding train.csv")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 regularisation strength")
    args = parser.parse_args()

    started = time.perf_counter()
    train = pl.read_csv(args.data / TRAIN_FILE, infer_schema_length=10000)
    table, all_features, imu_features = sequence_features(train)
    del train
    gestures = table["gesture"].to_numpy().astype(object)
    subjects = table["subject"].to_numpy().astype(object)
    folds = assign_folds(gestures, subjects, args.folds, args.seed)
    print(
        f"{len(table)} sequences, {len(np.unique(subjects))} subjects, {args.folds} subject-grouped folds "
        f"(features in {time.perf_counter() - started:.1f} s)"
    )
    print("| variant | features | score | binary F1 | macro F1 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, columns in (("all sensors", all_features), ("IMU only", imu_features)):
        features = table.select(columns).to_numpy().astype(np.float64)
        # one BLAS thread: these small fits get far slower, not faster, with more threads
        with threadpool_limits(limits=1):
            predictions = cross_validate(features, gestures, folds, args.seed, args.max_iter, args.c)
        print(
            f"| {name} | {len(columns)} | {competition_score(gestures, predictions):.4f} | "
            f"{binary_f1(gestures, predictions):.4f} | {macro_f1(gestures, predictions):.4f} |",
            flush=True,
        )
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
