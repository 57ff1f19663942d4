"""Serving and packaging never go on silently with a bad run folder, output path or setting.

- a fold the run trained whose folder is gone is an error unless the folds are named;
- a ``config.yaml`` edited after training is refused (naming the keys), and a checkpoint whose
  tensors do not fit the model built from it names the tensors;
- batch mode and the Kaggle script never write their output over an input file;
- the Kaggle packaging stages exactly the run (no link out of it) and the tracked code, never
  into ``codes/`` or a run folder;
- every ``CMI_*`` switch takes the usual yes/no spellings and refuses anything else.

The run folders are exp013's tiny random-weight ones of ``tests/test_run_folder_safety.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from codes.common.data_files import DataFileError
from codes.inference.experiment import batch_main
from codes.inference.kaggle_package import StagingError, stage_code_dataset
from codes.inference.run_folder import RunFolderError
from tests import test_run_folder_safety as safety
from tests.test_run_folder_safety import (
    EXP,
    REPO_ROOT,
    inference_module,
    package,
    run_submission,
    submission_environment,
)

pristine_run = safety.pristine_run  # fixtures: a tiny 2-fold exp013 run folder with random weights
run_dir = safety.run_dir  # a copy of it that a test may damage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared CPU


def load(run_dir: Path, **options):
    return inference_module().load_predictor(run_dir, device="cpu", subject_aware=False, **options)


def edit_config(run_dir: Path, section: str, key: str, value) -> None:
    path = run_dir / "config.yaml"
    values = yaml.safe_load(path.read_text())
    values[section][key] = value
    path.write_text(yaml.safe_dump(values))


def write_record(run_dir: Path) -> None:
    """``run_record.json`` as training writes it at the start: the config as in config.yaml."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    record = {"version": 1, "config": config, "data": {}}
    (run_dir / "run_record.json").write_text(json.dumps(record))


# ---------------------------------------------------------------- 1. a fold folder gone
@pytest.mark.parametrize("told_by", ["config", "metrics.json"])
def test_a_missing_fold_folder_is_an_error_unless_the_folds_are_named(run_dir, told_by):
    missing = "fold1"
    if told_by == "metrics.json":  # a finished 3-fold run (folds.csv) whose config says 2
        (run_dir / "metrics.json").write_text(json.dumps({"folds": {"0": {}, "1": {}, "2": {}}}))
        missing = "fold2"
    else:
        shutil.rmtree(run_dir / "fold1")
    with pytest.raises(RunFolderError) as raised:
        load(run_dir)
    message = str(raised.value)
    assert str(run_dir) in message and f"no fold folder {missing}" in message
    assert told_by in message and "copy it again from the original run folder" in message
    complete = [0] if told_by == "config" else [0, 1]
    assert f"pass folds={complete}" in message
    assert load(run_dir, folds=complete).folds == complete  # named folds: served


def test_a_missing_seed_folder_is_an_error_unless_the_folds_are_named(run_dir, caplog):
    """trainer.seeds=[0, 5]: every fold holds fold<k>/best.pt and fold<k>/seed5/best.pt."""
    edit_config(run_dir, "trainer", "seeds", [0, 5])
    (run_dir / "fold0" / "seed5").mkdir()
    shutil.copy(run_dir / "fold0" / "best.pt", run_dir / "fold0" / "seed5" / "best.pt")
    with pytest.raises(RunFolderError, match=r"lacks fold1/seed5/best\.pt.*copy it again"):
        load(run_dir)
    with caplog.at_level(logging.WARNING):
        assert len(load(run_dir, folds=[0, 1]).members) == 3  # named: fold 1 serves its one seed
    assert "fold1/seed5/best.pt" in caplog.text
    (run_dir / "fold1" / "seed5").mkdir()
    shutil.copy(run_dir / "fold1" / "best.pt", run_dir / "fold1" / "seed5" / "best.pt")
    assert len(load(run_dir).members) == 4


def test_a_staged_subset_of_folds_serves_as_staged_and_packaging_applies_the_same_rule(run_dir, tmp_path):
    (run_dir / "metrics.json").write_text(json.dumps({"folds": {"0": {}, "1": {}}}))
    _, run = package(run_dir, tmp_path / "out", "--folds", "0")
    assert json.loads((run / "ensemble.json").read_text()) == {"folds": [0]}
    assert load(run).folds == [0]  # the staged run says it serves fold 0
    shutil.rmtree(run_dir / "fold1")
    with pytest.raises(SystemExit, match=r"no fold folder fold1 .*metrics\.json"):
        package(run_dir, tmp_path / "out")


# ---------------------------------------------------------------- 2. config.yaml vs the checkpoints
@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("data", "max_len", 128), ("model", "d_model", 32), ("data", "tof_mode", "none")],
)
def test_a_config_yaml_edited_after_training_is_refused_naming_the_keys(
    run_dir, tmp_path, section, key, value
):
    write_record(run_dir)
    before = yaml.safe_load((run_dir / "config.yaml").read_text())[section][key]
    edit_config(run_dir, section, key, value)
    with pytest.raises(RunFolderError) as raised:
        load(run_dir)
    message = str(raised.value)
    assert f"{section}.{key}: {before!r} at training, {value!r} in config.yaml" in message
    assert str(run_dir / "config.yaml") in message and "run_record.json" in message
    with pytest.raises(SystemExit, match=rf"{section}\.{key}"):  # never staged either
        package(run_dir, tmp_path / "out")
    # paths, machine and trainer settings, and speed settings, may differ
    edit_config(run_dir, section, key, before)
    edit_config(run_dir, "paths", "data_dir", "/elsewhere")
    edit_config(run_dir, "machine", "num_threads", 3)
    edit_config(run_dir, "model", "pack_padded_steps", False)
    assert load(run_dir).folds == [0, 1]


def test_a_run_folder_without_a_record_is_served_with_an_info_line(run_dir, caplog):
    with caplog.at_level(logging.INFO, logger="codes.inference.run_folder"):
        assert load(run_dir).folds == [0, 1]
    assert any(
        "has no run_record.json" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records
    )


def test_a_damaged_run_record_is_an_error_naming_it(run_dir):
    (run_dir / "run_record.json").write_text('{"version": 1, "con')
    with pytest.raises(RunFolderError, match="is damaged") as raised:
        load(run_dir)
    assert str(run_dir / "run_record.json") in str(raised.value)


def test_a_checkpoint_that_does_not_fit_the_config_names_the_tensors_not_a_torch_dump(run_dir):
    edit_config(run_dir, "model", "d_model", 32)  # no run_record.json: only the tensors can tell
    with pytest.raises(RunFolderError) as raised:
        load(run_dir)
    message = str(raised.value)
    assert str(run_dir / "fold0" / "best.pt") in message and "in the checkpoint" in message
    assert "(16,) in the checkpoint, (32,) in the model" in message
    assert "restore it from the original run folder" in message
    assert "size mismatch for" not in message and "Error(s) in loading" not in message
    assert raised.value.__cause__ is None


# ---------------------------------------------------------------- 3. outputs never replace inputs
@pytest.fixture
def served_data_dir(tmp_path) -> Path:
    environment = submission_environment(Path("unused"), tmp_path)  # writes competition/test.csv
    return Path(environment["CMI_COMPETITION_DIR"])


def batch(run_dir: Path, served_data_dir: Path, output: Path | str) -> dict | None:
    argv = [
        f"run_dir={run_dir}",
        f"data={served_data_dir}",
        f"output={output}",
        "device=cpu",
        "subject_aware=false",
    ]
    return batch_main(inference_module().load_predictor, EXP, argv)


@pytest.mark.parametrize(
    "target",
    ["test.csv", "test_demographics.csv", "another spelling", "a hard link", "config.yaml", "fold0/best.pt"],
)
def test_batch_mode_never_writes_its_output_over_an_input(run_dir, served_data_dir, tmp_path, target):
    inputs = {
        "test.csv": served_data_dir / "test.csv",
        "test_demographics.csv": served_data_dir / "test_demographics.csv",
        "another spelling": served_data_dir / ".." / served_data_dir.name / "test.csv",
        "a hard link": tmp_path / "linked.csv",
        "config.yaml": run_dir / "config.yaml",
        "fold0/best.pt": run_dir / "fold0" / "best.pt",
    }
    os.link(served_data_dir / "test.csv", tmp_path / "linked.csv")
    output = inputs[target]
    before = output.read_bytes()
    with pytest.raises(
        DataFileError, match="an input of this prediction; writing it would replace"
    ) as raised:
        batch(run_dir, served_data_dir, output)
    assert str(output) in str(raised.value) and "Choose another output path" in str(raised.value)
    assert output.read_bytes() == before


def test_batch_mode_refuses_a_folder_as_output_and_overwrites_its_own_submission(
    run_dir, served_data_dir, tmp_path
):
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(
        DataFileError, match=r"is an existing folder; name the file to write, e\.g\. .*submission"
    ):
        batch(run_dir, served_data_dir, folder)
    batch(run_dir, served_data_dir, run_dir / "submission.csv")  # the default output, in the run folder
    batch(run_dir, served_data_dir, run_dir / "submission.csv")  # written again: not an input
    assert pl.read_csv(run_dir / "submission.csv").columns == ["sequence_id", "gesture"]


def test_the_kaggle_script_never_writes_its_output_over_test_csv(pristine_run, tmp_path):
    environment = submission_environment(pristine_run, tmp_path)
    test_csv = Path(environment["CMI_COMPETITION_DIR"]) / "test.csv"
    before = test_csv.read_bytes()
    result = run_submission({**environment, "CMI_OUTPUT": str(test_csv)}, tmp_path)
    assert result.returncode != 0 and "an input of this prediction" in result.stderr
    assert str(test_csv) in result.stderr and test_csv.read_bytes() == before


# ---------------------------------------------------------------- 4. packaging stages the run and the tracked code
def test_packaging_refuses_a_link_out_of_the_run_folder(run_dir, tmp_path):
    outside = tmp_path / "elsewhere" / "best.pt"
    outside.parent.mkdir()
    shutil.move(run_dir / "fold1" / "best.pt", outside)
    (run_dir / "fold1" / "best.pt").symlink_to(outside)
    with pytest.raises(
        SystemExit, match=r"refusing to stage .*fold1/best\.pt: a link leads it out of the run"
    ):
        package(run_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "run").exists()
    # a link that stays inside the run folder is followed
    (run_dir / "fold1" / "best.pt").unlink()
    shutil.move(outside, run_dir / "best-fold1.pt")
    (run_dir / "fold1" / "best.pt").symlink_to(run_dir / "best-fold1.pt")
    _, run = package(run_dir, tmp_path / "out")
    assert (run / "fold1" / "best.pt").is_file() and not (run / "fold1" / "best.pt").is_symlink()


def code_tree(root: Path) -> Path:
    """A minimal repository layout: codes/, configs/, kaggle/submission.py, pyproject.toml."""
    for name, text in {
        "codes/__init__.py": "",
        "codes/common/tool.py": "X = 1\n",
        "configs/experiment.yaml": "a: 1\n",
        "kaggle/submission.py": "",
        "pyproject.toml": "",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_the_code_dataset_holds_the_tracked_files_only(tmp_path, caplog):
    root = code_tree(tmp_path / "repo")
    git(root, "init", "-q")
    git(root, "add", ".")
    (root / "codes" / "notes.txt").write_text("my private notes")
    (root / "codes" / "draft.py").write_text("Y = 2\n")
    (root / "configs" / "scratch.yaml").write_text("b: 2\n")
    with caplog.at_level(logging.WARNING, logger="codes.inference.kaggle_package"):
        code = stage_code_dataset(tmp_path / "out" / "code", "someone", repo_root=root)
    staged = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    assert not {"codes/notes.txt", "codes/draft.py", "configs/scratch.yaml"} & set(staged)
    assert {"codes/__init__.py", "codes/common/tool.py", "configs/experiment.yaml"} <= set(staged)
    warned = " ".join(r.getMessage() for r in caplog.records)  # untracked code it may need: named
    assert "codes/draft.py" in warned and "configs/scratch.yaml" in warned and "git add" in warned


def test_without_git_the_code_dataset_is_refused_unless_asked(tmp_path):
    root = code_tree(tmp_path / "not-a-clone")
    (root / "codes" / "notes.txt").write_text("my private notes")
    with pytest.raises(StagingError, match=r"is not a git checkout .*pass --no-git"):
        stage_code_dataset(tmp_path / "out" / "code", "someone", repo_root=root)
    assert not (tmp_path / "out").exists()
    code = stage_code_dataset(tmp_path / "out" / "code", "someone", repo_root=root, use_git=False)
    assert (code / "codes" / "common" / "tool.py").is_file()


def test_packaging_refuses_an_output_inside_the_code_or_a_run_folder(run_dir, pristine_run, tmp_path):
    root = code_tree(tmp_path / "repo")
    git(root, "init", "-q")
    git(root, "add", ".")
    with pytest.raises(StagingError, match=r"lies inside .*codes, which is staged itself"):
        stage_code_dataset(root / "codes" / "kaggle" / "code", "someone", repo_root=root)
    assert not (root / "codes" / "kaggle").exists()
    with pytest.raises(SystemExit, match=rf"lies inside the run folder {run_dir}"):
        package(run_dir, run_dir / "kaggle")
    assert not (run_dir / "kaggle").exists()
    other = tmp_path / "outputs" / EXP / "other"  # another run folder of training
    shutil.copytree(pristine_run, other)
    with pytest.raises(SystemExit, match=rf"lies inside the run folder {other}"):
        package(run_dir, other / "staged")
    assert not (other / "staged").exists()


# ---------------------------------------------------------------- 5. environment switches
def test_the_kaggle_script_accepts_the_usual_yes_no_spellings(pristine_run, tmp_path):
    settings = {
        "CMI_QUANTIZE": " TRUE ",
        "CMI_FOLD_THREADS": "2",
        "CMI_NUM_THREADS": "1",
        "CMI_SUBJECT_AWARE": "Off",
    }
    result = run_submission(submission_environment(pristine_run, tmp_path, **settings), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 Linear layers" in result.stderr and "(1 torch threads, 2 fold threads)" in result.stdout
    # subject-aware answers asked for with "yes": on, so the run's missing protocol.json is an error
    (tmp_path / "b").mkdir()
    result = run_submission(
        submission_environment(pristine_run, tmp_path / "b", CMI_SUBJECT_AWARE="yes"), tmp_path
    )
    assert result.returncode != 0 and "subject_aware=True but" in result.stderr


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"CMI_FOLD_THREADS": "two"}, "CMI_FOLD_THREADS must be a positive whole number"),
        ({"CMI_FOLD_THREADS": "0"}, "CMI_FOLD_THREADS must be a positive whole number"),
        (
            {"CMI_QUANTIZE": "maybe"},
            "CMI_QUANTIZE='maybe' is not a yes/no value: use one of 1, true, yes, on",
        ),
        ({"CMI_SUBJECT_AWARE": "2"}, "CMI_SUBJECT_AWARE='2' is not a yes/no value"),
    ],
)
def test_the_kaggle_script_refuses_other_values_naming_the_variable(
    pristine_run, tmp_path, settings, expected
):
    result = run_submission(submission_environment(pristine_run, tmp_path, **settings), tmp_path)
    assert result.returncode != 0 and expected in result.stderr
    assert "loaded folds" not in result.stdout  # refused before the run loads


@pytest.mark.parametrize(("value", "applied"), [("off", False), (" No ", False), ("maybe", None)])
def test_the_allocator_switch_reads_the_same_spellings(value, applied):
    code = "from codes.models.cpu_fast_paths.allocator import keep_freed_cpu_memory; print(keep_freed_cpu_memory())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "CMI_KEEP_FREED_MEMORY": value},
    )  # fmt: skip
    if applied is None:
        assert (
            result.returncode != 0 and "CMI_KEEP_FREED_MEMORY='maybe' is not a yes/no value" in result.stderr
        )
    else:
        assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]


# ---- sweep findings
def served_frames(served_data_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """test.csv's two sequences (SEQ_1, SEQ_2) and the demographics."""
    test = pl.read_csv(served_data_dir / "test.csv")
    demographics = pl.read_csv(served_data_dir / "test_demographics.csv")
    return (
        test.filter(pl.col("sequence_id") == "SEQ_1"),
        test.filter(pl.col("sequence_id") == "SEQ_2"),
        demographics,
    )


def test_predict_given_two_sequences_answers_the_first_one_and_names_both(run_dir, served_data_dir, caplog):
    first, second, demographics = served_frames(served_data_dir)
    alone = load(run_dir).predict_probabilities(first, demographics)
    with caplog.at_level(logging.WARNING):
        mixed = load(run_dir).predict_probabilities(pl.concat([first, second]), demographics)
    [warning] = [r.getMessage() for r in caplog.records if "sequence_ids" in r.getMessage()]
    assert "2 sequence_ids (SEQ_1, SEQ_2)" in warning and "answering SEQ_1" in warning
    assert "sequence_counter order" not in caplog.text  # the rows of SEQ_2 are not sorted in
    assert abs(mixed - alone).max() < 1e-5
    with pytest.raises(DataFileError, match=r"2 sequence_ids \(SEQ_1, SEQ_2\).*one sequence_id per call"):
        load(run_dir, strict=True).predict_probabilities(pl.concat([first, second]), demographics)


def write_served_test(served_data_dir: Path, frame: pl.DataFrame) -> None:
    (served_data_dir / "test.csv").unlink()
    frame.write_csv(served_data_dir / "test.csv", null_value="")


@pytest.mark.parametrize("empty", ["", "  "])
def test_batch_mode_refuses_rows_without_a_sequence_id_naming_their_lines(
    run_dir, served_data_dir, tmp_path, empty
):
    first, second, _ = served_frames(served_data_dir)
    second = second.with_columns(pl.when(pl.col("sequence_counter") < 3).then(pl.lit(empty)).otherwise(
        pl.col("sequence_id")).alias("sequence_id"))  # fmt: skip
    write_served_test(served_data_dir, pl.concat([first, second]))
    lines = [first.height + 2, first.height + 3, first.height + 4]  # rows 40-42 (header: line 1)
    with pytest.raises(DataFileError) as raised:
        batch(run_dir, served_data_dir, tmp_path / "submission.csv")
    message = str(raised.value)
    assert str(served_data_dir / "test.csv") in message
    assert f"3 row(s) have no sequence_id, on lines {lines[0]}, {lines[1]} and {lines[2]}" in message
    assert "cannot be submitted" in message and "Fill in the sequence_id" in message
    assert not (tmp_path / "submission.csv").exists()


def test_batch_mode_names_a_sequence_id_that_two_recordings_share(run_dir, served_data_dir, tmp_path, caplog):
    first, second, _ = served_frames(served_data_dir)
    write_served_test(served_data_dir, pl.concat([first, second.with_columns(sequence_id=pl.lit("SEQ_1"))]))
    from codes.inference.batch import run_batch

    with caplog.at_level(logging.WARNING):
        run_batch(load(run_dir), served_data_dir, tmp_path / "submission.csv")
    [warning] = [r.getMessage() for r in caplog.records if "repeat sequence_counter" in r.getMessage()]
    assert "SEQ_1 (counters 0, 1, 2, 3, 4, 5, 6, 7, ...; 40 in all)" in warning  # SEQ_1 has 40 rows
    assert "answered as one sequence" in warning
    assert pl.read_csv(tmp_path / "submission.csv")["sequence_id"].to_list() == ["SEQ_1"]


def test_predict_names_a_sequence_whose_counters_repeat(run_dir, served_data_dir, caplog):
    """One predict() call with two recordings under one id: named, as batch mode names it."""
    first, second, _ = served_frames(served_data_dir)
    merged = pl.concat([first, second.with_columns(sequence_id=pl.lit(first["sequence_id"][0]))])
    predictor = load(run_dir)
    with caplog.at_level(logging.WARNING):
        predictor.predict(merged, None)
    [warning] = [r.getMessage() for r in caplog.records if "repeat sequence_counter" in r.getMessage()]
    assert f"{first['sequence_id'][0]} (counters 0, 1, 2" in warning and "own sequence_id" in warning


def test_batch_mode_refuses_a_batch_size_below_one_before_loading(run_dir, served_data_dir, tmp_path):
    from codes.inference.batch import run_batch

    argv = [f"run_dir={run_dir}", f"data={served_data_dir}", f"output={tmp_path / 's.csv'}", "batch_size=0"]
    with pytest.raises(ValueError, match=r"batch_size=0: .* whole number >= 1"):
        batch_main(lambda *a, **k: pytest.fail("the folds were loaded"), EXP, argv)
    with pytest.raises(ValueError, match=r"batch_size=-3"):
        run_batch(load(run_dir), served_data_dir, tmp_path / "s.csv", batch_size=-3)
    assert not (tmp_path / "s.csv").exists()


def test_batch_mode_help_lists_the_settings_and_an_unknown_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        batch_main(inference_module().load_predictor, EXP, ["--help"])
    assert raised.value.code == 0
    usage = capsys.readouterr().out
    assert f"codes/exp/{EXP}/inference.py run_dir=" in usage and "example:" in usage
    assert "batch_size=64" in usage and "folds=null" in usage and "quantize=false" in usage
    errors = {}
    for argv, named in ((["dat=synthetic"], "unknown setting 'dat'"), (["batch_size=many"], "batch_size")):
        with pytest.raises(SystemExit) as raised:
            batch_main(inference_module().load_predictor, EXP, argv)
        assert raised.value.code == 2
        errors[named] = capsys.readouterr().err.strip()
        assert "\n" not in errors[named] and named in errors[named] and "Traceback" not in errors[named]
    assert "the settings are run_dir, data, output, device, batch_size" in errors["unknown setting 'dat'"]


def test_the_batch_module_help_points_to_the_experiments_inference_script():
    result = subprocess.run(
        [sys.executable, "-m", "codes.inference.batch", "--help"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "codes/exp/<exp>/inference.py" in result.stdout and "batch_size=64" in result.stdout


def test_serving_folds_naming_a_fold_twice_is_refused(run_dir):
    with pytest.raises(ValueError, match=r"folds=\[0, 0\] names fold 0 more than once.*name each fold once"):
        load(run_dir, folds=[0, 0])
    assert load(run_dir, folds=[1, 0]).folds == [1, 0]
