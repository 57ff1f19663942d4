"""Checkpoints written atomically: a temporary file in the same folder, then a rename.

A crash while writing leaves the previous checkpoint intact; a reader never sees half a file.
"""

from __future__ import annotations

import os
import pickle
import pickletools
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
_NOT_TORCH = "Invalid magic number"  # a pickle, but not torch.save's format
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}


def _first_pickled_global(path: Path) -> str | None:
    """``module.name`` of the first Python object a plain pickle file refers to; "" for a pickle of
    plain values; None when the file is not a whole pickle (the opcodes are read, nothing is run)."""
    strings: list[str] = []
    try:
        with open(path, "rb") as stream:
            for opcode, argument, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    return str(argument).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if opcode.name in _STRING_OPCODES:
                    strings.append(str(argument))
    except (OSError, ValueError, EOFError):
        return None
    return ""


def _pickled_object(error: BaseException, path: Path) -> str | None:
    """What a file torch refused holds when the reason is pickled Python objects (a class or function
    saved whole, or a file written by ``pickle`` rather than ``torch.save``), else None."""
    unsupported = _UNSUPPORTED_GLOBAL.search(str(error))
    if unsupported:
        return unsupported.group(1)
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text or _NOT_TORCH in text:
        name = _first_pickled_global(path)
        return None if name is None else name or "a plain pickle file"
    return None


def _unreadable_reason(error: BaseException) -> str:
    """A short reason from torch's error, without its advice to unpickle the file unsafely."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return "its contents are garbled"
    if isinstance(error, EOFError) or not text:
        return "the file ends too early"
    first = text.splitlines()[0].split(". ")[0].strip()
    return f"{type(error).__name__}: {first[:200]}"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomically` (plain tensors and Python values only).

    Always loaded with ``weights_only=True``; a file torch cannot read that way raises
    :class:`CheckpointError` naming it: one holding pickled Python objects (a class saved whole, a
    ``pickle`` file) says so; zero bytes, truncated or garbled, it is damaged or incomplete.
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
        pickled = _pickled_object(error, path)
        if pickled is not None:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({pickled}), which are not loaded for safety "
                "(unpickling can run any code): a checkpoint holds only tensors and plain values, as "
                "training writes them. If it was saved by other code, save the weights alone "
                "(torch.save({'model': model.state_dict()}, path)); if it should be a run's checkpoint, "
                "copy it again from the original run folder."
            ) from None
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
