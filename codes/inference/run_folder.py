"""Reading a finished run folder ``outputs/<exp>/<run>/``: its config, folds, weights and normalisers.

A run folder holds ``config.yaml`` (the resolved config) and, per trained fold,
``fold{k}/best.pt`` (``{"model": weights, "ema": AveragedModel state or None, "epoch", "score"}``)
and ``fold{k}/normalizer.json``. Training evaluates (and writes out-of-fold predictions from) the
EMA weights when ``trainer.ema_decay > 0``, the raw weights otherwise; :func:`evaluated_weights`
returns the same ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from codes.common.checkpoint import load_checkpoint
from codes.common.sequences import FeatureNormalizer

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "best.pt"
NORMALIZER_FILE = "normalizer.json"
_FOLD_DIR = re.compile(r"^fold(\d+)$")
_EMA_PREFIX = "module."  # AveragedModel keeps the averaged model under .module


class RunFolderError(FileNotFoundError):
    """A run folder lacks what inference needs; the message names the path and what to do."""


class ConfigView(Mapping):
    """Read-only attribute access to a nested config dict (``cfg.model.bert.num_layers``).

    Stands in for an OmegaConf ``DictConfig`` where only reading is needed, so inference does
    not need Hydra or OmegaConf (a Kaggle image may lack them).
    """

    def __init__(self, values: Mapping[str, Any], path: str = "") -> None:
        self._values = dict(values)
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            where = f"{self._path}.{name}" if self._path else name
            raise AttributeError(f"the run config has no key {where!r}") from None

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, Mapping):
            return ConfigView(value, f"{self._path}.{key}" if self._path else key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._values))

    def __repr__(self) -> str:
        return f"ConfigView({self._values!r})"


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(
            f"{run_dir} is not a run folder: it has no {CONFIG_FILE}. Pass the folder a training run "
            "wrote, e.g. run_dir=outputs/exp018/<run> (python codes/exp/exp018/train.py writes one)"
        )
    return run_dir


def load_run_config(run_dir: Path) -> ConfigView:
    """The resolved config the run was trained with (``config.yaml``)."""
    path = require_run_dir(run_dir) / CONFIG_FILE
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} does not hold a config mapping")
    return ConfigView(values)


def trained_folds(run_dir: Path) -> list[int]:
    """Folds of the run folder that have both a best checkpoint and a normaliser, in order."""
    run_dir = require_run_dir(run_dir)
    folds = []
    for child in run_dir.iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and (child / CHECKPOINT_FILE).is_file() and (child / NORMALIZER_FILE).is_file():
            folds.append(int(match.group(1)))
    return sorted(folds)


def select_folds(run_dir: Path, folds: Iterable[int] | None = None) -> list[int]:
    """``folds`` (default: every trained fold), checked against what the folder holds."""
    available = trained_folds(run_dir)
    if not available:
        raise RunFolderError(
            f"{run_dir} holds no trained fold (fold<k>/{CHECKPOINT_FILE} + fold<k>/{NORMALIZER_FILE}); "
            "has its training finished at least one epoch?"
        )
    if folds is None:
        return available
    wanted = [int(k) for k in folds]
    missing = [k for k in wanted if k not in available]
    if missing:
        raise RunFolderError(f"{run_dir} has no trained fold {missing}; it holds folds {available}")
    if not wanted:
        raise ValueError("folds must name at least one fold")
    return wanted


def load_normalizer(run_dir: Path, fold: int) -> FeatureNormalizer:
    """The fold's feature normaliser (fitted on its training sequences)."""
    path = Path(run_dir) / f"fold{fold}" / NORMALIZER_FILE
    if not path.is_file():
        raise RunFolderError(f"missing {path}: the fold's normalisation statistics")
    return FeatureNormalizer.from_state_dict(json.loads(path.read_text()))


def evaluated_weights(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The weights training evaluated: the EMA model's when the checkpoint has one, else the raw model's.

    Returns ``(state dict for the bare model, "ema" | "model")``. The EMA state of an
    ``AveragedModel`` has its tensors under ``module.`` plus an ``n_averaged`` counter.
    """
    ema = checkpoint.get("ema")
    if isinstance(ema, Mapping) and ema:
        state = {k[len(_EMA_PREFIX) :]: v for k, v in ema.items() if k.startswith(_EMA_PREFIX)}
        return state, "ema"
    model = checkpoint.get("model")
    if isinstance(model, Mapping) and model:
        return dict(model), "model"
    raise RunFolderError("the checkpoint holds neither EMA nor model weights")


def load_fold_weights(run_dir: Path, fold: int) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`evaluated_weights` of ``fold{k}/best.pt``, loaded on the CPU."""
    path = Path(run_dir) / f"fold{fold}" / CHECKPOINT_FILE
    if not path.is_file():
        raise RunFolderError(f"missing {path}: the fold's best checkpoint")
    return evaluated_weights(load_checkpoint(path, map_location="cpu"))
