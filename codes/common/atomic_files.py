"""Files written atomically: a temporary file beside the target, then a rename.

A reader never sees half a file, a failed write leaves the previous file and no temporary, and a
failed write (a full disk above all) names the file it was writing. Torch-free, so that the data
layer's cache uses the same writes as the run folders (``codes/common/runs.py`` re-exports them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# what tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp") names: ".<name>.<8 random characters>.tmp"
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def write_failure(error: OSError, path: Path) -> OSError:
    """An OSError of ``error``'s errno whose message names ``path`` and what to do about it."""
    reason = error.strerror or str(error) or type(error).__name__
    return OSError(
        error.errno,
        f"could not write {path} ({reason}); free space on that disk (or fix its permissions) and "
        "run again, or write elsewhere (paths.output_dir for run folders, the data folder's cache/ "
        "for the feature cache)",
    )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds
    (a reader never sees half a file; a failure leaves the previous file and no temporary), with
    the mode a new file gets from ``open()`` (readable by the group under the usual umask). An
    ``OSError`` while writing (a full disk: ``ENOSPC``) is raised again with the same errno and a
    message naming ``path`` and what to do."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_failure(error, path) from error
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise write_failure(error, path) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(text: str, path: Path) -> None:
    """``text`` to ``path`` via a temporary file and a rename (never a half-written file)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomically(obj: Any, path: Path) -> None:
    """JSON to ``path`` via a temporary file and a rename (never a half-written file)."""
    write_text_atomically(json.dumps(obj, indent=2), path)


def remove_leftover_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_path` writes left in ``folder``
    and its sub-folders (names ``.<file>.<8 characters>.tmp`` only), with an INFO line naming
    them; returns them. Call it only while no other process writes there (the run folder's lock)."""
    leftovers = sorted(
        path for path in Path(folder).rglob(".*.tmp") if path.is_file() and TEMPORARY_NAME.match(path.name)
    )
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        logger.info(
            "removed %d temporary file(s) an interrupted write left in %s: %s",
            len(leftovers),
            folder,
            ", ".join(str(path.relative_to(folder)) for path in leftovers),
        )
    return leftovers
