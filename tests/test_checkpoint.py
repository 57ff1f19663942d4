"""Atomic checkpoint writes."""

import pytest
import torch

from codes.common import checkpoint
from codes.common.checkpoint import load_checkpoint, save_atomically


def test_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {"model": model.state_dict(), "epoch": 4, "history": [0.5, 0.25]}
    save_atomically(state, tmp_path / "fold0" / "last.pt")
    loaded = load_checkpoint(tmp_path / "fold0" / "last.pt")
    assert loaded["epoch"] == 4 and loaded["history"] == [0.5, 0.25]
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_atomically({"epoch": 1}, path)

    def broken_save(obj, stream):
        stream.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_checkpoints_get_the_mode_open_gives_a_new_file(tmp_path):
    """Readable by the group under the usual umask, not mkstemp's owner-only 0600."""
    from codes.common.runs import FILE_MODE

    path = save_atomically({"epoch": 1}, tmp_path / "best.pt")
    assert path.stat().st_mode & 0o777 == FILE_MODE
