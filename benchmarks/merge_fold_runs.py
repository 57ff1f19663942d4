"""One out-of-fold table from runs that trained different folds of the same experiment and data.

A fold's training depends on the run's settings and its own seed (``trainer.seed + fold``) only,
so a k-fold run can be split over processes: ``data.folds=[0,1,2]`` in one, ``data.folds=[3,4]``
in another. A run that was stopped after some folds keeps their best checkpoints; their
out-of-fold probabilities are predicted again from ``fold<k>/best.pt`` (the inference path,
which reproduces training's evaluation: ``tests/test_experiment_contract.py``).

    python benchmarks/merge_fold_runs.py --exp exp019 --data data/real_imu \
        --run outputs/exp019/<run-a>:0,1,2 --run outputs/exp019/<run-b>:3,4 --out outputs/exp019/<merged>

writes ``<out>/oof.parquet`` (the columns training writes) and ``<out>/metrics.json`` (the
overall and per-fold scores, ``wall_seconds`` the sum of the runs' training time), which
``benchmarks/real_imu.py --from-run <out>`` tabulates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from codes.common.folds import FOLD_FILE, read_fold_file  # noqa: E402
from codes.common.metric import binary_f1, competition_score, macro_f1  # noqa: E402
from codes.common.schema import GESTURES  # noqa: E402
from codes.common.sequences import load_sequence_table  # noqa: E402
from codes.inference.run_folder import load_run_config  # noqa: E402


def fold_oof(exp: str, run_dir: Path, fold: int, data_dir: Path) -> pl.DataFrame:
    """The fold's rows of the run's oof.parquet, or predicted from its best checkpoint."""
    path = run_dir / "oof.parquet"
    if path.is_file():
        oof = pl.read_parquet(path).filter(pl.col("fold") == fold)
        if oof.height:
            return oof
    inference = importlib.import_module(f"codes.exp.{exp}.inference")
    dataset = importlib.import_module(f"codes.exp.{exp}.dataset")
    cfg = load_run_config(run_dir)
    table = load_sequence_table(data_dir, "train", dataset.feature_settings(cfg.data))
    folds = read_fold_file(data_dir / FOLD_FILE, table.subjects)
    if folds is None:
        raise FileNotFoundError(f"{data_dir / FOLD_FILE}: the folds of the runs are needed")
    index = np.flatnonzero(folds == fold)
    valid = table.subset(index)
    predictor = inference.load_predictor(run_dir, folds=[fold], device="cpu", subject_aware=False)
    probabilities = predictor.table_probabilities(valid)
    imu = valid.subset(np.arange(valid.n_sequences))
    columns = valid.feature_groups.get("thm", []) + valid.feature_groups.get("tof", [])
    imu.features[:, columns] = 0.0
    imu.feature_present[:, columns] = False
    imu_probabilities = predictor.table_probabilities(imu)
    names = np.array(GESTURES)
    frame = pl.DataFrame({
        "sequence_id": valid.sequence_ids, "fold": np.full(len(index), fold), "gesture": names[valid.labels],
        "predicted_gesture": names[probabilities.argmax(1)],
        "predicted_gesture_imu_only": names[imu_probabilities.argmax(1)],
    })  # fmt: skip
    return pl.concat(
        [frame, pl.DataFrame(probabilities, schema=[f"prob_{g}" for g in GESTURES])], how="horizontal"
    )


def scores(oof: pl.DataFrame) -> dict[str, float]:
    true, pred = oof["gesture"].to_numpy(), oof["predicted_gesture"].to_numpy()
    return {
        "score": competition_score(true, pred), "binary_f1": binary_f1(true, pred), "macro_f1": macro_f1(true, pred),
        "score_imu_only": competition_score(true, oof["predicted_gesture_imu_only"].to_numpy()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data folder the runs trained on")
    parser.add_argument("--run", action="append", required=True, help="RUN_DIR:FOLD,FOLD,...")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    parts, wall = [], 0.0
    for spec in args.run:
        run, folds = spec.rsplit(":", 1)
        run_dir = Path(run)
        for fold in (int(k) for k in folds.split(",")):
            parts.append(fold_oof(args.exp, run_dir, fold, args.data))
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file():
            wall += json.loads(metrics_path.read_text())["overall"]["wall_seconds"]
    oof = pl.concat(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    oof.write_parquet(args.out / "oof.parquet")
    per_fold = {str(k): scores(oof.filter(pl.col("fold") == k)) for k in sorted(set(oof["fold"].to_list()))}
    metrics = {
        "overall": {**scores(oof), "n_sequences": oof.height, "wall_seconds": wall},
        "folds": per_fold,
        "merged_from": args.run,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics["overall"], indent=1))


if __name__ == "__main__":
    main()
