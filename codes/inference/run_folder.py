"""Reading a finished run folder ``outputs/<exp>/<run>/``: its config, folds, weights and normalisers.

A run folder holds ``config.yaml`` (the resolved config) and, per trained fold,
``fold{k}/best.pt`` (``{"model": weights, "ema": AveragedModel state or None, "epoch", "score"}``)
and ``fold{k}/normalizer.json``. Training evaluates (and writes out-of-fold predictions from) the
EMA weights when ``trainer.ema_decay > 0``, the raw weights otherwise; :func:`evaluated_weights`
returns the same ones.

A damaged file (a truncated or zero-byte ``best.pt``, an unreadable ``normalizer.json``) and a fold
folder holding only one of the two files are errors naming the file; nothing is silently left out.
So is a fold the run trained whose folder is gone (:func:`expected_folds`: ``ensemble.json``,
``metrics.json`` or the config's ``data.folds`` / ``data.n_folds``), unless the folds are named.

A ``config.yaml`` edited after training (another ``data.max_len``, model size, ...) no longer
describes the checkpoints: :func:`check_config_against_record` compares it with the config the run
recorded at its start (``run_record.json``), and :func:`weights_mismatch` names the tensors whose
shapes do not fit the model built from it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from codes.common.checkpoint import CheckpointError, load_checkpoint
from codes.common.runs import RUN_RECORD_FILE, RunRecordError, flatten_settings, read_run_record
from codes.common.sequences import FeatureNormalizer

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "best.pt"
NORMALIZER_FILE = "normalizer.json"
METRICS_FILE = "metrics.json"  # written when training finishes: its "folds" are the folds it trained
ENSEMBLE_FILE = "ensemble.json"  # {"folds": [...]}: the folds a staged run serves (kaggle_package)
_FOLD_DIR = re.compile(r"^fold(\d+)$")
_SEED_DIR = re.compile(
    r"^seed(-?\d+)$"
)  # fold<k>/seed<s>/: a further seed's model of the fold (trainer.seeds)
_EMA_PREFIX = "module."  # AveragedModel keeps the averaged model under .module
# an experiment name as a single path component and a codes/exp/<exp> folder name: no "/" and no ".."
_EXP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


logger = logging.getLogger(__name__)


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
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RunFolderError(
            f"{path} is damaged (not readable YAML: {str(error).splitlines()[0]}); copy the run folder "
            "again from where it was trained"
        ) from None
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} does not hold a config mapping")
    return ConfigView(values)


def check_exp_name(name: object, source: str) -> str:
    """``name`` when it is a plain experiment name (``exp018``), usable as one path component and as
    a ``codes/exp/<exp>`` folder; else a :class:`RunFolderError` naming ``source``."""
    text = str(name)
    if not _EXP_NAME.match(text) or ".." in text:
        raise RunFolderError(
            f"{source} gives the experiment name {text!r}, which is not a plain name (letters, digits, "
            "'_', '.', '-'; no '/' and no '..'); it is used for paths and codes/exp/<exp>, so it is "
            "refused. Fix exp_name in the run's config.yaml (it is the name of the experiment folder "
            "that trained the run, e.g. exp018)"
        )
    return text


def run_exp_name(run_dir: Path, cfg: Mapping[str, Any] | None = None) -> str:
    """The run's ``exp_name`` from its ``config.yaml``, checked by :func:`check_exp_name`."""
    cfg = load_run_config(run_dir) if cfg is None else cfg
    if cfg.get("exp_name") is None:
        raise RunFolderError(
            f"{Path(run_dir) / CONFIG_FILE} has no exp_name (the experiment that trained it)"
        )
    return check_exp_name(cfg["exp_name"], f"{Path(run_dir) / CONFIG_FILE}")


def _fold_folders(run_dir: Path) -> dict[int, Path]:
    folders = {}
    for child in require_run_dir(run_dir).iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and child.is_dir():
            folders[int(match.group(1))] = child
    return dict(sorted(folders.items()))


def trained_folds(run_dir: Path) -> list[int]:
    """Folds of the run folder that have both a best checkpoint and a normaliser, in order."""
    return [
        fold
        for fold, folder in _fold_folders(run_dir).items()
        if (folder / CHECKPOINT_FILE).is_file() and (folder / NORMALIZER_FILE).is_file()
    ]


def incomplete_folds(run_dir: Path) -> dict[int, str]:
    """Fold folders holding only one of ``best.pt`` and ``normalizer.json``: fold -> what is wrong."""
    problems = {}
    for fold, folder in _fold_folders(run_dir).items():
        has_weights = (folder / CHECKPOINT_FILE).is_file()
        has_normalizer = (folder / NORMALIZER_FILE).is_file()
        if has_weights and not has_normalizer:
            problems[fold] = (
                f"{folder.name} has {CHECKPOINT_FILE} but no {NORMALIZER_FILE} (its normalisation statistics; "
                "lost in a copy or download?)"
            )
        elif has_normalizer and not has_weights:
            problems[fold] = (
                f"{folder.name} has {NORMALIZER_FILE} but no {CHECKPOINT_FILE} (its training has not finished "
                "an epoch: still running, or stopped; continue it with trainer.resume=true)"
            )
    return problems


def _listed_folds(path: Path) -> list[int]:
    """The fold numbers of a JSON file's ``"folds"``: a list of them, or a mapping keyed by them
    (``metrics.json``); a ``ValueError`` when the file holds neither."""
    state = json.loads(path.read_text(encoding="utf-8"))
    listed = state.get("folds") if isinstance(state, dict) else None
    if not isinstance(listed, (list, dict)) or not listed:
        raise ValueError(f'no "folds" list or mapping in {path.name}')
    return sorted(int(k) for k in listed)


def _config_folds(cfg: Mapping[str, Any]) -> list[int] | None:
    """``data.folds``, else ``0..data.n_folds-1``: the folds training was set to train."""
    data = cfg.get("data")
    if not isinstance(data, Mapping):
        return None
    if data.get("folds") is not None:
        return sorted(int(k) for k in data["folds"])
    n_folds = data.get("n_folds")
    return list(range(int(n_folds))) if isinstance(n_folds, int) and n_folds > 0 else None


def expected_folds(run_dir: Path) -> tuple[list[int], str] | None:
    """The folds the run folder serves by default and the file that says so, or None when none does.

    In order: ``ensemble.json`` (a staged run: the folds ``kaggle_package`` staged), ``metrics.json``
    (a finished run: the folds it trained), the config's ``data.folds`` or ``data.n_folds`` (a run
    still training; the folds of a data folder's ``folds.csv`` are known once it has finished).
    A damaged ``ensemble.json`` is an error; a damaged ``metrics.json`` is warned about and skipped.
    """
    run_dir = Path(run_dir)
    staged = run_dir / ENSEMBLE_FILE
    if staged.is_file():
        try:
            return _listed_folds(staged), str(staged)
        except (ValueError, TypeError, AttributeError) as error:
            raise RunFolderError(
                f"{staged} is damaged ({type(error).__name__}: {str(error)[:200]}); it names the folds the "
                f'run serves, e.g. {{"folds": [0, 1]}}: stage the run again, or pass folds=[...]'
            ) from None
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        try:
            return _listed_folds(metrics), str(metrics)
        except (ValueError, TypeError, AttributeError) as error:
            logger.warning("%s is unreadable (%s); the run's folds are taken from its config", metrics, error)
    folds = _config_folds(load_run_config(run_dir))
    if folds is None:
        return None
    return folds, f"{run_dir / CONFIG_FILE}: data.folds / data.n_folds"


def check_no_fold_missing(run_dir: Path, available: list[int]) -> None:
    """A :class:`RunFolderError` when a fold of :func:`expected_folds` has no complete folder."""
    expected = expected_folds(run_dir)
    if expected is None:
        logger.info(
            "%s does not say which folds it trained (no %s, %s or data.n_folds): serving the folds it holds, %s",
            run_dir, ENSEMBLE_FILE, METRICS_FILE, available,
        )  # fmt: skip
        return
    folds, source = expected
    missing = [k for k in folds if k not in available]
    if missing:
        raise RunFolderError(
            f"{run_dir} has no fold folder {', '.join(f'fold{k}' for k in missing)} (best.pt + "
            f"normalizer.json), but its folds are {folds} ({source}). If a folder was lost in a copy or "
            "download, copy it again from the original run folder; if the run is still training, let it "
            f"finish or continue it with trainer.resume=true; or pass folds={available} to predict with "
            "the folds it holds"
        )


def expected_seed_folders(run_dir: Path) -> list[str]:
    """The further seed folders every fold of the run has (``trainer.seeds=[s0, s1, ...]``:
    ``seed<s1>``, ...; the first seed trains in ``fold<k>/`` itself); [] without ``trainer.seeds``."""
    trainer = load_run_config(run_dir).get("trainer")
    seeds = trainer.get("seeds") if isinstance(trainer, Mapping) else None
    return [f"seed{int(seed)}" for seed in list(seeds or [])[1:]]


def check_no_seed_missing(run_dir: Path, folds: list[int], named: bool) -> None:
    """Every served fold holds the models of all its seeds (``fold<k>/seed<s>/best.pt``).

    A missing one is a :class:`RunFolderError` when the folds were not named (the rule for a
    missing fold); with ``folds=[...]`` it is a warning and the fold serves the seeds it holds."""
    expected = expected_seed_folders(run_dir)
    missing = [
        f"fold{fold}/{seed}/{CHECKPOINT_FILE}"
        for fold in folds
        for seed in expected
        if seed not in fold_seed_folders(run_dir, fold)
    ]
    if not missing:
        return
    message = (
        f"{run_dir} lacks {', '.join(missing)}: its config trains every fold with trainer.seeds "
        f"(further seed folders {expected})"
    )
    if named:
        logger.warning("%s; the folds named serve the seeds they hold", message)
        return
    raise RunFolderError(
        f"{message}. If a folder was lost in a copy or download, copy it again from the original run "
        "folder; if the run is still training, let it finish; or name the folds (folds=[...]) to serve "
        "the seeds each fold holds"
    )


def select_folds(run_dir: Path, folds: Iterable[int] | None = None) -> list[int]:
    """``folds`` (default: every trained fold), checked against what the folder holds.

    With ``folds=None``, a fold folder holding only one of ``best.pt`` and ``normalizer.json``, and
    a fold of :func:`expected_folds` without its folder, are errors (never silently left out of the
    ensemble); ``folds=[...]`` naming complete folds only loads those.
    """
    available = trained_folds(run_dir)
    incomplete = incomplete_folds(run_dir)
    if folds is None:
        if incomplete:
            what = "; ".join(incomplete.values())
            if not available:
                raise RunFolderError(f"{run_dir} holds no complete fold: {what}")
            raise RunFolderError(
                f"{run_dir} has incomplete fold folders: {what}. Every fold needs both {CHECKPOINT_FILE} "
                f"and {NORMALIZER_FILE}: copy the missing file again from the original run folder, or pass "
                f"folds={available} to predict with the complete folds only"
            )
        if not available:
            raise RunFolderError(
                f"{run_dir} holds no trained fold (fold<k>/{CHECKPOINT_FILE} + fold<k>/{NORMALIZER_FILE}); "
                "has its training finished at least one epoch?"
            )
        check_no_fold_missing(run_dir, available)
        check_no_seed_missing(run_dir, available, named=False)
        return available
    wanted = [int(k) for k in folds]
    if not wanted:
        raise ValueError("folds must name at least one fold")
    twice = sorted({k for k in wanted if wanted.count(k) > 1})
    if twice:
        raise ValueError(
            f"folds={wanted} names fold {', '.join(map(str, twice))} more than once, which would weigh "
            "it twice in the ensemble; name each fold once"
        )
    broken = [incomplete[k] for k in wanted if k in incomplete]
    if broken:
        raise RunFolderError(f"{run_dir}: {'; '.join(broken)}; the complete folds are {available}")
    missing = [k for k in wanted if k not in available]
    if missing:
        raise RunFolderError(f"{run_dir} has no trained fold {missing}; it holds folds {available}")
    check_no_seed_missing(run_dir, wanted, named=True)
    return wanted


def load_normalizer(run_dir: Path, fold: int) -> FeatureNormalizer:
    """The fold's feature normaliser (fitted on its training sequences).

    A file that is not JSON, or lacks equally long finite ``mean`` and positive ``scale`` lists,
    is a :class:`RunFolderError` naming it.
    """
    path = Path(run_dir) / f"fold{fold}" / NORMALIZER_FILE
    if not path.is_file():
        raise RunFolderError(f"missing {path}: the fold's normalisation statistics")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        mean = np.asarray(state["mean"], dtype=np.float64)
        scale = np.asarray(state["scale"], dtype=np.float64)
        problem = None
        if mean.ndim != 1 or scale.shape != mean.shape or not len(mean):
            problem = "'mean' and 'scale' are not two equally long lists of numbers"
        elif not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            problem = "it holds non-finite values or a scale <= 0"
    except (ValueError, TypeError, KeyError, IndexError) as error:  # not JSON, not a dict, no "mean"...
        lines = str(error).splitlines()
        problem = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
    if problem is not None:
        raise RunFolderError(
            f"{path} is damaged or incomplete ({path.stat().st_size} bytes; {problem}), so fold {fold}'s "
            "inputs cannot be normalised as in training. If it was downloaded or copied, copy it again "
            "from the original run folder; else train the fold again, or pass folds=[...] without "
            f"fold {fold}"
        )
    return FeatureNormalizer.from_state_dict({"mean": mean.tolist(), "scale": scale.tolist()})


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


def fold_seed_folders(run_dir: Path, fold: int) -> list[str]:
    """``fold{k}``'s further seed folders holding a best checkpoint (``trainer.seeds``), e.g.
    ``["seed7"]``: their models join the fold's (the fold's normaliser serves them all)."""
    folder = Path(run_dir) / f"fold{fold}"
    if not folder.is_dir():
        return []
    seeds = [
        child.name
        for child in folder.iterdir()
        if _SEED_DIR.match(child.name) and (child / CHECKPOINT_FILE).is_file()
    ]
    return sorted(seeds, key=lambda name: int(name[len("seed") :]))


def load_fold_weights(
    run_dir: Path, fold: int, seed_folder: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`evaluated_weights` of ``fold{k}/best.pt`` (or ``fold{k}/<seed_folder>/best.pt``),
    loaded on the CPU."""
    path = Path(run_dir) / f"fold{fold}" / (seed_folder or "") / CHECKPOINT_FILE
    if not path.is_file():
        raise RunFolderError(f"missing {path}: the fold's best checkpoint")
    try:
        checkpoint = load_checkpoint(path, map_location="cpu")
    except CheckpointError as error:
        raise RunFolderError(
            f"{error} To predict without fold {fold} meanwhile, pass folds=[...] without it."
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise RunFolderError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint of this repository's training"
        )
    try:
        return evaluated_weights(checkpoint)
    except RunFolderError as error:
        raise RunFolderError(f"{path}: {error}") from None


# Config keys that shape what a served model computes: config.yaml must still hold the values the
# run recorded at its start. Everything outside these sections (paths, machine, trainer, augment)
# may differ, and so may the keys of SERVING_NEUTRAL_KEYS.
SERVING_SECTIONS = ("exp_name", "model", "data")
SERVING_NEUTRAL_KEYS = frozenset({
    # which data and folds training read: the fold weights are what they are
    "data.source", "data.synthetic_subjects", "data.synthetic_seed", "data.n_folds", "data.folds",
    "data.fold_seed", "data.exclude_fold", "data.sensor_drop_prob",
    # used only when training starts
    "model.init_from", "model.init_strict", "model.cls_init_std",
    # speed or memory settings with the same results (tests/test_inference.py checks pack_padded_steps)
    "model.pack_padded_steps", "model.bert.attn_implementation", "model.bert.gradient_checkpointing",
    # dropout: inactive in eval mode
    "model.dropout", "model.attention_dropout", "model.head_dropout", "model.bert.hidden_dropout",
    "model.bert.attention_dropout",
})  # fmt: skip


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config the run recorded as it started (``run_record.json``'s ``"config"``, read by
    :func:`codes.common.runs.read_run_record`), or None for a run folder written before the record
    existed; a damaged record is a :class:`RunFolderError` naming it."""
    try:
        record = read_run_record(run_dir)
    except RunRecordError as error:
        raise RunFolderError(
            f"{error} (it holds the config the run was trained with, which {CONFIG_FILE} is checked against)"
        ) from None
    return None if record is None else record["config"]


def serving_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened ``key: value`` pairs of ``config`` that shape serving (:data:`SERVING_SECTIONS`
    but :data:`SERVING_NEUTRAL_KEYS`)."""
    values = config.to_dict() if isinstance(config, ConfigView) else dict(config)
    return {
        key: value
        for key, value in flatten_settings(values).items()
        if key.split(".")[0] in SERVING_SECTIONS and key not in SERVING_NEUTRAL_KEYS
    }


def _same_value(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN


def config_record_differences(current: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every serving setting (:func:`serving_settings`) that differs."""
    now, then = serving_settings(current), serving_settings(recorded)
    return [
        f"{key}: {then.get(key, '<absent>')!r} at training, {now.get(key, '<absent>')!r} in {CONFIG_FILE}"
        for key in sorted(set(now) | set(then))
        if key not in now or key not in then or not _same_value(now[key], then[key])
    ]


def check_config_against_record(run_dir: Path, cfg: Mapping[str, Any]) -> None:
    """A :class:`RunFolderError` naming the keys when ``config.yaml`` no longer holds the serving
    settings the run recorded as it started (``run_record.json``); a run folder without the record
    (written before it existed) is served as before, with an INFO line."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        logger.info(
            "%s has no %s (written by training since it exists): its %s is not checked against the "
            "settings the run was trained with",
            run_dir, RUN_RECORD_FILE, CONFIG_FILE,
        )  # fmt: skip
        return
    differences = config_record_differences(cfg, recorded)
    if differences:
        raise RunFolderError(
            f"{Path(run_dir) / CONFIG_FILE} no longer holds the settings the run was trained with "
            f"({Path(run_dir) / RUN_RECORD_FILE}): " + "; ".join(differences) + ". The checkpoints were "
            f"trained with the recorded values: restore {CONFIG_FILE} from the original run folder (or "
            f'put the recorded values back; {RUN_RECORD_FILE}\'s "config" holds them), or train a run with '
            "the new settings"
        )


def weights_mismatch(
    model_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], shown: int = 6
) -> list[str]:
    """What keeps ``weights`` from loading into a model whose ``state_dict()`` is ``model_state``:
    tensors of another shape, and tensors only one side has (at most ``shown`` of each kind)."""
    shapes = [
        f"{key}: {tuple(weights[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
        for key, tensor in model_state.items()
        if key in weights and tuple(weights[key].shape) != tuple(tensor.shape)
    ]
    absent = [key for key in model_state if key not in weights]
    extra = [key for key in weights if key not in model_state]
    problems = shapes[:shown]
    if len(shapes) > shown:
        problems.append(f"... {len(shapes)} tensors of another shape in all")
    for keys, what in ((absent, "not in the checkpoint"), (extra, "in the checkpoint but not in the model")):
        if keys:
            listed = ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")
            problems.append(f"{what}: {listed}")
    return problems
