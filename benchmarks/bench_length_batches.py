"""Epoch time of an experiment with padded, cut and length-grouped batches, side by side.

    python benchmarks/bench_length_batches.py --exp exp019 --rounds 3 -- variant=quick data.max_len=200
    python benchmarks/bench_length_batches.py --exp exp019 --rounds 2 --epochs 1 -- variant=quick \\
        data.max_len=200 data=synthetic paths.synthetic_dir=data/synthetic_full data.synthetic_subjects=81

Each setting of :data:`SETTINGS` is one training run of fold 0 (``train.py`` in its own process,
``machine=cpu``, one torch thread unless overridden), ``--epochs`` epochs; the settings take turns
for ``--rounds`` rounds, so that a busy machine slows each alike. An epoch's time is what
``train.log`` says for it: the training steps and the validation of that epoch (padded or cut
like the training). Prints every epoch's seconds and a markdown table: each setting's median
and its speed-up over ``padded``, by the medians and per round (the ratio of the round's mean
epochs, which ran one after the other; their median is least touched by a load that drifts). The runs go to a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# the settings compared: name -> their overrides (codes/common/batching.py)
SETTINGS: dict[str, list[str]] = {
    "padded": ["data.pad_to_batch=false", "data.group_by_length=false"],
    "cut": ["data.pad_to_batch=true", "data.group_by_length=false"],
    "cut+grouped": ["data.pad_to_batch=true", "data.group_by_length=true"],
}
EPOCH_LINE = re.compile(r"fold (\d+) epoch (\d+): .*\(([\d.]+) s\)$")


def epoch_seconds(log: Path) -> list[float]:
    """The seconds of each epoch in a run's ``train.log``."""
    return [float(m.group(3)) for line in log.read_text().splitlines() if (m := EPOCH_LINE.search(line))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", default="exp019")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every setting")
    args = parser.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    seconds: dict[str, list[float]] = {s: [] for s in settings}
    round_means: dict[str, list[float]] = {s: [] for s in settings}  # per round: the mean epoch
    with tempfile.TemporaryDirectory() as work:
        for round_index in range(args.rounds):
            for name in settings:
                run_name = f"{name.replace('+', '-')}-r{round_index}"
                command = [
                    sys.executable, str(REPO_ROOT / "codes" / "exp" / args.exp / "train.py"),
                    "machine=cpu", "machine.num_threads=1", "machine.num_workers=1", "data.folds=[0]",
                    f"trainer.epochs={args.epochs}", f"paths.output_dir={work}", f"run_name={run_name}",
                    *args.overrides, *SETTINGS[name],
                ]  # fmt: skip
                subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
                got = epoch_seconds(Path(work) / args.exp / run_name / "train.log")
                seconds[name].extend(got)
                round_means[name].append(statistics.mean(got))
                print(
                    f"round {round_index} {name}: epochs {', '.join(f'{s:.1f}' for s in got)} s", flush=True
                )
    baseline = statistics.median(seconds[settings[0]])
    print(f"\n{args.exp} {' '.join(args.overrides)}, fold 0, {args.epochs} epoch(s) x {args.rounds} rounds")
    print(
        "| batches | epoch seconds | median | speed-up of the medians | speed-up per round (median) |\n"
        "| --- | --- | --- | --- | --- |"
    )
    for name in settings:
        median = statistics.median(seconds[name])
        values = ", ".join(f"{s:.1f}" for s in seconds[name])
        # a round's settings ran one after the other: their ratio is least touched by a load
        # that changes over the whole benchmark
        ratios = [b / m for b, m in zip(round_means[settings[0]], round_means[name], strict=True)]
        per_round = f"{', '.join(f'{r:.2f}' for r in ratios)}: **{statistics.median(ratios):.2f}x**"
        print(f"| {name} | {values} | **{median:.1f}** | {baseline / median:.2f}x | {per_round} |")


if __name__ == "__main__":
    main()
