"""Ingest benchmark: train.csv -> model-ready per-step features, three ways.

    python benchmarks/bench_ingest.py [--data data/synthetic_full] [--subjects 81] [--repeats 1]

- ``polars cold``: ``load_sequence_table`` with an empty cache (read, features, cache write);
- ``polars cached``: the same call again, served from the cache;
- ``pandas groupby``: the obvious way: ``pandas.read_csv`` of every column, then a Python loop
  over ``groupby("sequence_id")`` computing the same features one sequence at a time.

Each measurement runs in a fresh process, which reports its wall time and peak resident memory.
The dataset (full competition size by default) is generated first when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("polars-cold", "polars-cached", "pandas-groupby")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_mode(mode: str, data_dir: Path, cache_dir: Path) -> dict:
    """One measurement, in this process."""
    from codes.common.features import FeatureSettings, compute_step_features
    from codes.common.sequences import load_sequence_table

    settings = FeatureSettings()
    started = time.perf_counter()
    if mode in ("polars-cold", "polars-cached"):
        table = load_sequence_table(data_dir, "train", settings, cache_dir=cache_dir)
        n_sequences, n_rows = table.n_sequences, len(table.features)
    elif mode == "pandas-groupby":
        import pandas as pd

        frame = pd.read_csv(data_dir / "train.csv")
        demographics = pd.read_csv(data_dir / "train_demographics.csv").set_index("subject")
        features = []
        for _, group in frame.groupby("sequence_id", sort=False):
            group = group.sort_values("sequence_counter")
            left = bool(demographics.loc[group["subject"].iloc[0], "handedness"] == 0)
            sensors = group[settings.sensor_columns].to_numpy(dtype=np.float64)
            step = compute_step_features(sensors, np.array([0, len(group)]), np.array([left]), settings)
            features.append(step.features)
        n_sequences, n_rows = len(features), sum(len(f) for f in features)
    else:
        raise ValueError(mode)
    return {
        "mode": mode,
        "seconds": time.perf_counter() - started,
        "peak_rss_gb": _peak_rss_gb(),
        "sequences": n_sequences,
        "rows": n_rows,
    }


def measure(mode: str, data_dir: Path, cache_dir: Path) -> dict:
    """Run one mode in a fresh interpreter and return what it reports."""
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--data",
        str(data_dir),
        "--cache-dir",
        str(cache_dir),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/synthetic_full"))
    parser.add_argument(
        "--subjects", type=int, default=81, help="subjects when the dataset must be generated"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.data, args.cache_dir)))
        return

    if not (args.data / "train.csv").is_file():
        from codes.common.synthetic import generate_dataset

        print(f"generating the synthetic dataset ({args.subjects} subjects) in {args.data} ...", flush=True)
        generate_dataset(args.data, n_subjects=args.subjects, seed=0)
    size_mb = (args.data / "train.csv").stat().st_size / 1e6
    load_before = os.getloadavg()[0]
    results = []
    for _ in range(args.repeats):
        cache_dir = Path(tempfile.mkdtemp(prefix="ingest-cache-"))
        try:
            results.append(measure("polars-cold", args.data, cache_dir))
            results.append(measure("polars-cached", args.data, cache_dir))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if not args.skip_pandas:
            results.append(measure("pandas-groupby", args.data, Path(tempfile.gettempdir())))

    print(f"\ntrain.csv: {size_mb:.0f} MB, {results[0]['rows']} rows, {results[0]['sequences']} sequences")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    print("| way | wall time (s), best | each round (s) | peak memory (GB) |")
    print("| --- | ---: | --- | ---: |")
    for mode in MODES:
        runs = [r for r in results if r["mode"] == mode]
        if runs:
            seconds = min(r["seconds"] for r in runs)
            each = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            memory = max(r["peak_rss_gb"] for r in runs)
            print(f"| {mode} | {seconds:.2f} | {each} | {memory:.2f} |")
    colds = [r["seconds"] for r in results if r["mode"] == "polars-cold"]
    pandas_runs = [r["seconds"] for r in results if r["mode"] == "pandas-groupby"]
    if pandas_runs:
        per_round = [p / c for c, p in zip(colds, pandas_runs, strict=True)]
        print(
            f"\npolars cold is {min(pandas_runs) / min(colds):.1f}x faster than pandas groupby (best vs best); "
            f"per round: {', '.join(f'{x:.1f}x' for x in per_round)}"
        )


if __name__ == "__main__":
    main()
