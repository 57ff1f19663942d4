"""The runs under ``outputs/`` side by side: ``python -m codes.common.run_table``.

    python -m codes.common.run_table                       # every run, best CV first
    python -m codes.common.run_table --exp exp013 exp018   # only these experiments
    python -m codes.common.run_table --sort date --csv     # newest first, as CSV

One row per run folder ``<outputs>/<exp>/<run>/`` (a folder holding at least one of the files
:func:`codes.common.runs.prepare_run_dir` writes, ``train.log`` or ``metrics.json``):

- ``cv``, ``cv_imu_only``: ``metrics.json``'s ``overall.score`` and ``overall.score_imu_only``;
- ``valid_mse``: NoiseBERT pretraining runs' ``best.valid_masked_mse`` (they have no CV);
- ``folds``: trained folds / ``data.n_folds`` of ``config.yaml`` (the folds in ``metrics.json``
  when finished, else the ``fold{k}/`` folders holding a ``best.pt``);
- ``date``: when the run started, local time: the modification time of ``overrides.txt``
  (written once at the start; a resumed run rewrites ``config.yaml`` but not this file), else
  of ``config.yaml``, else of the folder;
- ``commit``: ``git_commit.txt``, shortened to 10 characters (``-dirty`` kept);
- ``status``: ``finished`` (``metrics.json`` exists); without metrics, from the run folder's lock
  (``.lock``, held by the training process for the whole run): ``running`` (held) or ``stopped``
  (free: the process stopped, crashed or was killed; ``trainer.resume=true`` continues it); a
  folder without a ``.lock`` (older runs): ``running?`` (a file changed in the last
  :data:`RUNNING_WITHIN_S` seconds) or ``unfinished``. A file that cannot be read
  (``metrics.json``, ``config.yaml``) is named in it instead, and the row is still listed;
- ``overrides``: ``overrides.txt``'s lines joined by spaces, ``run_name=`` left out (it is the
  ``run`` column); the text table shortens them, the CSV keeps them whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import yaml

# codes.common.runs.REPO_ROOT (tests check they agree); not imported, so that listing runs does
# not import torch
REPO_ROOT = Path(__file__).resolve().parents[2]
# a run folder without metrics.json or .lock that had a file written this recently may be running
RUNNING_WITHIN_S = 30 * 60
LOCK_FILE = ".lock"  # codes.common.runs.LOCK_FILE (not imported, see REPO_ROOT)
OVERRIDES_WIDTH = 100  # characters of the overrides column in the text table
RUN_FILES = ("config.yaml", "overrides.txt", "git_commit.txt", "packages.txt", "train.log", "metrics.json")
SCHEMA = {
    "experiment": pl.String,
    "run": pl.String,
    "cv": pl.Float64,
    "cv_imu_only": pl.Float64,
    "valid_mse": pl.Float64,
    "folds": pl.String,
    "date": pl.Datetime("us"),
    "commit": pl.String,
    "status": pl.String,
    "overrides": pl.String,
}
HEADERS = {
    "experiment": "experiment",
    "run": "run",
    "cv": "CV",
    "cv_imu_only": "IMU-only CV",
    "valid_mse": "valid MSE",
    "folds": "folds",
    "date": "date",
    "commit": "commit",
    "status": "status",
    "overrides": "overrides",
}
DATE_FORMAT = "%Y-%m-%d %H:%M"


def _problem(name: str, error: Exception) -> str:
    """``damaged metrics.json (JSONDecodeError: Expecting value: line 1 column 1 (char 0))``."""
    detail = str(error).splitlines()[0] if str(error) else ""
    return f"damaged {name} ({type(error).__name__}{': ' + detail if detail else ''})"


def _read_config(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        problems.append("no config.yaml")
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        problems.append(_problem("config.yaml", error))
        return None
    if not isinstance(config, dict):
        problems.append("damaged config.yaml (not a mapping)")
        return None
    return config


def _read_metrics(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """The parsed ``metrics.json``; None when absent or damaged (then named in ``problems``)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problems.append(_problem("metrics.json", error))
        return None
    if not isinstance(metrics, dict):
        problems.append("damaged metrics.json (not an object)")
        return None
    return metrics


def _number(mapping: Any, *keys: str) -> float | None:
    """``mapping[k1][k2]...`` as a float, or None when a key is missing or the value is not a number."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    if isinstance(mapping, bool) or not isinstance(mapping, int | float):
        return None
    return float(mapping)


def _short_commit(run_dir: Path) -> str | None:
    try:
        lines = (run_dir / "git_commit.txt").read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines:
        return None
    commit = lines[0]
    dirty = commit.endswith("-dirty")
    commit = commit.removesuffix("-dirty")
    if all(c in "0123456789abcdef" for c in commit.lower()):
        commit = commit[:10]
    return commit + ("-dirty" if dirty else "")


def _overrides(run_dir: Path) -> str | None:
    try:
        lines = (run_dir / "overrides.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    kept = [line.strip() for line in lines if line.strip() and not line.strip().startswith("run_name=")]
    return " ".join(kept)


def _started(run_dir: Path) -> datetime:
    for name in ("overrides.txt", "config.yaml"):
        if (run_dir / name).is_file():
            return datetime.fromtimestamp((run_dir / name).stat().st_mtime)
    return datetime.fromtimestamp(run_dir.stat().st_mtime)


def _last_write(run_dir: Path) -> float:
    """The newest modification time of the folder's files and its sub-folders' files."""
    times = []
    for path in run_dir.iterdir():
        for child in path.iterdir() if path.is_dir() else [path]:
            try:
                if child.is_file():
                    times.append(child.stat().st_mtime)
            except OSError:  # a temporary file renamed away meanwhile
                continue
    return max(times, default=run_dir.stat().st_mtime)


def writer_alive(run_dir: Path) -> bool | None:
    """Whether a process holds the run folder's lock (``.lock``, taken by ``open_run_dir`` for the
    whole run): True (running), False (no writer: the run stopped, crashed or was killed), or None
    when the folder has no ``.lock`` (written before runs took it, or copied without it) or the
    lock cannot be tried (a read-only folder). The lock is taken for an instant and released; a run
    starting at that instant waits for it (``runs.LOCK_WAIT_S``) rather than being refused."""
    from filelock import FileLock, Timeout

    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def _trained_folds(run_dir: Path, metrics: dict[str, Any] | None) -> int:
    if metrics is not None and isinstance(metrics.get("folds"), dict):
        return len(metrics["folds"])
    return sum(1 for path in run_dir.glob("fold*/best.pt") if path.parent.name[4:].isdigit())


def read_run(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """One row of the table (the keys of :data:`SCHEMA`) for the run folder ``run_dir``."""
    now = time.time() if now is None else now
    problems: list[str] = []
    config = _read_config(run_dir, problems)
    metrics = _read_metrics(run_dir, problems)
    pretraining = metrics is not None and "best" in metrics and "overall" not in metrics
    row: dict[str, Any] = dict.fromkeys(SCHEMA)
    row |= {
        "experiment": run_dir.parent.name,
        "run": run_dir.name,
        "date": _started(run_dir),
        "commit": _short_commit(run_dir),
        "overrides": _overrides(run_dir),
    }
    if metrics is not None and pretraining:
        row["valid_mse"] = _number(metrics, "best", "valid_masked_mse")
        if row["valid_mse"] is None:
            problems.append("metrics.json lacks best.valid_masked_mse")
    elif metrics is not None:
        row["cv"] = _number(metrics, "overall", "score")
        row["cv_imu_only"] = _number(metrics, "overall", "score_imu_only")
        if row["cv"] is None:
            problems.append("metrics.json lacks overall.score")
    n_folds = _number(config, "data", "n_folds")
    if n_folds is not None:
        row["folds"] = f"{_trained_folds(run_dir, metrics)}/{int(n_folds)}"
    if problems:
        row["status"] = "; ".join(problems)
    elif metrics is not None:
        row["status"] = "finished"
    else:
        row["status"] = _unfinished_status(run_dir, now)
    return row


def _unfinished_status(run_dir: Path, now: float) -> str:
    """``running`` or ``stopped`` from the run folder's lock; for a folder without one, ``running?``
    (a file written in the last :data:`RUNNING_WITHIN_S` seconds) or ``unfinished``."""
    alive = writer_alive(run_dir)
    if alive is not None:
        return "running" if alive else "stopped"
    return "running?" if now - _last_write(run_dir) < RUNNING_WITHIN_S else "unfinished"


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any((path / n).is_file() for n in RUN_FILES)


def collect_runs(
    outputs_dir: Path, experiments: Iterable[str] | None = None, now: float | None = None
) -> pl.DataFrame:
    """Every run folder ``<outputs_dir>/<exp>/<run>/`` as a row (columns :data:`SCHEMA`).

    ``experiments`` keeps only those experiment folders; ``now`` (seconds since the epoch, default
    the current time) decides ``running?`` against ``unfinished``. Rows are in experiment, run
    order; :func:`sort_runs` orders them otherwise.
    """
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        raise FileNotFoundError(
            f"{outputs_dir} is not a folder; give the folder that holds <exp>/<run>/ with --outputs"
        )
    wanted = set(experiments) if experiments is not None else None
    rows = [
        read_run(run_dir, now)
        for exp_dir in sorted(outputs_dir.iterdir())
        if exp_dir.is_dir() and not exp_dir.name.startswith(".")
        if wanted is None or exp_dir.name in wanted
        for run_dir in sorted(exp_dir.iterdir())
        if _is_run_dir(run_dir)
    ]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def sort_runs(table: pl.DataFrame, by: str = "cv") -> pl.DataFrame:
    """``cv``: best CV first, then pretraining runs by lowest valid MSE, then the rest (each newest
    first on ties); ``date``: newest first."""
    if by == "cv":
        return table.sort(
            ["cv", "valid_mse", "date"], descending=[True, False, True], nulls_last=True, maintain_order=True
        )
    if by == "date":
        return table.sort(["date", "experiment", "run"], descending=[True, False, False], maintain_order=True)
    raise ValueError(f"sort by 'cv' or 'date', not {by!r}")


def _as_text(table: pl.DataFrame, overrides_width: int | None) -> pl.DataFrame:
    """Every column as text: 4 decimals, dates to the minute, ``|`` escaped, empty cells for missing values."""
    overrides = pl.col("overrides")
    if overrides_width is not None:
        overrides = (
            pl.when(overrides.str.len_chars() > overrides_width)
            .then(overrides.str.slice(0, overrides_width - 1) + "…")
            .otherwise(overrides)
        )
    numbers = (
        pl.Series(c, [None if v is None else f"{v:.4f}" for v in table[c]], dtype=pl.String)
        for c in ("cv", "cv_imu_only", "valid_mse")
    )
    return table.with_columns(
        *numbers,
        pl.col("date").dt.strftime(DATE_FORMAT),
        overrides.alias("overrides"),
    ).with_columns(pl.col(pl.String).str.replace_all("|", r"\|", literal=True).fill_null(""))


def format_table(table: pl.DataFrame, overrides_width: int | None = OVERRIDES_WIDTH) -> str:
    """A Markdown table of the runs (``valid MSE`` shown only when a pretraining run has one)."""
    text = _as_text(table, overrides_width)
    if table["valid_mse"].is_null().all():
        text = text.drop("valid_mse")
    text = text.rename({k: v for k, v in HEADERS.items() if k in text.columns})
    with pl.Config(
        tbl_formatting="ASCII_MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_cols=-1,
        fmt_str_lengths=10_000,
        tbl_width_chars=65_535,
    ):
        return str(text)


def format_csv(table: pl.DataFrame) -> str:
    """CSV with every column (full precision, whole overrides, dates to the minute)."""
    return table.with_columns(pl.col("date").dt.strftime(DATE_FORMAT)).write_csv()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codes.common.run_table", description="The runs under outputs/ side by side."
    )
    parser.add_argument(
        "--outputs",
        type=Path,
        default=REPO_ROOT / "outputs",
        help="folder of <exp>/<run>/ (default: outputs/)",
    )
    parser.add_argument(
        "--exp", nargs="+", action="extend", default=None, metavar="NAME", help="only these experiments"
    )
    parser.add_argument(
        "--sort", choices=("cv", "date"), default="cv", help="cv: best CV first (default); date: newest first"
    )
    parser.add_argument("--csv", action="store_true", help="print CSV (every column, overrides whole)")
    args = parser.parse_args(argv)
    try:
        table = sort_runs(collect_runs(args.outputs, args.exp), args.sort)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    if table.is_empty():
        which = f" of {', '.join(args.exp)}" if args.exp else ""
        print(f"no runs{which} under {args.outputs}", file=sys.stderr)
        return 0
    print(format_csv(table) if args.csv else format_table(table), end="" if args.csv else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
