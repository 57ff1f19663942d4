"""A run's folder, log, provenance and seeding: what every training script needs.

A run folder ``outputs/<exp>/<run>/`` starts with its provenance: ``config.yaml`` (the resolved
config), ``overrides.txt`` (the command-line overrides, one per line), ``git_commit.txt`` and
``packages.txt`` (``name==version`` of every installed distribution: ``pip install -c
packages.txt -e .`` re-creates the environment the run used)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codes.common.distributed import DistributedContext, broadcast_from_main, run_on_main

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
PROVENANCE_FILES = ("config.yaml", "overrides.txt", "git_commit.txt", "packages.txt")


class TrainingInterrupted(RuntimeError):
    """Raised after ``trainer.interrupt_after_epochs`` epochs; the run continues with trainer.resume=true."""


def repo_path(path: str | Path) -> Path:
    """Relative config paths are taken from the repository root."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit, with ``-dirty`` when tracked files have changes; ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global RNG, for code that still uses it)
    torch.manual_seed(seed)


def setup_logging(log_file: Path | None, is_main: bool = True) -> None:
    """Log to stderr, and to ``log_file`` on the main process; other ranks log warnings only."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds
    (a reader never sees half a file; a failure leaves the previous file), with the mode a new
    file gets from ``open()`` (readable by the group under the usual umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
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


def installed_packages() -> str:
    """``name==version`` of every installed distribution, sorted: a constraints file."""
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions[name.lower()] = distribution.version
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def command_line_overrides() -> list[str] | None:
    """The Hydra command-line overrides of this process, or None outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


# Settings that may differ when a run is resumed: they do not shape its results.
RESUMABLE_CHANGES = (
    "run_name",
    "trainer.resume",
    "trainer.interrupt_after_epochs",
    "trainer.wandb",
    "paths.output_dir",
    "machine.device",
    "machine.num_workers",
    "machine.num_threads",
    "machine.distributed_timeout_s",
)
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+-]*$")
LOCK_FILE = ".lock"


class RunFolderInUse(RuntimeError):
    """Another process is writing to the run folder."""


class ResumeMismatchError(ValueError):
    """``trainer.resume=true`` with settings that differ from the run's own."""


def check_run_name(run_name: str) -> str:
    """A run name is one plain path component (letters, digits, ``_ . , = + -``; no ``..``)."""
    if not RUN_NAME.match(run_name) or ".." in run_name:
        raise ValueError(
            f"run_name={run_name!r} must be a single folder name (letters, digits and _ . , = + -, "
            "not starting with a dot, no '..' or '/'): runs are written only under paths.output_dir/<exp>/"
        )
    return run_name


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


# settings added after runs were saved, with the value that reproduces what those runs did: a
# saved config without the key resumes under that value
ADDED_KEY_DEFAULTS = {
    "machine.compile_mode": "default",
    "trainer.checkpoint_every_epochs": 1,
    "model.init_strict": True,  # read only when a run starts, never on resume
    "cls_objective.weight": 0.0,  # NoiseBERT runs saved before the CLS objective
    # NoiseBERT runs saved before the raw-signal vibration and strict (fold-excluding) pretraining
    "data.noise_domain": "features",
    "noise.rotation_deg_per_unit": 2.0,
    "data.exclude_fold": None,
    "data.n_folds": 5,
    "data.fold_seed": 42,
}


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that differs and may not differ on resume."""
    old, new = _flatten(saved), _flatten(current)
    old = {**{k: v for k, v in ADDED_KEY_DEFAULTS.items() if k in new}, **old}
    return [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES
    ]


def run_has_started(run_dir: Path) -> bool:
    """The folder holds a checkpoint or finished metrics (provenance files alone do not count:
    an attempt that failed before its first epoch leaves nothing to continue)."""
    return (run_dir / "metrics.json").is_file() or any(run_dir.rglob("last.pt"))


@contextmanager
def open_run_dir(
    cfg: Any, context: DistributedContext, overrides: Sequence[str] | None = None
) -> Iterator[Path]:
    """``<paths.output_dir>/<exp_name>/<run_name>/``, locked for the run, with its provenance files.

    Rank 0 takes an exclusive lock on the folder (``.lock``; a second process writing to the
    same run is refused), then checks: a started run is reused only with ``trainer.resume=true``;
    a finished run is not resumed; a resumed run must have the settings it was started with, but
    for :data:`RESUMABLE_CHANGES` (the differing keys are listed). A folder whose earlier attempt
    failed before writing any checkpoint may be reused. Every rank gets the path or the error.
    ``overrides`` default to this process's Hydra command line (``overrides.txt``; a resumed run
    adds ``overrides.resume-<time>.txt`` and keeps the original ``config.yaml``).
    """
    from filelock import FileLock, Timeout

    run_name = broadcast_from_main(cfg.run_name or time.strftime("%Y%m%d-%H%M%S"), context)
    check_run_name(run_name)
    run_dir = repo_path(cfg.paths.output_dir) / cfg.exp_name / run_name
    if overrides is None:
        overrides = command_line_overrides()
    lock = FileLock(run_dir / LOCK_FILE)

    def lock_check_and_write() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderInUse(
                f"another process is writing to {run_dir} (it holds {run_dir / LOCK_FILE}); wait for it to "
                "finish or choose another run_name"
            ) from None
        try:
            _check_and_write(cfg, run_dir, run_name, overrides)
        except BaseException:
            lock.release()
            raise

    run_on_main(lock_check_and_write, context)
    try:
        yield run_dir
    finally:
        if context.is_main:
            lock.release()


def _check_and_write(cfg: Any, run_dir: Path, run_name: str, overrides: Sequence[str] | None) -> None:
    from omegaconf import OmegaConf  # training only: inference imports this module without OmegaConf

    resume, has_config = bool(cfg.trainer.resume), (run_dir / "config.yaml").is_file()
    current = OmegaConf.to_container(cfg, resolve=True)
    if resume:
        if not has_config:
            raise FileNotFoundError(f"trainer.resume=true but {run_dir} holds no run to continue")
        if (run_dir / "metrics.json").is_file():
            raise FileExistsError(
                f"{run_dir} holds a finished run (metrics.json); nothing to resume. Start another run_name"
            )
        differences = resume_differences(
            OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")), current
        )
        if differences:
            raise ResumeMismatchError(
                f"trainer.resume=true with settings that differ from the run's config.yaml in {run_dir}: "
                + "; ".join(differences)
                + ". Resume with the run's own settings (only "
                + ", ".join(RESUMABLE_CHANGES[1:])
                + " may change), or start another run_name"
            )
    elif run_has_started(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with trainer.resume=true run_name={run_name}, "
            "or choose another run_name"
        )
    elif has_config:
        logger.warning(
            "%s holds no checkpoint (an earlier attempt stopped before its first epoch); reusing it", run_dir
        )
    if not (resume and has_config):
        write_text_atomically(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    listed = "".join(f"{item}\n" for item in overrides) if overrides is not None else "# composed in code\n"
    if resume and has_config:  # the original provenance stays; the resume gets its own record
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_text_atomically(
            f"# resumed with git commit {git_commit()}\n{listed}", run_dir / f"overrides.resume-{stamp}.txt"
        )
        return
    write_text_atomically(listed, run_dir / "overrides.txt")
    write_text_atomically(git_commit() + "\n", run_dir / "git_commit.txt")
    write_text_atomically(installed_packages(), run_dir / "packages.txt")
