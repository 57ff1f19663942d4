"""Ingest benchmark: train.csv -> model-ready per-step features, three ways.

    python benchmarks/bench_ingest.py [--data data/synthetic_full] [--subjects 81] [--repeats 1]
        [--tof-modes summary grid] [--skip-pandas]

- ``polars cold``: ``load_sequence_table`` with an empty cache (read, features, cache write);
- ``polars cached``: the same call again, served from the cache;
- ``pandas groupby``: the obvious way: ``pandas.read_csv`` of every column, then a Python loop
  over ``groupby("sequence_id")`` computing the same features one sequence at a time.

The polars ways run once per ``--tof-modes`` entry (``features.FeatureSettings.tof_mode``;
default ``summary``, the default features), each reporting the size of the cache file it wrote.
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


def run_mode(mode: str, data_dir: Path, cache_dir: Path, tof_mode: str = "summary") -> dict:
    """One measurement, in this process."""
    from codes.common.features import FeatureSettings, compute_step_features
    from codes.common.sequences import load_sequence_table

    settings = FeatureSettings(tof_mode=tof_mode)
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
        "tof_mode": tof_mode,
        "cache_mb": sum(f.stat().st_size for f in cache_dir.glob("*.npz")) / 1e6
        if cache_dir.is_dir()
        else 0.0,
    }


def measure(mode: str, data_dir: Path, cache_dir: Path, tof_mode: str = "summary") -> dict:
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
        "--tof-mode",
        tof_mode,
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
    parser.add_argument("--tof-mode", default="summary", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tof-modes", nargs="+", default=["summary"], help="feature settings' tof_mode, each"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.data, args.cache_dir, args.tof_mode)))
        return

    if not (args.data / "train.csv").is_file():
        from codes.common.synthetic import generate_dataset

        print(f"generating the synthetic dataset ({args.subjects} subjects) in {args.data} ...", flush=True)
        generate_dataset(args.data, n_subjects=args.subjects, seed=0)
    size_mb = (args.data / "train.csv").stat().st_size / 1e6
    load_before = os.getloadavg()[0]
    results = []
    for _ in range(args.repeats):
        for tof_mode in args.tof_modes:
            cache_dir = Path(tempfile.mkdtemp(prefix="ingest-cache-"))
            try:
                results.append(measure("polars-cold", args.data, cache_dir, tof_mode))
                results.append(measure("polars-cached", args.data, cache_dir, tof_mode))
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
        if not args.skip_pandas:
            results.append(measure("pandas-groupby", args.data, Path(tempfile.gettempdir())))

    print(f"\ntrain.csv: {size_mb:.0f} MB, {results[0]['rows']} rows, {results[0]['sequences']} sequences")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    print("| way | tof_mode | wall time (s), best | each round (s) | peak memory (GB) | cache (MB) |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for mode in MODES:
        for tof_mode in args.tof_modes:
            runs = [r for r in results if r["mode"] == mode and r["tof_mode"] == tof_mode]
            if runs:
                seconds = min(r["seconds"] for r in runs)
                each = ", ".join(f"{r['seconds']:.2f}" for r in runs)
                memory = max(r["peak_rss_gb"] for r in runs)
                cache = max(r["cache_mb"] for r in runs)
                print(f"| {mode} | {tof_mode} | {seconds:.2f} | {each} | {memory:.2f} | {cache:.0f} |")
    colds = [
        r["seconds"] for r in results if r["mode"] == "polars-cold" and r["tof_mode"] == args.tof_modes[0]
    ]
    pandas_runs = [r["seconds"] for r in results if r["mode"] == "pandas-groupby"]
    if pandas_runs:
        per_round = [p / c for c, p in zip(colds, pandas_runs, strict=True)]
        print(
            f"\npolars cold is {min(pandas_runs) / min(colds):.1f}x faster than pandas groupby (best vs best); "
            f"per round: {', '.join(f'{x:.1f}x' for x in per_round)}"
        )


if __name__ == "__main__":
    main()
