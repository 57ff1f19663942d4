"""Data-layer demo: data source -> cached features -> folds -> normalised, padded arrays.

python -m codes.common.demo [--source auto|competition|synthetic] [--max-len 128] [--folds 5]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from codes.common.data_source import DATA_SOURCES, resolve_data_dir
from codes.common.features import FeatureSettings
from codes.common.folds import assign_folds
from codes.common.sequences import FeatureNormalizer, load_sequence_table, pad_sequences


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=DATA_SOURCES, default="auto")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--synthetic-dir", type=Path, default=Path("data/synthetic"))
    parser.add_argument(
        "--synthetic-subjects", type=int, default=20, help="when the synthetic data is generated"
    )
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tof-mode", choices=("none", "summary", "raw"), default="summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    data_dir = resolve_data_dir(args.source, args.data_dir, args.synthetic_dir, args.synthetic_subjects)
    settings = FeatureSettings(tof_mode=args.tof_mode)
    started = time.perf_counter()
    table = load_sequence_table(data_dir, "train", settings)
    first_load = time.perf_counter() - started
    started = time.perf_counter()
    table = load_sequence_table(data_dir, "train", settings)
    cached_load = time.perf_counter() - started

    lengths = table.lengths
    print(f"data: {data_dir}")
    print(
        f"train: {table.n_sequences} sequences, {len(np.unique(table.subjects))} subjects, {lengths.sum()} rows; "
        f"length min {lengths.min()} / median {int(np.median(lengths))} / mean {lengths.mean():.1f} / max {lengths.max()}"
    )
    print(
        f"IMU-only sequences: {table.imu_only.mean():.1%}; steps with a missing IMU reading: {1 - table.step_valid.mean():.2%}"
    )
    print(
        f"{len(table.feature_names)} features per step: "
        + ", ".join(f"{g}={len(i)}" for g, i in table.feature_groups.items())
    )
    print(f"load: first {first_load:.2f} s, again (cache) {cached_load:.2f} s")

    folds = assign_folds(table.gestures, table.subjects, n_folds=args.folds)
    for fold in range(args.folds):
        in_fold = folds == fold
        print(
            f"fold {fold}: {in_fold.sum()} validation sequences, {len(np.unique(table.subjects[in_fold]))} subjects"
        )
    train_part = table.subset(np.flatnonzero(folds != 0))
    normalizer = FeatureNormalizer().fit(train_part)
    padded = pad_sequences(table, args.max_len, normalizer.transform(table))
    print(
        f"padded to the last {args.max_len} steps: features {padded.features.shape}, mask {padded.mask.shape}, "
        f"{(lengths > args.max_len).mean():.1%} of sequences truncated"
    )


if __name__ == "__main__":
    main()
