"""What hashing the data files on every load costs: ``file_digest`` against the cached and cold
``load_sequence_table`` of a split.

    python -m codes.common.synthetic --out data/synthetic_full --subjects 81 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/bench_cache_digest.py --data data/synthetic_full [--cached 5] [--cold 3]

One process; the files are read once first, so they sit in the page cache. The cache goes to a
temporary folder, never to the data folder's ``cache/``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from codes.common.sequences import file_digest, load_sequence_table, split_files


def timed(
    function: Callable[[], object], rounds: int, before: Callable[[], object] = lambda: None
) -> list[float]:
    """Wall seconds of ``rounds`` calls of ``function``, each after ``before`` (not timed)."""
    times = []
    for _ in range(rounds):
        before()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def report(name: str, times: list[float]) -> None:
    rounds = ", ".join(f"{t:.2f}" for t in times)
    print(f"{name}: {rounds} (median {statistics.median(times):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding train.csv")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--cached", type=int, default=5, help="rounds of the digest and the cached load")
    parser.add_argument("--cold", type=int, default=3, help="rounds of the cold load (empty cache)")
    args = parser.parse_args()
    files = split_files(args.data, args.split)
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        report("cold load_sequence_table", timed(
            lambda: load_sequence_table(args.data, args.split, cache_dir=cache), args.cold,
            before=lambda: shutil.rmtree(cache, ignore_errors=True),
        ))  # fmt: skip
        report(
            "file_digest of the split's files", timed(lambda: [file_digest(p) for p in files], args.cached)
        )
        report("cached load_sequence_table", timed(
            lambda: load_sequence_table(args.data, args.split, cache_dir=cache), args.cached
        ))  # fmt: skip


if __name__ == "__main__":
    main()
