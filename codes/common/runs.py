"""A run's folder, log, provenance and seeding: what every training script needs.

A run folder ``outputs/<exp>/<run>/`` starts with its provenance: ``config.yaml`` (the resolved
config), ``overrides.txt`` (the command-line overrides, one per line), ``git_commit.txt`` and
``packages.txt`` (``name==version`` of every installed distribution: ``pip install -c
packages.txt -e .`` re-creates the environment the run used)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codes.common.atomic_files import (  # noqa: F401 (re-exported: the run folder's writes)
    FILE_MODE,
    atomic_path,
    remove_leftover_temporaries,
    write_json_atomically,
    write_text_atomically,
)
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
# a process that only looks (python -m codes.common.run_table) holds the lock for a moment: a run
# starting then waits this long rather than being refused
LOCK_WAIT_S = 1.0
RUN_RECORD_FILE = "run_record.json"
RUN_RECORD_VERSION = 1


class RunFolderInUse(RuntimeError):
    """Another process is writing to the run folder."""


class ResumeMismatchError(ValueError):
    """``trainer.resume=true`` with settings, or data files, that differ from the run's own."""


class RunRecordError(ValueError):
    """A ``run_record.json`` that exists but cannot be read; the message names it and what to do."""


def check_folder_name(value: object, setting: str) -> str:
    """``value`` when it is one plain path component (letters, digits, ``_ . , = + -``; not starting
    with a dot; no ``..``), else a ``ValueError`` naming ``setting``."""
    if not isinstance(value, str) or not RUN_NAME.match(value) or ".." in value:
        raise ValueError(
            f"{setting}={value!r} must be a single folder name (letters, digits and _ . , = + -, "
            "not starting with a dot, no '..' or '/'): runs are written only under "
            "paths.output_dir/<exp_name>/<run_name>/"
        )
    return value


def check_run_name(run_name: str) -> str:
    """A run name is one plain path component (letters, digits, ``_ . , = + -``; no ``..``)."""
    return check_folder_name(run_name, "run_name")


def flatten_settings(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"model.d_model": 64, ...}`` (dotted keys to leaf values)."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten_settings(value, f"{prefix}{key}."))
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
    old, new = flatten_settings(saved), flatten_settings(current)
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


def data_digests(data_dir: Path, names: Sequence[str]) -> dict[str, str]:
    """``{name: SHA-256 of its content}`` for each of ``names`` that is a file of ``data_dir`` (an
    optional file that is absent, e.g. ``folds.csv``, is left out)."""
    from codes.common.sequences import file_digest  # the cache's digest: one rule for "same data"

    data_dir = Path(data_dir)
    return {name: file_digest(data_dir / name) for name in names if (data_dir / name).is_file()}


def write_run_record(run_dir: Path, config: dict[str, Any], data: dict[str, str]) -> Path:
    """``run_dir/run_record.json``, written atomically when a run starts: ``{"version": 1,
    "config": <the resolved config, as in config.yaml>, "data": {<data file name>: <SHA-256>}}``."""
    path = Path(run_dir) / RUN_RECORD_FILE
    write_json_atomically({"version": RUN_RECORD_VERSION, "config": config, "data": dict(data)}, path)
    return path


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``run_record.json`` as a dict, or None for a run folder written before runs kept
    one; a damaged record raises :class:`RunRecordError` naming it."""
    path = Path(run_dir) / RUN_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunRecordError(
            f"{path} is damaged ({type(error).__name__}: {error}); copy it again from the original run "
            "folder, or delete it (the run is then treated like one started before runs kept a record)"
        ) from None
    if (
        not isinstance(record, dict)
        or record.get("version") != RUN_RECORD_VERSION
        or not isinstance(record.get("config"), dict)
        or not isinstance(record.get("data"), dict)
    ):
        raise RunRecordError(
            f"{path} is not a version-{RUN_RECORD_VERSION} run record ({{'version', 'config', 'data'}}); "
            "copy it again from the original run folder, or delete it"
        )
    return record


def data_changes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``name: what changed`` for every data file whose content differs, or that appeared or went."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        if name not in current:
            changes.append(f"{name}: gone (the run started with it)")
        elif name not in recorded:
            changes.append(f"{name}: new (the run started without it)")
        elif recorded[name] != current[name]:
            changes.append(
                f"{name}: other content (SHA-256 {recorded[name][:12]}... -> {current[name][:12]}...)"
            )
    return changes


def record_run_data(cfg: Any, run_dir: Path, data_dir: Path, names: Sequence[str]) -> None:
    """A new run writes its :func:`write_run_record`; a resumed one checks that the data files
    ``names`` of ``data_dir`` are those it started with (:class:`ResumeMismatchError` naming the
    changed files otherwise). A run folder without a record (written before runs kept one) resumes
    with a warning. Call it on rank 0, in the run folder's lock (:func:`open_run_dir`)."""
    from omegaconf import OmegaConf  # training only

    current = data_digests(data_dir, names)
    if not cfg.trainer.resume:
        write_run_record(run_dir, OmegaConf.to_container(cfg, resolve=True), current)
        return
    record = read_run_record(run_dir)
    if record is None:
        logger.warning(
            "%s has no %s (the run started before runs recorded their data): resuming without checking "
            "that %s are the files it started with",
            run_dir, RUN_RECORD_FILE, ", ".join(names),
        )  # fmt: skip
        return
    changes = data_changes(record["data"], current)
    if changes:
        raise ResumeMismatchError(
            f"trainer.resume=true, but the data in {data_dir} changed since the run in {run_dir} started: "
            + "; ".join(changes)
            + ". Resuming would mix models trained on two datasets. Put back the files the run started "
            "with, or start another run_name on the new data"
        )


def begin_run(cfg: Any, run_dir: Path, data_dir: Path, names: Sequence[str]) -> None:
    """What every run does in its locked folder once the data is known (rank 0 only): the
    temporaries an interrupted write left are removed (an INFO line names them) and
    :func:`record_run_data` records or checks the data files ``names``."""
    remove_leftover_temporaries(run_dir)
    record_run_data(cfg, run_dir, data_dir, names)


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
    run_dir = repo_path(cfg.paths.output_dir) / check_folder_name(cfg.exp_name, "exp_name") / run_name
    if overrides is None:
        overrides = command_line_overrides()
    lock = FileLock(run_dir / LOCK_FILE)

    def lock_check_and_write() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
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
