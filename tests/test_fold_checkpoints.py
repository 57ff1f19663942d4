"""``last.pt`` every ``trainer.checkpoint_every_epochs`` epochs, and resuming stays exact.

Without the key ``last.pt`` is written after every epoch, as always. With ``k`` it is written
after every k-th epoch, after the last one, when training stops early and before a process stops
as asked (``trainer.interrupt_after_epochs``); a crash in between resumes from the older file and
repeats the epochs after it, which gives the uninterrupted run's results.
"""

from __future__ import annotations

import polars as pl
import pytest

from codes.common import training
from codes.common.checkpoint import load_checkpoint
from tests.helpers import experiment_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXP = "exp013"  # any experiment: the plumbing is shared


def run(toy_data, tmp_path, run_name: str, *overrides: str) -> dict:
    import importlib

    cfg = experiment_config(
        EXP, "variant=smoke", "machine=cpu", "data=competition", f"paths.data_dir={toy_data}",
        f"paths.output_dir={tmp_path}", f"run_name={run_name}", "data.folds=[0]",
        "trainer.early_stopping_patience=10", *overrides,
    )  # fmt: skip
    return importlib.import_module(f"codes.exp.{EXP}.train").run_training(cfg)


def record_last_writes(monkeypatch) -> list[int]:
    """The epoch count stored in every ``last.pt`` written from now on."""
    written: list[int] = []
    original = training.save_atomically

    def recording(obj, path):
        if path.name == "last.pt":
            written.append(obj["state"]["epoch"])
        return original(obj, path)

    monkeypatch.setattr(training, "save_atomically", recording)
    return written


def comparable(metrics: dict) -> tuple:
    return metrics["history"], {k: v for k, v in metrics["overall"].items() if k != "wall_seconds"}


def test_without_the_key_last_pt_is_written_after_every_epoch(toy_data, tmp_path, monkeypatch):
    written = record_last_writes(monkeypatch)
    run(toy_data, tmp_path, "every", "trainer.epochs=3")
    assert written == [1, 2, 3]


def test_every_k_epochs_and_after_the_last_one(toy_data, tmp_path, monkeypatch):
    written = record_last_writes(monkeypatch)
    run(toy_data, tmp_path, "k2", "trainer.epochs=5", "+trainer.checkpoint_every_epochs=2")
    assert written == [2, 4, 5]


def test_an_early_stop_writes_last_pt(toy_data, tmp_path, monkeypatch):
    written = record_last_writes(monkeypatch)
    metrics = run(
        toy_data, tmp_path, "early", "trainer.epochs=20", "trainer.early_stopping_patience=1",
        "+trainer.checkpoint_every_epochs=7",
    )  # fmt: skip
    epochs = len(metrics["history"]["0"])
    assert epochs < 20 and written[-1] == epochs
    assert load_checkpoint(tmp_path / EXP / "early" / "fold0" / "last.pt")["state"]["finished"]


def test_resuming_from_a_checkpoint_every_2_epochs_equals_an_uninterrupted_run(
    toy_data, tmp_path, monkeypatch
):
    every_2 = ("trainer.epochs=4", "+trainer.checkpoint_every_epochs=2")
    straight = run(toy_data, tmp_path, "straight", *every_2)

    # asked to stop after 3 epochs: last.pt is written then, off the 2-epoch beat
    with pytest.raises(training.TrainingInterrupted):
        run(toy_data, tmp_path, "cut", *every_2, "trainer.interrupt_after_epochs=3")
    assert load_checkpoint(tmp_path / EXP / "cut" / "fold0" / "last.pt")["state"]["epoch"] == 3
    cut = run(toy_data, tmp_path, "cut", *every_2, "trainer.resume=true")

    # a crash after epoch 3: last.pt is the one of epoch 2, and epoch 3 is trained again
    original = training.FoldCheckpoints.save

    def crash_after_epoch_3(self, state, improved, score):
        original(self, state, improved, score)
        if state.epoch == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(training.FoldCheckpoints, "save", crash_after_epoch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(toy_data, tmp_path, "crash", *every_2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / EXP / "crash" / "fold0" / "last.pt")["state"]["epoch"] == 2
    crash = run(toy_data, tmp_path, "crash", *every_2, "trainer.resume=true")

    for resumed, name in ((cut, "cut"), (crash, "crash")):
        assert comparable(resumed) == comparable(straight), name
        oof = pl.read_parquet(tmp_path / EXP / name / "oof.parquet")
        assert oof.equals(pl.read_parquet(tmp_path / EXP / "straight" / "oof.parquet")), name
