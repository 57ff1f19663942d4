"""Checkpoints written atomically: a temporary file in the same folder, then a rename.

A crash while writing leaves the previous checkpoint intact; a reader never sees half a file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from codes.common.runs import atomic_path


def save_atomically(obj: Any, path: Path) -> Path:
    """``torch.save`` to ``path`` via a temporary file, ``fsync`` and ``os.replace``, with the mode
    ``open()`` gives a new file (readable by the group under the usual umask)."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        torch.save(obj, stream)
        stream.flush()
        os.fsync(stream.fileno())
    return path


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read; the message names it and what to do."""


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_DEVICE_ERROR = "Attempting to deserialize object on"


def _unreadable_reason(error: BaseException) -> str:
    """A short reason from torch's error, without its advice to unpickle the file unsafely."""
    text = str(error)
    unsupported = _UNSUPPORTED_GLOBAL.search(text)
    if unsupported:
        return f"it holds a Python object ({unsupported.group(1)}) where only tensors and plain values belong"
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return "its contents are garbled"
    if isinstance(error, EOFError) or not text:
        return "the file ends too early"
    first = text.splitlines()[0].split(". ")[0].strip()
    return f"{type(error).__name__}: {first[:200]}"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomically` (plain tensors and Python values only).

    Always loaded with ``weights_only=True``; a file torch cannot read that way (zero bytes,
    truncated, garbled) raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as error:  # torch raises EOFError, RuntimeError, OSError, KeyError, UnpicklingError...
        if _DEVICE_ERROR in str(error):  # an intact file, mapped to a device this machine lacks
            raise
        size = path.stat().st_size
        retrain = (
            "delete it and train the fold again (without a last.pt, trainer.resume=true starts the fold anew)"
            if path.name == "last.pt"
            else "train the fold again (trainer.resume=true continues from the fold's last.pt when that one "
            "is intact)"
        )
        raise CheckpointError(
            f"{path} is damaged or incomplete ({size} bytes; {_unreadable_reason(error)}), so it cannot "
            "be loaded. If it was downloaded or copied, copy it again from the original run folder; "
            f"if the original is damaged too, {retrain}."
        ) from None


def load_matching_weights(model: torch.nn.Module, path: Path) -> dict[str, list[str]]:
    """Copy the tensors of a checkpoint whose name and shape match ``model``'s; report the rest.

    ``path`` holds a state dict, or a dict with one under ``"model"`` (what training writes).
    Returns ``{"loaded": [...], "new": [...] (kept at their initialisation), "mismatched": [...]
    (same name, other shape), "unused": [...] (not in the model)}``.
    """
    stored = load_checkpoint(path)
    state = stored["model"] if isinstance(stored.get("model"), dict) else stored
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    loaded_set = set(loaded)
    return {
        "loaded": loaded,
        "new": [k for k in own if k not in loaded_set],
        "mismatched": mismatched,
        "unused": [k for k in state if k not in own],
    }
