"""Runs and their files, round 2: nothing stale or foreign is used silently.

The feature cache follows the files' content (not their size and time); a resumed run refuses
data that changed since it started; ``exp_name`` stays one folder name; leftovers of interrupted
writes are cleaned up; fold choices that leave nothing to train or validate on are named; a
full disk names the file it was writing; a pickled checkpoint says so; the run table tells a
running run from a stopped one by the run folder's lock.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from codes.common import run_table
from codes.common.checkpoint import CheckpointError, load_checkpoint, save_atomically
from codes.common.data_files import TRAIN_FILE
from codes.common.distributed import DistributedContext
from codes.common.folds import assign_folds, data_folds
from codes.common.runs import ResumeMismatchError, open_run_dir, write_json_atomically
from codes.common.sequences import load_sequence_table
from tests.helpers import experiment_config, write_toy_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared CPU

EXP = "exp013"  # any experiment: the plumbing is shared
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run_training(data_dir: Path, output_dir: Path, run_name: str, *overrides: str) -> dict:
    """exp013's smoke preset on fold 0 for 2 epochs."""
    cfg = experiment_config(
        EXP, "variant=smoke", "machine=cpu", "data=competition", f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}", f"run_name={run_name}", "data.folds=[0]", "trainer.epochs=2",
        *overrides,
    )  # fmt: skip
    return importlib.import_module(f"codes.exp.{EXP}.train").run_training(cfg)


def edit_one_digit(path: Path) -> None:
    """Change one digit of the first data row's acc_x value in place: same size, other content."""
    text = path.read_bytes()
    header_end = text.index(b"\n")
    column = text[:header_end].decode().split(",").index("acc_x")
    row_end = text.index(b"\n", header_end + 1)
    fields = text[header_end + 1 : row_end].split(b",")
    start = header_end + 1 + sum(len(field) + 1 for field in fields[:column])
    digit = next(i for i in range(start, start + len(fields[column])) if chr(text[i]).isdigit())
    replacement = b"7" if text[digit : digit + 1] != b"7" else b"3"
    path.write_bytes(text[:digit] + replacement + text[digit + 1 :])


def log_lines(run_dir: Path) -> list[str]:
    """The run's log (``train.log``): what the user reads, whatever pytest captures."""
    return (run_dir / "train.log").read_text().splitlines()


# ---------------------------------------------------------------- 1. the cache follows the content
def test_an_edit_that_keeps_size_and_mtime_gives_new_features_not_the_cached_ones(tmp_path):
    data = write_toy_data(tmp_path / "data")
    first = load_sequence_table(data, "train")
    assert list((data / "cache").glob("train-*.npz"))  # cached
    csv = data / TRAIN_FILE
    before = csv.stat()
    edit_one_digit(csv)
    os.utime(csv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (csv.stat().st_size, csv.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    again = load_sequence_table(data, "train")
    fresh = load_sequence_table(data, "train", use_cache=False)
    assert not np.array_equal(again.features, first.features, equal_nan=True)
    assert np.array_equal(again.features, fresh.features, equal_nan=True)


# ---------------------------------------------------------------- 2. a resumed run and its data
def interrupted_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data folder, outputs folder, run folder) of a run stopped after its first epoch."""
    data = write_toy_data(tmp_path / "data")
    out = tmp_path / "outputs"
    with pytest.raises(importlib.import_module("codes.common.runs").TrainingInterrupted):
        run_training(data, out, "r", "trainer.interrupt_after_epochs=1")
    return data, out, out / EXP / "r"


def test_a_run_records_its_config_and_data_and_refuses_to_resume_on_changed_data(tmp_path):
    data, out, run_dir = interrupted_run(tmp_path)
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["version"] == 1
    assert record["config"] == OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert record["data"] == {
        name: hashlib.sha256((data / name).read_bytes()).hexdigest()
        for name in ("train.csv", "train_demographics.csv")
    }
    from codes.common.runs import read_run_record

    assert read_run_record(run_dir) == record and read_run_record(tmp_path) is None

    original = (data / TRAIN_FILE).read_bytes()
    edit_one_digit(data / TRAIN_FILE)
    with pytest.raises(ResumeMismatchError, match=r"train\.csv: other content") as refused:
        run_training(data, out, "r", "trainer.resume=true")
    assert str(run_dir) in str(refused.value) and "start another run_name" in str(refused.value)
    (data / TRAIN_FILE).write_bytes(original)
    (data / "folds.csv").write_text("subject,fold\n")  # a file the run did not start with
    with pytest.raises(ResumeMismatchError, match=r"folds\.csv: new \(the run started without it\)"):
        run_training(data, out, "r", "trainer.resume=true")
    (data / "folds.csv").unlink()
    assert not (run_dir / "metrics.json").exists()  # nothing was trained on the other data

    # a run folder written before runs kept a record resumes, with a warning
    (run_dir / "run_record.json").unlink()
    metrics = run_training(data, out, "r", "trainer.resume=true")
    assert metrics["folds"]["0"]["epochs"] == 2
    [warning] = [line for line in log_lines(run_dir) if "WARNING" in line and "run_record.json" in line]
    assert "resuming without checking" in warning


def test_noisebert_pretraining_refuses_to_resume_on_changed_data(tmp_path):
    from codes.common.runs import TrainingInterrupted
    from codes.noisebert.pretrain import pretrain
    from tests.test_noisebert_model import pretrain_config

    data = write_toy_data(tmp_path / "data")
    with pytest.raises(TrainingInterrupted):
        pretrain(
            pretrain_config(
                data, tmp_path, "trainer.epochs=2", "run_name=p", "trainer.interrupt_after_epochs=1"
            )
        )
    edit_one_digit(data / TRAIN_FILE)
    with pytest.raises(ResumeMismatchError, match=r"train\.csv: other content"):
        pretrain(pretrain_config(data, tmp_path, "trainer.epochs=2", "run_name=p", "trainer.resume=true"))


# ---------------------------------------------------------------- 3. exp_name is one folder name
def plain_config(tmp_path: Path, exp_name: str):
    return OmegaConf.create(
        {
            "exp_name": exp_name,
            "run_name": "r1",
            "paths": {"output_dir": str(tmp_path / "outputs")},
            "machine": {"device": "cpu"},
            "trainer": {"resume": False},
        }
    )


@pytest.mark.parametrize("exp_name", ["../../x", "ABSOLUTE", "a/b", "..", ".hidden", ""])
def test_exp_name_must_be_one_plain_folder_name(tmp_path, exp_name):
    if exp_name == "ABSOLUTE":
        exp_name = str(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"exp_name=.* must be a single folder name"):
        with open_run_dir(plain_config(tmp_path, exp_name), CPU, []):
            pass
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written anywhere


# ---------------------------------------------------------------- 4. leftovers of interrupted writes
def test_a_resumed_run_removes_the_temporaries_of_interrupted_writes_and_nothing_else(tmp_path):
    data, out, run_dir = interrupted_run(tmp_path)
    leftovers = [run_dir / ".metrics.json.k2j4_9ab.tmp", run_dir / "fold0" / ".last.pt.x8d0qq1z.tmp"]
    kept = [run_dir / "notes.tmp", run_dir / ".keep.tmp", run_dir / "fold0" / "last.pt.x8d0qq1z.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"half a file")
    run_training(data, out, "r", "trainer.resume=true")
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in kept)
    [line] = [line for line in log_lines(run_dir) if "temporary file" in line]  # the run's log says so
    assert " INFO " in line
    assert ".metrics.json.k2j4_9ab.tmp" in line and "fold0/.last.pt.x8d0qq1z.tmp" in line


# ---------------------------------------------------------------- 5. folds that leave nothing
def test_data_folds_naming_a_fold_that_does_not_exist_is_refused_before_training(tmp_path):
    data = write_toy_data(tmp_path / "data")
    with pytest.raises(ValueError, match=r"data\.folds=\[0, 5\] names fold 5.*are 0\.\.4.*choose among them"):
        run_training(data, tmp_path / "outputs", "r", "data.folds=[0,5]", "data.n_folds=5")
    assert not list((tmp_path / "outputs").rglob("*.pt"))  # not even fold 0 was trained


def test_a_fold_file_putting_every_subject_in_one_fold_is_named(tmp_path):
    data = write_toy_data(tmp_path / "data")
    subjects = [f"SUBJ_{i:06d}" for i in range(6)]
    (data / "folds.csv").write_text("subject,fold\n" + "".join(f"{s},0\n" for s in subjects))
    with pytest.raises(
        ValueError, match=r"folds\.csv puts every subject of the data in fold 0.*at least 2 folds"
    ):
        data_folds(data, ["x"] * 6, subjects)


def test_a_fold_file_leaving_a_fold_without_subjects_names_the_fold(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("subject,fold\nA,0\nB,1\nC,3\nD,2\n")  # D has no sequence: fold 2 is empty
    with pytest.raises(
        ValueError, match=r"folds\.csv: the folds .*fold 2 holds none of the data's subjects.*Give fold 2"
    ):
        data_folds(tmp_path, ["x"] * 3, ["A", "B", "C"])


def test_one_fold_is_named_as_a_setting_not_a_library_error():
    with pytest.raises(ValueError, match=r"n_folds=1 \(data\.n_folds\).*at least 2 folds"):
        assign_folds(["a", "b", "a", "b"], ["A", "B", "C", "D"], n_folds=1)


# ---------------------------------------------------------------- 6. a full disk names the file
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def assert_names_the_file(error: OSError, path: Path) -> None:
    assert error.errno == errno.ENOSPC
    assert str(path) in str(error) and "free space" in str(error)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_a_run_folder_file_names_it_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "run" / "metrics.json"
    write_json_atomically({"old": 1}, path)
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError) as raised:
        write_json_atomically({"new": 2}, path)
    assert_names_the_file(raised.value, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1} and not temporaries(tmp_path)


def test_a_full_disk_while_writing_a_checkpoint_names_it(tmp_path, monkeypatch):
    path = tmp_path / "fold0" / "last.pt"
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError) as raised:
        save_atomically({"model": {}}, path)
    assert_names_the_file(raised.value, path)
    assert not path.exists() and not temporaries(tmp_path)


def test_a_full_disk_while_writing_the_cache_is_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    data = write_toy_data(tmp_path / "data")
    monkeypatch.setattr(np, "savez", no_space)
    with caplog.at_level(logging.WARNING, logger="codes.common.sequences"):
        table = load_sequence_table(data, "train")
    assert table.n_sequences == 6 * 18  # the features are still used
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(data / "cache" / "train-") in warning and "free space" in warning
    assert not list((data / "cache").glob("*.npz")) and not temporaries(data)


# ---------------------------------------------------------------- 7. a pickled checkpoint
class Pickled:
    """A Python object that a checkpoint must not hold."""


@pytest.mark.parametrize(
    "writer", ["pickle of plain values", "pickle of an object", "torch.save of an object"]
)
def test_a_checkpoint_holding_pickled_objects_says_so(tmp_path, writer):
    path = tmp_path / "best.pt"
    if writer == "pickle of plain values":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=2))
    elif writer == "pickle of an object":
        path.write_bytes(pickle.dumps({"model": Pickled()}, protocol=2))
    else:
        torch.save({"model": Pickled()}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path} holds pickled Python objects")
    assert "which are not loaded for safety" in message and "damaged" not in message
    assert "weights_only" not in message and "trust" not in message  # no advice to unpickle it


# ---------------------------------------------------------------- 8. running or stopped
def lockless_run(outputs: Path, written: float) -> Path:
    """A run folder without metrics.json whose files were written at ``written``, with a .lock."""
    run_dir = outputs / EXP / "r"
    (run_dir / "fold0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("exp_name: exp013\ndata:\n  n_folds: 5\n")
    (run_dir / "train.log").write_text("epoch 0\n")
    (run_dir / ".lock").touch()
    for path in run_dir.rglob("*"):
        os.utime(path, (written, written))
    return run_dir


def status_of(outputs: Path, now: float) -> str:
    return run_table.collect_runs(outputs, now=now)["status"].to_list()[0]


def test_the_run_table_reads_running_or_stopped_from_the_run_folder_lock(tmp_path):
    now = 1_780_000_000.0
    run_dir = lockless_run(tmp_path / "outputs", written=now - 2 * 3600)  # quiet for two hours
    script = (
        "import sys, time\nfrom filelock import FileLock\n"
        "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert status_of(tmp_path / "outputs", now) == "running"  # alive, though silent for long
        assert status_of(tmp_path / "outputs", now) == "running"  # looking did not take the lock
    finally:
        holder.kill()
        holder.wait()
    os.utime(run_dir / "train.log", (now - 60, now - 60))  # it wrote a minute ago, then died
    assert status_of(tmp_path / "outputs", now) == "stopped"


# ---- sweep findings
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.epochs=0", r"trainer\.epochs=0 must be a whole number >= 1"),
        ("trainer.batch_size=0", r"trainer\.batch_size=0 must be a whole number >= 1"),
        ("data.max_len=0", r"data\.max_len=0 must be a whole number >= 1"),
        (
            "data.folds=[]",
            r"data\.folds=\[\] names no fold to train; leave data\.folds null to train every fold",
        ),
    ],
)
def test_a_setting_that_leaves_nothing_to_train_is_refused_before_the_run_folder_is_made(
    tmp_path, override, named
):
    data = write_toy_data(tmp_path / "data")
    with pytest.raises(ValueError, match=named):
        run_training(data, tmp_path / "outputs", "r", override)
    assert not (tmp_path / "outputs").exists()  # no run folder: the run table shows no stopped run


def test_noisebert_pretraining_refuses_a_batch_size_of_zero_before_the_run_folder_is_made(tmp_path):
    from codes.noisebert.pretrain import pretrain
    from tests.test_noisebert_model import pretrain_config

    data = write_toy_data(tmp_path / "data")
    with pytest.raises(ValueError, match=r"trainer\.batch_size=0 must be a whole number >= 1"):
        pretrain(pretrain_config(data, tmp_path / "outputs", "trainer.batch_size=0", "run_name=p"))
    assert not (tmp_path / "outputs").exists()


def test_an_empty_fold_choice_is_refused_by_the_fold_check():
    from codes.common.folds import check_selected_folds

    with pytest.raises(ValueError, match=r"leave data\.folds null to train every fold"):
        check_selected_folds(np.array([0, 1, 0, 1]), [], "data.n_folds=2")
