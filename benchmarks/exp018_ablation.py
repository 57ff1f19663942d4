"""Why exp018 trails exp013: the ablation's arms, their commands, and its table.

exp019 with its recipe switched off computes exactly exp018 (``tests/test_pinned_runs.py``), so
each arm is exp019 at exp018's settings plus the one change the arm names:

    python benchmarks/exp018_ablation.py --commands              # the train.py command of every arm x seed
    python benchmarks/exp018_ablation.py --folds 0 1             # the table, scored on folds 0 and 1

Every arm runs ``variant=quick`` (exp018's quick budget: 9 epochs, d_model 64, max_len 64) on the
same subject-grouped 5-fold split of the 20-subject synthetic data, with ``data.folds`` set to
the folds given, at 2 seeds. Runs whose folder holds more folds (a whole 5-fold baseline) are
scored on the same folds only, so every row compares the same validation sequences. The CV is
the competition score of the pooled out-of-fold predictions of those folds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from codes.common.metric import competition_score  # noqa: E402
from tests.pinned_runs import EXP019_AS_EXP018  # noqa: E402

SEEDS = (42, 7)
# arm -> the overrides it adds to exp018's settings (EXP019_AS_EXP018 without the tiny dims)
ARMS: dict[str, list[str]] = {
    "base": [],
    "lr025": ["trainer.bert_lr_scale=0.25"],
    "warm20": ["trainer.warmup_ratio=0.2"],
    "cls002": ["model.cls_init_std=0.02"],
    "ln": ["model.head_norm=true"],
    "posnone": ["model.bert.position_embeddings=none"],
    "drop0": ["model.bert.hidden_dropout=0", "model.bert.attention_dropout=0"],
    "pool": ["model.head_pooling=cls_mean_max"],
    "ep18": ["trainer.epochs=18"],
}
DESCRIPTIONS = {
    "base": "exp018 as it is (CLS output only, BERT at the body's rate, warm-up 5%)",
    "lr025": "BERT head and CLS token at 0.25 x the learning rate",
    "warm20": "warm-up 20% of the steps instead of 5%",
    "cls002": "CLS token initialised N(0, 0.02^2) instead of zeros",
    "ln": "LayerNorm on the CLS output before the heads",
    "posnone": "no BERT position embeddings (the Squeezeformer's sinusoidal ones only)",
    "drop0": "no dropout in BERT (hidden and attention)",
    "pool": "heads read the CLS output + masked mean and max of BERT's step outputs",
    "ep18": "18 epochs instead of 9",
}
# exp018's quick settings as exp019 overrides: EXP019_AS_EXP018 minus what the quick variant sets
BASE_OVERRIDES = [
    *(o for o in EXP019_AS_EXP018 if not o.startswith(("data.max_len", "trainer.lr="))),
    "trainer.epochs=9",  # exp018's quick schedule (exp019's quick variant has 12)
]


def run_name(arm: str, seed: int) -> str:
    return f"abl-{arm}-s{seed}"


def command(arm: str, seed: int, folds: list[int]) -> str:
    overrides = [
        "variant=quick", "machine=cpu", "machine.num_threads=1", f"run_name={run_name(arm, seed)}",
        f"trainer.seed={seed}", f"data.folds=[{','.join(map(str, folds))}]", *BASE_OVERRIDES, *ARMS[arm],
    ]  # fmt: skip
    return "python codes/exp/exp019/train.py " + " ".join(overrides)


def scores(run_dir: Path, folds: list[int]) -> tuple[float, float] | None:
    """(CV, IMU-only CV) of ``folds``' pooled out-of-fold predictions, or None when missing."""
    path = run_dir / "oof.parquet"
    if not path.is_file():
        return None
    oof = pl.read_parquet(path).filter(pl.col("fold").is_in(folds))
    if sorted(set(oof["fold"].to_list())) != sorted(folds):
        return None
    true = oof["gesture"].to_numpy()
    return (
        competition_score(true, oof["predicted_gesture"].to_numpy()),
        competition_score(true, oof["predicted_gesture_imu_only"].to_numpy()),
    )


def table(outputs: Path, folds: list[int], extra_runs: dict[str, list[Path]]) -> str:
    lines = [
        f"| arm | change | CV, folds {folds} (seeds {', '.join(map(str, SEEDS))}) | mean | IMU-only | mean |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for arm in ARMS:
        runs = extra_runs.get(arm, []) + [outputs / "exp019" / run_name(arm, s) for s in SEEDS]
        found = [s for s in (scores(r, folds) for r in runs) if s is not None][: len(SEEDS)]
        if not found:
            lines.append(f"| {arm} | {DESCRIPTIONS[arm]} | not run | | | |")
            continue
        cv, imu = np.array([f[0] for f in found]), np.array([f[1] for f in found])
        lines.append(
            f"| {arm} | {DESCRIPTIONS[arm]} | {', '.join(f'{v:.4f}' for v in cv)} | {cv.mean():.4f} "
            f"| {', '.join(f'{v:.4f}' for v in imu)} | {imu.mean():.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--outputs", type=Path, default=REPO_ROOT / "outputs")
    parser.add_argument("--commands", action="store_true", help="print the train.py commands")
    parser.add_argument(
        "--base-run", type=Path, action="append", default=[],
        help="a whole exp018 quick run folder to score as a 'base' seed (e.g. outputs/exp018/<run>)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.commands:
        for arm in ARMS:
            for seed in SEEDS:
                print(command(arm, seed, args.folds))
        return
    print(table(args.outputs, args.folds, {"base": args.base_run}))


if __name__ == "__main__":
    main()
