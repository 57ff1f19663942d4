"""The table of runs: values read from hand-made run folders, damaged files, sorting, the CLI."""

from __future__ import annotations

import io
import json
import os
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

from codes.common import run_table
from codes.common.run_table import collect_runs, main, sort_runs

T0 = 1_780_000_000.0  # every file's modification time, unless a run says otherwise
NOW = T0 + 7200  # two hours later: a run without metrics.json written at T0 is unfinished
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cv_metrics(score: float, imu: float, folds: list[int]) -> dict:
    per_fold = {"score": score, "binary_f1": 1.0, "macro_f1": 0.5, "score_imu_only": imu}
    overall = {**per_fold, "n_sequences": 100, "wall_seconds": 12.0}
    return {"overall": overall, "folds": {str(k): per_fold for k in folds}, "history": {}}


def make_run(
    outputs: Path,
    exp: str,
    run: str,
    *,
    started: float,
    config: dict | str | None = None,
    metrics: dict | str | None = None,
    overrides: str = "",
    commit: str = COMMIT,
    best_folds: tuple[int, ...] = (),
    last_write: float | None = None,
) -> Path:
    """A run folder as prepare_run_dir and the training leave it; strings are written as they are."""
    run_dir = outputs / exp / run
    run_dir.mkdir(parents=True)
    if config is None:
        config = {"exp_name": exp, "run_name": "", "data": {"n_folds": 5, "folds": None}}
    files = {
        "config.yaml": config if isinstance(config, str) else yaml.safe_dump(config),
        "overrides.txt": overrides,
        "git_commit.txt": commit + "\n",
        "packages.txt": "numpy==2.0.0\n",
        "train.log": "started\n",
    }
    if metrics is not None:
        files["metrics.json"] = metrics if isinstance(metrics, str) else json.dumps(metrics)
    for fold in best_folds:
        files[f"fold{fold}/best.pt"] = "weights"
    for name, text in files.items():
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_text(text)
        os.utime(run_dir / name, (started, started))
    if last_write is not None:
        os.utime(run_dir / "train.log", (last_write, last_write))
    return run_dir


@pytest.fixture
def outputs(tmp_path) -> Path:
    """Seven runs of three experiments, and folders that are not runs."""
    out = tmp_path / "outputs"
    make_run(
        out, "exp013", "a", started=T0, metrics=cv_metrics(0.8, 0.7, [0, 1]), best_folds=(0, 1),
        overrides="trainer.epochs=3\nrun_name=a\ndata.folds=[0,1]\n",
    )  # fmt: skip
    make_run(
        out, "exp018", "b", started=T0 + 60, metrics=cv_metrics(0.9, 0.6, [0, 1, 2, 3, 4]),
        overrides="# composed in code\n", commit="unknown",
    )  # fmt: skip
    # interrupted two hours ago: one fold with weights, the second begun
    make_run(out, "exp013", "c", started=T0 + 120, best_folds=(0,), overrides="model.num_blocks=2\n")
    (out / "exp013" / "c" / "fold1").mkdir()
    # no metrics yet and a log line a minute ago
    make_run(out, "exp013", "d", started=T0 + 180, commit=COMMIT + "-dirty", last_write=NOW - 60)
    make_run(out, "exp018", "e", started=T0 + 240, metrics='{"overall": {"score": 0.')  # cut short
    make_run(
        out, "exp018", "f", started=T0 + 300, config="data: [unclosed\n", metrics=cv_metrics(0.5, 0.4, [0])
    )
    make_run(
        out, "noisebert", "g", started=T0 + 360, config={"exp_name": "noisebert", "data": {"valid_fraction": 0.1}},
        metrics={"best": {"valid_masked_mse": 0.25, "valid_loss": 0.3}, "best_epoch": 3, "wall_seconds": 5.0},
    )  # fmt: skip
    (out / "exp013" / "empty").mkdir()  # not a run: none of its files
    (out / "kaggle" / "exp018-b" / "run").mkdir(parents=True)  # a Kaggle package, not a run
    (out / "kaggle" / "exp018-b" / "run" / "config.yaml").write_text("exp_name: exp018\n")
    (out / "README.md").write_text("# outputs/\n")
    return out


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(T0 + offset)


EXPECTED = {
    # run: (experiment, cv, cv_imu_only, valid_mse, folds, date, commit, status, overrides)
    "a": (
        "exp013",
        0.8,
        0.7,
        None,
        "2/5",
        at(0),
        "0123456789",
        "finished",
        "trainer.epochs=3 data.folds=[0,1]",
    ),
    "b": ("exp018", 0.9, 0.6, None, "5/5", at(60), "unknown", "finished", "# composed in code"),
    "c": ("exp013", None, None, None, "1/5", at(120), "0123456789", "unfinished", "model.num_blocks=2"),
    "d": ("exp013", None, None, None, "0/5", at(180), "0123456789-dirty", "running?", ""),
    "e": ("exp018", None, None, None, "0/5", at(240), "0123456789", "damaged metrics.json", ""),
    "f": ("exp018", 0.5, 0.4, None, None, at(300), "0123456789", "damaged config.yaml", ""),
    "g": ("noisebert", None, None, 0.25, None, at(360), "0123456789", "finished", ""),
}


def test_every_run_folder_is_a_row_with_the_values_of_its_files(outputs):
    table = collect_runs(outputs, now=NOW)
    assert table.columns == list(run_table.SCHEMA)
    assert table["run"].to_list() == ["a", "c", "d", "b", "e", "f", "g"]  # experiment, run order
    for row in table.iter_rows(named=True):
        experiment, cv, imu, mse, folds, date, commit, status, overrides = EXPECTED[row["run"]]
        assert row["experiment"] == experiment
        assert row["cv"] == cv and row["cv_imu_only"] == imu and row["valid_mse"] == mse
        assert row["folds"] == folds and row["date"] == date and row["commit"] == commit
        assert row["status"].startswith(status), row
        assert row["overrides"] == overrides


def test_damaged_files_are_named_with_the_error(outputs):
    status = dict(collect_runs(outputs, now=NOW).select("run", "status").iter_rows())
    assert status["e"].startswith("damaged metrics.json (JSONDecodeError: ")
    assert status["f"].startswith("damaged config.yaml (") and "Error" in status["f"]
    (outputs / "exp013" / "a" / "metrics.json").write_text('{"overall": {"macro_f1": 0.5}}')
    (outputs / "exp013" / "c" / "config.yaml").unlink()
    status = dict(collect_runs(outputs, now=NOW).select("run", "status").iter_rows())
    assert status["a"] == "metrics.json lacks overall.score"
    assert status["c"] == "no config.yaml"


def test_a_run_is_running_only_while_it_writes(outputs):
    status = dict(
        collect_runs(outputs, now=NOW + run_table.RUNNING_WITHIN_S).select("run", "status").iter_rows()
    )
    assert status["d"] == "unfinished"
    os.utime(outputs / "exp013" / "c" / "fold0" / "best.pt", (NOW, NOW))  # a fold folder's file counts
    status = dict(collect_runs(outputs, now=NOW).select("run", "status").iter_rows())
    assert status["c"] == "running?"


def test_the_experiment_filter(outputs):
    assert collect_runs(outputs, ["exp018", "noisebert"], now=NOW)["run"].to_list() == ["b", "e", "f", "g"]
    assert collect_runs(outputs, ["exp099"], now=NOW).is_empty()


def test_sorting_by_cv_then_pretraining_mse_then_newest(outputs):
    table = collect_runs(outputs, now=NOW)
    assert sort_runs(table, "cv")["run"].to_list() == ["b", "a", "f", "g", "e", "d", "c"]
    assert sort_runs(table, "date")["run"].to_list() == ["g", "f", "e", "d", "c", "b", "a"]
    with pytest.raises(ValueError, match="'cv' or 'date'"):
        sort_runs(table, "score")


def test_cli_prints_the_rows_as_a_table(outputs, capsys):
    assert main(["--outputs", str(outputs), "--exp", "exp013", "noisebert"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    assert header == [
        "experiment",
        "run",
        "CV",
        "IMU-only CV",
        "valid MSE",
        "folds",
        "date",
        "commit",
        "status",
        "overrides",
    ]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]
    assert [row[1] for row in rows] == ["a", "g", "d", "c"]
    assert rows[0] == [
        "exp013", "a", "0.8000", "0.7000", "", "2/5", at(0).strftime("%Y-%m-%d %H:%M"), "0123456789", "finished",
        "trainer.epochs=3 data.folds=[0,1]",
    ]  # fmt: skip
    assert rows[1][4] == "0.2500" and rows[1][2] == ""


def test_cli_csv_keeps_every_column_and_the_whole_overrides(outputs, capsys):
    long = " ".join(f"model.option{i}=value{i}" for i in range(20))
    make_run(outputs, "exp013", "long", started=T0, metrics=cv_metrics(0.1, 0.1, [0]), overrides=long)
    assert main(["--outputs", str(outputs), "--sort", "date", "--csv"]) == 0
    csv = pl.read_csv(io.StringIO(capsys.readouterr().out), schema_overrides={"folds": pl.String})
    assert csv.columns == list(run_table.SCHEMA)
    assert csv["run"].to_list()[:2] == ["g", "f"]
    assert csv.filter(pl.col("run") == "long")["overrides"].item() == long
    assert main(["--outputs", str(outputs), "--exp", "exp013"]) == 0
    assert long not in capsys.readouterr().out  # the text table shortens it
    assert len(long) > run_table.OVERRIDES_WIDTH


def test_cli_names_a_missing_folder_and_an_empty_listing(tmp_path, capsys):
    assert main(["--outputs", str(tmp_path / "nothing")]) == 1
    assert "nothing is not a folder" in capsys.readouterr().err
    assert main(["--outputs", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().err


def test_default_outputs_folder_is_the_repository_s():
    from codes.common.runs import REPO_ROOT

    assert run_table.REPO_ROOT == REPO_ROOT
