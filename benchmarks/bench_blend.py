"""predict() latency of a blend against each of its members alone, on the same sequences.

    python benchmarks/bench_blend.py --blend-dir outputs/blends/<name> [--data data/synthetic] \\
        [--threads 1] [--n-sequences 200] [--warmup 10]

The test.csv sequences of ``--data`` are served in the local gateway's shuffled order; for each
sequence the blend and every member alone answer it in turn (one ``predict(sequence,
demographics)`` call each), so that a noisy machine slows all of them alike. Prints the p50 / p90
per predictor and the blend's p50 over each member's.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from codes.common.data_files import TEST_DEMOGRAPHICS_FILE  # noqa: E402
from codes.common.data_source import resolve_data_dir  # noqa: E402
from codes.common.runs import setup_logging  # noqa: E402
from codes.inference.blend import load_blend, load_member_predictor, member_folder, read_blend_file  # noqa: E402
from codes.inference.gateway import LocalGateway, latency_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blend-dir", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, default=None, help="a folder with test.csv (default: the synthetic data)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--n-sequences", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="serving order")
    args = parser.parse_args()
    setup_logging(None)
    logging.getLogger("codes.inference").setLevel(logging.ERROR)  # odd-row warnings: not timed noise
    torch.set_num_threads(args.threads)
    data_dir = args.data or resolve_data_dir("synthetic", synthetic_dir=REPO_ROOT / "data" / "synthetic")
    blend_file = read_blend_file(args.blend_dir)
    predictors = {"blend": load_blend(args.blend_dir, device="cpu", subject_aware=False)}
    for entry in blend_file["members"]:
        predictors[entry["name"]] = load_member_predictor(
            member_folder(args.blend_dir, entry), device="cpu", subject_aware=False
        )
    test = pl.read_csv(data_dir / "test.csv")
    demographics = pl.read_csv(data_dir / TEST_DEMOGRAPHICS_FILE)
    served = list(LocalGateway(test, demographics, seed=args.seed).batches())
    for _, sequence, subject in served[: args.warmup]:
        for predictor in predictors.values():
            predictor.predict(sequence, subject)
    seconds = {name: [] for name in predictors}
    for _, sequence, subject in served[: args.n_sequences]:
        for name, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict(sequence, subject)
            seconds[name].append(time.perf_counter() - started)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s); {len(seconds['blend'])} sequences of {data_dir / 'test.csv'}, "
        f"{args.warmup} warm-up calls; blend weights all_sensors "
        f"{blend_file['routes']['all_sensors']['weights']}, imu_only {blend_file['routes']['imu_only']['weights']}"
    )
    blend_p50 = latency_summary(np.array(seconds["blend"]))["p50"]
    print("| predictor | p50 ms | p90 ms | blend p50 / this p50 |\n| --- | ---: | ---: | ---: |")
    for name, values in seconds.items():
        latency = latency_summary(np.array(values))
        print(f"| {name} | {latency['p50']:.1f} | {latency['p90']:.1f} | {blend_p50 / latency['p50']:.2f} |")


if __name__ == "__main__":
    main()
