"""Checkpoints written atomically: a temporary file in the same folder, then a rename.

A crash while writing leaves the previous checkpoint intact; a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomically(obj: Any, path: Path) -> Path:
    """``torch.save`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomically` (plain tensors and Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


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
