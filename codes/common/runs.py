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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codes.common.distributed import DistributedContext, broadcast_from_main, run_on_main

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


def write_text_atomically(text: str, path: Path) -> None:
    """``text`` to ``path`` via a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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


def prepare_run_dir(cfg: Any, context: DistributedContext, overrides: Sequence[str] | None = None) -> Path:
    """``<paths.output_dir>/<exp_name>/<run_name>/`` with its provenance files.

    Refuses to reuse a started run unless ``trainer.resume=true``, and to resume a folder that
    holds no run. Rank 0 checks and writes; every rank gets its path or its error. ``overrides``
    default to this process's Hydra command line (``overrides.txt``; a resumed run adds an
    ``overrides.resume-<time>.txt``).
    """
    from omegaconf import OmegaConf  # training only: inference imports this module without OmegaConf

    run_name = broadcast_from_main(cfg.run_name or time.strftime("%Y%m%d-%H%M%S"), context)
    run_dir = repo_path(cfg.paths.output_dir) / cfg.exp_name / run_name
    if overrides is None:
        overrides = command_line_overrides()

    def check_and_write() -> None:
        started = (run_dir / "config.yaml").is_file()
        if started and not cfg.trainer.resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; continue it with trainer.resume=true run_name={run_name}, "
                "or choose another run_name"
            )
        if cfg.trainer.resume and not started:
            raise FileNotFoundError(f"trainer.resume=true but {run_dir} holds no run to continue")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
        listed = (
            "".join(f"{item}\n" for item in overrides) if overrides is not None else "# composed in code\n"
        )
        name = (
            "overrides.txt"
            if not cfg.trainer.resume
            else f"overrides.resume-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        )
        write_text_atomically(listed, run_dir / name)
        write_text_atomically(git_commit() + "\n", run_dir / "git_commit.txt")
        write_text_atomically(installed_packages(), run_dir / "packages.txt")

    run_on_main(check_and_write, context)
    return run_dir
