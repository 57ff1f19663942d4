"""The k-fold training plumbing every experiment calls: a function library, not a base class.

An experiment's ``train.py`` keeps what its idea changes (the model, the loss, the optimizer,
the training step in ``train_fold``) and calls these functions for the rest:

- :func:`run_kfold`: distributed set-up, the run folder, the data, the folds, the outputs;
- :class:`FoldRun`: what one fold's loop needs from the run (device, precision, this rank's
  shuffled shard, the model placed on the device with the CPU fast paths, DDP and compile);
- :class:`FoldCheckpoints`: ``last.pt`` (resume) and ``best.pt`` (atomic writes);
- :class:`EpochLosses`: the progress bar and the loss, read every few steps and checked finite
  on every rank;
- :func:`end_epoch`: evaluation, the decision of rank 0 (improved, early stop) shared with every
  rank, checkpoints, the interruption rule; :func:`fold_predictions` at the end of a fold;
- :func:`write_outputs`: ``oof.parquet``, ``metrics.json`` and the plots.

Changing a function here changes every experiment that calls it: ``tests/test_pinned_runs.py``
pins what exp013 and exp018 compute.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from codes.common.batching import (
    BatchCut,
    check_batching_settings,
    length_grouped_order,
    length_sorted_batches,
)
from codes.common.checkpoint import load_checkpoint, load_matching_weights, save_atomically
from codes.common.data_source import resolve_data_dir
from codes.common.distributed import (
    DistributedContext,
    barrier,
    broadcast_from_main,
    gather_objects,
    init_distributed,
    raise_if_any_rank_failed,
    run_on_main,
    shard_indices,
    shutdown_distributed,
)
from codes.common.ema import WarmupEMA
from codes.common.features import FeatureSettings
from codes.common.folds import FOLD_FILE, check_folds_setting, check_selected_folds, data_folds
from codes.common.machine import apply_num_threads, autocast, autocast_dtype
from codes.common.metric import binary_f1, competition_score, macro_f1
from codes.common.plots import plot_confusion_matrix, plot_fold_curves
from codes.common.protocol import PROTOCOL_FILE, protocol_record
from codes.common.runs import (
    TrainingInterrupted,
    atomic_path,
    begin_run,
    open_run_dir,
    repo_path,
    setup_logging,
    write_json_atomically,
)
from codes.common.schema import GESTURES
from codes.common.sequences import SequenceTable, load_sequence_table, split_files

logger = logging.getLogger("codes.common.training")
LOSS_READ_EVERY = 20  # training steps between reads of the loss (finiteness check, progress bar)

__all__ = [
    "EpochLosses",
    "FoldCheckpoints",
    "FoldRun",
    "FoldState",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "build_ema",
    "check_run_settings",
    "end_epoch",
    "fold_predictions",
    "initialise_from",
    "place_model",
    "predict_probabilities",
    "run_kfold",
    "score_probabilities",
    "write_outputs",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the fold stops and its last good checkpoint is kept."""


@dataclass
class FoldState:
    """What ``last.pt`` holds besides the weights: enough to continue exactly."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    finished: bool = False


@dataclass
class FoldRun:
    """One fold of a run, as its training loop sees it."""

    cfg: DictConfig
    fold: int
    fold_dir: Path
    context: DistributedContext
    non_imu_columns: list[int]  # feature indices an IMU-only sequence lacks (thermopiles, ToF)
    epochs_this_process: int = 0
    _imu_only: tuple[Any, Any] | None = field(default=None, repr=False)  # (source, IMU-only copy)

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg.machine.precision, self.device)

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast (bf16 on CUDA by default, none on CPU)."""
        return autocast(self.device, self.autocast_dtype)

    @property
    def resuming(self) -> bool:
        """``trainer.resume=true`` and this fold has a ``last.pt`` to continue from."""
        return bool(self.cfg.trainer.resume) and (self.fold_dir / "last.pt").is_file()

    def steps_per_epoch(self, n_sequences: int, batch_size: int) -> int:
        """Batches per epoch of every rank (the shards are padded to the same size)."""
        per_rank = math.ceil(n_sequences / self.context.world_size)
        return math.ceil(per_rank / batch_size)

    def epoch_order(self, n_sequences: int, epoch_seed: int) -> torch.Tensor:
        """This rank's shard of a permutation drawn from ``epoch_seed`` (the same on every rank)."""
        order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(epoch_seed))
        return shard_indices(order, self.context)

    def epoch_batches(
        self, lengths: torch.Tensor, batch_size: int, steps_per_epoch: int, epoch_seed: int
    ) -> list[torch.Tensor]:
        """This rank's ``steps_per_epoch`` batches of an epoch (indices into the training fold):
        :meth:`epoch_order`'s shard cut into batches, or with ``data.group_by_length`` an order
        grouped by ``lengths`` (real steps per sequence), drawn from ``epoch_seed``, then sharded
        (``codes/common/batching.py``). Every rank gets the same number of batches; the same
        ``epoch_seed`` gives the same batches (a resumed run repeats them)."""
        data_cfg = self.cfg.data
        if data_cfg.get("group_by_length", False):
            # the global order in batches of world_size x batch_size neighbours in length: sharded
            # round-robin, every rank's step-k batch comes from the same global batch
            generator = torch.Generator().manual_seed(epoch_seed)
            global_batch = batch_size * self.context.world_size
            grouped = length_grouped_order(
                lengths, global_batch, data_cfg.get("group_mega_batches"), generator
            )
            order = shard_indices(grouped, self.context)
        else:
            order = self.epoch_order(len(lengths), epoch_seed)
        return [order[step * batch_size : (step + 1) * batch_size] for step in range(steps_per_epoch)]

    def imu_only(self, tensors):
        """``tensors`` with the thermopile and ToF inputs removed (made once per fold)."""
        if self._imu_only is None or self._imu_only[0] is not tensors:
            self._imu_only = (tensors, tensors.imu_only(self.non_imu_columns))
        return self._imu_only[1]

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, with the CPU fast paths there (``machine.cpu_fast_paths``)."""
        return place_model(model, self.device, self.cfg.machine)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: DDP under ``torchrun``, ``torch.compile`` when asked for
        (``machine.compile=true``), in ``machine.compile_mode`` (``default``; ``reduce-overhead``
        replays CUDA graphs, which needs every batch of the same shape: drop the last ragged one)."""
        trained = DistributedDataParallel(model) if self.context.is_distributed else model
        if not self.cfg.machine.compile:
            return trained
        return torch.compile(trained, mode=self.cfg.machine.get("compile_mode", "default"))


def place_model(model: torch.nn.Module, device: torch.device, machine_cfg) -> torch.nn.Module:
    """``model`` on ``device``; on a CPU with ``machine.cpu_fast_paths``, the CPU fast paths
    (``codes/models/cpu_fast_paths/``: the same results, faster training). The one place they
    are switched on; a GPU never goes through them."""
    model = model.to(device)
    if device.type == "cpu" and machine_cfg.cpu_fast_paths:
        from codes.models.cpu_fast_paths import enable_cpu_fast_paths

        enable_cpu_fast_paths(model)
    return model


def build_ema(model: torch.nn.Module, decay: float) -> WarmupEMA | None:
    """EMA weights (decay warmed up as ``min(decay, (1 + n) / (10 + n))``); None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return WarmupEMA(model, decay)  # AveragedModel's values and state dict, without host syncs


def initialise_from(model: torch.nn.Module, path: str, fold: int, strict: bool = True) -> None:
    """Copy the tensors of a checkpoint (e.g. NoiseBERT pretraining) that fit, and log the rest.

    ``strict`` (``model.init_strict``): a checkpoint with a tensor of the model's name but another
    shape (pretrained with another preset), or with no tensor the model takes, raises instead of
    training almost from scratch. New tensors (the heads) and unused ones (a pretraining head)
    are expected and only logged. ``{fold}`` in ``path`` becomes the fold's number (one
    pretraining per fold, e.g. ``outputs/noisebert/strict-fold{fold}/best.pt``).
    """
    path = str(path).replace("{fold}", str(fold))
    report = load_matching_weights(model, repo_path(path))
    logger.info(
        "fold %d: initialised from %s: %d tensors loaded, %d new (%s), %d with another shape (%s), %d unused",
        fold, path, len(report["loaded"]), len(report["new"]), ", ".join(report["new"][:8]),
        len(report["mismatched"]), ", ".join(report["mismatched"][:8]), len(report["unused"]),
    )  # fmt: skip
    if strict and (report["mismatched"] or not report["loaded"]):
        raise ValueError(
            f"model.init_from={path}: {len(report['loaded'])} tensors fit the model, "
            f"{len(report['mismatched'])} have another shape ({', '.join(report['mismatched'][:5])}): "
            "the checkpoint was trained with other model settings (another preset or variant). "
            "Pretrain with the same model settings, or set model.init_strict=false to load only "
            "the tensors that fit."
        )


class FoldCheckpoints:
    """``fold{k}/last.pt`` (weights, optimizer, scheduler, :class:`FoldState`) and ``best.pt``."""

    def __init__(self, run: FoldRun, model, ema, optimizer, scheduler) -> None:
        self.run, self.model, self.ema, self.optimizer, self.scheduler = run, model, ema, optimizer, scheduler
        self.last_path, self.best_path = run.fold_dir / "last.pt", run.fold_dir / "best.pt"

    def resume(self) -> FoldState:
        """The saved state when resuming (weights, optimizer and scheduler restored), else a new one."""
        if not self.run.resuming:
            return FoldState()
        checkpoint = load_checkpoint(self.last_path, map_location=self.run.device)
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        logger.info("fold %d: resumed after epoch %d", self.run.fold, checkpoint["state"]["epoch"])
        return FoldState(**checkpoint["state"])

    def save(self, state: FoldState, improved: bool, score: float) -> None:
        """Rank 0 writes ``best.pt`` when improved, then ``last.pt`` when it is due: every
        ``trainer.checkpoint_every_epochs`` epochs (1 when the key is absent), after the last
        epoch, when training stops early, and before this process stops as asked
        (``trainer.interrupt_after_epochs``). A crash between two writes resumes from the older
        ``last.pt`` and repeats the epochs after it (each epoch's randomness is seeded by its index)."""
        if not self.run.context.is_main:
            return
        trainer_cfg = self.run.cfg.trainer
        every = int(trainer_cfg.get("checkpoint_every_epochs", 1) or 1)
        interrupt_after = trainer_cfg.get("interrupt_after_epochs")
        last_due = (
            every <= 1
            or state.epoch % every == 0
            or state.finished
            or state.epoch >= trainer_cfg.epochs
            or (interrupt_after is not None and self.run.epochs_this_process + 1 >= interrupt_after)
        )
        if not (improved or last_due):
            return
        weights = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        if improved:
            save_atomically({**weights, "epoch": state.epoch - 1, "score": score}, self.best_path)
        if not last_due:
            return
        save_atomically(
            {
                **weights,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": state.__dict__,
            },
            self.last_path,
        )

    def load_best(self) -> None:
        """The best weights into the evaluated model (the EMA when used)."""
        best = load_checkpoint(self.best_path, map_location=self.run.device)
        if self.ema is not None:
            self.ema.load_state_dict(best["ema"])
        else:
            self.model.load_state_dict(best["model"])


class EpochLosses:
    """The steps of an epoch with a progress bar, and the mean training loss over every rank.

    Losses stay on the device and are read every :data:`LOSS_READ_EVERY` steps (one host
    synchronisation, not one per step); a non-finite one stops every rank with
    :class:`NonFiniteLossError` naming the epoch and step.
    """

    def __init__(self, run: FoldRun, epoch: int, steps_per_epoch: int) -> None:
        self.run, self.epoch, self.steps_per_epoch = run, epoch, steps_per_epoch
        self.pending: list[torch.Tensor] = []
        self.loss_sum, self.n_seen = 0.0, 0
        self.progress = tqdm(
            range(steps_per_epoch),
            desc=f"fold {run.fold} epoch {epoch}",
            leave=False,
            disable=not run.context.is_main,
        )

    def steps(self) -> Iterator[int]:
        return iter(self.progress)

    def add(self, step: int, loss: torch.Tensor, batch_size: int) -> None:
        self.pending.append(loss.detach() * batch_size)
        self.n_seen += batch_size
        if (step + 1) % LOSS_READ_EVERY != 0 and step + 1 != self.steps_per_epoch:
            return
        read = torch.stack(self.pending).float().cpu()
        bad = torch.nonzero(~torch.isfinite(read)).flatten()
        error = None
        if len(bad):
            error = NonFiniteLossError(
                f"fold {self.run.fold}: the loss became {read[bad[0]].item()} at epoch {self.epoch}, "
                f"step {step + 1 - len(read) + int(bad[0])}; the last good checkpoint is kept in "
                f"{self.run.fold_dir / 'last.pt'}"
            )
        raise_if_any_rank_failed(error, self.run.context)
        self.loss_sum += float(read.sum())
        self.pending.clear()
        self.progress.set_postfix(loss=f"{self.loss_sum / self.n_seen:.4f}")

    def mean(self) -> float:
        """The epoch's mean loss per sequence over every rank."""
        context = self.run.context
        return sum(gather_objects(self.loss_sum, context)) / max(sum(gather_objects(self.n_seen, context)), 1)


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    tensors,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    cut: BatchCut | None = None,
) -> tuple[np.ndarray, float]:
    """(N, 18) gesture probabilities and the mean cross-entropy of ``tensors`` (features, mask,
    demographics, labels), in the order of ``tensors``.

    With a ``cut`` (``data.pad_to_batch``), the sequences are batched in length order and each
    batch is cut to its longest one (``codes/common/batching.py``); the models are mask-correct,
    so the probabilities are those of the padded batches up to float rounding."""
    model.eval()
    n_sequences = len(tensors)
    if cut is None:
        batches = (slice(start, start + batch_size) for start in range(0, n_sequences, batch_size))
    else:
        lengths = tensors.mask.sum(dim=1).numpy()
        batches = length_sorted_batches(lengths, batch_size)
    probabilities = np.zeros((n_sequences, len(GESTURES)), dtype=np.float32)
    losses = []
    for batch in batches:
        features, mask = tensors.features[batch], tensors.mask[batch]
        if cut is not None:
            features, mask = cut.cut_by_mask((features, mask), step_items=(0, 1))
        demographics = tensors.demographics[batch].to(device)
        labels = tensors.labels[batch].to(device)
        with autocast(device, dtype):
            outputs = model(features.to(device), mask.to(device), demographics)
        losses.append(float(F.cross_entropy(outputs["gesture_logits"].float(), labels, reduction="sum")))
        probabilities[batch] = outputs["gesture_logits"].float().softmax(-1).cpu().numpy()
    return probabilities, sum(losses) / max(n_sequences, 1)


def score_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The competition score and its two halves for argmax predictions."""
    names = np.array(GESTURES)
    y_true, y_pred = names[labels], names[probabilities.argmax(1)]
    return {
        "score": competition_score(y_true, y_pred),
        "binary_f1": binary_f1(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
    }


def _evaluate(run: FoldRun, evaluated: torch.nn.Module, valid) -> dict[str, Any]:
    batch_size = run.cfg.trainer.batch_size
    dtype = run.autocast_dtype
    cut = BatchCut.from_config(run.cfg)  # data.pad_to_batch
    probabilities, valid_loss = predict_probabilities(evaluated, valid, batch_size, run.device, dtype, cut)
    imu_probabilities, _ = predict_probabilities(
        evaluated, run.imu_only(valid), batch_size, run.device, dtype, cut
    )
    labels = valid.labels.numpy()
    return {
        "probabilities": probabilities,
        "imu_probabilities": imu_probabilities,
        "valid_loss": valid_loss,
        "score": score_probabilities(probabilities, labels)["score"],
        "imu_score": score_probabilities(imu_probabilities, labels)["score"],
    }


def end_epoch(
    run: FoldRun,
    state: FoldState,
    checkpoints: FoldCheckpoints,
    evaluated: torch.nn.Module,
    valid,
    train_loss: float,
    lr: float,
    started: float,
) -> None:
    """Evaluate, record, decide (rank 0, shared with every rank), save, and stop when asked to.

    Every rank evaluates, but rank 0's scores decide whether the epoch improved and whether
    training stops early (the ranks' EMA BatchNorm statistics may differ by rounding), so every
    rank takes the same path. Raises :class:`TrainingInterrupted` after
    ``trainer.interrupt_after_epochs`` epochs of this process.
    """
    trainer_cfg = run.cfg.trainer
    epoch = state.epoch
    evaluation = _evaluate(run, evaluated, valid)
    valid_loss, score, imu_score = broadcast_from_main(
        (evaluation["valid_loss"], evaluation["score"], evaluation["imu_score"]), run.context
    )
    state.train_seconds += time.perf_counter() - started
    state.history.append({
        "epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_score": score,
        "valid_score_imu_only": imu_score, "lr": lr,
    })  # fmt: skip
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_without_improvement = score, epoch, 0
    else:
        state.epochs_without_improvement += 1
    state.epoch = epoch + 1
    if state.epochs_without_improvement >= trainer_cfg.early_stopping_patience:
        state.finished = True
        logger.info("fold %d: early stop after epoch %d (best epoch %d)", run.fold, epoch, state.best_epoch)
    if state.epoch >= trainer_cfg.epochs:
        state.finished = True
    if run.context.is_main:
        logger.info(
            "fold %d epoch %d: train_loss %.4f valid_loss %.4f score %.4f imu_only %.4f%s (%.1f s)",
            run.fold, epoch, train_loss, valid_loss, score, imu_score, " *" if improved else "",
            time.perf_counter() - started,
        )  # fmt: skip
    checkpoints.save(state, improved, score)
    barrier(run.context)
    run.epochs_this_process += 1
    interrupt_after = trainer_cfg.interrupt_after_epochs
    if interrupt_after is not None and run.epochs_this_process >= interrupt_after and not state.finished:
        raise TrainingInterrupted(
            f"fold {run.fold}: stopped after {run.epochs_this_process} epoch(s) as asked "
            "(trainer.interrupt_after_epochs); continue with trainer.resume=true"
        )


def fold_predictions(
    run: FoldRun, state: FoldState, checkpoints: FoldCheckpoints, evaluated: torch.nn.Module, valid
) -> dict[str, Any]:
    """Out-of-fold probabilities of the best weights (EMA when used), with the fold's history."""
    checkpoints.load_best()
    evaluation = _evaluate(run, evaluated, valid)
    return {
        "probabilities": evaluation["probabilities"],
        "imu_probabilities": evaluation["imu_probabilities"],
        "history": state.history,
        "best_epoch": state.best_epoch,
        "train_seconds": state.train_seconds,
    }


# oof.parquet: prob_<gesture> with every sensor, prob_imu_only_<gesture> with the thermopile and ToF
# inputs off (the IMU-only score's probabilities; what a blend fits its IMU-only route on)
IMU_ONLY_PROBABILITY_PREFIX = "prob_imu_only_"


def write_outputs(
    run_dir: Path, table: SequenceTable, folds: np.ndarray, results: dict[int, dict], wall_seconds: float
) -> dict:
    """``oof.parquet`` (per sequence: fold, gesture, predictions, ``prob_<gesture>`` and
    ``prob_imu_only_<gesture>``), ``metrics.json`` and the plots; returns the metrics."""
    names = np.array(GESTURES)
    parts, per_fold = [], {}
    all_true, all_pred, all_imu = [], [], []
    for fold, result in sorted(results.items()):
        index = np.flatnonzero(folds == fold)
        true = names[table.labels[index]]
        pred = names[result["probabilities"].argmax(1)]
        imu_pred = names[result["imu_probabilities"].argmax(1)]
        all_true.append(true), all_pred.append(pred), all_imu.append(imu_pred)
        frame = pl.DataFrame({
            "sequence_id": table.sequence_ids[index], "fold": np.full(len(index), fold),
            "gesture": true, "predicted_gesture": pred, "predicted_gesture_imu_only": imu_pred,
        })  # fmt: skip
        probabilities = pl.DataFrame(result["probabilities"], schema=[f"prob_{g}" for g in GESTURES])
        imu_probabilities = pl.DataFrame(
            result["imu_probabilities"], schema=[f"{IMU_ONLY_PROBABILITY_PREFIX}{g}" for g in GESTURES]
        )
        parts.append(pl.concat([frame, probabilities, imu_probabilities], how="horizontal"))
        per_fold[fold] = {
            "score": competition_score(true, pred), "binary_f1": binary_f1(true, pred), "macro_f1": macro_f1(true, pred),
            "score_imu_only": competition_score(true, imu_pred), "best_epoch": result["best_epoch"],
            "train_seconds": result["train_seconds"], "epochs": len(result["history"]),
        }  # fmt: skip
    with atomic_path(run_dir / "oof.parquet") as temporary:
        pl.concat(parts).write_parquet(temporary)
    y_true, y_pred, y_imu = np.concatenate(all_true), np.concatenate(all_pred), np.concatenate(all_imu)
    metrics = {
        "overall": {
            "score": competition_score(y_true, y_pred), "binary_f1": binary_f1(y_true, y_pred),
            "macro_f1": macro_f1(y_true, y_pred), "score_imu_only": competition_score(y_true, y_imu),
            "n_sequences": len(y_true), "wall_seconds": wall_seconds,
        },
        "folds": {str(k): v for k, v in per_fold.items()},
        "history": {str(k): r["history"] for k, r in results.items()},
    }  # fmt: skip
    write_json_atomically(metrics, run_dir / "metrics.json")
    plot_fold_curves({k: r["history"] for k, r in results.items()}, run_dir / "curves.png")
    plot_confusion_matrix(y_true, y_pred, GESTURES, run_dir / "confusion_matrix.png")
    return metrics


TrainFold = Callable[[DictConfig, FoldRun, Any, Any], dict]
SplitFold = Callable[[SequenceTable, np.ndarray, int, int], tuple]


def seed_members(cfg: DictConfig, fold_dir: Path) -> list[tuple[DictConfig, Path]]:
    """(config, folder) of every model a fold trains: one at ``trainer.seed`` in ``fold{k}/``, or
    with ``trainer.seeds=[s0, s1, ...]`` one per seed: s0 in ``fold{k}/``, the others in
    ``fold{k}/seed{s}/`` (inference averages them with the folds, the OOF averages them)."""
    seeds = cfg.trainer.get("seeds")
    if not seeds:
        return [(cfg, fold_dir)]
    members = []
    for index, seed in enumerate(seeds):
        member_cfg = cfg.copy()
        member_cfg.trainer.seed = int(seed)
        members.append((member_cfg, fold_dir if index == 0 else fold_dir / f"seed{int(seed)}"))
    return members


def average_seed_members(members: list[dict]) -> dict:
    """One fold's result from its seeds' :func:`fold_predictions`: probabilities averaged, the
    first seed's history and best epoch, the training time summed."""
    if len(members) == 1:
        return members[0]
    return {
        "probabilities": np.mean([m["probabilities"] for m in members], axis=0),
        "imu_probabilities": np.mean([m["imu_probabilities"] for m in members], axis=0),
        "history": members[0]["history"],
        "best_epoch": members[0]["best_epoch"],
        "train_seconds": sum(m["train_seconds"] for m in members),
    }


POSITIVE_SETTINGS = ("trainer.epochs", "trainer.batch_size", "data.max_len")  # each a whole number >= 1


def check_run_settings(cfg: DictConfig) -> None:
    """Refuse, before a run folder is made, settings that would only fail later with an unclear
    error and leave a ``stopped`` run behind: :data:`POSITIVE_SETTINGS` below 1 (or not whole
    numbers) and ``data.folds=[]`` (:func:`~codes.common.folds.check_folds_setting`). A
    ``ValueError`` names the setting and what to do. Keys the config lacks are not checked."""
    for key in POSITIVE_SETTINGS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a whole number >= 1; set {key}=<n> with n >= 1")
    check_folds_setting(OmegaConf.select(cfg, "data.folds"))
    if OmegaConf.select(cfg, "data") is not None and OmegaConf.select(cfg, "machine") is not None:
        check_batching_settings(cfg)  # data.length_bucket, data.group_mega_batches


def run_kfold(
    cfg: DictConfig,
    train_fold: TrainFold,
    split_fold: SplitFold,
    settings: FeatureSettings,
    non_imu_columns: Callable[[SequenceTable], list[int]],
    overrides: Sequence[str] | None = None,
    keep_sensors: bool = False,
) -> dict | None:
    """The whole k-fold run of an experiment; returns the metrics on rank 0 (None elsewhere).

    ``split_fold(table, folds, fold, max_len)`` gives (train tensors, validation tensors,
    validation indices, fitted normalizer); ``train_fold(cfg, run, train, valid)`` trains a fold
    and returns :func:`fold_predictions`' dict. ``keep_sensors``: the table keeps its raw sensor
    rows (``SequenceTable.sensors``) for features computed per batch from augmented signals.
    """
    started = time.perf_counter()
    check_run_settings(cfg)
    apply_num_threads(cfg.machine.num_threads)
    context = init_distributed(cfg.machine.device, cfg.machine.distributed_timeout_s)
    try:
        with open_run_dir(cfg, context, overrides) as run_dir:
            return _run_folds(
                cfg,
                context,
                run_dir,
                started,
                train_fold,
                split_fold,
                settings,
                non_imu_columns,
                keep_sensors,
            )
    finally:
        shutdown_distributed(context)


def _run_folds(
    cfg: DictConfig,
    context: DistributedContext,
    run_dir: Path,
    started: float,
    train_fold: TrainFold,
    split_fold: SplitFold,
    settings: FeatureSettings,
    non_imu_columns: Callable[[SequenceTable], list[int]],
    keep_sensors: bool = False,
) -> dict | None:
    """The folds of a run in its (locked) folder, then the outputs."""
    setup_logging(run_dir / "train.log", context.is_main)
    logger.info("run folder %s, device %s, %d process(es)", run_dir, context.device, context.world_size)
    wandb_run = start_wandb(cfg, run_dir) if context.is_main and cfg.trainer.wandb else None

    data_dir_kwargs = {
        "source": cfg.data.source, "competition_dir": repo_path(cfg.paths.data_dir),
        "synthetic_dir": repo_path(cfg.paths.synthetic_dir), "synthetic_subjects": cfg.data.synthetic_subjects,
        "synthetic_seed": cfg.data.synthetic_seed,
    }  # fmt: skip
    table_kwargs = {"keep_sensors": keep_sensors, "check_units": bool(cfg.data.get("check_units", True))}
    if context.is_main:  # rank 0 generates the synthetic data and fills the cache first
        data_dir = resolve_data_dir(**data_dir_kwargs)
        table = load_sequence_table(data_dir, "train", settings, **table_kwargs)
    barrier(context)
    if not context.is_main:
        data_dir = resolve_data_dir(**data_dir_kwargs)
        table = load_sequence_table(data_dir, "train", settings, **table_kwargs)
    # the data files this run reads: recorded when it starts, checked when it resumes
    data_files = [path.name for path in split_files(data_dir, "train")] + [FOLD_FILE]
    run_on_main(lambda: begin_run(cfg, run_dir, data_dir, data_files), context)
    if context.is_main:  # per-subject gesture and pair counts, for subject-aware inference
        write_json_atomically(
            protocol_record(table.gestures, table.subjects, table.orientations), run_dir / PROTOCOL_FILE
        )
    # the data folder's own folds (folds.csv), if any
    folds, from_file = data_folds(
        data_dir, table.gestures, table.subjects, cfg.data.n_folds, cfg.data.fold_seed
    )
    source = f"data.n_folds={cfg.data.n_folds}, data.fold_seed={cfg.data.fold_seed}"
    if from_file:
        source = str(data_dir / FOLD_FILE)
        logger.info(
            "folds from %s: %d folds (data.n_folds and data.fold_seed are not used)",
            source,
            int(folds.max()) + 1,
        )
    selected = check_selected_folds(folds, cfg.data.folds, source)
    columns = non_imu_columns(table)

    results = {}
    for fold in selected:
        train, valid, _, normalizer = split_fold(table, folds, fold, cfg.data.max_len)
        fold_dir = run_dir / f"fold{fold}"
        if context.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(normalizer.state_dict(), fold_dir / "normalizer.json")
        members = []
        for member_cfg, member_dir in seed_members(cfg, fold_dir):
            if context.is_main:
                member_dir.mkdir(parents=True, exist_ok=True)
            run = FoldRun(
                cfg=member_cfg, fold=fold, fold_dir=member_dir, context=context, non_imu_columns=columns
            )
            members.append(train_fold(member_cfg, run, train, valid))
        results[fold] = average_seed_members(members)
        if wandb_run is not None:
            for row in results[fold]["history"]:
                wandb_run.log({f"fold{fold}/{k}": v for k, v in row.items()})
    metrics = None
    if context.is_main:
        metrics = write_outputs(run_dir, table, folds, results, time.perf_counter() - started)
        overall = metrics["overall"]
        logger.info(
            "CV score %.4f (binary F1 %.4f, macro F1 %.4f), IMU-only %.4f; outputs in %s",
            overall["score"], overall["binary_f1"], overall["macro_f1"], overall["score_imu_only"], run_dir,
        )  # fmt: skip
        if wandb_run is not None:
            wandb_run.summary.update(overall)
            wandb_run.finish()
    return metrics


def start_wandb(cfg: DictConfig, run_dir: Path):
    """A Weights & Biases run when the package is installed; never required."""
    try:
        import wandb
    except ImportError:
        logger.warning("trainer.wandb=true but wandb is not installed; logging locally only")
        return None
    return wandb.init(project="cmi-bfrb", name=f"{cfg.exp_name}/{run_dir.name}", dir=str(run_dir),
                      config=OmegaConf.to_container(cfg, resolve=True))  # fmt: skip
